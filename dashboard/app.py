"""hiddenlens dashboard: ``streamlit run`` entry point (``hiddenlens dashboard`` starts it).

The sidebar (model picker, device, prompt) is shared; each page lives in ``views/`` and calls ``backend`` only.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from hiddenlens.dashboard import sidebar

PAGES = Path(__file__).parent / "views"  # not "pages/": Streamlit would treat that as an old-style multipage app

st.set_page_config(page_title="hiddenlens", layout="wide")
sidebar.render()
st.navigation([
    st.Page(PAGES / "overview.py", title="Overview", default=True),
    st.Page(PAGES / "dynamics.py", title="Latent dynamics"),
    st.Page(PAGES / "sinks.py", title="Attention sinks"),
    st.Page(PAGES / "intention.py", title="Intention"),
    st.Page(PAGES / "truth.py", title="Truthful directions"),
    st.Page(PAGES / "leakage.py", title="Semantic leakage"),
    st.Page(PAGES / "iteration.py", title="Latent iteration"),
    st.Page(PAGES / "patching.py", title="Compare and patch"),
    st.Page(PAGES / "results.py", title="Results"),
]).run()
