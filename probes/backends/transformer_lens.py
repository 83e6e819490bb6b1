"""The ``transformer_lens`` backend: a TransformerBridge over the handle's weights, captured through its hook points.

``wrap_transformer_lens`` builds the bridge with raw Hugging Face numerics (no LayerNorm folding, no weight
centring: TransformerLens' default for bridges; ``enable_compatibility_mode()`` is never called). Three things
differ from ``TransformerBridge.boot_transformers(name, hf_model=...)``, on purpose:

* The bridge **replaces the submodules of the model it wraps** (decoder layers become ``BlockBridge``, linears
  ``LinearBridge``...) and forces eager attention on it. So that ``handle.hf_model`` stays a plain transformers
  model (its SDPA kernels, its PyTorch-hook capture path and every other consumer unchanged), the bridge wraps a
  *structural clone*: new module objects that share every parameter and buffer tensor with ``handle.hf_model``
  (no weight is copied or reloaded; ``bridge.original_model`` is the clone).
* transformers 5 passes the KV cache to attention modules as ``cache=``, which the bridge's attention (written
  for ``past_key_values=``) ignores, so cached decoding would attend to the new token alone. A forward pre-hook
  on each bridged attention module (the clone's, installed once here) passes it under both names.
* ``boot_transformers`` re-loads the tokenizer by name from the hub (offline that fails, and for in-memory
  tokenizers it cannot work), so we call the builder it uses underneath (``build_bridge_from_module``) and hand
  the bridge the handle's own tokenizer.

Reads and edits go through the bridge's ``HookPoint`` modules (the dispatcher hooks of :mod:`.hooks`: our own
handles, reference-counted), so hooks that user code added through TransformerLens (``add_hook`` /
``run_with_hooks``) are never touched.
"""
from __future__ import annotations

import copy
from functools import partial
from typing import Callable

import torch

from hiddenlens.models.attention_functions import PATTERN_FUNCTIONS
from hiddenlens.models.loading import share_weights_clone

from ..sites import Site
from .errors import BackendError
from .hf import hf_generate, run_stopping
from .hooks import HookRegistry, acquire_all, forward_offset

#: our block site kind -> the bridge's hook point (relative to ``blocks.{i}``)
_BLOCK_HOOKS = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn.q": "attn.hook_q",
    "attn.k": "attn.hook_k",
    "attn.v": "attn.hook_v",
    "attn.z": "attn.hook_z",
    "attn.scores": "attn.hook_attn_scores",
    "attn.pattern": "attn.hook_pattern",
    "attn.out": "hook_attn_out",
    "mlp.pre": "mlp.hook_pre",
    "mlp.post": "mlp.hook_post",
    "mlp.out": "hook_mlp_out",
}
#: global sites -> hook point. ``embed`` is the input of block 0 (token + position embedding for GPT-2).
_GLOBAL_HOOKS = {"embed": "blocks.0.hook_resid_pre", "final_norm": "ln_final.hook_out", "logits": "unembed.hook_out"}


def hook_name(site: Site) -> str:
    """The TransformerBridge hook point that carries ``site`` (e.g. ``blocks.3.attn.hook_z``)."""
    if site.layer is None:
        return _GLOBAL_HOOKS[site.kind]
    return f"blocks.{site.layer}.{_BLOCK_HOOKS[site.kind]}"


def _canonical(site: Site, n_heads: int, n_kv_heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Bridge layout -> ours, as a view: per-head q/k/v/z come as ``[batch, pos, head, d]`` (or ``[batch, pos,
    head * d]``), we use ``[batch, head, pos, d]``."""
    if site.kind not in ("attn.q", "attn.k", "attn.v", "attn.z"):
        return _same
    heads = n_kv_heads if site.kind in ("attn.k", "attn.v") else n_heads

    def to_heads(t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 3:  # [batch, pos, heads * d]
            t = t.view(t.shape[0], t.shape[1], heads, -1)
        return t.transpose(1, 2)
    return to_heads


def wrap_transformer_lens(handle):
    """A ``TransformerBridge`` over ``handle``'s weights (raw HF numerics, eager attention), with its tokenizer.

    Returns the bridge; ``bridge.original_model`` is a clone of ``handle.hf_model`` sharing its tensors, so
    ``handle.hf_model`` itself keeps its modules and attention implementation.
    """
    try:
        from transformer_lens.model_bridge.sources._bridge_builder import (build_bridge_from_module,
                                                                           detect_tokenizer_bos_eos)
        from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config
        from transformer_lens.utilities.attn_implementation import force_eager_attention
    except ImportError as exc:
        raise ImportError(f"backend='transformer_lens' needs transformer-lens >= 3 with TransformerBridge "
                          f"({exc}); `pip install 'transformer-lens>=4'` or use backend='hf'") from exc
    impl = handle.hf_model.config._attn_implementation
    if impl in PATTERN_FUNCTIONS:
        raise ValueError(f"this model uses its own attention function ({impl!r}); the TransformerBridge would "
                         "replace it with softmax attention and give wrong numbers. Use backend='hf' or "
                         "backend='nnsight' for it")
    clone = share_weights_clone(handle.hf_model)
    force_eager_attention(clone)
    try:
        arch = determine_architecture_from_hf_config(clone.config)
    except ValueError as exc:
        raise ValueError(f"TransformerLens has no bridge for {type(handle.hf_model).__name__} ({exc}); "
                         "use backend='hf' or backend='nnsight' for this model") from exc
    bridge = build_bridge_from_module(clone, arch, hf_config=copy.deepcopy(clone.config), tokenizer=None,
                                      model_name=handle.spec, dtype=handle.dtype, device=handle.device)
    bridge.tokenizer = handle.tokenizer  # first assignment: no re-configuration of the shared tokenizer
    bridge.cfg.tokenizer_prepends_bos, bridge.cfg.tokenizer_appends_eos = detect_tokenizer_bos_eos(handle.tokenizer)
    for block in bridge.blocks:
        block.attn.register_forward_pre_hook(_cache_alias, with_kwargs=True)
    bridge.eval()
    return bridge


def _cache_alias(module, args, kwargs):
    """transformers 5 hands attention its KV cache as ``cache=``; the bridge's attention reads ``past_key_values``.

    Without this alias every cached decode step of ``generate`` would attend to the new token alone.
    """
    if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
        return args, {**kwargs, "past_key_values": kwargs["cache"]}
    return None


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _offset(args, kwargs) -> tuple[int, torch.Tensor | None, int]:
    offset, mask, length = forward_offset(args, kwargs)
    if mask is not None:
        offset = mask.shape[1] - length  # the 2-D mask spans cached + new tokens during generate
    return offset, mask, length


class TransformerLensBackend:
    """Runs a TransformerBridge over ``handle.hf_model``'s weights; reads and edits at its hook points."""

    name = "transformer_lens"

    def __init__(self, handle):
        self.handle = handle
        self.bridge = wrap_transformer_lens(handle)
        self.hooks = HookRegistry(handle)

    @property
    def model(self) -> torch.nn.Module:
        return self.bridge

    def attach(self, block) -> Callable[[], None]:
        a = self.handle.adapter

        def steps():
            yield partial(self.hooks.add_begin, self.bridge.original_model.base_model, _offset)
            for site in block.sites:
                name = hook_name(site)
                if name not in self.bridge.hook_dict:
                    raise BackendError(self.name, f"reach site {site.name} (the bridge has no hook point {name!r})")
                yield partial(self.hooks.add_site, self.bridge.hook_dict[name], "output", site,
                              _canonical(site, a.n_heads, a.n_kv_heads))
        return acquire_all(steps())

    tap = attach
    edit = attach

    def forward(self, batch, logits: bool = True, stop_after: int | None = None, **kwargs):
        """Positions are ``batch.position_ids`` (counted from each row's first real token), like the others."""
        kwargs.setdefault("position_ids", batch.position_ids)

        def run():
            return self.bridge(batch.input_ids, attention_mask=batch.attention_mask,
                               return_type="logits" if logits else None, **kwargs)
        if logits:
            return run()
        stop = self.bridge.hook_dict[f"blocks.{stop_after}.hook_resid_post"] if stop_after is not None else None
        run_stopping(self.hooks, self.handle, stop, stop_after, run)
        return None

    def generate(self, batch, max_new_tokens: int, do_sample: bool, output_scores: bool, streamer=None, **kwargs):
        """HF's ``generate`` on the bridged clone (shared weights), so the bridge's hook points fire each step."""
        return hf_generate(self.bridge.original_model, self.handle.tokenizer, batch, max_new_tokens, do_sample,
                           output_scores, streamer, **kwargs)
