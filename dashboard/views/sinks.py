"""Attention sinks: layer x head grid of a sink metric; click (or pick) a head to see its pattern; value and
residual norms; prose vs code for active-dormant heads."""
import streamlit as st

from hiddenlens.dashboard import attention, backend, figures, ui

st.header("Attention sinks")
key = ui.require_model()
prompt = ui.prompt()
add_bos = ui.add_bos()
st.caption("Position 0 is the tokenizer's BOS (sidebar: Prepend BOS)." if add_bos else
           "Position 0 is the prompt's first token: BOS is off in the sidebar, so the sink metrics measure "
           "attention to a content token.")
c1, c2 = st.columns(2)
metric = c1.selectbox("Colour", list(backend.SINK_METRICS), format_func=backend.SINK_METRICS.get, key="sink_metric")
max_tokens = c2.slider("Tokens analysed (from the start, BOS included when prepended)", 8, 256, 96, key="sink_tokens")
with ui.shown_errors("The sink analysis"):
    result = backend.sink_analysis(key, prompt, max_tokens=max_tokens, add_bos=add_bos)
    grid = attention.head_grid(result.heads, metric)
    n_layers, n_heads = grid.shape
    if "sink_layer" not in st.session_state:  # start on the strongest sink head
        best = result.heads.loc[result.heads["dormancy"].idxmax()]
        st.session_state["sink_layer"], st.session_state["sink_head"] = int(best["layer"]), int(best["head"])
    selected = (min(st.session_state["sink_layer"], n_layers - 1), min(st.session_state["sink_head"], n_heads - 1))
    event = st.plotly_chart(figures.head_grid(grid, f"{backend.SINK_METRICS[metric]} per head (click one)",
                                              metric, selected), key="sink_grid", on_select="rerun",
                            selection_mode="points")
    points = event.selection.points if event and event.selection else []
    clicked = (int(points[0]["y"]), int(points[0]["x"])) if points else None
    if clicked is not None and clicked != st.session_state.get("sink_clicked"):
        st.session_state["sink_clicked"] = clicked
        st.session_state["sink_layer"], st.session_state["sink_head"] = clicked
        st.rerun()
    c1, c2 = st.columns(2)
    layer = c1.selectbox("Layer", range(n_layers), key="sink_layer")
    head = c2.selectbox("Head", range(n_heads), key="sink_head")
    row = result.heads[(result.heads["layer"] == layer) & (result.heads["head"] == head)].iloc[0]
    m = st.columns(4)
    m[0].metric(f"Dormancy of L{layer}H{head}", f"{row['dormancy']:.3f}")
    m[1].metric("Sink mass (key 0)", f"{row['sink_first']:.3f}")
    m[2].metric("Value norm ratio", f"{row['value_ratio']:.2f}")
    m[3].metric("Attends to the sink", "yes" if row["attends_sink"] else "no")
    tokens, pattern, factor = backend.head_pattern(key, prompt, layer, head, max_tokens=max_tokens, add_bos=add_bos)
    left, right = st.columns(2)
    left.plotly_chart(figures.pattern_heatmap(pattern, tokens, factor, f"Attention pattern L{layer}H{head}"),
                      key="sink_pattern")
    profile = result.layers
    norm_scale = right.radio("Norm scale", figures.SCALES, horizontal=True, key="sink_norm_scale",
                             help="log10 by default: the first token's norm dwarfs the others")
    right.plotly_chart(figures.layer_curves(
        {"first token": profile["resid_first"], "largest other": profile["resid_max_other"],
         "mean other": profile["resid_mean_other"]},
        "Residual norm per layer (resid_post)", "L2 norm",
        [f"L{int(x)}" for x in profile["layer"]], scale=norm_scale), key="sink_norms")

st.subheader("Prose vs code")
st.caption("Active-dormant heads switch between sinking on one domain and working on the other. This runs the same "
           f"metrics on offline English prose and Python source ({backend.DOMAIN_PROMPTS} passages of "
           f"{backend.DOMAIN_TOKENS} tokens each).")
if st.toggle("Compare prose and code", key="sink_domains"):
    with ui.shown_errors("The prose vs code comparison"):
        by_domain, contrast = backend.domain_sinks(key, add_bos=add_bos)
        cols = st.columns(len(by_domain))
        for col, (name, res) in zip(cols, by_domain.items()):
            col.plotly_chart(figures.head_grid(attention.head_grid(res.heads, "dormancy"), f"Dormancy on {name}",
                                               "dormancy"), key=f"sink_domain_{name}")
        st.markdown("Heads whose dormancy differs most between the domains:")
        ui.table(contrast, "sinks_domain_contrast", "sink_csv_contrast", height=320)
        st.caption("Save as run: the sinks study (`hiddenlens analyze sinks`) at these settings: the grids and "
                   "contrast above plus the causal confirmation of the top heads and the tokens that make them "
                   "leave the sink (one run folder the Results page opens). The single-prompt view above has no "
                   "study run of its own: the study contrasts two domains.")
        ui.save_as_run(lambda: backend.sinks_run(key, add_bos=add_bos), "sinks", "sink_save")
