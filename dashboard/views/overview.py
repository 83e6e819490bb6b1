"""Overview: model card, architecture, capturable sites."""
import pandas as pd
import streamlit as st

from hiddenlens.dashboard import backend, ui

st.header("Overview")
key = ui.require_model()
with ui.shown_errors("Reading the model card"):
    card = backend.model_card(key)
    cols = st.columns(5)
    cols[0].metric("Model", card["spec"])
    cols[1].metric("Parameters", f"{card['parameters'] / 1e6:.2f} M")
    cols[2].metric("Device", card["device"])
    cols[3].metric("Precision", card["dtype"])
    cols[4].metric("Backend", card["backend"])
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
               "`blocks.3-7.attn.pattern` select several at once.")
    ui.table(sites, "sites", "overview_csv_sites", height=260)
st.info("The prompt in the sidebar is shared by every page. Pick a page on the left to look inside the model.")
