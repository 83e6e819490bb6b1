"""Per-layer eager attention, so attention scores and patterns can be read and edited while other layers keep SDPA.

SDPA (and flash) kernels never materialise the attention matrix. While a block reads or edits ``attn.pattern`` or
``attn.scores`` of some layers, :func:`attach_attention` swaps the model's attention implementation for a
dispatcher registered with transformers' ``AttentionInterface`` (reference-counted: the original name comes back
when the last such block closes). At each call the dispatcher looks up the blocks open *in the running context*
(:mod:`hiddenlens.probes.context`): an attention module with none of them calls the original kernel unchanged
(bit-identical, also for other threads' forwards meanwhile); otherwise it runs the eager computation below, applies
edits to the scores (the softmax is then recomputed) and to the pattern (the output is then recomputed as
``pattern @ v``), and hands both to the reads.

Models with a non-softmax attention (e.g. the ReLU attention of the Bigram-Backcopy models) declare their own
weights function with :func:`register_pattern_function` under the name of their attention implementation; taps
on such a model then report the model's own scores and pattern (not a softmax recomputed from the scores).

Numerics: eager and SDPA differ by float rounding only (about 1e-6 relative in fp32, 1e-3 in bf16), so a
tapped layer's output can differ from an untapped run by that much; untapped layers are bit-identical. Parity
tests against HF's own ``output_attentions`` therefore load the model with ``attn_implementation="eager"``.
"""
from __future__ import annotations

import threading

import torch

from hiddenlens.models.attention_functions import PATTERN_FUNCTIONS as _PATTERN_FUNCTIONS
from hiddenlens.models.attention_functions import eager_with_weights, repeat_kv

from . import context
from .sites import Site

_REGISTERED: set[str] = set()
_LOCK = threading.Lock()
#: id(config) -> [original implementation name, number of attached attention modules]
_SWAPPED: dict[int, list] = {}


def _attend(pattern: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``pattern [b, h, q, k] @ value [b, kv_h, k, d]`` -> attention output ``[b, q, h, d]`` (GQA repeated)."""
    v = repeat_kv(value, pattern.shape[1] // value.shape[1])
    return torch.matmul(pattern, v).transpose(1, 2).contiguous()


def _blocks_here(module) -> list[tuple[Site, Site, tuple]]:
    """For each handle attached to ``module``: its scores / pattern sites and the blocks open in this context."""
    out = []
    for handle, layer, _ in list(getattr(module, "_hiddenlens_attention", {}).values()):
        blocks = context.open_blocks(handle)
        if blocks:
            scores, pattern = Site(layer, "attn.scores"), Site(layer, "attn.pattern")
            users = tuple(b for b in blocks if scores in b.site_set or pattern in b.site_set)
            if users:
                out.append((scores, pattern, users))
    return out


def _register(base: str) -> str:
    """Register the dispatcher for a base implementation (``sdpa``, ``eager``...) once; return its name."""
    # transformers is heavy to import: only when a read or edit of attention weights first needs it
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = f"hiddenlens_{base}"
    if name in _REGISTERED:
        return name
    original = ALL_ATTENTION_FUNCTIONS.get(base) if base != "eager" else None

    def dispatch(module, query, key, value, attention_mask, *args, **kwargs):
        here = _blocks_here(module)
        weights_fn = _PATTERN_FUNCTIONS.get(base, eager_with_weights)
        if not here:
            if original is not None:
                return original(module, query, key, value, attention_mask, *args, **kwargs)
            out, _, pattern = weights_fn(module, query, key, value, attention_mask, *args, **kwargs)
            return out, pattern
        out, scores, pattern = weights_fn(module, query, key, value, attention_mask, *args, **kwargs)
        for s_site, p_site, users in here:
            changed = False
            for b in users:
                if b.writes and s_site in b.site_set:
                    if base in _PATTERN_FUNCTIONS:
                        raise NotImplementedError(f"{s_site.name}: this model's own attention function ({base!r}) "
                                                  "cannot be recomputed from edited scores; edit attn.pattern")
                    new = b.apply(s_site, scores)
                    if new is not None:
                        scores = new
                        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
                        changed = True
            for b in users:
                if b.writes and p_site in b.site_set:
                    new = b.apply(p_site, pattern)
                    if new is not None:
                        pattern, changed = new, True
            if changed:
                out = _attend(pattern, value)
            for b in users:
                if not b.writes:
                    if s_site in b.site_set:
                        b.record(s_site, scores)
                    if p_site in b.site_set:
                        b.record(p_site, pattern)
        return out, pattern

    AttentionInterface.register(name, dispatch)
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    AttentionMaskInterface.register(name, mask_fn)
    _REGISTERED.add(name)
    return name


def attach_attention(handle, model: torch.nn.Module, module: torch.nn.Module, layer: int):
    """Route ``module`` (the attention of block ``layer`` of ``model``) through the dispatcher for ``handle``'s
    blocks; returns the function that undoes it (reference-counted per module and per model config)."""
    config = model.config
    with _LOCK:
        swap = _SWAPPED.get(id(config))
        if swap is None:
            base = config._attn_implementation or "eager"
            swap = _SWAPPED[id(config)] = [base, 0]
            config._attn_implementation = _register(base)
        swap[1] += 1
        attached = module.__dict__.setdefault("_hiddenlens_attention", {})
        entry = attached.setdefault(id(handle), [handle, layer, 0])
        entry[2] += 1

    def release() -> None:
        with _LOCK:
            entry[2] -= 1
            if entry[2] == 0:
                attached.pop(id(handle), None)
                if not attached:
                    del module.__dict__["_hiddenlens_attention"]
            swap[1] -= 1
            if swap[1] == 0:
                config._attn_implementation = swap[0]
                del _SWAPPED[id(config)]
    return release
