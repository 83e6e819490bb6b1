"""The Bigram-Backcopy model: a transformers ``GPT2LMHeadModel`` with one head, pre-norm LayerNorm (eps 1e-5),
learned absolute positions, ReLU FFN (4 x width), untied output, every bias (linear and LayerNorm) zeroed and frozen,
so it is the bias-free model of Guo et al. (arXiv 2410.13835) while every hiddenlens backend and site works
unchanged. ``attention="relu"`` swaps softmax for ``relu(QK^T/sqrt(d) + mask) / n_keys`` (row i divided by i + 1),
registered with transformers' ``AttentionInterface`` as ``bb_relu`` and declared to the capture with
:func:`hiddenlens.models.attention_functions.register_pattern_function`, so ``attn.pattern`` reports the ReLU
weights.

Checkpoints are folders ``step_000500/`` holding ``model.safetensors``, ``config.json`` and ``hiddenlens_model.json``
(``{"kind": "bigram-backcopy", ...}``), so ``hiddenlens.load_model(folder)`` loads them like any other model (the
directory loader registered below). The task is :mod:`hiddenlens.models.bb_task`, training
:mod:`hiddenlens.models.bb_training`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hiddenlens.common.errors import DamagedFileError
from hiddenlens.common.files import atomic_path, write_json, write_text

from .attention_functions import additive_mask, register_pattern_function
from .bb_task import BBGenerator, build_tokenizer
from .loading import MARKER, register_directory_loader

KIND = "bigram-backcopy"
RELU_ATTENTION = "bb_relu"


# ---- ReLU attention -----------------------------------------------------------------------------------------
def relu_attention_with_weights(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
    """``A = relu(QK^T * scaling + mask) / n_keys`` (n_keys = unmasked keys of the row, i + 1 without padding).

    Returns ``(attn_output [b, q, h, d], scores [b, h, q, k], pattern [b, h, q, k])`` like the eager path.
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    mask = additive_mask(attention_mask, query.shape[2], key.shape[2], scores.dtype, scores.device)
    mask = mask[..., : key.shape[2]]
    scores = scores + mask
    n_keys = (mask > torch.finfo(scores.dtype).min / 2).sum(-1, keepdim=True).clamp_min(1)
    pattern = torch.relu(scores) / n_keys
    if dropout and module.training:
        pattern = torch.nn.functional.dropout(pattern, p=dropout)
    out = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    return out, scores, pattern


def _relu_attention(module, query, key, value, attention_mask, *args, **kwargs):
    out, _, pattern = relu_attention_with_weights(module, query, key, value, attention_mask, *args, **kwargs)
    return out, pattern


def _register_relu_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(RELU_ATTENTION, _relu_attention)
    AttentionMaskInterface.register(RELU_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    register_pattern_function(RELU_ATTENTION, relu_attention_with_weights)


# ---- model ------------------------------------------------------------------------------------------------
@dataclass
class BBConfig:
    """One BB training run. ``attention``: softmax | relu; ``optimizer``: adamw | sgd (momentum 0.9)."""

    d_model: int = 64
    n_layers: int = 1
    seq_length: int = 32
    k: int = 3
    attention: str = "softmax"
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    batch_size: int = 64
    steps: int = 1000
    seed: int = 0
    checkpoint_every: int = 0  # 0: only the final checkpoint (when an output folder is given)

    def __post_init__(self):
        """Validate every field: one line naming the field (and its ``hiddenlens bb train`` option) and the fix."""
        for name in ("d_model", "n_layers", "seq_length", "k", "batch_size", "steps"):
            _check_int(name, getattr(self, name), 1)
        _check_int("checkpoint_every", self.checkpoint_every, 0)
        _check_int("seed", self.seed, None)
        if self.attention not in ("softmax", "relu"):
            raise ValueError(f"attention={self.attention!r} (--attention): use 'softmax' or 'relu'")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer={self.optimizer!r} (--optimizer): use 'adamw' or 'sgd'")
        if self.n_layers > 12:
            raise ValueError(f"n_layers={self.n_layers} (--layers): use 1 to 12 (the paper uses 1 to 3)")
        _check_float("lr", self.lr, low=0.0, low_open=True)
        _check_float("weight_decay", self.weight_decay, low=0.0)
        _check_float("momentum", self.momentum, low=0.0, high=1.0)


#: fields whose ``hiddenlens bb train`` option is not ``--field-name`` (None: no option)
_OPTIONS = {"n_layers": "--layers", "momentum": None}


def _option(name: str) -> str:
    """`` (--option)`` naming the ``hiddenlens bb train`` option of a config field, or nothing."""
    opt = _OPTIONS.get(name, "--" + name.replace("_", "-"))
    return f" ({opt})" if opt else ""


def _check_int(name: str, value, low: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r}{_option(name)}: must be an integer")
    if low is not None and value < low:
        raise ValueError(f"{name}={value}{_option(name)}: must be at least {low}")


def _check_float(name: str, value, low: float, high: float | None = None, low_open: bool = False) -> None:
    """A finite number with ``low <= value`` (``<`` when ``low_open``) and ``value < high`` (when given)."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if low_open else value >= low) and (high is None or value < high))
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high is not None else "")
        raise ValueError(f"{name}={value!r}{_option(name)}: must be a finite number {bound}")


def build_model(cfg: BBConfig, vocab_size: int, bos_id: int):
    """A bias-free 1-head GPT-2 (see the module docstring), weights seeded by ``cfg.seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if cfg.attention == "relu":
        _register_relu_attention()
    config = GPT2Config(vocab_size=vocab_size, n_positions=cfg.seq_length, n_embd=cfg.d_model,
                        n_layer=cfg.n_layers, n_head=1, n_inner=4 * cfg.d_model, activation_function="relu",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                        tie_word_embeddings=False, bos_token_id=bos_id, eos_token_id=None, pad_token_id=bos_id)
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(config)
    _torch_default_init(model)
    _freeze_biases(model)
    model.config._attn_implementation = RELU_ATTENTION if cfg.attention == "relu" else "eager"
    return model


def _torch_default_init(model) -> None:
    """Re-initialise like a plain PyTorch model (INFERRED: the official BBM model is built from ``nn.Linear`` /
    ``nn.Embedding``): embeddings N(0, 1), projections U(-1/sqrt(fan_in), 1/sqrt(fan_in)), LayerNorm weights 1.
    GPT-2's own init (N(0, 0.02)) gave a weaker sink in our runs."""
    from transformers.pytorch_utils import Conv1D

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Embedding):
                mod.weight.normal_(0.0, 1.0)
            elif isinstance(mod, (Conv1D, torch.nn.Linear)):
                fan_in = mod.weight.shape[0] if isinstance(mod, Conv1D) else mod.weight.shape[1]
                mod.weight.uniform_(-fan_in ** -0.5, fan_in ** -0.5)
            elif isinstance(mod, torch.nn.LayerNorm):
                mod.weight.fill_(1.0)


def _freeze_biases(model) -> None:
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            with torch.no_grad():
                p.zero_()
            p.requires_grad_(False)


# ---- checkpoints --------------------------------------------------------------------------------------------
def save_checkpoint(model, gen: BBGenerator, cfg: BBConfig, folder: str | Path, step: int) -> Path:
    """Write ``model.safetensors``, ``config.json`` and the marker (last, so half-written folders never load)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    write_text(folder / "config.json", model.config.to_json_string())
    write_json(folder / MARKER, {"kind": KIND, "step": step, "attention": cfg.attention, "config": asdict(cfg),
                                 "chars": gen.stats.chars, "triggers": gen.triggers})
    return folder


def load_directory(path: str | Path, dtype: torch.dtype = torch.float32):
    """The directory loader of kind ``bigram-backcopy``: ``(GPT2LMHeadModel, tokenizer)``."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(path)
    meta = json.loads((path / MARKER).read_text())
    if meta.get("kind") != KIND:
        raise ValueError(f"{path / MARKER} has kind {meta.get('kind')!r}, expected {KIND!r}")
    if meta["attention"] == "relu":
        _register_relu_attention()
    config = GPT2Config.from_json_file(str(path / "config.json"))
    model = GPT2LMHeadModel(config)
    try:
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    except RuntimeError as exc:  # missing / unexpected / mis-shaped tensors: config.json and weights disagree
        raise DamagedFileError(f"{path}: config.json and model.safetensors disagree ({str(exc).splitlines()[0]}); "
                               "re-save the checkpoint with `hiddenlens bb train`") from exc
    model.config._attn_implementation = RELU_ATTENTION if meta["attention"] == "relu" else "eager"
    return model.to(dtype).eval(), build_tokenizer(meta["chars"])


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint folders under ``folder`` (or ``folder`` itself), ordered by training step."""
    folder = Path(folder)
    if (folder / MARKER).is_file():
        return [folder]
    found = [p.parent for p in folder.glob(f"*/{MARKER}")]
    if not found:
        raise FileNotFoundError(f"no BB checkpoints (folders with {MARKER}) under {folder}")
    return sorted(found, key=lambda p: json.loads((p / MARKER).read_text()).get("step", 0))


def checkpoint_step(folder: str | Path) -> int:
    return int(json.loads((Path(folder) / MARKER).read_text()).get("step", 0))


register_directory_loader(KIND, load_directory)
