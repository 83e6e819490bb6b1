"""Backend-specific forward, generate and capture attachment for :class:`ModelHandle`.

``hf`` runs the transformers model with PyTorch hooks. ``transformer_lens`` runs a ``TransformerBridge`` over
the same weights and captures through its hook points. ``nnsight`` runs an nnsight ``LanguageModel`` over the
same weights and captures with ``.save()`` inside a trace (its ``remote=True`` execution on NDIF is the route for
models that do not fit one machine: pass ``remote=True`` through ``handle.run(..., remote=True)``).
"""
from __future__ import annotations

import torch

BACKENDS = ("hf", "transformer_lens", "nnsight")


def wrap(handle, backend: str):
    """Build the backend object (bridge / LanguageModel) around ``handle.hf_model``; None for ``hf``."""
    if backend == "hf":
        return None
    if backend == "transformer_lens":
        from hiddenlens.probes.tl_hooks import wrap_transformer_lens
        return wrap_transformer_lens(handle)
    if backend == "nnsight":
        from hiddenlens.probes.nnsight_hooks import wrap_nnsight
        return wrap_nnsight(handle)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def attach(handle, capture):
    """Install ``capture`` on the handle; returns the function that removes everything it installed."""
    from hiddenlens.probes import active

    if handle.backend == "hf":
        from hiddenlens.probes.hf_hooks import attach_hf as impl
    elif handle.backend == "transformer_lens":
        from hiddenlens.probes.tl_hooks import attach_tl as impl
    else:
        from hiddenlens.probes.nnsight_hooks import attach_nnsight as impl
    detach = impl(handle, capture)
    active.push(handle, capture)

    def undo():
        try:
            detach()
        finally:
            active.pop(handle, capture)
    return undo


def backend_forward(handle, batch, logits: bool = True, **kwargs):
    """One forward over a :class:`Batch`; returns logits ``[batch, pos, vocab]`` or None.

    Runs without autograd unless a capture with ``grad=True`` is active on the handle.
    """
    from hiddenlens.probes.active import active_captures

    grad = torch.is_grad_enabled() and any(c.grad for c in active_captures(handle))
    with torch.enable_grad() if grad else torch.no_grad():
        return _forward(handle, batch, logits, **kwargs)


def _forward(handle, batch, logits: bool, **kwargs):
    if handle.backend == "hf":
        kwargs.setdefault("position_ids", batch.position_ids)
        if logits:
            return handle.hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   use_cache=False, **kwargs).logits
        handle.hf_model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   use_cache=False, **kwargs)
        return None
    if handle.backend == "transformer_lens":
        from hiddenlens.probes.tl_hooks import tl_forward
        return tl_forward(handle, batch, logits=logits, **kwargs)
    from hiddenlens.probes.nnsight_hooks import nnsight_forward
    return nnsight_forward(handle, batch, logits=logits, **kwargs)


def backend_generate(handle, batch, max_new_tokens: int, do_sample: bool, output_scores: bool, streamer=None,
                     **kwargs):
    """Generate from a :class:`Batch` with the KV cache; returns a :class:`GenerationOutput`."""
    from .handle import GenerationOutput

    if handle.backend == "nnsight":
        from hiddenlens.probes.nnsight_hooks import nnsight_generate
        seqs = nnsight_generate(handle, batch, max_new_tokens=max_new_tokens, do_sample=do_sample, **kwargs)
        scores = []
    else:
        # transformer_lens: HF's generate on the bridged clone (shared weights), so the bridge's hook points fire.
        tok = handle.tokenizer
        model = handle.hf_model
        if handle.backend == "transformer_lens":
            from hiddenlens.probes.tl_hooks import generation_model
            model = generation_model(handle)
        out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             max_new_tokens=max_new_tokens, do_sample=do_sample,
                             pad_token_id=tok.pad_token_id, return_dict_in_generate=True,
                             output_scores=output_scores, streamer=streamer, **kwargs)
        seqs, scores = out.sequences, list(out.scores or [])
    plen = batch.input_ids.shape[1]
    new = seqs[:, plen:]
    mask = torch.cat([batch.attention_mask, torch.ones_like(new)], 1)
    texts = handle.tokenizer.batch_decode(new, skip_special_tokens=True)
    return GenerationOutput(seqs, plen, texts, mask, scores)
