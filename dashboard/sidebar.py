"""The sidebar shared by every page: model picker, backend / device / dtype, what is running where, the prompt."""
from __future__ import annotations

import streamlit as st
import torch

from . import modelstore, ui
from hiddenlens.studies.report import PREPEND_BOS

from .backend import MAX_PROMPT_CHARS
from .modelstore import BACKENDS, BUILTIN_SPECS, ModelKey

CUSTOM = "Local folder or hub id"
CHECKPOINT = "Project checkpoint"
LABELS = {BUILTIN_SPECS[0]: f"{BUILTIN_SPECS[0]} (embedded)", "tiny-llama": "tiny-llama (random, tests)",
          "tiny-gpt2": "tiny-gpt2 (random, tests)"}


def _picked_spec() -> str:
    """The spec picked in the sidebar; the first time, the one the dashboard was started with. (Defaults go through
    ``index=`` / ``value=``: widget values seeded via session state are reset when the page changes.)"""
    start = modelstore.default_key().spec
    options = [*BUILTIN_SPECS, CUSTOM, CHECKPOINT]
    kind = st.sidebar.selectbox("Model", options, key="pick_kind", format_func=lambda k: LABELS.get(k, k),
                                index=options.index(start if start in BUILTIN_SPECS else CUSTOM))
    if kind == CUSTOM:
        return st.sidebar.text_input("Folder or hub id", value="" if start in BUILTIN_SPECS else start,
                                     key="pick_custom", help="A transformers checkpoint folder, a hiddenlens model "
                                     "folder, or a Hugging Face id (needs the hub or its local cache)").strip()
    if kind == CHECKPOINT:
        root = st.sidebar.text_input("Runs folder", value=modelstore.runs_dir(), key="pick_root")
        found = modelstore.find_checkpoints(root)
        if not found:
            st.sidebar.info(f"No model folders (with hiddenlens_model.json or config.json) under {root!r}.")
            return ""
        return st.sidebar.selectbox("Checkpoint", found, key="pick_checkpoint")
    return kind


def _runtime_options() -> tuple[str, str, str]:
    with st.sidebar.expander("Backend, device, precision"):
        backend = st.selectbox("Backend", BACKENDS, key="pick_backend")
        device = st.selectbox("Device", modelstore.device_choices(), key="pick_device")
        dtype = st.selectbox("Precision", ["auto", "float32", "bfloat16", "float16"], key="pick_dtype",
                             help="auto: bfloat16 on a GPU that supports it, float32 elsewhere")
    return backend, device, dtype


def render() -> None:
    """Draw the sidebar and load the picked model; sets ``ui.KEY_STATE`` (None when nothing is loaded)."""
    st.sidebar.title("hiddenlens")
    spec = _picked_spec()
    backend, device, dtype = _runtime_options()
    st.session_state[ui.KEY_STATE] = None
    if spec:
        key = ModelKey(spec, backend, device, dtype)
        try:
            with st.spinner(f"Loading {spec}..."):
                handle = modelstore.get_model(key)
        except Exception as exc:  # noqa: BLE001 - a bad model spec is shown, the app keeps running
            st.sidebar.error(f"Could not load {spec!r}: {ui.error_text(exc)}")
        else:
            st.session_state[ui.KEY_STATE] = key
            where = str(handle.device)
            if handle.device.type == "cuda":
                where += f" ({torch.cuda.get_device_name(handle.device)})"
            st.sidebar.caption(f"Running **{spec}** on **{where}**, **{str(handle.dtype).replace('torch.', '')}**, "
                               f"backend **{handle.backend.name}**")
    st.sidebar.toggle("Prepend BOS", value=PREPEND_BOS, key=ui.BOS_STATE,
                      help="prepend the tokenizer's BOS to the prompt on every page (position 0 is then a fixed "
                           "token); the CLI does the same unless given --no-bos")
    st.sidebar.text_area("Prompt (shared by all pages)", value=ui.DEFAULT_PROMPT, key=ui.PROMPT_STATE,
                         max_chars=MAX_PROMPT_CHARS, height=110)
