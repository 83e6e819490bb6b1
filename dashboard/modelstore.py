"""One model in memory at a time: load by :class:`ModelKey`, free the previous one first.

Streamlit's ``st.cache_resource(max_entries=1)`` evicts the old model only *after* the new one has loaded (peak =
two models), so :func:`get_model` unloads the previous handle, clears the cache and collects garbage before it
loads another one.
"""
from __future__ import annotations

import gc
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
import torch

import hiddenlens as hl
from hiddenlens.models import EMBEDDED_SPEC

#: The model the dashboard opens with (``hiddenlens dashboard --model`` sets it; tests use ``tiny-llama``).
MODEL_ENV = "HIDDENLENS_DASHBOARD_MODEL"
#: Folder searched for project checkpoints (default ``./runs``).
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
    return ModelKey(os.environ.get(MODEL_ENV) or EMBEDDED_SPEC)


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
_current: dict = {"key": None, "handle": None}


@st.cache_resource(max_entries=1, show_spinner=False)
def _load(key: ModelKey):
    return hl.load_model(key.spec, backend=key.backend, device=key.device, dtype=key.dtype)


def get_model(key: ModelKey):
    """The handle for ``key``; a different key frees the loaded model, and every cached result computed on it
    (some hold tensors on its device, e.g. a tuned lens), before loading the new one."""
    with _lock:
        if _current["key"] is not None and _current["key"] != key:
            old = _current["handle"]
            _current.update(key=None, handle=None)
            st.cache_resource.clear()
            if old is not None:
                old.unload()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        handle = _load(key)
        _current.update(key=key, handle=handle)
        return handle


def clear() -> None:
    """Forget the loaded model (tests call this between apps)."""
    with _lock:
        _current.update(key=None, handle=None)
        _load.clear()
        gc.collect()
