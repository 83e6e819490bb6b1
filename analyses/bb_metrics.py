"""Sink metrics of Bigram-Backcopy models (Guo et al., arXiv 2410.13835), read through ``hiddenlens.capture``.

The task, model and training live in ``hiddenlens.models.bb_task`` / ``bb_model`` / ``bb_training``; this module
measures what the paper reports: attention to BOS at trigger and non-trigger queries, the copy attention, value
drains and residual-state peaks, per layer. :func:`sink_evaluator` plugs them into training's history.
"""
from __future__ import annotations

import torch

from hiddenlens.models.bb_model import KIND
from hiddenlens.models.bb_task import BBGenerator, query_masks, task_losses
from hiddenlens.models.bb_training import Evaluator, eval_batch


def as_handle(model, tokenizer, spec: str = KIND):
    """Wrap an in-memory BB model into a :class:`~hiddenlens.ModelHandle` (hf backend) for captures."""
    from hiddenlens.models.adapter import discover_adapter
    from hiddenlens.probes.handle import ModelHandle

    return ModelHandle(model, tokenizer, discover_adapter(model), spec, info={"spec": spec})


@torch.no_grad()
def bb_metrics(handle, gen: BBGenerator, n_seqs: int = 256, seed: int = 12345) -> dict:
    """Sink metrics of a BB model on fresh sequences, per layer (head 0), through ``hiddenlens.capture``.

    Queries are input positions p >= 1; a trigger query holds a trigger token (its target is x_{p-1}).
    Returns ``{"loss", "trigger_loss", "nontrigger_loss", "bigram_optimum", "layers": [per-layer dict]}`` with
    per layer: ``bos_attn_nontrigger`` (mean A[p, 0]), ``bos_attn_trigger``, ``copy_attn_trigger`` (mean
    A[p, p-1] at trigger queries), ``bos_share`` (sum of A[p, 0] over the sum of all weights, non-trigger
    queries; equals ``bos_attn_nontrigger`` under softmax), ``value_norm_ratio`` (||W_O v_BOS|| over the mean of
    the other positions), ``resid_ratio_mean`` / ``resid_ratio_max`` (block output norm at BOS over the mean / max
    of the others).
    """
    from hiddenlens.analyses.sinks import head_value_norms, o_proj_matrix
    from hiddenlens.probes.capture import capture

    x = eval_batch(gen, n_seqs, seed)
    inp = x[:, :-1]
    was_training = handle.hf_model.training
    handle.hf_model.eval()
    try:
        with capture(handle, ["blocks.*.attn.pattern", "blocks.*.attn.v", "blocks.*.resid_post"],
                     to="cpu", dtype=torch.float32) as cache:
            logits = handle.run(inp.to(handle.device), add_bos=None).logits.float()
    finally:
        handle.hf_model.train(was_training)
    out = task_losses(logits, x, gen) | {"layers": []}
    trig, nontrig = query_masks(inp, gen)
    rows = torch.arange(inp.shape[1])
    for layer in range(handle.adapter.n_layers):
        a = cache[f"blocks.{layer}.attn.pattern"][:, 0]                              # [n, q, k]
        to_bos = a[:, :, 0]
        prev = torch.zeros_like(to_bos)
        prev[:, 1:] = a[:, rows[1:], rows[1:] - 1]
        total = a.sum(-1)
        vnorm = head_value_norms(cache[f"blocks.{layer}.attn.v"], o_proj_matrix(handle, layer).cpu(),
                                 handle.adapter.n_heads)[:, 0]                       # [n, pos]
        r = cache[f"blocks.{layer}.resid_post"].norm(dim=-1)                         # [n, pos]
        out["layers"].append({
            "layer": layer,
            "bos_attn_nontrigger": float(to_bos[nontrig].mean()),
            "bos_attn_trigger": float(to_bos[trig].mean()) if trig.any() else float("nan"),
            "copy_attn_trigger": float(prev[trig].mean()) if trig.any() else float("nan"),
            "bos_share": float(to_bos[nontrig].sum() / total[nontrig].sum().clamp_min(1e-12)),
            "value_norm_ratio": float(vnorm[:, 0].mean() / vnorm[:, 1:].mean()),
            "resid_ratio_mean": float(r[:, 0].mean() / r[:, 1:].mean()),
            "resid_ratio_max": float((r[:, 0] / r[:, 1:].max(1).values).mean()),
        })
    return out


def flat_metrics(m: dict) -> dict:
    """One flat row: the losses plus each layer's metrics as ``L{layer}_{name}``."""
    row = {k: v for k, v in m.items() if k != "layers"}
    for lm in m["layers"]:
        row.update({f"L{lm['layer']}_{k}": v for k, v in lm.items() if k != "layer"})
    return row


def sink_evaluator(n_seqs: int = 256, seed: int = 12345) -> Evaluator:
    """An ``evaluate`` for :func:`hiddenlens.models.bb_training.train`: :func:`bb_metrics`, flattened."""
    handles: dict[int, object] = {}

    def evaluate(model, tokenizer, gen: BBGenerator) -> dict:
        handle = handles.get(id(model))
        if handle is None or handle.hf_model is not model:
            handle = handles[id(model)] = as_handle(model, tokenizer)
        return flat_metrics(bb_metrics(handle, gen, n_seqs, seed))

    return evaluate
