"""Attention weight functions: eager softmax attention that also returns its scores and pattern, and the registry
of models' own attention functions (e.g. the ReLU attention of the Bigram-Backcopy models), so that reads of
``attn.pattern`` report a model's real weights. Pure functions: the hook layer (``hiddenlens.probes.attention``)
calls them; models register theirs with :func:`register_pattern_function`.
"""
from __future__ import annotations

from typing import Callable

import torch

#: attention implementation name -> fn(module, query, key, value, attention_mask, **kw) -> (out, scores, pattern)
PATTERN_FUNCTIONS: dict[str, Callable] = {}


def register_pattern_function(implementation: str, fn: Callable) -> None:
    """Declare how a custom attention implementation computes its weights, so captures report them.

    ``implementation`` is the name the model's ``config._attn_implementation`` holds (registered with
    transformers' ``AttentionInterface``); ``fn`` has the signature of :func:`eager_with_weights` and returns
    ``(attn_output [b, q, h, d], scores [b, h, q, k], pattern [b, h, q, k])``. Without a registration the taps
    compute softmax attention.
    """
    PATTERN_FUNCTIONS[implementation] = fn


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def additive_mask(mask: torch.Tensor | None, q_len: int, k_len: int, dtype, device) -> torch.Tensor:
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
    k = repeat_kv(key, n_rep)
    v = repeat_kv(value, n_rep)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    softcap = softcap if softcap is not None else getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    mask = additive_mask(attention_mask, query.shape[2], k.shape[2], scores.dtype, scores.device)
    scores = scores + mask[..., : k.shape[2]]
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout and module.training:
        pattern = torch.nn.functional.dropout(pattern, p=dropout)
    out = torch.matmul(pattern, v).transpose(1, 2).contiguous()
    return out, scores, pattern
