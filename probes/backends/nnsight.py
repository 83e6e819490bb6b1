"""The ``nnsight`` backend: an nnsight model over the handle's modules; reads and edits inside its traces.

``wrap_nnsight`` returns ``nnsight.modeling.transformers.TransformersModel(handle.hf_model, ...)``: nnsight 0.8's
name for what older releases called ``LanguageModel``. It wraps the *same* module objects and does not change the
attention implementation.

Forward: :meth:`NNsightBackend.forward` opens ``lm.trace(...)`` and visits, in execution order (nnsight refuses
values requested out of order), each module input / output that an open block needs (the same site table as the
``hf`` backend, :func:`hiddenlens.probes.backends.hf.site_point`, so every backend reads the same tensors). At each
one it runs the blocks' edits and reads (:func:`hiddenlens.probes.backends.hooks.process`, the code the ``hf``
hooks run) and assigns an edited value back through nnsight (``envoy.output = ...`` / ``envoy.inputs = ...``).
``attn.scores`` / ``attn.pattern`` are not module outputs under SDPA: they go through the per-layer eager switch
of :mod:`hiddenlens.probes.attention`, as on the other backends. With no logits wanted the trace stops after the
last block it needs (``tracer.stop()``).

Generate: ``lm.generate`` (nnsight's); while blocks are open, their sites are read and edited at every step by
the same dispatcher hooks as the ``hf`` backend, on the modules nnsight wraps.

Remote execution (NDIF, ``handle.run(prompts, remote=True)``, needs an API key and a model NDIF hosts): reads only,
saved inside the trace and recorded after it; edits and attention-weight sites raise. It cannot be exercised
offline.
"""
from __future__ import annotations

import contextvars
from functools import partial
from typing import Callable

import torch

from .. import context
from ..attention import attach_attention
from ..sites import Site
from .errors import BackendError
from .hf import HFBackend, site_point
from .hooks import acquire_all, hidden_arg, process, untuple



def wrap_nnsight(handle):
    """An nnsight ``TransformersModel`` (the former ``LanguageModel``) over ``handle.hf_model`` and its tokenizer."""
    try:
        from nnsight.modeling.transformers import TransformersModel
    except ImportError as exc:
        raise ImportError(f"backend='nnsight' needs nnsight >= 0.8 ({exc}); `pip install 'nnsight>=0.8'` or use "
                          "backend='hf'") from exc
    return TransformersModel(handle.hf_model, tokenizer=handle.tokenizer, task="text-generation")


def _execution_order(model: torch.nn.Module) -> dict[tuple[str, str], int]:
    """Rank of every module's input and output in one forward (measured on two tokens, by hooks removed at once)."""
    order: dict[tuple[str, str], int] = {}
    handles = []

    def mark(name, where):
        def hook(*_):
            order.setdefault((name, where), len(order))
        return hook

    try:
        for name, mod in model.named_modules():
            handles.append(mod.register_forward_pre_hook(mark(name, "input")))
            handles.append(mod.register_forward_hook(mark(name, "output")))
        with torch.no_grad():
            ids = torch.zeros((1, 2), dtype=torch.long, device=next(model.parameters()).device)
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return order


def _envoy(lm, name: str):
    obj = lm
    for part in name.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


class NNsightBackend:
    """Runs ``lm.trace`` / ``lm.generate`` of an nnsight model over ``handle.hf_model``."""

    name = "nnsight"

    def __init__(self, handle):
        self.handle = handle
        self.lm = wrap_nnsight(handle)
        self._hf = HFBackend(handle)
        self._names = {id(m): n for n, m in handle.hf_model.named_modules()}
        self._order: dict[tuple[str, str], int] | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.lm

    def _points(self, blocks) -> dict[tuple[str, str], dict[Site, list]]:
        """(module name, where) -> {site: [extract]} for every non-attention site of ``blocks``."""
        model, a = self.handle.hf_model, self.handle.adapter
        points: dict[tuple[str, str], dict[Site, list]] = {}
        for b in blocks:
            for site in b.sites:
                p = site_point(a, model, site)
                if p is not None:
                    points.setdefault((self._names[id(p[0])], p[1]), {})[site] = [p[2]]
        return points

    def attach(self, block) -> Callable[[], None]:
        """Attention-weight sites need the eager switch; the others are visited inside each trace."""
        model, a = self.handle.hf_model, self.handle.adapter
        return acquire_all(partial(attach_attention, self.handle, model, a.sub(model, s.layer, a.attn_path), s.layer)
                           for s in block.sites if site_point(a, model, s) is None)

    tap = attach
    edit = attach

    def forward(self, batch, logits: bool = True, stop_after: int | None = None, remote: bool = False, **kwargs):
        lm, handle = self.lm, self.handle
        blocks = context.open_blocks(handle)
        if remote and any(b.writes for b in blocks):
            raise BackendError(self.name, "edit with remote=True", "run edits locally (remote=False)")
        if self._order is None:  # measured in an empty context: the open blocks must not see that forward
            self._order = contextvars.Context().run(_execution_order, handle.hf_model)
        points = self._points(blocks)
        keys = sorted(points, key=self._order.__getitem__)
        head = (self._names[id(handle.adapter.unembedding(handle.hf_model))], "output")
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                  "position_ids": kwargs.pop("position_ids", batch.position_ids)}
        for b in blocks:  # before the trace: attention sites are handled by the eager switch while it runs
            b.begin_forward(0, batch.attention_mask, batch.input_ids.shape[1])
        saved: dict = {}
        stop = not logits and bool(keys) and not any(k == head for k in keys)
        with lm.trace(inputs, remote=remote, **kwargs) as tracer:
            for name, where in keys:
                envoy = _envoy(lm, name)
                raw = envoy.inputs if where == "input" else envoy.output
                tensor = hidden_arg(*raw) if where == "input" else untuple(raw)
                if remote:
                    saved[(name, where)] = tensor.save()
                    continue
                new = process(handle, points[(name, where)], tensor, blocks)
                if new is not None:
                    if where == "input":
                        args, kw = raw
                        envoy.inputs = ((new,) + tuple(args[1:]), kw) if args else (args, {**kw, "hidden_states": new})
                    else:
                        envoy.output = (new,) + tuple(raw[1:]) if isinstance(raw, tuple) else new
            if logits:
                saved[head] = _envoy(lm, head[0]).output.save()
            elif stop:
                tracer.stop()
        for key, value in saved.items():
            if key != head:
                process(handle, points[key], value, blocks)
        return saved[head] if logits else None

    def generate(self, batch, max_new_tokens: int, do_sample: bool, output_scores: bool, streamer=None, **kwargs):
        """nnsight's ``lm.generate``; open blocks read and edit every step through hooks on the wrapped modules."""
        if output_scores or streamer is not None:
            raise BackendError(self.name, "return per-step scores or stream tokens from generate",
                               "use backend='hf' or 'transformer_lens' for output_scores / streamer")
        release = acquire_all(partial(self._hf.attach, b) for b in context.open_blocks(self.handle))
        try:
            inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            seqs = self.lm.generate(inputs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                    pad_token_id=self.handle.tokenizer.pad_token_id, **kwargs)
        finally:
            release()
        return seqs, []
