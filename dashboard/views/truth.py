"""Truthful directions: probe AUROC per layer and per head, projection histograms, and steered vs plain generation
side by side with per-token truth scores coloured inline."""
import pandas as pd
import streamlit as st

from hiddenlens.dashboard import attention, backend, figures, highlight, modelstore, ui

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
    view = backend.truth_source(key, source)
except Exception as exc:  # noqa: BLE001 - a bad folder or a failed fit is a message on the page
    st.error(f"Cannot get truthful directions: {ui.error_text(exc)}")
    st.stop()

left, right = st.columns(2)
curves = {m: g.sort_values("layer")["auroc"].to_numpy() for m, g in view.layers.groupby("method", sort=False)}
layer_labels = [f"L{int(x)}" for x in sorted(view.layers["layer"].unique())]
left.plotly_chart(figures.layer_curves(curves, "Held-out AUROC per layer", "AUROC", layer_labels), key="truth_auroc")
if view.projections is not None:
    groups = {("true" if lab == 1 else "false"): g["projection"].to_numpy()
              for lab, g in view.projections.groupby("label")}
    groups = {k: groups[k] for k in ("false", "true") if k in groups}  # colours: figures.TRUTH_COLOURS
    right.plotly_chart(figures.histogram(groups, f"Held-out projections at layer {view.best_layer}",
                                         "projection on the direction"), key="truth_hist")
if view.heads is not None and len(view.heads):
    st.plotly_chart(figures.head_grid(attention.head_grid(view.heads, "val_accuracy"),
                                      "Per-head probe accuracy (attn.z, validation)", "accuracy"),
                    key="truth_heads_grid")

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
with ui.shown_errors("Steered generation"):
    runs = backend.steer_compare(key, prompt, source, method, float(alpha), mode, int(new_tokens))
    cols = st.columns(2)
    for col, name in zip(cols, ("plain", "steered")):
        df = runs[name]
        col.markdown(f"**{name.capitalize()}**" + (f" (alpha = {alpha:g})" if name == "steered" else ""))
        col.html(highlight.coloured_tokens(df["token"].tolist(), df["p_true"].tolist(), df["generated"].tolist(),
                                           "p_true"))
        gen = df[df["generated"]]
        col.metric(f"Mean p_true of the new tokens ({name})", f"{gen['p_true'].mean():.3f}" if len(gen) else "n/a")
    st.caption("Colour: the direction's detector p_true per token (red = false, green = true, as in the histogram "
               "above); generated tokens are "
               "underlined. Hover a token for its score.")
    st.dataframe(pd.DataFrame({"plain": [runs["plain"]["token"].str.cat()],
                               "steered": [runs["steered"]["token"].str.cat()]}), hide_index=True)
