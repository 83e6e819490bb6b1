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
#: Short picker labels (the sidebar is narrow: longer ones are cut with "..."); the full spec is in the caption
#: under the picker and in its help text.
LABELS = {BUILTIN_SPECS[0]: "SmolLM2-135M (embedded)", "tiny-llama": "tiny-llama (random)",
          "tiny-gpt2": "tiny-gpt2 (random)"}
DESCRIPTIONS = {BUILTIN_SPECS[0]: "SmolLM2-135M-Instruct, shipped with hiddenlens (offline)",
                "tiny-llama": "a tiny random Llama, for tests", "tiny-gpt2": "a tiny random GPT-2, for tests"}
PICKER_HELP = "Built-in models: " + "; ".join(f"`{k}`: {v}" for k, v in DESCRIPTIONS.items())


def spec_caption(spec: str) -> str:
    """The full model spec under the picker (never cut), with what it is for the built-in models."""
    return f"Spec: `{spec}`" + (f" ({DESCRIPTIONS[spec]})" if spec in DESCRIPTIONS else "")


def _picked_spec() -> str:
    """The spec picked in the sidebar; the first time, the one the dashboard was started with. (Defaults go through
    ``index=`` / ``value=``: widget values seeded via session state are reset when the page changes.)"""
    start = modelstore.default_key().spec
    options = [*BUILTIN_SPECS, CUSTOM, CHECKPOINT]
    kind = st.sidebar.selectbox("Model", options, key="pick_kind", format_func=lambda k: LABELS.get(k, k),
                                index=options.index(start if start in BUILTIN_SPECS else CUSTOM), help=PICKER_HELP)
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
        picked = st.sidebar.selectbox("Checkpoint", found, key="pick_checkpoint")
        st.sidebar.caption(spec_caption(picked))
        return picked
    st.sidebar.caption(spec_caption(kind))
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
    _prompts()


def _use_picked() -> None:
    picked = st.session_state.get("hl_prompt_pick")
    if picked:
        st.session_state[ui.PROMPT_STATE] = picked
    st.session_state["hl_prompt_pick"] = None


def _keep_prompt() -> None:
    text = st.session_state.get(ui.PROMPT_STATE, "")
    kept = st.session_state[ui.PROMPTS_STATE]
    if text.strip() and text not in kept:
        kept.append(text)


def _prompts() -> None:
    """The shared prompt, and a list to switch between prompts (the examples, then those kept with "Keep")."""
    kept = st.session_state.setdefault(ui.PROMPTS_STATE, list(ui.EXAMPLE_PROMPTS))
    st.session_state.setdefault(ui.PROMPT_STATE, ui.DEFAULT_PROMPT)
    st.sidebar.selectbox("Switch prompt", kept, index=None, key="hl_prompt_pick", on_change=_use_picked,
                         placeholder=f"{len(kept)} prompts: examples and kept ones",
                         format_func=lambda p: repr(p) if len(p) < 48 else repr(p[:45]) + "...")
    st.sidebar.text_area("Prompt (shared by all pages)", key=ui.PROMPT_STATE, max_chars=MAX_PROMPT_CHARS, height=110)
    st.sidebar.button("Keep this prompt", on_click=_keep_prompt, key="hl_prompt_keep",
                      help="add the prompt to the list above, to come back to it later (this session)")
