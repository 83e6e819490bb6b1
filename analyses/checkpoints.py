"""Run one analysis over several checkpoints into one tidy table with a ``checkpoint`` column, and plot it.

A checkpoint spec is anything :func:`hiddenlens.load_model` takes (the embedded model, a local HF directory,
a directory saved by the project's own trainers, a hub id), optionally with ``@revision`` for a hub revision::

    from hiddenlens.analyses.checkpoints import over_checkpoints
    df = over_checkpoints(["runs/step1000", "runs/step2000"], lambda h: dynamics_summary(h, prompts))

Checkpoints are loaded one at a time and unloaded before the next, so memory stays that of one model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
from tqdm.auto import tqdm

from hiddenlens.probes.handle import load_model
from hiddenlens.probes.sites import block_of


def parse_checkpoint(spec: str) -> tuple[str, str | None]:
    """``"id@rev"`` -> ``("id", "rev")``; a plain spec or an existing path -> ``(spec, None)``."""
    if "@" in spec and not Path(spec).exists():
        name, rev = spec.rsplit("@", 1)
        if not name or not rev:
            raise ValueError(f"checkpoint {spec!r}: write MODEL@REVISION with both parts non-empty")
        return name, rev
    return spec, None


def checkpoint_label(spec: str) -> str:
    """A short label: the folder name for paths, ``name@rev`` for hub revisions."""
    name, rev = parse_checkpoint(spec)
    label = Path(name).name if Path(name).exists() else name
    return f"{label}@{rev}" if rev else label


def over_checkpoints(specs: Sequence[str], analysis: Callable, load: Callable | None = None,
                     labels: Sequence[str] | None = None, progress: bool = True, **load_kwargs) -> pd.DataFrame:
    """Apply ``analysis(handle) -> DataFrame`` to every checkpoint; concatenate with a ``checkpoint`` column.

    Args:
        specs: checkpoint specs (see module docstring), in the order they should appear.
        analysis: takes a loaded :class:`~hiddenlens.models.ModelHandle`, returns a tidy DataFrame.
        load: loader (default :func:`hiddenlens.load_model`); gets ``(spec, revision=..., **load_kwargs)``.
        labels: names for the ``checkpoint`` column (default :func:`checkpoint_label`); must be unique.
    """
    if not specs:
        raise ValueError("no checkpoints given")
    labels = list(labels) if labels is not None else [checkpoint_label(s) for s in specs]
    if len(labels) != len(specs):
        raise ValueError(f"{len(labels)} labels for {len(specs)} checkpoints")
    if len(set(labels)) != len(labels):
        raise ValueError(f"checkpoint labels must be unique, got {labels}; pass labels=[...]")
    if load is None:
        load = load_model
    frames = []
    for spec, label in tqdm(list(zip(specs, labels)), desc="checkpoints", disable=not progress or len(specs) < 2):
        name, rev = parse_checkpoint(spec)
        handle = load(name, revision=rev, **load_kwargs) if rev else load(name, **load_kwargs)
        try:
            df = analysis(handle)
        finally:
            handle.unload()
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"the analysis returned {type(df).__name__}; it must return a pandas DataFrame")
        frames.append(df.assign(checkpoint=label))
    out = pd.concat(frames, ignore_index=True)
    return out[["checkpoint"] + [c for c in out.columns if c != "checkpoint"]]


def plot_over_checkpoints(df: pd.DataFrame, x: str, ys: Sequence[str], title: str = "", hue: str = "checkpoint"):
    """One panel per column in ``ys``, one line per value of ``hue`` (default: per checkpoint) against ``x``.

    For per-depth tables use ``x="site"`` (drawn in the table's order, labelled ``embed`` / block index); for one
    row per checkpoint use ``x="checkpoint"`` and another ``hue`` (e.g. ``"regime"``). Returns a matplotlib
    figure."""
    import matplotlib  # heavy optional dependency: imported on use

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    missing = [c for c in [x, hue, *ys] if c not in df.columns]
    if missing:
        raise KeyError(f"columns {missing} not in the table (has {list(df.columns)})")
    fig, axes = plt.subplots(1, len(ys), figsize=(4 * len(ys), 3.2), squeeze=False)
    for ax, y in zip(axes[0], ys):
        for label, part in df.groupby(hue, sort=False):
            xs = part[x] if x != "site" else [s if block_of(s) is None else str(block_of(s)) for s in part[x]]
            ax.plot(xs, part[y], marker=".", label=str(label))
        ax.set_xlabel("block (site)" if x == "site" else x)
        if x == "site":
            ax.tick_params(axis="x", labelsize=6, rotation=90)
        ax.set_title(y)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
