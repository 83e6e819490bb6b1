"""Figures for the attention-sink analyses: matplotlib for reports, plotly for the dashboard.

Inputs are the tables of :mod:`hiddenlens.analyses.sinks` (``SinkAnalysis.heads`` / ``.layers``) and the training
histories of :mod:`hiddenlens.models.bb_training` (metrics: :mod:`hiddenlens.analyses.bb_metrics`); nothing here
runs a model.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def _grid(heads: pd.DataFrame, value: str) -> np.ndarray:
    """``heads`` table -> ``[layers, heads]`` array of ``value`` (rows ordered by layer)."""
    return heads.pivot(index="layer", columns="head", values=value).sort_index().to_numpy(dtype=float)


def sink_map_figure(by_domain: dict[str, pd.DataFrame], value: str = "dormancy"):
    """Layer x head heatmaps of ``value`` per domain, plus their difference when there are two domains."""
    import matplotlib.pyplot as plt  # heavy optional dependency: imported on use

    names = list(by_domain)
    grids = [_grid(by_domain[n], value) for n in names]
    panels = grids + ([grids[0] - grids[1]] if len(grids) == 2 else [])
    titles = [f"{value}: {n}" for n in names] + ([f"{names[0]} - {names[1]}"] if len(grids) == 2 else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 0.18 * grids[0].shape[0] + 2),
                             squeeze=False)
    for ax, grid, title, diff in zip(axes[0], panels, titles, [False] * len(grids) + [True]):
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="RdBu_r" if diff else "viridis",
                       vmin=-1 if diff else 0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    return fig


def norm_profile_figure(by_domain: dict[str, tuple[pd.DataFrame, pd.DataFrame]]):
    """Across layers: residual norm of position 0 over the max / mean of the others, and the median value-norm
    ratio of position 0 over the rest. ``by_domain``: name -> (layers table, heads table)."""
    import matplotlib.pyplot as plt  # heavy optional dependency: imported on use

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, (layers, _) in by_domain.items():
        ax1.plot(layers.layer, layers.resid_ratio_max, marker=".", label=f"{name}: / max other")
        ax1.plot(layers.layer, layers.resid_ratio_mean, ls="--", label=f"{name}: / mean other")
        ax2.plot(layers.layer, layers.value_ratio_median, marker=".", label=name)
    ax1.set_yscale("log")
    ax1.axhline(1, color="grey", lw=0.5)
    ax1.set(xlabel="layer (block output)", ylabel="||res_0|| ratio", title="residual-state peak")
    ax2.axhline(1, color="grey", lw=0.5)
    ax2.set(xlabel="layer", ylabel="||W_O v_0|| / mean others (median head)", title="value-state drain")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def sink_map_plotly(heads: pd.DataFrame, value: str = "dormancy", title: str | None = None):
    """A clickable plotly layer x head heatmap of ``value`` (hover shows the sink metrics of the head)."""
    import plotly.graph_objects as go  # heavy optional dependency: imported on use

    grid = _grid(heads, value)
    extra = ["sink_first", "other_token", "value_ratio", "logit_gap"]
    custom = np.stack([heads.pivot(index="layer", columns="head", values=c).sort_index().to_numpy(dtype=object)
                       for c in extra], axis=-1)
    fig = go.Figure(go.Heatmap(
        z=grid, x=sorted(heads["head"].unique()), y=sorted(heads["layer"].unique()), colorscale="Viridis",
        customdata=custom, zmin=0, zmax=1 if value in ("dormancy", "sink_first") else None,
        hovertemplate=("layer %{y} head %{x}<br>" + value + " %{z:.3f}<br>sink mass %{customdata[0]:.3f}"
                       "<br>top other key %{customdata[1]}<br>value ratio %{customdata[2]:.2f}"
                       "<br>logit gap %{customdata[3]:.2f}<extra></extra>")))
    fig.update_layout(title=title or f"{value} per head", xaxis_title="head", yaxis_title="layer")
    return fig


def head_pattern_plotly(tokens: list[str], pattern: np.ndarray, title: str = ""):
    """A plotly heatmap of one head's pattern (rows = queries, columns = keys)."""
    import plotly.graph_objects as go  # heavy optional dependency: imported on use

    labels = [f"{i}:{t!r}" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=pattern, x=labels, y=labels, colorscale="Blues", zmin=0))
    fig.update_layout(title=title, xaxis_title="key", yaxis_title="query", yaxis_autorange="reversed")
    return fig


BB_METRICS = (("bos_attn_nontrigger", "BOS attention, non-trigger queries"),
              ("bos_attn_trigger", "BOS attention, trigger queries"),
              ("copy_attn_trigger", "copy-source attention, trigger queries"),
              ("value_norm_ratio", "||W_O v_BOS|| / others"),
              ("resid_ratio_mean", "||res_BOS|| / mean others"))


def bb_curves_figure(history: pd.DataFrame, layer: int = 0):
    """Metric curves over training for each BB variant: mean over seeds, min-max band.

    ``history``: rows ``[variant, seed, step, L{layer}_<metric>..., trigger_loss, nontrigger_loss,
    bigram_optimum]``. Variants without that layer are skipped for its metrics.
    """
    import matplotlib.pyplot as plt  # heavy optional dependency: imported on use

    panels = [(f"L{layer}_{m}", t) for m, t in BB_METRICS] + [("trigger_loss", "trigger loss"),
                                                               ("excess_loss", "non-trigger loss - bigram optimum")]
    h = history.assign(excess_loss=history.nontrigger_loss - history.bigram_optimum)
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5))
    for ax, (col, title) in zip(axes.flat, panels):
        for variant, g in h.groupby("variant", sort=False):
            if col not in g or g[col].isna().all():
                continue
            s = g.groupby("step")[col]
            ax.plot(s.mean().index, s.mean().values, label=variant)
            ax.fill_between(s.mean().index, s.min().values, s.max().values, alpha=0.2)
        ax.set_title(title.replace("BOS", f"L{layer} BOS") if col.startswith("L") else title, fontsize=9)
        ax.set_xlabel("step")
        if col in ("trigger_loss", "excess_loss", f"L{layer}_resid_ratio_mean"):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
