"""The ``hf`` backend: native transformers modules, read and written through PyTorch hooks.

Only the modules of requested sites get a (dispatcher) hook, so a block costs nothing elsewhere. :func:`site_point`
is the table of where each site lives; the nnsight backend reuses it, so every backend reads the same tensors.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from hiddenlens.models.adapter import ArchitectureAdapter, get_path

from .. import context
from ..attention import attach_attention
from ..sites import Site
from .hooks import HookRegistry, acquire_all, forward_offset


def _heads(t: torch.Tensor, n: int) -> torch.Tensor:
    """``[batch, pos, n*d]`` -> ``[batch, n, pos, d]`` (a view)."""
    b, p, _ = t.shape
    return t.view(b, p, n, -1).transpose(1, 2)


def _fused(a: ArchitectureAdapter, which: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """q / k / v (``which`` 0 / 1 / 2) of a fused projection output as a ``[batch, heads, pos, head_dim]`` view."""
    hd, n = a.head_dim, a.n_heads

    def extract(t: torch.Tensor) -> torch.Tensor:
        b, p, _ = t.shape
        if a.qkv == "gpt2":  # [q | k | v], each [n*hd]
            return _heads(t[..., which * n * hd:(which + 1) * n * hd], n)
        # NeoX: [batch, pos, n, 3*hd], q / k / v interleaved per head
        return t.view(b, p, n, 3 * hd)[..., which * hd:(which + 1) * hd].transpose(1, 2)
    return extract


def site_point(adapter: ArchitectureAdapter, model: torch.nn.Module, site: Site):
    """Where a site lives: ``(module, "input" | "output", extract)``; None for the attention-weight sites.

    ``extract`` maps the module's output (or its first input) to the site's canonical layout, as a view.
    """
    k, a = site.kind, adapter
    if k == "embed":
        return a.block(model, 0), "input", _same
    if k == "final_norm":
        return a.final_norm(model), "output", _same
    if k == "logits":
        return a.unembedding(model), "output", _same
    block = a.block(model, site.layer)
    if k == "resid_pre":
        return block, "input", _same
    if k == "resid_post":
        return block, "output", _same
    if k == "resid_mid":
        return get_path(block, a.mlp_norm_path), "input", _same
    if k in ("attn.q", "attn.k", "attn.v"):
        if a.qkv == "separate":
            n = a.n_heads if k == "attn.q" else a.n_kv_heads
            path = {"attn.q": a.q_path, "attn.k": a.k_path, "attn.v": a.v_path}[k]
            return get_path(block, path), "output", lambda t: _heads(t, n)
        return get_path(block, a.qkv_path), "output", _fused(a, "qkv".index(k[-1]))
    if k == "attn.z":
        return get_path(block, a.o_path), "input", lambda t: _heads(t, a.n_heads)
    if k == "attn.out":
        return get_path(block, a.attn_out_path or a.attn_path), "output", _same
    if k == "mlp.pre":
        return get_path(block, a.mlp_in_path), "output", _same
    if k == "mlp.post":
        return get_path(block, a.mlp_out_proj_path), "input", _same
    if k == "mlp.out":
        return get_path(block, a.mlp_out_path or a.mlp_path), "output", _same
    if k in ("attn.scores", "attn.pattern"):
        return None
    raise KeyError(k)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack under the LM head (``model.base_model``), whose pre-hook sees every forward's offset."""
    return model.base_model if getattr(model, "base_model", None) is not None else model


class HFBackend:
    """Runs ``handle.hf_model``; reads and edits are dispatcher hooks on its modules (:mod:`.hooks`)."""

    name = "hf"

    def __init__(self, handle):
        self.handle = handle
        self.hooks = HookRegistry(handle)

    @property
    def model(self) -> torch.nn.Module:
        return self.handle.hf_model

    def attach(self, block, model: torch.nn.Module | None = None) -> Callable[[], None]:
        """Hooks for every site of ``block`` on ``model`` (default ``handle.hf_model``)."""
        model = model if model is not None else self.handle.hf_model
        a = self.handle.adapter

        def steps():
            yield partial(self.hooks.add_begin, backbone(model), forward_offset)
            for site in block.sites:
                point = site_point(a, model, site)
                if point is None:
                    yield partial(attach_attention, self.handle, model, a.sub(model, site.layer, a.attn_path),
                                  site.layer)
                else:
                    yield partial(self.hooks.add_site, point[0], point[1], site, point[2])
        return acquire_all(steps())

    tap = attach
    edit = attach

    def forward(self, batch, logits: bool = True, stop_after: int | None = None, **kwargs):
        model = self.handle.hf_model
        kwargs.setdefault("position_ids", batch.position_ids)
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **kwargs)
        if logits:
            return model(**inputs).logits
        run_stopping(self.hooks, self.handle, self.handle.adapter.block(model, stop_after)
                     if stop_after is not None else None, stop_after, lambda: backbone(model)(**inputs))
        return None

    def generate(self, batch, max_new_tokens: int, do_sample: bool, output_scores: bool, streamer=None, **kwargs):
        return hf_generate(self.handle.hf_model, self.handle.tokenizer, batch, max_new_tokens, do_sample,
                           output_scores, streamer, **kwargs)


def hf_generate(model, tokenizer, batch, max_new_tokens, do_sample, output_scores, streamer=None, **kwargs):
    """transformers' ``generate`` on ``model``; returns ``(sequences, scores)``."""
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                         return_dict_in_generate=True, output_scores=output_scores, streamer=streamer, **kwargs)
    return out.sequences, list(out.scores or [])


def run_stopping(hooks: HookRegistry, handle, stop_module, stop_after, fn: Callable[[], object]) -> None:
    """Run ``fn`` (a forward); with ``stop_module`` set, end it right after that module's output."""
    if stop_module is None:
        fn()
        return
    release = hooks.add_stop(stop_module, stop_after)
    try:
        with context.stopping_after(handle, stop_after):
            fn()
    except context.StopForward:
        pass
    finally:
        release()

