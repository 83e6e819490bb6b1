"""Latent iteration (Think-at-Hard): per-token decider scores over the prompt, the iterated tokens
highlighted, and where iteration fixed or broke the next-token prediction."""
import streamlit as st

from hiddenlens.dashboard import backend, figures, highlight, ui

st.header("Latent iteration")
key = ui.require_model()
prompt = ui.prompt()
st.caption("The prompt is read teacher-forced. A decider scores every position; positions above its threshold "
           "run again with a soft embedding of their own prediction fed back (duo-causal KV cache), and the "
           "logits add up. A *fix* is a wrong first prediction made right; a *break* the reverse.")
c1, c2, c3 = st.columns(3)
#: decider choices: entropy (training-free), this model's cached MLP decider (trained here on first use), a folder
DECIDERS = {"entropy": "entropy", "cached MLP": "trained MLP decider (cached; trains on first use)",
            "trained MLP": "MLP decider folder"}
kind = c1.radio("Decider", list(DECIDERS), format_func=DECIDERS.get, key="iter_kind",
                help="the MLP decider trained for this model is cached per model weights; the first use trains it "
                     "(48 prose chunks of 128 tokens, 8 epochs; a progress bar shows how far it is)")
decider, bar = "entropy", None
if kind == "trained MLP":
    decider = c1.text_input("Decider folder (decider.safetensors + decider.json)", key="iter_folder").strip()
    if not decider:
        st.info("Give the folder of a trained decider, or use the entropy decider.")
        st.stop()
elif kind == "cached MLP":
    decider = backend.CACHED
    if not backend.trained_here(key, "decider"):
        bar = st.progress(0.0, text="Training the MLP decider for this model (once; cached)")
threshold = c2.slider("Threshold (nats for entropy, probability for the MLP)", 0.0, 8.0 if kind == "entropy" else 1.0,
                      2.5 if kind == "entropy" else 0.5, key=f"iter_threshold_{kind.replace(' ', '_')}")
max_iter = c3.slider("Passes (max_iter)", 2, 4, 2, key="iter_max")
with ui.shown_errors("The iteration"):
    table, summary = backend.iteration(key, prompt, decider, float(threshold), int(max_iter), add_bos=ui.add_bos(),
                                       progress=bar and (lambda f, what: bar.progress(f, text=what)))
    if bar is not None:
        bar.empty()
    row = summary.iloc[0]
    m = st.columns(5)
    m[0].metric("Tokens iterated", f"{row['share_iterated']:.0%}")
    m[1].metric("Accuracy first pass", f"{row['acc_first']:.0%}")
    m[2].metric("Accuracy after", f"{row['acc_final']:.0%}")
    m[3].metric("Fixes", int(table["fixed"].sum()))
    m[4].metric("Breaks", int(table["broken"].sum()))
    scores = table["score"].to_numpy(dtype=float)
    span = max(float(scores.max() - scores.min()), 1e-9)
    st.markdown("**Decider score per token** (darker green = higher score; iterated tokens underlined)")
    st.html(highlight.coloured_tokens(table["token"].tolist(),
                                      (0.5 + 0.5 * (scores - scores.min()) / span).tolist(),
                                      (table["depth"] > 0).tolist(), "decider score (scaled)"))
    st.plotly_chart(figures.layer_curves({"decider score": scores}, "Decider score per position", "score",
                                         figures.position_labels(table["token"].tolist()), xaxis="position")
                    .add_hline(y=threshold, line_dash="dash", line_color="grey"), key="iter_scores")
    changed = table[table["fixed"] | table["broken"]]
    st.markdown(f"**Fixes and breaks** ({len(changed)})")
    if len(changed):
        ui.table(changed[["position", "token", "target", "pred_first", "pred_final", "depth", "score", "fixed",
                          "broken"]], "iteration_fixes_and_breaks", "iter_csv")
    else:
        st.write("Iteration changed no prediction on this prompt.")
