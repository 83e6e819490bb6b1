"""Models shared by the dashboard's sessions: load by :class:`ModelKey`, never pulled from under a session.

Every session that asks for a key gets the same handle (one load per key). The handle stays in memory while any
session holds it (its ``st.session_state``); a session that switches to another model drops its reference, and the
old model is freed once no session uses it (weak references, then garbage collection; Streamlit keeps a session's
previous state until its next run ends, so that can take one more interaction): one session switching models
never unloads the model another session is using. Reads and edits on a shared handle are per session
(each Streamlit session runs in its own thread, and hiddenlens blocks belong to the thread that opened them).
"""
from __future__ import annotations

import gc
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
import torch

import hiddenlens as hl
from hiddenlens.models import EMBEDDED_SPEC

#: The model the dashboard opens with (``hiddenlens dashboard --model`` sets it; tests use ``tiny-llama``).
MODEL_ENV = "HIDDENLENS_DASHBOARD_MODEL"
#: Backend, device and dtype of that first model (``hiddenlens dashboard --backend/--device/--dtype``).
BACKEND_ENV, DEVICE_ENV, DTYPE_ENV = ("HIDDENLENS_DASHBOARD_BACKEND", "HIDDENLENS_DASHBOARD_DEVICE",
                                      "HIDDENLENS_DASHBOARD_DTYPE")
#: Folder searched for project checkpoints and run folders (default ``./runs``).
RUNS_ENV = "HIDDENLENS_RUNS_DIR"
BUILTIN_SPECS = (EMBEDDED_SPEC, "tiny-llama", "tiny-gpt2")
BACKENDS = ("hf", "transformer_lens", "nnsight")
MARKERS = ("hiddenlens_model.json", "config.json")


@dataclass(frozen=True)
class ModelKey:
    """Everything that identifies a loaded model; also the cache key of every result computed on it."""

    spec: str
    backend: str = "hf"
    device: str = "auto"
    dtype: str = "auto"

    @property
    def label(self) -> str:
        return f"{self.spec} [{self.backend}, {self.device}, {self.dtype}]"


def default_key() -> ModelKey:
    return ModelKey(os.environ.get(MODEL_ENV) or EMBEDDED_SPEC, os.environ.get(BACKEND_ENV) or "hf",
                    os.environ.get(DEVICE_ENV) or "auto", os.environ.get(DTYPE_ENV) or "auto")


def runs_dir() -> str:
    """Where project checkpoints and report folders are searched first (``$HIDDENLENS_RUNS_DIR``, else ``runs``)."""
    return os.environ.get(RUNS_ENV) or "runs"


def device_choices() -> list[str]:
    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


def find_checkpoints(root: str | Path, max_depth: int = 3, limit: int = 200) -> list[str]:
    """Folders under ``root`` that ``hl.load_model`` can open (a marker file), sorted; ``[]`` if root is missing."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    found: list[str] = []
    stack = [(root, 0)]
    while stack and len(found) < limit:
        d, depth = stack.pop()
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            continue
        if any((d / m).is_file() for m in MARKERS):
            found.append(str(d))
        if depth < max_depth:
            stack.extend((c, depth + 1) for c in reversed(children))
    return sorted(found)


_lock = threading.Lock()
#: key -> handle, while at least one session holds it
_loaded: "weakref.WeakValueDictionary[ModelKey, object]" = weakref.WeakValueDictionary()
_SESSION_KEY = "_hiddenlens_model"


def get_model(key: ModelKey):
    """The shared handle for ``key`` (loaded on first use); this session keeps it alive until it asks for another."""
    with _lock:
        handle = _loaded.get(key)
        if handle is None:
            handle = hl.load_model(key.spec, backend=key.backend, device=key.device, dtype=key.dtype)
            _loaded[key] = handle
    try:
        previous = st.session_state.get(_SESSION_KEY)
        st.session_state[_SESSION_KEY] = (key, handle)
    except Exception:  # no session (a bare script): nothing to hold the reference
        previous = None
    if previous is not None and previous[0] != key:
        del previous
        gc.collect()  # frees the old model now if no other session holds it
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return handle


def loaded_keys() -> list[ModelKey]:
    """Keys whose models are in memory now (held by at least one session)."""
    return list(_loaded.keys())


def loaded_model(key: ModelKey):
    """The handle loaded for ``key``, or None; unlike :func:`get_model` this session does not start holding it."""
    return _loaded.get(key)


def clear() -> None:
    """Forget every loaded model (tests call this between apps)."""
    with _lock:
        _loaded.clear()
    gc.collect()
