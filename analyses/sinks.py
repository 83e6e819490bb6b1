"""Attention sinks and active-dormant heads (Guo et al., "Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs", arXiv 2410.13835).

Everything is computed as reductions inside the capture hooks (``hiddenlens.capture(..., reduce=fn)``): each
layer's attention pattern ``[batch, heads, q, k]`` is reduced to per-head sums while the forward runs and is never
stored, so 30 layers x 9 heads x 2,048 tokens needs one layer's pattern at a time.

Positions are *relative to each prompt's first real token* (prompts are left-padded): "position 0" is the first
token, the BOS when ``add_bos=True``. Per layer and query head (grouped-query attention: query head h reads KV head
``h // (n_heads // n_kv_heads)``):

* ``sink_first``: attention mass of key 0, ``mass_j = sum_{i>=j} A_ij / (N - j)`` (mean over the queries that can
  see key j), averaged over prompts; ``other_mass`` / ``other_token``: the largest mass of any other key (per
  prompt, averaged) and the token that most often holds it (delimiters such as "." or "\\n");
* ``dormancy``: mean over queries i >= 1 of ``A_i0`` (token-level mean over all prompts); ``attends_sink`` is
  ``dormancy > tau`` with tau = 0.8 (INFERRED, "Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs" (arXiv 2410.13835): the threshold of Sandoval-Segura et al.);
* ``row_entropy``: mean over i >= 1 of ``-sum_j A_ij ln A_ij / ln(i + 1)``; ``col_entropy``: the max over keys j
  (with at least 2 queries) of the entropy of the renormalised column ``A_ij / sum_i A_ij`` (i >= j) divided by
  ``ln(N - j)``, averaged over prompts; ``sink_head`` is ``row_entropy < tau_row`` and ``col_entropy > tau_col``
  (defaults 0.5 and 0.9 are INFERRED: the official code has no defaults);
* ``logit_gap``: ``q_i.k_0/sqrt(d) - mean_{j<=i} q_i.k_j/sqrt(d)``, mean over queries i >= 1 (from ``attn.scores``);
* ``value_first`` / ``value_rest``: ``||W_O^h v_j||_2`` at position 0 vs the mean over j >= 1 (``attn.v`` times the
  head's column slice of the output projection), ``value_ratio`` = first / rest.

Per layer: ``resid_first``, ``resid_max_other``, ``resid_mean_other`` (norms of the block output ``resid_post``)
and their ratios (the residual-state peak).

Causal confirmation (:func:`head_ablation`): zero a head, or move all its attention to position 0, and report the
change in next-token cross-entropy. "Move to position 0" replaces the head's output at every query by its output
at position 0, which under softmax attention is exactly ``v_0`` (query 0 sees only key 0); it is therefore exact
for softmax models only. A head is ``dormant`` when it attends to the sink and neither intervention changes the
loss by more than ``eps`` nats (0.01 by default, INFERRED).
"""
from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from hiddenlens.common.batching import batch_starts
from hiddenlens.common.stats import entropy
from hiddenlens.models.tiny import offline_prose
from hiddenlens.probes.capture import capture
from hiddenlens.probes.edit import Apply, edit

TAU = 0.8
TAU_ROW = 0.5
TAU_COL = 0.9
EPS_CE = 0.01
_SITE = re.compile(r"blocks\.(\d+)\.(.+)")


# ---- prompts ------------------------------------------------------------------------------------------------
def prepare_prompts(handle, prompts, add_bos: bool = True, max_tokens: int | None = None) -> list[list[int]]:
    """Token-id lists (BOS first when ``add_bos``), each cut to at most ``max_tokens`` tokens."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise ValueError("no prompts given: pass at least one string or token-id list")
    batch = handle.tokenize(list(prompts), add_bos=add_bos)
    rows = [ids[m.bool()].tolist() for ids, m in zip(batch.input_ids.cpu(), batch.attention_mask.cpu())]
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens={max_tokens}: sink metrics need at least 2 tokens per prompt")
        rows = [r[:max_tokens] for r in rows]
    if any(len(r) < 2 for r in rows):
        raise ValueError("every prompt needs at least 2 tokens (the first position and one query that can see it)")
    return rows


def _batches(rows: list[list[int]], batch_size: int):
    for s in batch_starts(len(rows), batch_size):
        yield list(range(s, min(s + batch_size, len(rows))))


def _starts(rows: list[list[int]], idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padding offsets ``start [b]`` (first real position) and lengths ``[b]`` of a batch of rows."""
    lengths = torch.tensor([len(rows[i]) for i in idx])
    return int(lengths.max()) - lengths, lengths


# ---- pure reductions (hand-testable) ------------------------------------------------------------------------
def _masks(start: torch.Tensor, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``valid [b, q, k]`` (both real and k <= q) and relative positions ``rel [b, pos]``."""
    pos = torch.arange(width, device=device)
    rel = pos[None, :] - start.to(device)[:, None]
    real = rel >= 0
    valid = real[:, :, None] & real[:, None, :] & (pos[None, None, :] <= pos[None, :, None])
    return valid, rel


def pattern_reductions(pattern: torch.Tensor, start: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-prompt, per-head sink statistics of one layer's attention ``pattern [b, h, q, k]`` (float).

    ``start [b]``: index of each row's first real token (left padding; default all 0). Returns tensors over
    ``[b, h]`` unless noted: ``mass [b, h, k]`` (mass per *relative* key position, 0 past the prompt's end),
    ``sink_first``, ``other_mass``, ``other_pos`` (relative position of the largest other mass),
    ``attn0_sum`` / ``n_queries`` (sum and count of A_i0 over queries i >= 1), ``row_entropy_sum``,
    ``col_entropy`` (max over keys).
    """
    b, h, q, k = pattern.shape
    if q != k:
        raise ValueError(f"pattern must be square over the prompt [b, h, pos, pos], got {tuple(pattern.shape)}")
    a = pattern.float()
    start = torch.zeros(b, dtype=torch.long) if start is None else start.long()
    valid, rel = _masks(start, k, a.device)
    a = a * valid[:, None]
    n = (rel >= 0).sum(1)                                                       # [b] prompt lengths
    # mass per key: mean over the queries that can see it
    col_sum = a.sum(2)                                                          # [b, h, k]
    seen_by = (n[:, None] - rel).clamp_min(1)                                   # [b, k] = N - j
    mass_abs = col_sum / seen_by[:, None]
    idx = (start.to(a.device)[:, None] + torch.arange(k, device=a.device)[None]).clamp_max(k - 1)
    inside = (torch.arange(k, device=a.device)[None] < n[:, None])[:, None]     # [b, 1, k] within the prompt
    mass = mass_abs.gather(2, idx[:, None].expand(b, h, k)) * inside
    other = mass[:, :, 1:]
    other_mass, other_pos = other.max(-1)
    # attention of queries i >= 1 to position 0
    first = a.gather(3, start.to(a.device)[:, None, None, None].expand(b, h, q, 1))[..., 0]   # [b, h, q]
    query = rel >= 1                                                            # [b, q]
    attn0_sum = (first * query[:, None]).sum(-1)
    # row entropy (normalised by ln(i + 1)), queries i >= 1
    row_h = entropy(a.log(), from_log_probs=True) / torch.log((rel + 1).clamp_min(2).float())[:, None]
    row_entropy_sum = (row_h * query[:, None]).sum(-1)
    # column entropy of the renormalised column, keys with at least 2 queries, max over keys
    c = a / col_sum[:, :, None, :].clamp_min(1e-30)
    col_h = entropy(c.log().transpose(2, 3), from_log_probs=True) \
        / torch.log(seen_by.clamp_min(2).float())[:, None]                      # [b, h, k]
    keyok = (rel >= 0) & (seen_by >= 2)
    col_entropy = torch.where(keyok[:, None], col_h, torch.full_like(col_h, -1.0)).max(-1).values
    return {"mass": mass, "sink_first": mass[:, :, 0], "other_mass": other_mass, "other_pos": other_pos + 1,
            "attn0_sum": attn0_sum, "n_queries": query.sum(1), "row_entropy_sum": row_entropy_sum,
            "col_entropy": col_entropy}


def logit_gap_sum(scores: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over queries i >= 1 of ``s_i0 - mean_{j<=i} s_ij`` for ``scores [b, h, q, k]`` -> ``[b, h]``.

    Masked entries of ``scores`` (padding, future keys) are ignored whatever value they hold.
    """
    b, h, q, k = scores.shape
    start = torch.zeros(b, dtype=torch.long) if start is None else start.long()
    valid, rel = _masks(start, k, scores.device)
    s = torch.where(valid[:, None], scores.float(), torch.zeros((), device=scores.device))
    row_mean = s.sum(-1) / valid.sum(-1).clamp_min(1)[:, None]
    first = s.gather(3, start.to(s.device)[:, None, None, None].expand(b, h, q, 1))[..., 0]
    return ((first - row_mean) * (rel >= 1)[:, None]).sum(-1)


def head_value_norms(v: torch.Tensor, w_o: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``||W_O^h v_j||_2`` per query head and token: ``v [b, kv_heads, pos, d_head]``, ``w_o [d_model, n_heads *
    d_head]`` -> ``[b, n_heads, pos]``. Query head h reads KV head ``h // (n_heads // kv_heads)``."""
    b, kvh, p, d = v.shape
    if w_o.shape[1] != n_heads * d:
        raise ValueError(f"W_O has {w_o.shape[1]} input columns, expected n_heads*head_dim = {n_heads * d}")
    if n_heads % kvh:
        raise ValueError(f"{n_heads} query heads cannot share {kvh} KV heads")
    v_q = v.repeat_interleave(n_heads // kvh, dim=1).double()                   # [b, H, p, d]
    w = w_o.double().reshape(w_o.shape[0], n_heads, d)                          # [m, H, d]
    gram = torch.einsum("mhd,mhe->hde", w, w)                                   # W_O^h^T W_O^h  [H, d, d]
    sq = torch.einsum("bhpd,hde,bhpe->bhp", v_q, gram, v_q)                     # ||W_O^h v||^2, d^2 per token
    return sq.clamp_min(0).sqrt().float()


def o_proj_matrix(handle, layer: int) -> torch.Tensor:
    """The attention output projection of ``layer`` as ``[d_model, n_heads * head_dim]``."""
    from transformers.pytorch_utils import Conv1D  # heavy dependency (transformers): imported on use

    mod = handle.adapter.sub(handle.hf_model, layer, handle.adapter.o_path)
    return (mod.weight.T if isinstance(mod, Conv1D) else mod.weight).detach()


# ---- the capture pass ---------------------------------------------------------------------------------------
@dataclass
class SinkAnalysis:
    """Result of :func:`sink_analysis`: ``heads`` (one row per layer x head), ``layers`` (residual and value
    profiles), ``mass`` ``[layers, heads, pos]`` (mean mass per relative key position; NaN where no prompt reaches
    that position), and the settings used."""

    heads: pd.DataFrame
    layers: pd.DataFrame
    mass: np.ndarray
    settings: dict = field(default_factory=dict)


class _Accumulator:
    def __init__(self, n_layers: int, n_heads: int, width: int, tokenizer, count_layer: int):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.L, self.H = n_layers, n_heads
        self.sums = {k: z(n_layers, n_heads) for k in (
            "sink_first", "other_mass", "attn0", "n_queries", "row_entropy", "col_entropy", "logit_gap",
            "value_first", "value_rest", "n_rest", "n_prompts")}
        self.mass = z(n_layers, n_heads, width)
        self.mass_n = z(width)
        self.resid = {k: z(n_layers) for k in ("first", "max_other", "mean_other", "n")}
        self.other_tokens = [[Counter() for _ in range(n_heads)] for _ in range(n_layers)]
        self.tokenizer = tokenizer
        self.count_layer = count_layer  # the layer whose forwards count prompts per key position
        self.start = self.ids = None

    def pattern(self, layer: int, p: torch.Tensor) -> None:
        r = pattern_reductions(p, self.start)
        s = self.sums
        for key, src in (("sink_first", "sink_first"), ("other_mass", "other_mass"), ("attn0", "attn0_sum"),
                         ("row_entropy", "row_entropy_sum"), ("col_entropy", "col_entropy")):
            s[key][layer] += r[src].sum(0).double().cpu()
        s["n_queries"][layer] += float(r["n_queries"].sum())
        s["n_prompts"][layer] += p.shape[0]
        w = min(r["mass"].shape[-1], self.mass.shape[-1])
        self.mass[layer, :, :w] += r["mass"][:, :, :w].sum(0).double().cpu()
        if layer == self.count_layer:
            n = (self.ids.shape[1] - self.start)
            self.mass_n[:w] += (torch.arange(w)[None] < n[:, None]).sum(0).double()
        pos = (self.start[:, None].to(r["other_pos"].device) + r["other_pos"]).cpu()
        tok = self.ids.gather(1, pos.reshape(pos.shape[0], -1)).reshape(pos.shape)
        for row in tok.tolist():
            for head, t in enumerate(row):
                self.other_tokens[layer][head][t] += 1

    def scores(self, layer: int, sc: torch.Tensor) -> None:
        self.sums["logit_gap"][layer] += logit_gap_sum(sc, self.start).sum(0).double().cpu()

    def values(self, layer: int, v: torch.Tensor, w_o: torch.Tensor) -> None:
        norms = head_value_norms(v, w_o.to(v.device), self.H)                       # [b, H, p]
        b, _, p = norms.shape
        start = self.start.to(norms.device)
        rel = torch.arange(p, device=norms.device)[None] - start[:, None]
        first = norms.gather(2, start[:, None, None].expand(b, self.H, 1))[..., 0]
        rest = (norms * (rel >= 1)[:, None]).sum(-1)
        self.sums["value_first"][layer] += first.sum(0).double().cpu()
        self.sums["value_rest"][layer] += rest.sum(0).double().cpu()
        self.sums["n_rest"][layer] += float((rel >= 1).sum())

    def residual(self, layer: int, x: torch.Tensor) -> None:
        norms = x.float().norm(dim=-1)                                             # [b, p]
        rel = torch.arange(norms.shape[1], device=norms.device)[None] - self.start.to(norms.device)[:, None]
        first = norms.gather(1, self.start.to(norms.device)[:, None])[:, 0]
        others = torch.where(rel >= 1, norms, torch.full_like(norms, -1.0))
        mean_other = (norms * (rel >= 1)).sum(1) / (rel >= 1).sum(1)
        self.resid["first"][layer] += float(first.sum())
        self.resid["max_other"][layer] += float(others.max(1).values.sum())
        self.resid["mean_other"][layer] += float(mean_other.sum())
        self.resid["n"][layer] += norms.shape[0]

    def result(self, layers: list[int], handle, tau, tau_row, tau_col, settings) -> SinkAnalysis:
        s = self.sums
        kv_group = handle.adapter.n_heads // handle.adapter.n_kv_heads
        rows = []
        for layer in layers:
            n_p = float(s["n_prompts"][layer, 0])
            for h in range(self.H):
                tok, count = self.other_tokens[layer][h].most_common(1)[0]
                vf = float(s["value_first"][layer, h]) / n_p
                vr = float(s["value_rest"][layer, h] / s["n_rest"][layer, h])
                dormancy = float(s["attn0"][layer, h] / s["n_queries"][layer, h])
                row_h = float(s["row_entropy"][layer, h] / s["n_queries"][layer, h])
                col_h = float(s["col_entropy"][layer, h]) / n_p
                rows.append({
                    "layer": layer, "head": h, "kv_head": h // kv_group,
                    "sink_first": float(s["sink_first"][layer, h]) / n_p, "dormancy": dormancy,
                    "other_mass": float(s["other_mass"][layer, h]) / n_p,
                    "other_token": self.tokenizer.decode([tok]), "other_token_share": count / n_p,
                    "row_entropy": row_h, "col_entropy": col_h,
                    "logit_gap": float(s["logit_gap"][layer, h] / s["n_queries"][layer, h]),
                    "value_first": vf, "value_rest": vr, "value_ratio": vf / vr if vr > 0 else float("nan"),
                    "attends_sink": dormancy > tau, "sink_head": (row_h < tau_row) and (col_h > tau_col)})
        heads = pd.DataFrame(rows)
        r = self.resid
        lay = pd.DataFrame({"layer": layers,
                            "resid_first": [float(r["first"][i] / r["n"][i]) for i in layers],
                            "resid_max_other": [float(r["max_other"][i] / r["n"][i]) for i in layers],
                            "resid_mean_other": [float(r["mean_other"][i] / r["n"][i]) for i in layers]})
        lay["resid_ratio_max"] = lay.resid_first / lay.resid_max_other
        lay["resid_ratio_mean"] = lay.resid_first / lay.resid_mean_other
        g = heads.groupby("layer")
        lay["value_ratio_median"] = g.value_ratio.median().values
        lay["sink_first_mean"] = g.sink_first.mean().values
        lay["frac_attends_sink"] = g.attends_sink.mean().values
        with np.errstate(invalid="ignore", divide="ignore"):
            mass = (self.mass[layers] / self.mass_n[None, None]).numpy()
        mass[:, :, self.mass_n.numpy() == 0] = np.nan
        return SinkAnalysis(heads, lay, mass, settings)


def _layer_list(handle, layers) -> list[int]:
    n = handle.adapter.n_layers
    if layers is None:
        return list(range(n))
    out = sorted(set(int(i) for i in layers))
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ValueError(f"layers {bad} out of range: this model has layers 0..{n - 1}")
    return out


def sink_analysis(handle, prompts, add_bos: bool = True, max_tokens: int | None = None, batch_size: int = 8,
                  layers: Sequence[int] | None = None, tau: float = TAU, tau_row: float = TAU_ROW,
                  tau_col: float = TAU_COL, progress: bool = False) -> SinkAnalysis:
    """Every sink metric of the module docstring for ``layers`` (default all), in one capture pass.

    Args:
        handle: a loaded model (any backend).
        prompts: strings or token-id lists (see :func:`prepare_prompts`).
        add_bos: prepend the tokenizer's BOS so position 0 is a fixed token (the embedded SmolLM2 adds none).
        max_tokens: cut each prompt to this many tokens (BOS included).
        batch_size: prompts per forward.
        tau, tau_row, tau_col: thresholds of ``attends_sink`` and ``sink_head``.
        progress: tqdm bar over batches.
    """
    rows = prepare_prompts(handle, prompts, add_bos, max_tokens)
    layer_ids = _layer_list(handle, layers)
    width = max(len(r) for r in rows)
    acc = _Accumulator(handle.adapter.n_layers, handle.adapter.n_heads, width, handle.tokenizer, layer_ids[0])
    w_o = {i: o_proj_matrix(handle, i) for i in layer_ids}

    def reduce(name: str, t: torch.Tensor):
        layer, kind = _SITE.fullmatch(name).groups()
        layer = int(layer)
        if kind == "attn.pattern":
            acc.pattern(layer, t)
        elif kind == "attn.scores":
            acc.scores(layer, t)
        elif kind == "attn.v":
            acc.values(layer, t, w_o[layer])
        else:
            acc.residual(layer, t)
        return None

    spec = ",".join(map(str, layer_ids))
    sites = [f"blocks.{spec}.{k}" for k in ("attn.pattern", "attn.scores", "attn.v", "resid_post")]
    batches = list(_batches(rows, batch_size))
    if progress:
        batches = tqdm(batches, desc="sink metrics", unit="batch")
    with capture(handle, sites, reduce=reduce):
        for idx in batches:
            acc.start, _ = _starts(rows, idx)
            w = int(max(len(rows[i]) for i in idx))
            acc.ids = torch.stack([torch.tensor([0] * (w - len(rows[i])) + rows[i]) for i in idx])
            handle.run([rows[i] for i in idx], add_bos=None, logits=False)
    settings = {"n_prompts": len(rows), "tokens_per_prompt_max": width,
                "tokens_per_prompt_mean": float(np.mean([len(r) for r in rows])), "add_bos": add_bos,
                "tau": tau, "tau_row": tau_row, "tau_col": tau_col}
    return acc.result(layer_ids, handle, tau, tau_row, tau_col, settings)


def sink_scores(handle, prompts, **kwargs) -> pd.DataFrame:
    """The per-head table of :func:`sink_analysis` ``[layer, head, kv_head, sink_first, dormancy, ...]``."""
    return sink_analysis(handle, prompts, **kwargs).heads


# ---- per-head views -----------------------------------------------------------------------------------------
def head_pattern(handle, prompt, layer: int, head: int, add_bos: bool = True,
                 max_tokens: int | None = None) -> tuple[list[str], np.ndarray]:
    """One head's attention pattern on one prompt: ``(tokens, pattern [pos, pos])`` (float32, rows = queries)."""
    layer = _layer_list(handle, [layer])[0]
    if not 0 <= head < handle.adapter.n_heads:
        raise ValueError(f"head {head} out of range: this model has heads 0..{handle.adapter.n_heads - 1}")
    row = prepare_prompts(handle, [prompt], add_bos, max_tokens)[0]
    with capture(handle, f"blocks.{layer}.attn.pattern",
                 reduce=lambda name, t: t[:, head].float().cpu()) as cache:
        handle.run([row], add_bos=None, logits=False)
    pattern = cache.chunks(f"blocks.{layer}.attn.pattern")[0].value[0].numpy()
    return [handle.tokenizer.decode([t]) for t in row], pattern


def sink_leaving_tokens(handle, prompts, layer: int, head: int, add_bos: bool = True,
                        max_tokens: int | None = None, batch_size: int = 8, min_count: int = 3) -> pd.DataFrame:
    """Which query tokens make a head leave the sink: per query token, how often it occurs (queries i >= 1) and
    the mean of ``A_i0``; sorted by ``attn_first`` ascending. ``[token, token_id, count, attn_first]``."""
    layer = _layer_list(handle, [layer])[0]
    if not 0 <= head < handle.adapter.n_heads:
        raise ValueError(f"head {head} out of range: this model has heads 0..{handle.adapter.n_heads - 1}")
    rows = prepare_prompts(handle, prompts, add_bos, max_tokens)
    sums: Counter = Counter()
    counts: Counter = Counter()
    state = {}

    def reduce(name, t):
        a = t[:, head].float()
        first = a.gather(2, state["start"].to(a.device)[:, None, None].expand(-1, a.shape[1], 1))[..., 0].cpu()
        for b, idx in enumerate(state["idx"]):
            s = int(state["start"][b])
            for i, tok in enumerate(rows[idx][1:], start=s + 1):
                sums[tok] += float(first[b, i])
                counts[tok] += 1
        return None

    with capture(handle, f"blocks.{layer}.attn.pattern", reduce=reduce):
        for idx in _batches(rows, batch_size):
            state["start"], _ = _starts(rows, idx)
            state["idx"] = idx
            handle.run([rows[i] for i in idx], add_bos=None, logits=False)
    df = pd.DataFrame([{"token": handle.tokenizer.decode([t]), "token_id": t, "count": c, "attn_first": sums[t] / c}
                       for t, c in counts.items() if c >= min_count])
    if df.empty:
        raise ValueError(f"no query token occurs at least min_count={min_count} times; lower min_count")
    return df.sort_values(["attn_first", "count"], ascending=[True, False]).reset_index(drop=True)


# ---- causal confirmation ------------------------------------------------------------------------------------
@torch.inference_mode()
def _ce_sums(handle, rows, idx) -> tuple[float, int]:
    """Summed next-token cross-entropy (nats) over the real tokens of one batch, and the number of targets."""
    out = handle.run([rows[i] for i in idx], add_bos=None)
    logits, ids, mask = out.logits.float(), out.input_ids, out.attention_mask.bool()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    keep = mask[:, :-1] & mask[:, 1:]
    return float(ce[keep].sum()), int(keep.sum())


@dataclass
class HeadIntervention:
    """What :func:`intervene_head` changed: ``layer``, ``head``, ``mode``, ``changed_positions`` (head-output
    vectors replaced so far) and ``start`` (``[batch]`` first real positions of the *next* forward; None = 0)."""

    layer: int
    head: int
    mode: str
    changed_positions: int = 0
    start: torch.Tensor | None = None


@contextlib.contextmanager
def intervene_head(handle, layer: int, head: int, mode: str = "zero"):
    """Within the block, head ``head`` of ``layer`` is zeroed (``zero``) or attends only to position 0 (``bos``).

    An edit (:func:`hiddenlens.edit`) of the head's per-head attention output ``blocks.{layer}.attn.z`` (so it runs
    on every backend). ``bos`` copies the head's output at each row's first real position (``report.start``,
    default 0) to every position: exactly ``v_0`` under softmax attention. Yields a :class:`HeadIntervention` that
    counts what was changed.
    """
    a = handle.adapter
    layer = _layer_list(handle, [layer])[0]
    if not 0 <= head < a.n_heads:
        raise ValueError(f"head {head} out of range: this model has heads 0..{a.n_heads - 1}")
    if mode not in ("zero", "bos"):
        raise ValueError(f"mode {mode!r}: use 'zero' or 'bos'")
    report = HeadIntervention(layer, head, mode)

    def change(z: torch.Tensor, where) -> torch.Tensor:  # z [batch, 1 head, pos, head_dim]
        report.changed_positions += int(z.shape[0] * z.shape[2])
        if mode == "zero":
            return torch.zeros_like(z)
        start = torch.zeros(z.shape[0], dtype=torch.long) if report.start is None else report.start
        first = z[torch.arange(z.shape[0], device=z.device), :, start.to(z.device)]   # [b, 1, head_dim]
        return first[:, :, None, :].expand_as(z).clone()

    with edit(handle, {f"blocks.{layer}.attn.z": Apply(change)}, heads=[head]):
        yield report


def _check_jobs(handle, heads, modes) -> None:
    a = handle.adapter
    for m in modes:
        if m not in ("zero", "bos"):
            raise ValueError(f"mode {m!r}: use 'zero' or 'bos'")
    for layer, head in heads:
        _layer_list(handle, [layer])
        if not 0 <= head < a.n_heads:
            raise ValueError(f"head {head} out of range: this model has heads 0..{a.n_heads - 1}")


def head_ablation(handle, prompts, heads: Sequence[tuple[int, int]], modes: Sequence[str] = ("zero", "bos"),
                  add_bos: bool = True, max_tokens: int | None = None, batch_size: int = 8,
                  progress: bool = False, stack_rows: int = 32) -> pd.DataFrame:
    """Change in next-token cross-entropy when a head is zeroed (``zero``: ``A = 0``) or all its attention moves
    to position 0 (``bos``: its output at every query becomes its output at position 0, i.e. ``v_0`` under
    softmax).

    Batched: one forward runs several (head, mode) interventions at once on stacked copies of a batch of prompts,
    copy ``j`` carrying intervention ``j`` (an edit of ``blocks.{layer}.attn.z`` that changes only copy ``j``'s
    head), with ``max(1, stack_rows // rows in the batch)`` copies per forward; ``stack_rows=0`` runs one forward
    per intervention and batch through :func:`intervene_head` (the reference path; equal within float error,
    tested). Larger ``stack_rows`` means fewer, larger forwards and logits of ``[stack_rows, pos, vocab]`` floats.

    Returns ``[layer, head, mode, ce_base, ce, delta_ce, n_tokens, changed_positions]``
    (nats per predicted token; ``changed_positions`` counts head-output vectors replaced).
    """
    rows = prepare_prompts(handle, prompts, add_bos, max_tokens)
    _check_jobs(handle, heads, modes)
    if isinstance(stack_rows, bool) or not isinstance(stack_rows, int) or stack_rows < 0:
        raise ValueError(f"stack_rows={stack_rows!r}: use 0 (one forward per head) or a positive number of rows")
    batches = list(_batches(rows, batch_size))
    base = [_ce_sums(handle, rows, idx) for idx in batches]
    ce_base = sum(s for s, _ in base) / sum(n for _, n in base)
    jobs = [(layer, head, m) for layer, head in heads for m in modes]
    sums = {job: [0.0, 0, 0] for job in jobs}  # summed CE, targets, changed positions
    if stack_rows == 0:
        for job in tqdm(jobs, desc="head interventions", unit="run", disable=not progress):
            with intervene_head(handle, *job) as report:
                for idx in batches:
                    report.start, _ = _starts(rows, idx)
                    s, c = _ce_sums(handle, rows, idx)
                    sums[job][0] += s
                    sums[job][1] += c
            sums[job][2] = report.changed_positions
    else:
        groups = [(idx, jobs[g:g + max(1, stack_rows // len(idx))]) for idx in batches
                  for g in range(0, len(jobs), max(1, stack_rows // len(idx)))]
        for idx, group in tqdm(groups, desc="head interventions (stacked)", unit="forward", disable=not progress):
            for job, (s, c, changed) in zip(group, _stacked_ce_sums(handle, rows, idx, group)):
                sums[job][0] += s
                sums[job][1] += c
                sums[job][2] += changed
    out = []
    for (layer, head, mode), (total, n, changed) in sums.items():
        ce = total / n
        out.append({"layer": layer, "head": head, "mode": mode, "ce_base": ce_base, "ce": ce,
                    "delta_ce": ce - ce_base, "n_tokens": n, "changed_positions": changed})
    return pd.DataFrame(out)


@torch.inference_mode()
def _stacked_ce_sums(handle, rows, idx, group) -> list[tuple[float, int, int]]:
    """One forward over ``len(group)`` stacked copies of the batch ``idx``; copy ``j`` gets intervention
    ``group[j] = (layer, head, mode)``. Returns per intervention ``(summed CE, targets, changed positions)``."""
    b = len(idx)
    start, _ = _starts(rows, idx)
    by_layer: dict[int, list[tuple[int, int, str]]] = {}
    for j, (layer, head, mode) in enumerate(group):
        by_layer.setdefault(layer, []).append((j, head, mode))
    changed = [0] * len(group)

    def change_for(layer: int):
        def change(z: torch.Tensor, where) -> torch.Tensor:  # z [copies * b, heads, pos, head_dim]
            z = z.clone()
            for j, head, mode in by_layer[layer]:
                part = z[j * b:(j + 1) * b, head]                                # [b, pos, head_dim]
                changed[j] += int(part.shape[0] * part.shape[1])
                if mode == "zero":
                    z[j * b:(j + 1) * b, head] = 0
                else:
                    first = part[torch.arange(b, device=z.device), start.to(z.device)]  # [b, head_dim]
                    z[j * b:(j + 1) * b, head] = first[:, None, :]
            return z
        return change

    ops = {f"blocks.{layer}.attn.z": Apply(change_for(layer)) for layer in by_layer}
    with edit(handle, ops):
        out = handle.run([rows[i] for i in idx] * len(group), add_bos=None)
    logits, ids, mask = out.logits.float(), out.input_ids, out.attention_mask.bool()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    keep = mask[:, :-1] & mask[:, 1:]
    ce = torch.where(keep, ce, torch.zeros_like(ce)).reshape(len(group), b, -1).sum((1, 2))
    n = keep.reshape(len(group), b, -1).sum((1, 2))
    return [(float(ce[j]), int(n[j]), changed[j]) for j in range(len(group))]


def classify_dormant(heads: pd.DataFrame, ablation: pd.DataFrame, eps: float = EPS_CE) -> pd.DataFrame:
    """Join :func:`head_ablation` into a per-head table: ``delta_ce_zero``, ``delta_ce_bos`` and ``dormant``
    (attends to the sink and neither intervention moves the loss by more than ``eps`` nats)."""
    wide = ablation.pivot_table(index=["layer", "head"], columns="mode", values="delta_ce").reset_index()
    wide.columns = [c if c in ("layer", "head") else f"delta_ce_{c}" for c in wide.columns]
    df = heads.merge(wide, on=["layer", "head"], how="inner")
    if df.empty:
        raise ValueError("no ablated head is in the head table; pass heads that sink_analysis measured")
    deltas = df[[c for c in df.columns if c.startswith("delta_ce_")]].abs().max(axis=1)
    df["dormant"] = df.attends_sink & (deltas < eps)
    return df


# ---- active-dormant contrast --------------------------------------------------------------------------------
def default_domains(handle, n_prompts: int = 40, n_tokens: int = 128) -> dict[str, list[list[int]]]:
    """English prose (``pydoc_data.topics``) and Python code (the first 80 stdlib modules beside ``json``), each as
    ``n_prompts`` passages of ``n_tokens`` tokens (BOS first, then ``n_tokens - 1`` text tokens), taken at evenly
    spaced offsets of the text."""
    stdlib = Path(json.__file__).parent.parent
    code = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:80])
    out = {}
    for name, text in (("prose", offline_prose()), ("code", code)):
        max_chars = 200_000 + 40 * n_prompts * n_tokens  # ~10x the characters needed at ~4 characters a token
        ids = handle.tokenizer(text[:max_chars], add_special_tokens=False)["input_ids"]
        span = n_tokens - 1
        if len(ids) < n_prompts * span:
            raise ValueError(f"the {name} text has {len(ids)} tokens, fewer than {n_prompts} x {span}")
        step = (len(ids) - span) // n_prompts
        bos = handle.tokenizer.bos_token_id
        if bos is None:
            raise ValueError("this tokenizer has no BOS token; sink analyses need a fixed first token")
        out[name] = [[bos] + ids[i * step: i * step + span] for i in range(n_prompts)]
    return out


def domain_contrast(by_domain: dict[str, SinkAnalysis]) -> pd.DataFrame:
    """Side-by-side dormancy of every head on two domains: ``[layer, head, dormancy_<a>, dormancy_<b>, diff]``
    with ``diff = dormancy_<a> - dormancy_<b>``, sorted by ``|diff|`` (the most active-dormant heads first)."""
    if len(by_domain) != 2:
        raise ValueError(f"domain_contrast compares exactly 2 domains, got {list(by_domain)}")
    (na, a), (nb, b) = by_domain.items()
    cols = ["layer", "head", "dormancy", "sink_first"]
    df = a.heads[cols].merge(b.heads[cols], on=["layer", "head"], suffixes=(f"_{na}", f"_{nb}"))
    df["diff"] = df[f"dormancy_{na}"] - df[f"dormancy_{nb}"]
    df["switches"] = (df[f"dormancy_{na}"] > a.settings["tau"]) != (df[f"dormancy_{nb}"] > b.settings["tau"])
    return df.reindex(df["diff"].abs().sort_values(ascending=False).index).reset_index(drop=True)
