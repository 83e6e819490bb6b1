"""Results: the runs under the runs root (``runs/<study>/<name>``), read file by file (tables, figures, report),
no recomputing. Only folders under the runs root are opened; links are not followed; large files are read in part
and remote images in reports are not loaded (see :mod:`hiddenlens.dashboard.results`)."""
import json

import streamlit as st

from hiddenlens.dashboard import backend, modelstore, results

KEPT_PATH = "res_path_kept"  # the folder last opened here, kept while other pages are shown

st.header("Results")
st.caption("Open a run folder written by a study (`hiddenlens analyze ...`, `truth directions`, `steer eval`, "
           "`bb reproduce`: summary.json, *.parquet / *.csv tables, *.png figures, report.md, study.json). Only "
           "JSON, Parquet, CSV, PNG, Markdown and safetensors headers are read.")
root = modelstore.runs_dir()
st.caption(f"Runs root: `{root}` (set with `hiddenlens dashboard --runs`). Only folders under it are opened.")
found = backend.find_runs(root)
if found:
    st.selectbox("Runs found", found, key="res_found", index=None, placeholder="pick one...",
                 on_change=lambda: st.session_state.update(res_path=st.session_state["res_found"] or ""))
else:
    st.caption(f"No runs (folders with a study.json) under {root}.")
# Streamlit drops a widget's state when its page is left: the folder is kept under another key and put back
if "res_path" not in st.session_state:
    st.session_state["res_path"] = st.session_state.get(KEPT_PATH, "")
path = st.text_input("Results folder", key="res_path", placeholder=f"{root}/<study>/<name>")
st.session_state[KEPT_PATH] = path
if not path.strip():
    st.stop()
try:
    res = backend.open_results(path, root)
except backend.ResultsError as exc:
    st.error(f"Cannot open this results folder: {exc}")
    st.stop()
st.success(f"Opened {res.path}" + (f" (a `{res.study}` run)" if res.study else " (no study.json: shown file by file)"))
for name, problem in res.problems.items():
    st.warning(f"{name} could not be read: {problem}")
if res.summary is not None:
    with st.expander("summary.json", expanded=False):
        st.json(res.summary)


def show_image(data: bytes, name: str) -> None:
    """One figure, or a warning in its place when it cannot be shown."""
    try:
        st.image(data, caption=name)
    except Exception as exc:  # noqa: BLE001 - a broken image is a warning, the page goes on
        st.warning(f"{name}.png cannot be shown: {type(exc).__name__}: {exc}"[:300])


tabs = st.tabs(["Report", f"Tables ({len(res.tables)})", f"Figures ({len(res.figures)})", "Other files"])
with tabs[0]:
    if not res.texts:
        st.write("No report.md in this folder.")
    for name, text in res.texts.items():
        st.markdown(f"**{name}**")
        if name in res.text_notes:
            st.warning(res.text_notes[name])
        if not name.endswith(".md"):
            st.text(text)
            continue
        for kind, body in results.report_parts(text, res.figures):
            if kind == "image":
                show_image(res.figures[body], body)
            else:
                st.markdown(body)
with tabs[1]:
    for name, df in res.tables.items():
        st.markdown(f"**{name}** ({len(df):,} rows)")
        if name in res.table_notes:
            st.caption(res.table_notes[name])
        st.dataframe(df, hide_index=True)
with tabs[2]:
    for name, png in res.figures.items():
        show_image(png, name)
with tabs[3]:
    for name, data in res.json_files.items():
        st.markdown(f"**{name}**")
        st.code(json.dumps(data, indent=2)[:20_000], language="json")
    for name, shapes in res.tensors.items():
        st.markdown(f"**{name}**: " + ", ".join(f"`{k}` {v}" for k, v in shapes.items()))
