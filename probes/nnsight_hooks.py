"""The ``nnsight`` backend: an nnsight model over the handle's weights, captured with ``.save()`` inside a trace.

``wrap_nnsight`` returns ``nnsight.modeling.transformers.TransformersModel(handle.hf_model, ...)``: nnsight 0.8's
name for what older releases called ``LanguageModel`` (still importable, now a deprecated alias). It wraps the
*same* module objects, adds no hook to them, and does not change the attention implementation.

Capture: ``attach_nnsight`` only registers a *plan* (which module's input or output carries each site, from the
same site table as the ``hf`` backend, :func:`hiddenlens.probes.hf_hooks.site_taps`, so every backend reads the
same tensors); :func:`nnsight_forward` then opens ``lm.trace(...)``, requests each planned value with ``.save()``
in execution order (nnsight refuses values requested out of order), and hands them to the capture after the
trace. Attention patterns are the attention module's second output, which transformers only fills under eager
attention: the layers whose ``attn.pattern`` / ``attn.scores`` are requested are switched to eager for the block
(the same per-layer switch as the ``hf`` backend, :func:`hiddenlens.probes.attention.tapped_attention`);
``attn.scores`` (pre-softmax) is not an output of any module, so it is read by that switch's tap.

Remote execution: ``handle.run(prompts, remote=True)`` passes ``remote=True`` to ``lm.trace``, which runs the
trace on NDIF (https://ndif.us, needs an API key and a model NDIF hosts). That is the route for models too large
for one machine; it cannot be exercised offline, and ``attn.scores`` is not available remotely.

Generation: ``handle.generate`` works with this backend, but not inside a capture block (a clear error says to
use ``backend="hf"`` or ``"transformer_lens"`` for per-step capture).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from .attention import tapped_attention
from .hf_hooks import site_taps
from .sites import Site

#: id(capture) -> its plan, while the capture block is open
_PLANS: dict[int, "_Plan"] = {}
#: hf_model -> {(module name, "input" | "output"): rank in one forward}
_ORDER: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, str], int]]" = weakref.WeakKeyDictionary()


@dataclass
class _Plan:
    """What one capture reads: ``(site, key, extract)`` with ``key = (module name, "input" | "output")``."""

    reads: list[tuple[Site, tuple[str, str], Callable]] = field(default_factory=list)


def wrap_nnsight(handle):
    """An nnsight ``TransformersModel`` (the former ``LanguageModel``) over ``handle.hf_model`` and its tokenizer."""
    try:
        from nnsight.modeling.transformers import TransformersModel
    except ImportError as exc:
        raise ImportError(f"backend='nnsight' needs nnsight >= 0.8 ({exc}); `pip install 'nnsight>=0.8'` or use "
                          "backend='hf'") from exc
    return TransformersModel(handle.hf_model, tokenizer=handle.tokenizer, task="text-generation")


def _execution_order(model: torch.nn.Module) -> dict[tuple[str, str], int]:
    """Rank of every module's input and output in one forward (measured once per model on two tokens)."""
    if model in _ORDER:
        return _ORDER[model]
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
    _ORDER[model] = order
    return order


def attach_nnsight(handle, capture) -> Callable[[], None]:
    """Register ``capture``'s plan for :func:`nnsight_forward`; return the function that unregisters it."""
    model, adapter = handle.hf_model, handle.adapter
    names = {id(mod): name for name, mod in model.named_modules()}
    plan = _Plan()
    weight_sites: dict[torch.nn.Module, dict[str, Site]] = {}
    for site in capture.sites:
        tap = site_taps(adapter, model, site)
        if tap is None:  # attn.scores / attn.pattern
            attn = adapter.sub(model, site.layer, adapter.attn_path)
            weight_sites.setdefault(attn, {})[site.kind] = site
            if site.kind == "attn.pattern":
                plan.reads.append((site, (names[id(attn)], "output"), _second_output(site)))
            continue
        module, where, extract = tap
        if where == "input":
            extract = _from_inputs(extract)
        plan.reads.append((site, (names[id(module)], where), extract))
    order = _execution_order(model)
    plan.reads.sort(key=lambda r: order[r[1]])

    def make_tap(sites: dict[str, Site]):
        def tap(scores, pattern):
            if "attn.scores" in sites:
                capture.record(sites["attn.scores"], scores)
        return tap

    ctx = tapped_attention(model, {m: make_tap(s) for m, s in weight_sites.items()})
    ctx.__enter__()
    _PLANS[id(capture)] = plan

    def detach() -> None:
        _PLANS.pop(id(capture), None)
        ctx.__exit__(None, None, None)
    return detach


def _from_inputs(extract: Callable) -> Callable:
    """nnsight's ``.inputs`` is ``(args, kwargs)``, the same pair a PyTorch pre-hook sees."""
    return lambda value: extract((tuple(value[0]), dict(value[1])))


def _second_output(site: Site) -> Callable:
    def extract(output):
        if not isinstance(output, (tuple, list)) or len(output) < 2 or output[1] is None:
            raise RuntimeError(f"{site.name}: the attention module returned no weights; this architecture's "
                               "attention does not go through transformers' attention interface")
        return output[1]
    return extract


def _envoy(lm, name: str):
    obj = lm
    for part in name.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def nnsight_forward(handle, batch, logits: bool = True, remote: bool = False, **kwargs):
    """One ``lm.trace`` over a :class:`Batch`; returns logits ``[batch, pos, vocab]`` (None with ``logits=False``).

    Every open capture on the handle gets the values of its plan. Positions are ``batch.position_ids`` (counted
    from each row's first real token), like the other backends.
    """
    from hiddenlens.probes.active import active_captures

    lm = handle.model
    caps = [c for c in active_captures(handle) if id(c) in _PLANS]
    order = _execution_order(handle.hf_model)
    keys = sorted({key for c in caps for _, key, _ in _PLANS[id(c)].reads}, key=order.__getitem__)
    names = {id(m): n for n, m in handle.hf_model.named_modules()}
    head = names[id(handle.adapter.unembedding(handle.hf_model))]
    if logits and (head, "output") not in keys:
        keys.append((head, "output"))
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "position_ids": kwargs.pop("position_ids", batch.position_ids)}
    for c in caps:  # before the trace: attn.scores are recorded by the attention tap while it runs
        c.begin_forward(0, batch.attention_mask)
    saved = {}
    grad = any(c.grad for c in caps) or (not caps and torch.is_grad_enabled())
    with torch.enable_grad() if grad else torch.no_grad():
        with lm.trace(inputs, remote=remote, **kwargs):
            for name, where in keys:
                envoy = _envoy(lm, name)
                saved[(name, where)] = (envoy.inputs if where == "input" else envoy.output).save()
    for c in caps:
        for site, key, extract in _PLANS[id(c)].reads:
            c.record(site, extract(saved[key]))
    return saved[(head, "output")] if logits else None


def nnsight_generate(handle, batch, max_new_tokens: int, do_sample: bool, **kwargs) -> torch.Tensor:
    """Greedy or sampled generation through ``lm.generate``; returns ``sequences`` ``[batch, prompt + new]``.

    Raises ``RuntimeError`` inside a capture block: per-step capture is not implemented for this backend.
    """
    from hiddenlens.probes.active import active_captures

    if any(id(c) in _PLANS for c in active_captures(handle)):
        raise RuntimeError("capture during generate is not supported with backend='nnsight'; load the model with "
                           "backend='hf' or 'transformer_lens' to capture each generation step, or capture the "
                           "prompt pass with handle.run(...)")
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with torch.no_grad():
        return handle.model.generate(inputs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                     pad_token_id=handle.tokenizer.pad_token_id, **kwargs)
