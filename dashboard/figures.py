"""Plotly figure builders (pure functions of numpy arrays; no Streamlit, no model)."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from .highlight import FALSE_RGB, TRUE_RGB
from .lens import token_strings_from_text

STAT_LABELS = {"top_prob": "top-1 probability", "entropy": "entropy (nats)", "kl_final": "KL to final layer (nats)",
               "norm": "residual norm"}
_LAYOUT = dict(margin=dict(l=10, r=10, t=40, b=10), template="plotly_white")

# One meaning for true / false on every page (histograms here, token backgrounds in highlight.py use the same RGB).
TRUE_COLOUR = f"rgb{TRUE_RGB}"  # green
FALSE_COLOUR = f"rgb{FALSE_RGB}"  # red
TRUTH_COLOURS = {"true": TRUE_COLOUR, "false": FALSE_COLOUR}

# Colour / axis scales for heavy-tailed values (position-0 norms, KL of the embedding row).
SCALES = ("log", "clipped at p99", "linear")
LOG_DEFAULT_STATS = ("norm", "kl_final")


def default_scale(stat: str) -> str:
    """Log for norms and KL (heavy-tailed), linear for bounded stats (probability, entropy)."""
    return "log" if stat in LOG_DEFAULT_STATS else "linear"


def apply_scale(values, scale: str = "linear") -> tuple[np.ndarray, float | None, float | None, str]:
    """THE scale helper behind every heatmap colour and curve axis: returns ``(values to draw, lo, hi, label)``.

    ``log``: log10 of the values (non-positive values floored at the smallest positive one); ``clipped at p99``:
    values clipped to [min, 99th percentile]; ``linear``: unchanged. ``lo``/``hi`` are the range of the drawn values
    (None when nothing is finite); ``label`` names the scale for titles and colour bars."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    v = np.asarray(values, dtype=float)
    finite = v[np.isfinite(v)]
    if scale == "log":
        positive = finite[finite > 0]
        floor = float(positive.min()) if positive.size else 1e-12
        v = np.log10(np.where(np.isfinite(v), np.maximum(v, floor), np.nan))
        label = "log10"
    elif scale == "clipped at p99":
        if finite.size:
            v = np.clip(v, float(finite.min()), float(np.percentile(finite, 99)))
        label = "clipped at p99"
    else:
        label = "linear"
    drawn = v[np.isfinite(v)]
    lo, hi = (float(drawn.min()), float(drawn.max())) if drawn.size else (None, None)
    return v, lo, hi, label


def position_labels(tokens: list[str]) -> list[str]:
    """Unique axis labels ``"i:token"``, whitespace made visible."""
    return [f"{i}:{t}" for i, t in enumerate(token_strings_from_text(tokens))]


def lens_heatmap(view, stat: str = "entropy", max_cells_with_text: int = 1200, scale: str | None = None
                 ) -> go.Figure:
    """Layers (y, input at the bottom) x positions (x); colour = ``stat`` on ``scale`` (default: log for norms and
    KL, linear otherwise); top token in cells; top-k on hover."""
    scale = scale or default_scale(stat)
    raw = np.asarray(getattr(view, stat), dtype=float)
    z, lo, hi, label = apply_scale(raw, scale)
    show_text = raw.size <= max_cells_with_text
    name = STAT_LABELS.get(stat, stat)
    fig = go.Figure(go.Heatmap(
        z=z, x=position_labels(view.tokens), y=view.layers, colorscale="Viridis", zmin=lo, zmax=hi,
        text=view.top_token if show_text else None, texttemplate="%{text}" if show_text else None,
        customdata=np.dstack([np.asarray(view.topk, dtype=object), raw.astype(object)]),  # raw value on hover
        colorbar=dict(title=f"{name}<br>({label})"),
        hovertemplate="%{y} @ %{x}<br>" + name + " %{customdata[1]:.3f}<br>top-k:<br>%{customdata[0]}"
                      "<extra></extra>"))
    fig.update_layout(title=f"{view.lens} lens: {name} ({label} scale)", xaxis_title="position",
                      yaxis_title="layer", height=max(320, 22 * len(view.layers) + 120), **_LAYOUT)
    return fig


def layer_curves(curves: dict[str, np.ndarray], title: str, yaxis: str, x_labels: list[str] | None = None,
                 xaxis: str = "layer", scale: str | None = None) -> go.Figure:
    """One line per entry of ``curves`` (over layers by default). With ``scale`` (see :func:`apply_scale`, applied to
    all curves together) the y values are drawn on that scale, named in the title and the y axis."""
    fig = go.Figure()
    if scale is not None:
        names = list(curves)
        joined, lo, hi, label = apply_scale(np.concatenate([np.asarray(curves[k], dtype=float).ravel()
                                                            for k in names]) if names else np.zeros(0), scale)
        parts = np.split(joined, np.cumsum([len(curves[k]) for k in names])[:-1]) if names else []
        curves = dict(zip(names, parts))
        title, yaxis = f"{title} ({label} scale)", f"{yaxis} ({label})"
    for name, ys in curves.items():
        xs = x_labels or list(range(len(ys)))
        fig.add_trace(go.Scatter(x=xs, y=np.asarray(ys, dtype=float), mode="lines+markers", name=name))
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title=yaxis, height=320, **_LAYOUT)
    return fig


def rgb_scale(name: str) -> list[list]:
    """A plotly sequential colour scale (e.g. ``"Magma"``) as ``[[position, "rgb(r, g, b)"], ...]``. Streamlit's
    chart theme rewrites the hex colours ``#000001`` ... ``#000040`` of a figure (its placeholders for theme
    colours), and Magma starts at ``#000004``: passed by name, its darkest colour, the minimum, is drawn pink."""
    import plotly.colors

    colours = getattr(plotly.colors.sequential, name)
    return [[i / (len(colours) - 1), "rgb({}, {}, {})".format(*plotly.colors.hex_to_rgb(c))]
            for i, c in enumerate(colours)]


def head_grid(scores: np.ndarray, title: str, colorbar: str, selected: tuple[int, int] | None = None
              ) -> go.Figure:
    """A heatmap of ``scores`` ``[n_layers, n_heads]``: layer (y, integer axis, layer 0 at the bottom) x head
    (x, integer axis); the colour range is the data's own (``zmin`` / ``zmax`` = its finite min / max, so the
    colour bar has no band below the weakest head); ``selected`` = ``(layer, head)`` is outlined.

    Clicking a cell selects it: ``st.plotly_chart(..., on_select="rerun", selection_mode="points")`` returns its
    ``x`` = head and ``y`` = layer. Streamlit selects points of scatter traces only (a click on a heatmap is not a
    selection), so a transparent marker sits on every cell centre (trace 1) and takes the click and the hover;
    with ``hoverdistance=-1`` a click anywhere in a cell picks that cell's marker."""
    z = np.asarray(scores, dtype=float)
    n_layers, n_heads = z.shape
    finite = z[np.isfinite(z)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (None, None)
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    fig = go.Figure([
        go.Heatmap(z=z.tolist(), x=list(range(n_heads)), y=list(range(n_layers)), colorscale=rgb_scale("Magma"), zmin=lo,
                   zmax=hi, xgap=1, ygap=1, colorbar=dict(title=colorbar), hoverinfo="skip"),
        go.Scatter(x=head.ravel().tolist(), y=layer.ravel().tolist(), mode="markers", showlegend=False,
                   marker=dict(opacity=0, size=max(8, min(28, 520 // max(n_layers, n_heads)))),
                   customdata=[f"{v:.3f}" if np.isfinite(v) else "n/a" for v in z.ravel()],
                   hovertemplate="layer %{y}, head %{x}<br>" + colorbar + " %{customdata}<extra></extra>")])
    if selected is not None:
        fig.add_shape(type="rect", x0=selected[1] - 0.5, x1=selected[1] + 0.5, y0=selected[0] - 0.5,
                      y1=selected[0] + 0.5, line=dict(color="#00c2ff", width=3))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", height=max(300, 18 * n_layers + 140),
                      xaxis=dict(dtick=max(1, n_heads // 16), tick0=0, range=[-0.5, n_heads - 0.5], zeroline=False,
                                 showgrid=False),
                      yaxis=dict(dtick=max(1, n_layers // 16), tick0=0, range=[-0.5, n_layers - 0.5],
                                 zeroline=False, showgrid=False),
                      clickmode="event+select", hovermode="closest", hoverdistance=-1, showlegend=False, **_LAYOUT)
    return fig


def pattern_heatmap(pattern: np.ndarray, tokens: list[str], pooled: int, title: str) -> go.Figure:
    """One head's attention pattern (query y, key x); axis labels are tokens unless the map was pooled."""
    n = pattern.shape[-1]
    labels = position_labels(tokens) if pooled == 1 else [f"{i * pooled}-{i * pooled + pooled - 1}" for i in range(n)]
    fig = go.Figure(go.Heatmap(z=pattern.astype(np.float32), x=labels, y=labels, colorscale="Blues",
                               zmin=0, hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title + (f" (pooled x{pooled})" if pooled > 1 else ""), xaxis_title="key",
                      yaxis_title="query", yaxis_autorange="reversed", height=420, **_LAYOUT)
    return fig


def layer_position_heatmap(z: np.ndarray, tokens: list[str], layers: list[str], title: str, colorbar: str,
                           scale: str = "log") -> go.Figure:
    """A layer x position heatmap (e.g. residual norms) coloured on ``scale`` (see :func:`apply_scale`); the raw
    value is on hover."""
    raw = np.asarray(z, dtype=float)
    drawn, lo, hi, label = apply_scale(raw, scale)
    fig = go.Figure(go.Heatmap(z=drawn, x=position_labels(tokens), y=layers, zmin=lo, zmax=hi, customdata=raw,
                               colorscale="Cividis", colorbar=dict(title=f"{colorbar}<br>({label})"),
                               hovertemplate="%{y} @ %{x}<br>" + colorbar + " %{customdata:.3f}<extra></extra>"))
    fig.update_layout(title=f"{title} ({label} scale)", xaxis_title="position", yaxis_title="layer", height=360,
                      **_LAYOUT)
    return fig


def histogram(groups: dict[str, np.ndarray], title: str, xaxis: str) -> go.Figure:
    """Overlaid histograms, one per group (e.g. projections of true vs false statements)."""
    fig = go.Figure([go.Histogram(x=np.asarray(v, dtype=float), name=k, opacity=0.6,
                                  marker_color=TRUTH_COLOURS.get(str(k).lower()))
                     for k, v in groups.items()])
    fig.update_layout(barmode="overlay", title=title, xaxis_title=xaxis, yaxis_title="count", height=320, **_LAYOUT)
    return fig


def bar_ci(labels: list[str], values, lows, highs, title: str, yaxis: str, reference: float | None = None
           ) -> go.Figure:
    """Bars with asymmetric confidence intervals; ``reference`` draws a dashed line (e.g. chance = 0.5)."""
    v, lo, hi = (np.asarray(a, dtype=float) for a in (values, lows, highs))
    fig = go.Figure(go.Bar(x=list(labels), y=v, error_y=dict(type="data", symmetric=False, array=hi - v,
                                                               arrayminus=v - lo)))
    if reference is not None:
        fig.add_hline(y=reference, line_dash="dash", line_color="grey")
    fig.update_layout(title=title, yaxis_title=yaxis, height=320, **_LAYOUT)
    return fig


def grouped_bars(labels: list[str], groups: dict[str, np.ndarray], title: str, yaxis: str) -> go.Figure:
    """Side-by-side bars per label, one colour per group (e.g. before / after)."""
    fig = go.Figure([go.Bar(x=list(labels), y=np.asarray(v, dtype=float), name=k) for k, v in groups.items()])
    fig.update_layout(barmode="group", title=title, yaxis_title=yaxis, height=340, **_LAYOUT)
    return fig


def patching_heatmap(z: np.ndarray, x: list[str], y: list[str], title: str, xaxis: str,
                     max_cells_with_text: int = 600) -> go.Figure:
    """Layer (y, first layer at the bottom) x position or head (x) map of a normalised patching metric
    (0 = the corrupted run, 1 = the clean run) on a diverging scale centred at 0."""
    z = np.asarray(z, dtype=float)
    bound = max(1.0, float(np.nanmax(np.abs(z)))) if np.isfinite(z).any() else 1.0
    show_text = z.size <= max_cells_with_text
    fig = go.Figure(go.Heatmap(
        z=z.tolist(), x=list(x), y=list(y), colorscale="RdBu", zmin=-bound, zmax=bound,
        colorbar=dict(title="normalised<br>(0 corrupt, 1 clean)"),
        texttemplate="%{z:.2f}" if show_text else None,
        hovertemplate="%{y} @ %{x}<br>normalised %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title="layer", xaxis=dict(type="category"),
                      yaxis=dict(type="category"), height=max(320, 24 * len(y) + 140), **_LAYOUT)
    return fig


def dla_bars(labels: list[str], values, title: str, yaxis: str) -> go.Figure:
    """One bar per component (positive = toward the answer, blue; negative = red)."""
    v = np.asarray(values, dtype=float)
    fig = go.Figure(go.Bar(x=list(labels), y=v.tolist(), marker_color=np.where(v >= 0, "#2166ac", "#b2182b").tolist(),
                           hovertemplate="%{x}<br>%{y:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="component", yaxis_title=yaxis, xaxis=dict(type="category"),
                      height=340, **_LAYOUT)
    return fig


def patching_scatter(activation, attribution, labels: list[str], r: float, title: str) -> go.Figure:
    """Attribution (y) against activation patching (x) per cell, with the y = x line and Pearson r in the title."""
    a, b = np.asarray(activation, dtype=float), np.asarray(attribution, dtype=float)
    finite = np.concatenate([a[np.isfinite(a)], b[np.isfinite(b)], [0.0, 1.0]])
    lo, hi = float(finite.min()), float(finite.max())
    fig = go.Figure([
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dash", color="grey"), name="y = x",
                   hoverinfo="skip"),
        go.Scatter(x=a.tolist(), y=b.tolist(), mode="markers", text=list(labels), name="cells",
                   hovertemplate="%{text}<br>activation %{x:.3f}<br>attribution %{y:.3f}<extra></extra>")])
    fig.update_layout(title=f"{title} (Pearson r = {r:.3f})", xaxis_title="activation patching (normalised)",
                      yaxis_title="attribution patching (normalised)", height=380, showlegend=False, **_LAYOUT)
    return fig
