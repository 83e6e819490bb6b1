"""Results: the runs under the runs root (``runs/<study>/<name>``), each read with its study's ``Result.read``
(tables, figures, report), no recomputing; any other results folder can be opened by path."""
import json

import streamlit as st

from hiddenlens.dashboard import backend, modelstore

st.header("Results")
st.caption("Open a run folder written by a study (`hiddenlens analyze ...`, `truth directions`, `steer eval`, "
           "`bb reproduce`: summary.json, *.parquet / *.csv tables, *.png figures, report.md, study.json). Only "
           "JSON, Parquet, CSV, PNG, Markdown and safetensors headers are read.")
root = st.text_input("Runs root", value=modelstore.runs_dir(), key="res_root")
found = backend.find_runs(root)
if found:
    st.selectbox("Runs found", found, key="res_found", index=None, placeholder="pick one...",
                 on_change=lambda: st.session_state.update(res_path=st.session_state["res_found"] or ""))
else:
    st.caption(f"No runs (folders with a study.json) under {root or '.'}.")
path = st.text_input("Results folder", key="res_path", placeholder="path/to/report-folder")
if path.strip():
    try:
        res = backend.open_results(path)
    except backend.ResultsError as exc:
        st.error(f"Cannot open this results folder: {exc}")
        st.stop()
    st.success(f"Opened {res.path}" + (f" (a `{res.study}` run)" if res.study else " (no study.json: shown file by "
                                                                               "file)"))
    for name, problem in res.problems.items():
        st.warning(f"{name} could not be read: {problem}")
    if res.summary is not None:
        with st.expander("summary.json", expanded=True):
            st.json(res.summary)
    tabs = st.tabs(["Report", f"Tables ({len(res.tables)})", f"Figures ({len(res.figures)})", "Other files"])
    with tabs[0]:
        if not res.texts:
            st.write("No report.md in this folder.")
        for name, text in res.texts.items():
            st.markdown(f"**{name}**")
            st.markdown(text)
    with tabs[1]:
        for name, df in res.tables.items():
            st.markdown(f"**{name}** ({len(df)} rows)")
            st.dataframe(df, hide_index=True)
    with tabs[2]:
        for name, png in res.figures.items():
            st.image(str(png), caption=name)
    with tabs[3]:
        for name, data in res.json_files.items():
            st.markdown(f"**{name}**")
            st.code(json.dumps(data, indent=2)[:20_000], language="json")
        for name, shapes in res.tensors.items():
            st.markdown(f"**{name}**: " + ", ".join(f"`{k}` {v}" for k, v in shapes.items()))
