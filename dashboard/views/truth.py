"""Truthful directions: probe AUROC per layer and per head, projection histograms, and steered vs plain generation
side by side with per-token truth scores coloured inline."""
import html
import os
from pathlib import Path

import pandas as pd
import streamlit as st

from hiddenlens.dashboard import attention, backend, figures, highlight, modelstore, ui


def detector_tokens(df: pd.DataFrame) -> str:
    """The tokens of ``df`` (``steer_compare``'s) as escaped HTML: coloured by p_true where the detector means
    something (``statement_end``), uncoloured elsewhere; generated tokens underlined."""
    spans = []
    for tok, p, generated, end in zip(df["token"], df["p_true"], df["generated"], df["statement_end"]):
        style = "border-radius:3px;padding:1px 0;white-space:pre-wrap"
        if end:
            style = f"background:{highlight.colour(p)};{style}"
        if generated:
            style += ";text-decoration:underline;text-decoration-thickness:2px"
        title = f"p_true {float(p):.3f}" if end else "not scored: the detector was fitted on a statement's final '.'"
        spans.append(f'<span title="{title}" style="{style}">{html.escape(tok)}</span>')
    return '<div style="font-family:monospace;line-height:1.9">' + "".join(spans) + "</div>"


def folder_signature(source: tuple) -> tuple:
    """``(name, mtime, size)`` of every file of a loaded run folder (links not followed; ``()`` for a live fit or
    an unreadable folder): the cached directions and figures below are read again when it changes."""
    if source[0] != "run":
        return ()
    try:
        entries = list(os.scandir(Path(source[1]).expanduser()))
        return tuple(sorted((e.name, e.stat(follow_symlinks=False).st_mtime_ns, e.stat(follow_symlinks=False).st_size)
                            for e in entries))
    except OSError:
        return ()


@st.cache_resource(max_entries=8, show_spinner=False)
def opened_directions(key, source: tuple, signature: tuple):
    """``backend.truth_source`` kept while the run folder's ``signature`` holds (a rerun does not read it again)."""
    return backend.truth_source(key, source)


st.header("Truthful directions")
key = ui.require_model()
prompt = ui.prompt()
c1, c2, c3 = st.columns([2, 2, 1])
source_kind = c1.radio("Directions", ["Load a run", "Fit live"], horizontal=True, key="truth_source")
if source_kind == "Fit live":
    family = c2.selectbox("Statement family", ["capitals", "negations", "arithmetic", "comparisons"],
                          key="truth_family")
    k_heads = c3.number_input("ITI heads", 0, 32, 8, key="truth_heads")
    source = ("fit", family, int(k_heads))
    if not st.toggle("Fit now (a forward pass over every statement; minutes on a CPU for larger models)",
                     key="truth_fit_now"):
        st.stop()
else:
    path = c2.text_input("Report folder of `hiddenlens truth directions`", key="truth_path",
                         placeholder=f"{modelstore.runs_dir()}/truth")
    if not path.strip():
        st.info("Give a report folder, or fit the directions live.")
        st.stop()
    source = ("run", path)
try:
    signature = folder_signature(source)
    view = opened_directions(key, source, signature)
except Exception as exc:  # noqa: BLE001 - a bad folder or a failed fit is a message on the page
    st.error(f"Cannot get truthful directions: {ui.error_text(exc)}")
    st.stop()



@st.cache_resource(max_entries=8, show_spinner=False)
def direction_figures(key, source: tuple, signature: tuple, _view) -> dict:
    """The figures of the directions ``_view`` (opened from ``source`` on model ``key``), built once: no steering
    control changes them, and building them is a good part of a rerun."""
    curves = {m: g.sort_values("layer")["auroc"].to_numpy() for m, g in _view.layers.groupby("method", sort=False)}
    layer_labels = [f"L{int(x)}" for x in sorted(_view.layers["layer"].unique())]
    out = {"truth_auroc": figures.layer_curves(curves, "Held-out AUROC per layer", "AUROC", layer_labels)}
    if _view.projections is not None:
        groups = {("true" if lab == 1 else "false"): g["projection"].to_numpy()
                  for lab, g in _view.projections.groupby("label")}
        groups = {k: groups[k] for k in ("false", "true") if k in groups}  # colours: figures.TRUTH_COLOURS
        out["truth_hist"] = figures.histogram(groups, f"Held-out projections at layer {_view.best_layer}",
                                              "projection on the direction")
    if _view.heads is not None and len(_view.heads):
        out["truth_heads_grid"] = figures.head_grid(attention.head_grid(_view.heads, "val_accuracy"),
                                                    "Per-head probe accuracy (attn.z, validation)", "accuracy")
    return out


figs = direction_figures(key, source, signature, view)
left, right = st.columns(2)
for where, name in ((left, "truth_auroc"), (right, "truth_hist"), (st, "truth_heads_grid")):
    if name in figs:
        where.plotly_chart(figs[name], key=name)

st.subheader("Steering: plain vs steered")
if not view.directions:
    st.warning("This run holds no directions to steer with.")
    st.stop()
c1, c2, c3, c4 = st.columns(4)
method = c1.selectbox("Direction", list(view.directions), key="truth_method",
                      format_func=lambda m: view.directions[m].name)
alpha = c2.slider("alpha (multiples of sigma)", -20.0, 20.0, 5.0, 0.5, key="truth_alpha")
mode = c3.selectbox("Positions", ["generated", "all", "prompt"], key="truth_mode")
new_tokens = c4.slider("New tokens", 4, 64, 16, key="truth_tokens")
add_bos = ui.add_bos()
fitted_bos = backend.tokenizer_adds_bos(key)
with ui.shown_errors("Steered generation"):
    bar = st.empty()
    cols = st.columns(2)
    for col, name in zip(cols, ("plain", "steered")):
        col.markdown(f"**{name.capitalize()}**" + (f" (alpha = {alpha:g})" if name == "steered" else ""))
    slots = {name: col.empty() for col, name in zip(cols, ("plain", "steered"))}
    runs = backend.steer_compare(
        key, prompt, source, method, float(alpha), mode, int(new_tokens), add_bos,
        progress=lambda done, stage: bar.progress(min(max(done, 0.0), 1.0), text=stage),
        stream=lambda name, text: slots[name].code(prompt + text, language=None, wrap_lines=True))
    bar.empty()
    for col, name in zip(cols, ("plain", "steered")):
        df = runs[name]
        slots[name].html(detector_tokens(df))
        ends = df[df["generated"] & df["statement_end"]]
        col.metric(f"p_true at the new statement ends ({name})",
                   f"{ends['p_true'].mean():.3f}" if len(ends) else "n/a (no '.' generated)")
    st.caption("Colour: the direction's detector p_true (red = false, green = true, as in the histogram above), shown "
               "only on tokens that end with '.': the detector was fitted on the final '.' of statements, so on other "
               "tokens its score means nothing and is not shown. Generated tokens are underlined; hover a coloured "
               "token for its score. The directions were fitted on statements tokenized "
               f"{'with' if fitted_bos else 'without'} BOS (this tokenizer's default); \"Prepend BOS\" is "
               f"{'on' if add_bos else 'off'}"
               + (", so the detector reads a tokenization it was not fitted on." if add_bos != fitted_bos else
                  ", as when fitted."))
    st.dataframe(pd.DataFrame({"plain": [runs["plain"]["token"].str.cat()],
                               "steered": [runs["steered"]["token"].str.cat()]}), hide_index=True)
    ui.save_view(key, "steering", {"source": list(source), "direction": method, "alpha": float(alpha), "mode": mode,
                                   "new_tokens": int(new_tokens), "add_bos": add_bos},
                 {"plain": runs["plain"], "steered": runs["steered"]}, button_key="truth_save")
