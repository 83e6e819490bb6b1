"""Latent dynamics: lens heatmap over layers x positions, entropy / KL curves, residual norm trajectories."""
import streamlit as st

from hiddenlens.dashboard import backend, figures, ui

st.header("Latent dynamics")
key = ui.require_model()
prompt = ui.prompt()
c1, c2, c3, c4 = st.columns(4)
#: lens choices: the logit lens, this model's cached tuned lens (trained here on first use), a lens file
LENSES = {"logit": "logit lens", "cached": "tuned lens trained for this model (cached; trains on first use)",
          "tuned": "tuned lens from a file"}
kind = c1.radio("Lens", list(LENSES), format_func=LENSES.get, key="dyn_lens",
                help="the tuned lens trained for this model is cached per model weights; the first use trains it "
                     "(closed form + 8 KL steps: 17 min measured for the embedded model on 2 CPU cores shared with "
                     "four other jobs, seconds for the tiny models)")
stat = c2.selectbox("Colour", list(figures.STAT_LABELS), format_func=figures.STAT_LABELS.get, key="dyn_stat")
max_positions = c3.slider("Last positions shown", 4, 96, 32, key="dyn_positions")
top_k = c4.slider("Top-k on hover", 1, 10, 5, key="dyn_topk")
tuned_path, bar = "", None
if kind == "tuned":
    tuned_path = st.text_input("Tuned lens file (.safetensors, written by TunedLens.save)", key="dyn_tuned_path")
    if not tuned_path.strip():
        st.info("Give the path of a trained tuned lens; the logit lens is shown meanwhile.")
elif kind == "cached":
    tuned_path = backend.CACHED
    if backend.trained_here(key, "lens"):
        st.caption("Tuned lens trained for this model (cached; `hiddenlens train-lens` retrains it).")
    else:
        bar = st.progress(0.0, text="Training the tuned lens for this model (once; cached)")
c1, c2, c3 = st.columns(3)
# per-stat key: each colour stat keeps its own scale (log by default for norms and KL, linear otherwise)
heat_scale = c1.radio("Heatmap colour scale", figures.SCALES, index=figures.SCALES.index(figures.default_scale(stat)),
                      horizontal=True, key=f"dyn_scale_{stat}",
                      help="log10, or linear clipped at the 99th percentile: an outlier (position 0, the embedding "
                           "row) no longer flattens the rest")
curve_scale = c2.radio("Entropy / KL curves scale", figures.SCALES, horizontal=True, key="dyn_curve_scale")
norm_scale = c3.radio("Residual norm colour scale", figures.SCALES, horizontal=True, key="dyn_norm_scale")
with ui.shown_errors("The lens"):
    view = backend.lens_view(key, prompt, tuned_path=tuned_path.strip(), max_positions=max_positions, top_k=top_k,
                             add_bos=ui.add_bos(), progress=bar and (lambda f, what: bar.progress(f, text=what)))
    if bar is not None:
        bar.empty()
    st.plotly_chart(figures.lens_heatmap(view, stat, scale=heat_scale), key="dyn_heatmap")
    left, right = st.columns(2)
    left.plotly_chart(figures.layer_curves({"entropy": view.curve("entropy"), "KL to final": view.curve("kl_final")},
                                           "Mean over positions", "nats", view.layers, scale=curve_scale),
                      key="dyn_curves")
    right.plotly_chart(figures.layer_position_heatmap(view.norm, view.tokens, view.layers,
                                                      "Residual norm trajectories", "L2 norm", scale=norm_scale),
                       key="dyn_norms")
    final = view.top_token[-1, -1]
    first = view.layers[int((view.top_token[:, -1] == final).argmax())]
    st.markdown(f"Next-token prediction at the last position: **{final}** (p = {view.top_prob[-1, -1]:.3f}); "
                f"the {view.lens} lens first agrees with it at **{first}**.")
