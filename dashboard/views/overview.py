"""Overview: model card, architecture, capturable sites."""
import pandas as pd
import streamlit as st

from hiddenlens.dashboard import backend, ui

st.header("Overview")
key = ui.require_model()
with ui.shown_errors("Reading the model card"):
    card = backend.model_card(key)
    st.metric("Model", card["spec"])  # a row of its own: the full spec, never cut
    cols = st.columns(4)
    cols[0].metric("Parameters", f"{card['parameters'] / 1e6:.2f} M")
    cols[1].metric("Device", card["device"])
    cols[2].metric("Precision", card["dtype"])
    cols[3].metric("Backend", card["backend"])
    st.caption(f"Source: {card['source']}")
    arch = card["architecture"]
    st.subheader("Architecture")
    sizes = ["family", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_model", "d_mlp", "d_vocab"]
    st.dataframe(pd.DataFrame([{k: arch[k] for k in sizes}]), hide_index=True)
    with st.expander("Module paths found by the adapter"):
        st.json({k: v for k, v in arch.items() if k not in sizes})
    st.subheader("Capturable sites")
    sites = backend.site_table(key)
    st.caption(f"{len(sites)} sites. Capture them with `hl.capture(handle, 'blocks.*.resid_post')`; patterns such as "
               "`blocks.3-7.attn.pattern` select several at once. **shape** is the captured tensor's, with this "
               "model's sizes: `batch` prompts, `pos` tokens, `q` / `k` query / key positions.")
    ui.table(sites, "sites", "overview_csv_sites", height=260)
    text = st.session_state.get(ui.PROMPT_STATE, ui.DEFAULT_PROMPT) or ""
    if text.strip():
        tokens = backend.prompt_tokens(key, text, ui.add_bos())
        st.caption(f"The shared prompt is **{len(tokens)} tokens** as every page feeds it (`pos` = {len(tokens)}; "
                   f"BOS {'prepended' if ui.add_bos() else 'not prepended'}, sidebar toggle): "
                   + " ".join(f"`{t.replace('`', chr(0x2CB))}`" for t in tokens[:64]) + (" ..." if len(tokens) > 64 else ""))
st.info("The prompt in the sidebar is shared by every page. Pick a page on the left to look inside the model.")
