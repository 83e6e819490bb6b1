"""Compare and patch: a clean and a corrupted prompt, their logit differences, the activation-patching map
(layer x position of the residual stream, or layer x head), direct logit attribution of the clean prompt, and
attribution patching against activation patching."""
import numpy as np
import streamlit as st

from hiddenlens.dashboard import backend, figures, ui

DEFAULTS = {"patch_clean": "The Eiffel Tower is in the city of", "patch_corrupted": "The Colosseum is in the city of",
            "patch_answer": " Paris", "patch_wrong": " Rome"}
SITE_LABELS = {"resid_post": "residual stream (resid_post): layer x position",
               "attn.z": "attention heads (attn.z): layer x head"}


st.header("Compare and patch")
key = ui.require_model()
st.caption("Activation patching copies one run's activation into the other, one cell at a time, and reads the logit "
           "difference `logit(answer) - logit(wrong)` at the last position. **denoise** patches clean into the "
           "corrupted run (what restores the clean answer?), **noise** patches corrupted into the clean run (what "
           "breaks it?). The map is normalised: 0 = the corrupted run, 1 = the clean run. The two prompts must have "
           "the same number of tokens and the answers must be single tokens (mind the leading space).")
c1, c2 = st.columns(2)
clean = c1.text_input("Clean prompt", value=DEFAULTS["patch_clean"], key="patch_clean",
                      max_chars=backend.MAX_PROMPT_CHARS)
corrupted = c2.text_input("Corrupted prompt", value=DEFAULTS["patch_corrupted"], key="patch_corrupted",
                          max_chars=backend.MAX_PROMPT_CHARS)
c1, c2, c3, c4 = st.columns(4)
answer = c1.text_input("Answer (clean)", value=DEFAULTS["patch_answer"], key="patch_answer",
                       help="the clean prompt's answer, one token (e.g. ' Paris' with its leading space)")
wrong = c2.text_input("Wrong (corrupted)", value=DEFAULTS["patch_wrong"], key="patch_wrong",
                      help="the corrupted prompt's answer, one token")
direction = c3.selectbox("Direction", ["denoise", "noise"], key="patch_direction")
site = c4.selectbox("Site", list(backend.PATCH_SITES), format_func=SITE_LABELS.get, key="patch_site")
if not (clean.strip() and corrupted.strip() and answer and wrong):
    st.info("Type both prompts and both answer tokens.")
    st.stop()
if answer == wrong:
    st.error(f"The answer and the wrong token are the same ({answer!r}): the logit difference is always 0.")
    st.stop()

view = None
with ui.shown_errors("Activation patching"):
    view = backend.activation_patch(key, clean, corrupted, answer, wrong, site, direction)
if view is None:
    st.stop()

m = st.columns(3)
m[0].metric("Logit difference, clean", f"{view['metric_clean']:.3f}")
m[1].metric("Logit difference, corrupted", f"{view['metric_corrupted']:.3f}")
m[2].metric("Clean - corrupted", f"{view['metric_clean'] - view['metric_corrupted']:.3f}")
if not np.isfinite(view["z"]).any():
    st.warning("Both runs give the same logit difference: the normalised metric is undefined. Pick prompts whose "
               "answers differ.")
by_position = view["column"] == "position"
x = figures.position_labels(view["tokens"]) if by_position else [f"H{h}" for h in view["columns"]]
what = "residual stream (resid_post)" if by_position else "attention heads (attn.z, every position)"
st.plotly_chart(figures.patching_heatmap(view["z"], x, view["y"], f"Activation patching ({direction}): {what}",
                                         "position (clean tokens)" if by_position else "head"),
                key="patch_heatmap")
with st.expander("Patching table"):
    ui.table(view["table"], f"activation_patching_{site}_{direction}", "patch_csv_cells")

st.subheader("Direct logit attribution (clean prompt)")
st.caption(f"What each component writes directly into `logit({answer!r}) - logit({wrong!r})` at the last position "
           "of the clean prompt, the final norm's scale frozen at the clean run; the parts sum to the clean logit "
           "difference.")
with ui.shown_errors("Direct logit attribution"):
    components, heads = backend.logit_attribution(key, clean, answer, wrong)
    st.plotly_chart(figures.dla_bars(components["name"].tolist(), components["diff"],
                                     f"Direct logit attribution of {answer!r} - {wrong!r} "
                                     f"(total {components.attrs['logit_diff']:.3f})", "logit difference"),
                    key="patch_dla")
    with st.expander("Components table"):
        ui.table(components, "dla_components", "patch_csv_dla")
    if st.toggle("Top heads", key="patch_heads"):
        n_top = st.slider("Heads shown", 1, max(1, len(heads)), min(10, len(heads)), key="patch_n_heads")
        st.dataframe(heads.head(n_top), hide_index=True)
        st.download_button("Download CSV (every head)", heads.to_csv(index=False).encode(), file_name="dla_heads.csv",
                           mime="text/csv", key="patch_csv_heads", on_click="ignore")

st.subheader("Attribution vs activation patching")
st.caption("Attribution patching estimates denoising activation patching to first order, "
           "`(a_clean - a_corrupt) . d metric / d a` at the corrupted run, for every cell at once (one forward and "
           "one backward). Each point is one cell of the map above, always in the denoise direction.")
with ui.shown_errors("Attribution patching"):
    compared = site
    both = backend.attribution_compare(key, clean, corrupted, answer, wrong, site)
    col = "position" if "position" in both else "head"
    labels = [f"L{int(layer)} {col[0]}{int(c)}" for layer, c in zip(both["layer"], both[col])]
    r = float(both.attrs.get("pearson_r", np.nan))
    st.plotly_chart(figures.patching_scatter(both["activation"], both["attribution"], labels, r,
                                             f"Attribution vs activation patching, {compared}"),
                    key="patch_scatter")
    st.metric("Pearson r", f"{r:.3f}")
    with st.expander("Comparison table"):
        ui.table(both, f"attribution_vs_activation_{compared}", "patch_csv_compare")
