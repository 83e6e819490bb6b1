"""Per-layer eager attention, so attention scores and patterns can be read while the other layers keep SDPA.

SDPA (and flash) kernels never materialise the attention matrix. When a capture asks for ``attn.pattern`` or
``attn.scores`` of some layers, :func:`tapped_attention` swaps the model's attention implementation for a
dispatcher registered with transformers' ``AttentionInterface``: attention modules carrying a tap run the eager
computation below and hand ``scores`` / ``pattern`` to the tap; every other module calls the original kernel
unchanged. The original implementation is restored in ``finally``.

Models with a non-softmax attention (e.g. the ReLU attention of the Bigram-Backcopy models) declare their own
weights function with :func:`register_pattern_function` under the name of their attention implementation; taps
on such a model then report the model's own scores and pattern (not a softmax recomputed from the scores).

Numerics: eager and SDPA differ by float rounding only (about 1e-6 relative in fp32, 1e-3 in bf16), so a
tapped layer's output can differ from an untapped run by that much; untapped layers are bit-identical. Parity
tests against HF's own ``output_attentions`` therefore load the model with ``attn_implementation="eager"``.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

_REGISTERED: set[str] = set()
#: attention implementation name -> fn(module, query, key, value, attention_mask, **kw) -> (out, scores, pattern)
_PATTERN_FUNCTIONS: dict[str, Callable] = {}


def register_pattern_function(implementation: str, fn: Callable) -> None:
    """Declare how a custom attention implementation computes its weights, so captures report them.

    ``implementation`` is the name the model's ``config._attn_implementation`` holds (registered with
    transformers' ``AttentionInterface``); ``fn`` has the signature of :func:`eager_with_weights` and returns
    ``(attn_output [b, q, h, d], scores [b, h, q, k], pattern [b, h, q, k])``. Without a registration the taps
    compute softmax attention.
    """
    _PATTERN_FUNCTIONS[implementation] = fn


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _additive_mask(mask: torch.Tensor | None, q_len: int, k_len: int, dtype, device) -> torch.Tensor:
    """Turn HF's mask (None = plain causal, bool = keep, float = additive) into an additive float mask."""
    neg = torch.finfo(dtype).min
    if mask is None:
        offset = k_len - q_len
        keep = torch.arange(k_len, device=device)[None, :] <= (torch.arange(q_len, device=device)[:, None] + offset)
        return torch.where(keep, 0.0, neg).to(dtype)[None, None]
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, neg).to(dtype)
    return mask.to(dtype)


def eager_with_weights(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                       **_) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF's eager attention. Returns ``(attn_output [b, q, h, d], scores [b, h, q, k], pattern [b, h, q, k])``."""
    n_rep = query.shape[1] // key.shape[1]
    k = _repeat_kv(key, n_rep)
    v = _repeat_kv(value, n_rep)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    softcap = softcap if softcap is not None else getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    mask = _additive_mask(attention_mask, query.shape[2], k.shape[2], scores.dtype, scores.device)
    scores = scores + mask[..., : k.shape[2]]
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout and module.training:
        pattern = torch.nn.functional.dropout(pattern, p=dropout)
    out = torch.matmul(pattern, v).transpose(1, 2).contiguous()
    return out, scores, pattern


def _register(base: str) -> str:
    """Register the dispatcher for a base implementation (``sdpa``, ``eager``...) once; return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = f"hiddenlens_{base}"
    if name in _REGISTERED:
        return name
    original = ALL_ATTENTION_FUNCTIONS.get(base) if base != "eager" else None

    def dispatch(module, query, key, value, attention_mask, *args, **kwargs):
        tap: Callable | None = getattr(module, "_hiddenlens_attn_tap", None)
        weights_fn = _PATTERN_FUNCTIONS.get(base, eager_with_weights)
        if tap is None:
            if original is not None:
                return original(module, query, key, value, attention_mask, *args, **kwargs)
            out, _, pattern = weights_fn(module, query, key, value, attention_mask, *args, **kwargs)
            return out, pattern
        out, scores, pattern = weights_fn(module, query, key, value, attention_mask, *args, **kwargs)
        tap(scores, pattern)
        return out, pattern

    AttentionInterface.register(name, dispatch)
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    AttentionMaskInterface.register(name, mask_fn)
    _REGISTERED.add(name)
    return name


@contextlib.contextmanager
def tapped_attention(model: torch.nn.Module, taps: dict[torch.nn.Module, Callable]):
    """Within the block, each attention module in ``taps`` calls ``tap(scores, pattern)`` on every forward."""
    if not taps:
        yield
        return
    config = model.config
    base = config._attn_implementation or "eager"
    if base.startswith("hiddenlens_"):
        raise RuntimeError("nested attention-pattern captures on one model are not supported")
    try:
        config._attn_implementation = _register(base)
        for module, tap in taps.items():
            module._hiddenlens_attn_tap = tap
        yield
    finally:
        for module in taps:
            if hasattr(module, "_hiddenlens_attn_tap"):
                del module._hiddenlens_attn_tap
        config._attn_implementation = base
