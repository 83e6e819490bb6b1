"""Run one analysis over several checkpoints into one tidy table with a ``checkpoint`` column, and plot it.

A checkpoint spec is anything :func:`hiddenlens.load_model` takes (the embedded model, a local HF directory,
a directory saved by the project's own trainers, a hub id), optionally with ``@revision`` for a hub revision::

    from hiddenlens.analyses.checkpoints import over_checkpoints
    df = over_checkpoints(["runs/step1000", "runs/step2000"], lambda h: dynamics_summary(h, prompts))

Every sweep over checkpoints (this module's :func:`over_checkpoints` and the studies' ``--checkpoints`` runs) goes
through :func:`map_checkpoints`: serially, checkpoints are loaded one at a time and unloaded before the next, so
memory stays that of one model; with ``ray=ADDRESS`` (``--ray``) each checkpoint is one Ray task that loads it by
spec in its worker (a model is never pickled) and returns plain tables, merged in spec order, so the result is the
serial run's. Ray is imported only then (:mod:`hiddenlens.common.ray_cluster`).
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import pandas as pd
from tqdm.auto import tqdm

from hiddenlens.common.errors import UserError
from hiddenlens.probes.handle import load_model
from hiddenlens.probes.sites import block_of

T = TypeVar("T")


class RayWithoutCheckpointsError(UserError, ValueError):
    """``--ray`` (``ray=``) was given to a run that sweeps no checkpoints."""


class RayHandleError(UserError, ValueError):
    """A loaded model was passed to a run over Ray, whose workers load every checkpoint by spec."""


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


def checkpoint_labels(specs: Sequence[str], labels: Sequence[str] | None = None) -> list[str]:
    """``labels`` (default: :func:`checkpoint_label` of each spec), checked: one per spec, all different."""
    if not specs:
        raise ValueError("no checkpoints given")
    given = labels is not None
    labels = list(labels) if labels is not None else [checkpoint_label(s) for s in specs]
    if len(labels) != len(specs):
        raise ValueError(f"{len(labels)} labels for {len(specs)} checkpoints")
    if len(set(labels)) != len(labels):
        fix = "pass labels that differ" if given else "give checkpoints whose folder names (or name@rev) differ"
        raise ValueError(f"checkpoint labels must be unique, got {labels}; {fix}")
    return labels


def load_checkpoint(spec: str, load: Callable = load_model, **load_kwargs):
    """``load(name, revision=rev, **load_kwargs)`` for ``name@rev``, ``load(spec, **load_kwargs)`` otherwise."""
    name, rev = parse_checkpoint(spec)
    return load(name, revision=rev, **load_kwargs) if rev else load(name, **load_kwargs)


def check_ray_sweep(ray: str | None, n_checkpoints: int) -> None:
    """Raise unless ``ray`` is None or the run sweeps ``n_checkpoints`` >= 1 checkpoints beside its model."""
    if ray is not None and n_checkpoints < 1:
        raise RayWithoutCheckpointsError(f"--ray {ray} runs one Ray task per checkpoint, but no --checkpoints "
                                         "(checkpoints=) were given: add --checkpoints or drop --ray")


def map_checkpoints(fn: Callable[[str], T], specs: Sequence[str], ray: str | None = None, progress: bool = True,
                    num_cpus: float = 1, num_gpus: float = 0,
                    on_result: Callable[[int, T], None] | None = None) -> list[T]:
    """``[fn(spec) for spec in specs]``, serially or as one Ray task per spec; results in spec order.

    Args:
        fn: loads its checkpoint by spec, measures it and returns plain data (DataFrames, dicts, tensors), never a
            model. For ``ray`` it must pickle (a module-level function, or a ``functools.partial`` of one).
        specs: checkpoint specs (see the module docstring).
        ray: None (run here, one after another) or a Ray address: ``local`` | ``auto`` | a cluster address (see
            :func:`hiddenlens.common.ray_cluster.ray_session`). Relative paths are read from this process's
            working directory (every worker of a ``local`` cluster changes to it; a remote cluster needs the
            same paths on its nodes).
        progress: a bar over checkpoints in this process, advanced as each checkpoint (task) finishes.
        num_cpus, num_gpus: the Ray resources of one task (one model in memory per task).
        on_result: called here as ``on_result(index, result)`` as each checkpoint finishes (in finishing order).
    """
    specs = list(specs)
    if not specs:
        raise ValueError("no checkpoints given")
    bar = tqdm(total=len(specs), desc="checkpoints", unit="ckpt", disable=not progress or len(specs) < 2)
    with bar:
        if ray is None:
            return _serial(fn, specs, bar, on_result)
        return _on_ray(fn, specs, ray, bar, on_result, num_cpus, num_gpus)


def _serial(fn: Callable, specs: list[str], bar, on_result) -> list:
    out = []
    for i, spec in enumerate(specs):
        out.append(fn(spec))
        bar.update(1)
        if on_result is not None:
            on_result(i, out[-1])
    return out


def _in_folder(fn: Callable, cwd: str, spec: str):
    """A Ray task's body: ``fn(spec)`` run from the driver's working directory (when this node has it)."""
    if os.path.isdir(cwd):
        os.chdir(cwd)
    return fn(spec)


def _on_ray(fn: Callable, specs: list[str], address: str, bar, on_result, num_cpus: float, num_gpus: float) -> list:
    """Submit one task per spec, collect as they finish; a failed task cancels the rest and raises its error."""
    from hiddenlens.common.ray_cluster import ray_session

    with ray_session(address) as ray:
        task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(_in_folder)
        fn_ref = ray.put(fn)
        refs = [task.remote(fn_ref, os.getcwd(), spec) for spec in specs]
        index = {ref: i for i, ref in enumerate(refs)}
        out: list = [None] * len(specs)
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                i = index[done[0]]
                out[i] = ray.get(done[0])
                bar.update(1)
                if on_result is not None:
                    on_result(i, out[i])
        except ray.exceptions.RayTaskError as err:
            _cancel(ray, pending)
            cause = getattr(err, "cause", None)
            if isinstance(cause, BaseException):  # the worker's own error (its message names the input), not Ray's
                raise cause from err
            raise
        except BaseException:
            _cancel(ray, pending)
            raise
    return out


def _cancel(ray, refs: list) -> None:
    for ref in refs:
        ray.cancel(ref, force=True)


def stack_checkpoints(frames: Sequence[pd.DataFrame], labels: Sequence[str]) -> pd.DataFrame:
    """One table: each frame with its label in a first ``checkpoint`` column, concatenated in order."""
    for df in frames:
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"the analysis returned {type(df).__name__}; it must return a pandas DataFrame")
    out = pd.concat([df.assign(checkpoint=label) for df, label in zip(frames, labels)], ignore_index=True)
    return out[["checkpoint"] + [c for c in out.columns if c != "checkpoint"]]


def _load_and_apply(analysis: Callable, load: Callable, load_kwargs: dict, spec: str):
    """``analysis(handle)`` on the checkpoint ``spec``, unloaded afterwards."""
    handle = load_checkpoint(spec, load, **load_kwargs)
    try:
        return analysis(handle)
    finally:
        handle.unload()


def over_checkpoints(specs: Sequence[str], analysis: Callable, load: Callable | None = None,
                     labels: Sequence[str] | None = None, progress: bool = True, ray: str | None = None,
                     **load_kwargs) -> pd.DataFrame:
    """Apply ``analysis(handle) -> DataFrame`` to every checkpoint; concatenate with a ``checkpoint`` column.

    Args:
        specs: checkpoint specs (see module docstring), in the order they should appear.
        analysis: takes a loaded :class:`~hiddenlens.models.ModelHandle`, returns a tidy DataFrame.
        load: loader (default :func:`hiddenlens.load_model`); gets ``(spec, revision=..., **load_kwargs)``.
        labels: names for the ``checkpoint`` column (default :func:`checkpoint_label`); must be unique.
        ray: a Ray address (see :func:`map_checkpoints`): one task per checkpoint; ``analysis`` and ``load`` must
            then pickle (module-level functions).
    """
    labels = checkpoint_labels(specs, labels)
    fn = partial(_load_and_apply, analysis, load or load_model, load_kwargs)
    return stack_checkpoints(map_checkpoints(fn, specs, ray=ray, progress=progress), labels)


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
