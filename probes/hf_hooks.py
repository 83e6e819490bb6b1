"""PyTorch hooks on native transformers modules: the capture path of the ``hf`` backend.

Only the modules of requested sites get a hook, so a capture costs nothing elsewhere. Every handle registered
here is removed by the returned ``detach`` callable (called in ``finally`` by the capture).
"""
from __future__ import annotations

from typing import Callable

import torch

from hiddenlens.models.adapter import ArchitectureAdapter, get_path, split_qkv

from .attention import tapped_attention
from .sites import Site


def _untuple(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _heads(t: torch.Tensor, n: int) -> torch.Tensor:
    """[batch, pos, n*d] -> [batch, n, pos, d]"""
    b, p, _ = t.shape
    return t.view(b, p, n, -1).transpose(1, 2)


def site_taps(adapter: ArchitectureAdapter, model: torch.nn.Module, site: Site):
    """Where a site lives: ``(module, "input" | "output", extract)``; ``None`` for attention-weight sites.

    ``extract`` maps the hook's raw value (output, or ``(args, kwargs)`` for inputs) to the canonical layout.
    The nnsight backend reuses this table, so all backends read the same tensors.
    """
    k, i = site.kind, site.layer
    a = adapter
    if k == "embed":
        return a.block(model, 0), "input", lambda ak: _hidden_arg(*ak)
    if k == "final_norm":
        return a.final_norm(model), "output", _untuple
    if k == "logits":
        return a.unembedding(model), "output", _untuple
    block = a.block(model, i)
    if k == "resid_pre":
        return block, "input", lambda ak: _hidden_arg(*ak)
    if k == "resid_post":
        return block, "output", _untuple
    if k == "resid_mid":
        return get_path(block, a.mlp_norm_path), "input", lambda ak: _hidden_arg(*ak)
    if k in ("attn.q", "attn.k", "attn.v"):
        n = a.n_heads if k == "attn.q" else a.n_kv_heads
        if a.qkv == "separate":
            path = {"attn.q": a.q_path, "attn.k": a.k_path, "attn.v": a.v_path}[k]
            return get_path(block, path), "output", lambda t: _heads(_untuple(t), n)
        which = "qkv".index(k[-1])
        return get_path(block, a.qkv_path), "output", lambda t: _heads(split_qkv(a, _untuple(t))[which], n)
    if k == "attn.z":
        return get_path(block, a.o_path), "input", lambda ak: _heads(_hidden_arg(*ak), a.n_heads)
    if k == "attn.out":
        return get_path(block, a.attn_out_path or a.attn_path), "output", _untuple
    if k == "mlp.pre":
        return get_path(block, a.mlp_in_path), "output", _untuple
    if k == "mlp.post":
        return get_path(block, a.mlp_out_proj_path), "input", lambda ak: _hidden_arg(*ak)
    if k == "mlp.out":
        return get_path(block, a.mlp_out_path or a.mlp_path), "output", _untuple
    if k in ("attn.scores", "attn.pattern"):
        return None
    raise KeyError(k)


def forward_offset(args, kwargs) -> tuple[int, torch.Tensor | None]:
    """Absolute position of the first input token of a backbone forward, and its 2-D attention mask."""
    cache_position = kwargs.get("cache_position")
    if cache_position is not None and cache_position.numel():
        offset = int(cache_position.reshape(-1)[0])
    else:
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        offset = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
    mask = kwargs.get("attention_mask")
    return offset, mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None


def attach_hf(handle, capture) -> Callable[[], None]:
    """Register hooks for ``capture.sites`` on ``handle.model``; return the function that removes them all."""
    model, adapter = handle.model, handle.adapter
    handles: list = []
    attn_taps: dict[torch.nn.Module, dict[str, Site]] = {}
    try:
        backbone = model.base_model if getattr(model, "base_model", None) is not None else model
        handles.append(backbone.register_forward_pre_hook(
            lambda mod, args, kwargs: capture.begin_forward(*forward_offset(args, kwargs)), with_kwargs=True))
        for site in capture.sites:
            tap = site_taps(adapter, model, site)
            if tap is None:
                attn = adapter.sub(model, site.layer, adapter.attn_path)
                attn_taps.setdefault(attn, {})[site.kind] = site
                continue
            module, where, extract = tap
            if where == "output":
                def hook(mod, args, output, site=site, extract=extract):
                    capture.record(site, extract(output))
                handles.append(module.register_forward_hook(hook))
            else:
                def pre(mod, args, kwargs, site=site, extract=extract):
                    capture.record(site, extract((args, kwargs)))
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

        def make_tap(sites: dict[str, Site]):
            def tap(scores, pattern):
                if "attn.scores" in sites:
                    capture.record(sites["attn.scores"], scores)
                if "attn.pattern" in sites:
                    capture.record(sites["attn.pattern"], pattern)
            return tap

        ctx = tapped_attention(model, {m: make_tap(s) for m, s in attn_taps.items()})
        ctx.__enter__()
    except BaseException:
        for h in handles:
            h.remove()
        raise

    def detach() -> None:
        try:
            ctx.__exit__(None, None, None)
        finally:
            for h in handles:
                h.remove()

    return detach
