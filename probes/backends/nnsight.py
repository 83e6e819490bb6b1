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

Remote execution (NDIF): ``handle.run(prompts, remote=True)`` / ``handle.generate(..., remote=True)`` pass
``remote`` to nnsight (``True``: NDIF with nnsight's own API key, ``NDIF_API_KEY`` or ``nnsight.CONFIG``; a host
URL; ``"local"``: nnsight's local simulation, which serializes the trace as for NDIF and runs it here with
hiddenlens hidden). The remote trace body uses nnsight and torch only: it saves each needed module tensor before
any edit, applies edits shipped as ``x * mult + add`` tensors (Add, Set, Scale, Zero, Patch), and the blocks' reads
and edit logs run here on the saved tensors afterwards. Function edits (``Apply``), attention-weight sites and
reads or edits during a remote ``generate`` raise :class:`BackendError`.
"""
from __future__ import annotations

import contextvars
import copy
from collections import defaultdict
from functools import partial
from typing import Callable

import torch

from hiddenlens.models.loading import input_device

from .. import context
from ..attention import attach_attention
from ..edit import Add, Patch, Scale, Set, Zero
from ..positions import PositionRange
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


def _execution_order(model: torch.nn.Module) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], tuple]]:
    """Rank of every module's input and output in one forward (measured on two tokens, by hooks removed at once),
    and the trailing shape (after ``[batch, pos]``) of each one's hidden tensor."""
    order: dict[tuple[str, str], int] = {}
    trail: dict[tuple[str, str], tuple] = {}
    handles = []

    def note(key, t):
        order.setdefault(key, len(order))
        if isinstance(t, torch.Tensor) and t.ndim >= 2:
            trail.setdefault(key, tuple(t.shape[2:]))

    def mark_input(name):
        def hook(mod, args, kwargs):
            note((name, "input"), args[0] if args else kwargs.get("hidden_states"))
        return hook

    def mark_output(name):
        def hook(mod, args, output):
            note((name, "output"), untuple(output))
        return hook

    try:
        for name, mod in model.named_modules():
            handles.append(mod.register_forward_pre_hook(mark_input(name), with_kwargs=True))
            handles.append(mod.register_forward_hook(mark_output(name)))
        with torch.no_grad():
            ids = torch.zeros((1, 2), dtype=torch.long, device=input_device(model))
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return order, trail


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
        self._trail: dict[tuple[str, str], tuple[int, ...]] = {}

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

    def forward(self, batch, logits: bool = True, stop_after: int | None = None, remote: bool | str = False,
                **kwargs):
        """One ``lm.trace``. ``remote``: False (here), True (NDIF), ``"local"`` (nnsight's local simulation of
        the remote path) or an NDIF host URL; see :meth:`_forward_remote`."""
        lm, handle = self.lm, self.handle
        blocks = context.open_blocks(handle)
        if remote:
            self._check_remote(blocks)
        if self._order is None:  # measured in an empty context: the open blocks must not see that forward
            self._order, self._trail = contextvars.Context().run(_execution_order, handle.hf_model)
        points = self._points(blocks)
        keys = sorted(points, key=self._order.__getitem__)
        head = (self._names[id(handle.adapter.unembedding(handle.hf_model))], "output")
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                  "position_ids": kwargs.pop("position_ids", batch.position_ids)}
        for b in blocks:  # before the trace: attention sites are handled by the eager switch while it runs
            b.begin_forward(0, batch.attention_mask, batch.input_ids.shape[1])
        if remote:
            return self._forward_remote(inputs, blocks, points, keys, head if logits else None, remote, kwargs)
        saved: dict = {}
        stop = not logits and bool(keys) and not any(k == head for k in keys)
        with lm.trace(inputs, **kwargs) as tracer:
            for name, where in keys:
                envoy = _envoy(lm, name)
                raw = envoy.inputs if where == "input" else envoy.output
                tensor = hidden_arg(*raw) if where == "input" else untuple(raw)
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
        return saved[head] if logits else None

    def _forward_remote(self, inputs, blocks, points, keys, head, remote, kwargs):
        """A trace whose body uses nnsight and torch only, so that NDIF (which has no hiddenlens) can run it.

        Each needed module input / output is saved *before* any edit (``clone().save()``) and comes back after the
        trace, where the blocks' edits and reads run on it here, in execution order (so reads, edit logs and
        ``fired`` counts are what a local run gives). Edits are shipped as an elementwise ``x * mult + add`` in the
        module's own layout, ``mult`` and ``add`` found by running the edit on probe tensors of zeros and ones
        (exact for Add, Set, Scale, Zero and Patch; :class:`~hiddenlens.probes.edit.Apply` (any function) and
        attention-weight sites raise :class:`BackendError`). The API key is nnsight's own (``NDIF_API_KEY`` or
        ``nnsight.CONFIG``); hiddenlens never reads or stores it."""
        handle = self.handle
        b_, p_ = inputs["input_ids"].shape
        plan = []
        for name, where in keys:
            shape = (b_, p_) + self._trail[(name, where)]
            mult, add = _affine(handle, points[(name, where)], shape, handle.dtype, handle.device, blocks)
            plan.append((_envoy(self.lm, name), where == "input", mult, add))
        head_envoy = _envoy(self.lm, head[0]) if head is not None else None
        values = _remote_trace(self.lm, inputs, plan, head_envoy, remote, kwargs)
        for key, value in zip(keys, values):
            process(handle, points[key], value, blocks)
        return values[-1] if head is not None else None

    def _check_remote(self, blocks) -> None:
        """Raise :class:`BackendError` for what the remote body cannot do (it runs no hiddenlens code)."""
        for b in blocks:
            attention = [s.name for s in b.sites if s.kind in ("attn.scores", "attn.pattern")]
            if attention:
                raise BackendError(self.name, f"read or edit {attention[0]} with remote=True (attention weights "
                                   "need hiddenlens' eager-attention switch on the server)", "use remote=False")
            for site, op in getattr(b, "ops", {}).items():
                if not isinstance(op, _AFFINE_OPS):
                    raise BackendError(self.name, f"apply {op!r} at {site.name} with remote=True (only Add, Set, "
                                       "Scale, Zero and Patch travel to the server as tensors)", "use remote=False")

    def generate(self, batch, max_new_tokens: int, do_sample: bool, output_scores: bool, streamer=None,
                 remote: bool | str = False, **kwargs):
        """nnsight's ``lm.generate``; open blocks read and edit every step through hooks on the wrapped modules.
        ``remote`` (as for :meth:`forward`) is passed to nnsight; with an open capture or edit it raises
        :class:`BackendError`: those per-step hooks are hiddenlens code, which does not run on NDIF."""
        if remote:
            return self._generate_remote(batch, max_new_tokens, do_sample, output_scores, streamer, remote, kwargs)
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

    def _generate_remote(self, batch, max_new_tokens, do_sample, output_scores, streamer, remote, kwargs):
        """``lm.generate(..., remote=remote)`` with nothing open on the handle; returns ``(sequences, [])``."""
        if context.open_blocks(self.handle):
            raise BackendError(self.name, "read or edit during generate with remote=True (per-step reads and edits "
                               "are hiddenlens hooks, which do not run on the server)",
                               "use handle.run(..., remote=True) for reads and edits of one forward, or remote=False")
        if output_scores or streamer is not None:
            raise BackendError(self.name, "return per-step scores or stream tokens from generate",
                               "use backend='hf' or 'transformer_lens' for output_scores / streamer")
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        seqs = _remote_generate(self.lm, inputs, remote, dict(kwargs, max_new_tokens=max_new_tokens,
                                                              do_sample=do_sample,
                                                              pad_token_id=self.handle.tokenizer.pad_token_id))
        return seqs.to(batch.input_ids.device), []


_AFFINE_OPS = (Add, Set, Scale, Zero, Patch)


def _affine(handle, sites: dict, shape: tuple, dtype, device, blocks) -> tuple:
    """``(mult, add)`` in a module's layout ``shape`` such that ``x * mult + add`` is what the open edits do to
    that module tensor ``x`` (None, None: no edit touches it). Found by running the edits (on copies of the
    blocks, so their logs are untouched) on zeros and on ones; ``mult`` is exactly 1 where ``f(1) == f(0) + 1``
    (an Add), so that ``x + add`` rounds as the local edit does."""
    writers = tuple(_dry_copy(b) for b in blocks if b.writes and any(s in b.site_set for s in sites))
    if not writers:
        return None, None
    zeros, ones = torch.zeros(shape, dtype=dtype, device=device), torch.ones(shape, dtype=dtype, device=device)
    f0 = process(handle, sites, zeros, writers)
    f1 = process(handle, sites, ones, writers)
    f0 = zeros if f0 is None else f0
    f1 = ones if f1 is None else f1
    mult = torch.where(f1 == f0 + 1, torch.ones_like(f1), f1 - f0)
    return mult, f0


def _dry_copy(block):
    """A shallow copy of an edit block whose logs are fresh (so probing it changes nothing the user reads)."""
    dry = copy.copy(block)
    dry.fired, dry.selected = dict(block.fired), dict(block.selected)
    dry.changes, dry._range = defaultdict(dict), PositionRange()
    return dry


def _remote_trace(lm, inputs: dict, plan: list, head_envoy, remote, kwargs: dict) -> list:
    """Run one trace with ``remote`` and return the saved tensors: each planned module input / output before its
    edit, then (with ``head_envoy``) the logits. The body uses only nnsight and torch: it is what travels to the
    server. ``plan``: ``[(envoy, is_input, mult | None, add | None)]`` in execution order."""
    import nnsight

    with lm.trace(inputs, remote=remote, **kwargs):
        values = nnsight.save(list())
        for envoy, is_input, mult, add in plan:
            raw = envoy.input if is_input else envoy.output
            tensor = raw[0] if isinstance(raw, tuple) else raw
            values.append(tensor.clone())
            if mult is not None:
                new = tensor * mult.to(tensor.device) + add.to(tensor.device)
                if is_input:
                    envoy.input = new
                elif isinstance(raw, tuple):
                    envoy.output = (new,) + tuple(raw[1:])
                else:
                    envoy.output = new
        if head_envoy is not None:
            values.append(head_envoy.output)
    return values


def _remote_generate(lm, inputs: dict, remote, kwargs: dict) -> torch.Tensor:
    """``lm.generate`` with ``remote``; the generated ``sequences`` (the body uses only nnsight)."""
    import nnsight

    with lm.generate(inputs, remote=remote, **kwargs) as tracer:
        out = nnsight.save(tracer.result)
    return out
