"""Causal patching (``hiddenlens.interventions.patching``): activation patching, attribution patching, ablations.

Built on the edit primitive (:func:`hiddenlens.edit`), so every method runs on every backend.

**Activation patching** over sites x positions (x heads): for each prompt pair (clean, corrupted, the same number
of tokens), each cell's activation of one run is replaced by the other run's. ``direction="denoise"`` patches
clean into the corrupted run (how much of the clean behaviour does this cell restore?), ``"noise"`` patches
corrupted into the clean run (how much does this cell break?). The metric is the logit difference
``logit(answer) - logit(wrong)`` at the last position; ``normalized = (m - m_corrupt) / (m_clean - m_corrupt)``
(0 = the corrupted run, 1 = the clean run, for both directions). One forward per site and pair: the rows of
that forward patch different positions (or heads), so a 30-layer x 10-position map costs 30 forwards per pair.

**Attribution patching** (first order, "Attribution Patching: Activation Patching At Industrial Scale", Nanda
2023): ``(a_clean - a_corrupt) . dm/da`` with the gradient taken at the corrupted run: one forward and one backward
per pair for the whole grid. It equals activation patching where ``m`` is linear in the patched activation
(e.g. at ``final_norm``), and approximates it elsewhere; :func:`compare` reports their correlation.

**Ablations** (:func:`ablation_op`): zero, mean (over a reference prompt set, per position from the end or over
all positions) and resample (the activation of a randomly drawn reference prompt), for any site, head or position
set, as an :class:`~hiddenlens.probes.edit.Op` to pass to :func:`hiddenlens.edit`.

Uncertainty: per-pair results plus, per cell, the mean over pairs with a bootstrap confidence interval
(:func:`hiddenlens.common.stats.bootstrap_ci`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from hiddenlens.common.stats import bootstrap_ci
from hiddenlens.probes.capture import capture
from hiddenlens.probes.edit import Apply, Op, Set, edit
from hiddenlens.probes.sites import HEAD_SITES, Site, resolve_sites

DIRECTIONS = ("denoise", "noise")


@dataclass(frozen=True)
class PromptPair:
    """A clean and a corrupted prompt of the same token length, the answer the clean prompt should get and the one
    the corrupted prompt should get (single tokens, e.g. ``" Paris"`` / ``" Rome"``)."""

    clean: str
    corrupted: str
    answer: str
    wrong: str


def _token(handle, text: str) -> int:
    ids = handle.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"answer {text!r} is {len(ids)} tokens; the metric needs single-token answers "
                         f"(e.g. with a leading space: {' ' + text.strip()!r})")
    return ids[0]


def _all_pair_ids(handle, pairs: Sequence[PromptPair], add_bos) -> list[tuple[list[int], list[int]]]:
    """Token ids of every pair; all pairs must share one length (cells are averaged over pairs by position)."""
    ids = [_pair_ids(handle, p, add_bos) for p in pairs]
    lengths = sorted({len(c) for c, _ in ids})
    if len(lengths) > 1:
        raise ValueError(f"the pairs tokenize to lengths {lengths}; results are averaged over pairs position by "
                         "position, so write every pair from one template of the same token length")
    return ids


def _setup(handle, pairs, sites, metric: str, add_bos):
    """Checked inputs of a patching run: ``(sites, their names, token ids of every pair)``."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: choose one of {METRICS}")
    if not pairs:
        raise ValueError("no prompt pairs given")
    site_list = resolve_sites(sites, handle.n_layers, handle.adapter.unavailable)
    return site_list, [s.name for s in site_list], _all_pair_ids(handle, pairs, add_bos)


def _pair_row(i: int, pair: PromptPair, m_clean: float, m_corrupt: float) -> dict:
    return {"pair": i, "clean": pair.clean, "corrupted": pair.corrupted, "answer": pair.answer, "wrong": pair.wrong,
            "metric_clean": m_clean, "metric_corrupted": m_corrupt}


def _pair_ids(handle, pair: PromptPair, add_bos) -> tuple[list[int], list[int]]:
    clean = handle.tokenize(pair.clean, add_bos=add_bos).input_ids[0].tolist()
    corrupt = handle.tokenize(pair.corrupted, add_bos=add_bos).input_ids[0].tolist()
    if len(clean) != len(corrupt):
        raise ValueError(f"clean {pair.clean!r} is {len(clean)} tokens and corrupted {pair.corrupted!r} is "
                         f"{len(corrupt)}; patching compares positions, so write pairs of the same token length")
    return clean, corrupt


METRICS = ("logit_diff", "prob")


def logit_diff(logits: torch.Tensor, answer: int, wrong: int) -> torch.Tensor:
    """``logits [..., vocab]`` -> ``logit(answer) - logit(wrong)`` ``[...]`` (float32)."""
    return logits[..., answer].float() - logits[..., wrong].float()


def patch_metric(logits: torch.Tensor, answer: int, wrong: int, metric: str) -> torch.Tensor:
    """``logit_diff`` (logit units) or ``prob`` (the answer's probability) of ``logits [..., vocab]``."""
    if metric == "logit_diff":
        return logit_diff(logits, answer, wrong)
    if metric == "prob":
        return torch.softmax(logits.float(), -1)[..., answer]
    raise ValueError(f"metric={metric!r}: choose one of {METRICS}")


@dataclass
class PatchingResult:
    """``cells``: one row per (pair, site, position[, head]) with ``metric`` (logit difference) and
    ``normalized``; ``pairs``: per pair ``clean`` / ``corrupted`` metrics and the tokens. :meth:`summary` gives
    the mean over pairs per cell with a bootstrap CI; :meth:`grid` a site x position (or layer x head) table."""

    cells: pd.DataFrame
    pairs: pd.DataFrame
    direction: str
    method: str

    def summary(self, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
        keys = [k for k in ("site", "layer", "head", "position") if k in self.cells]
        rows = []
        for key, g in self.cells.groupby(keys, sort=False, dropna=False):
            vals = g["normalized"].to_numpy(dtype=float)
            lo, hi = bootstrap_ci(vals, level=level, seed=seed) if len(vals) > 1 else (np.nan, np.nan)
            rows.append(dict(zip(keys, key if isinstance(key, tuple) else (key,)),
                             normalized=float(vals.mean()), ci_low=lo, ci_high=hi, n_pairs=len(vals),
                             metric=float(g["metric"].mean())))
        return pd.DataFrame(rows)

    def grid(self, value: str = "normalized") -> pd.DataFrame:
        """Mean ``value`` over pairs as a table: rows = sites (or layers), columns = positions (or heads)."""
        s = self.summary() if value in ("normalized", "ci_low", "ci_high") else self.cells
        if "head" in s and s["head"].notna().any():
            return s.pivot_table(index="layer", columns="head", values=value, aggfunc="mean")
        return s.pivot_table(index="site", columns="position", values=value, aggfunc="mean", sort=False)


def _cells(handle, site: Site, n_pos: int, per_head: bool, positions: Sequence[int] | None):
    """The cells of one site: ``(position or None, head or None)`` per row of its patched forward."""
    pos = list(range(n_pos)) if positions is None else [p if p >= 0 else n_pos + p for p in positions]
    if per_head:
        if site.kind not in HEAD_SITES:
            raise ValueError(f"per_head=True needs per-head sites (attn.z, attn.q/k/v...), not {site.name}")
        n = handle.adapter.n_kv_heads if site.kind in ("attn.k", "attn.v") else handle.adapter.n_heads
        return [(None, h) for h in range(n)]
    return [(p, None) for p in pos]


def _row_patch(cells, source: torch.Tensor) -> Op:
    """An op patching row r at ``cells[r]`` (position, head) with ``source`` (the other run, canonical layout)."""
    def patch(region: torch.Tensor, where) -> torch.Tensor:
        out = region.clone()
        src = source.to(device=region.device, dtype=region.dtype)
        head_axis, pos_axis = (1, 2) if where.site.per_head else (None, 1)
        for r, (p, h) in enumerate(cells):
            if h is not None:
                out[r, h] = src[0, h]
            elif head_axis is not None:
                out[r, :, p] = src[0, :, p]
            else:
                out[r, p] = src[0, p]
        return out
    return Apply(patch)


def activation_patching(handle, pairs: Sequence[PromptPair], sites: str | Sequence[str] = "blocks.*.resid_post",
                        direction: str = "denoise", per_head: bool = False, positions: Sequence[int] | None = None,
                        metric: str = "logit_diff", add_bos: bool | None = None,
                        progress: bool = True) -> PatchingResult:
    """Activation patching of every cell of ``sites`` (x positions, or x heads with ``per_head``) for each pair.

    ``positions``: patch only these (absolute; negative from the end); default every position. With ``per_head``
    each head is patched at every position at once (TransformerLens's per-head maps)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}: choose one of {DIRECTIONS}")
    site_list, names, all_ids = _setup(handle, pairs, sites, metric, add_bos)
    rows, pair_rows = [], []
    it = tqdm(list(enumerate(pairs)), desc="activation patching", disable=not progress)
    for i, pair in it:
        clean_ids, corrupt_ids = all_ids[i]
        ans, wrong = _token(handle, pair.answer), _token(handle, pair.wrong)
        with torch.inference_mode():
            with capture(handle, names) as clean:
                m_clean = float(patch_metric(handle.run([clean_ids], add_bos=None).logits[0, -1], ans, wrong,
                                             metric))
            with capture(handle, names) as corrupt:
                m_corrupt = float(patch_metric(handle.run([corrupt_ids], add_bos=None).logits[0, -1], ans, wrong,
                                               metric))
        source, target_ids = (clean, corrupt_ids) if direction == "denoise" else (corrupt, clean_ids)
        span = m_clean - m_corrupt
        pair_rows.append(_pair_row(i, pair, m_clean, m_corrupt))
        for site in site_list:
            cells = _cells(handle, site, len(clean_ids), per_head, positions)
            with torch.inference_mode(), edit(handle, {site.name: _row_patch(cells, source[site.name])}):
                logits = handle.run([target_ids] * len(cells), add_bos=None).logits[:, -1]
            values = patch_metric(logits, ans, wrong, metric).cpu().numpy()
            for (p, h), m in zip(cells, values):
                rows.append({"pair": i, "site": site.name, "layer": site.layer, "head": h, "position": p,
                             "metric": float(m), "normalized": (float(m) - m_corrupt) / span if span else np.nan})
    return PatchingResult(pd.DataFrame(rows), pd.DataFrame(pair_rows), direction, "activation")


def attribution_patching(handle, pairs: Sequence[PromptPair], sites: str | Sequence[str] = "blocks.*.resid_post",
                         per_head: bool = False, metric: str = "logit_diff", add_bos: bool | None = None,
                         progress: bool = True) -> PatchingResult:
    """First-order estimate of denoising activation patching: ``(a_clean - a_corrupt) . dm/da`` at the corrupted
    run (one forward + one backward per pair), normalised like :func:`activation_patching`."""
    site_list, names, all_ids = _setup(handle, pairs, sites, metric, add_bos)
    rows, pair_rows = [], []
    for i, pair in tqdm(list(enumerate(pairs)), desc="attribution patching", disable=not progress):
        clean_ids, corrupt_ids = all_ids[i]
        ans, wrong = _token(handle, pair.answer), _token(handle, pair.wrong)
        with torch.inference_mode(), capture(handle, names) as clean:
            m_clean = float(patch_metric(handle.run([clean_ids], add_bos=None).logits[0, -1], ans, wrong, metric))
        taken: dict[str, torch.Tensor] = {}

        def take(region: torch.Tensor, where) -> torch.Tensor:
            """Identity op whose output the forward continues from: the gradient w.r.t. it is dm/da, in the
            site's canonical layout (also for per-head views of a module's input)."""
            taken[where.site.name] = out = region.clone()
            return out

        with torch.enable_grad(), edit(handle, {n: Apply(take) for n in names}, grad=True):
            value = patch_metric(handle.run([corrupt_ids], add_bos=None).logits[0, -1], ans, wrong, metric)
        grads = torch.autograd.grad(value, [taken[n] for n in names])
        corrupt = {n: taken[n].detach() for n in names}
        m_corrupt = float(value.detach())
        span = m_clean - m_corrupt
        pair_rows.append(_pair_row(i, pair, m_clean, m_corrupt))
        for site, g in zip(site_list, grads):
            delta = (clean[site.name].float() - corrupt[site.name].float()) * g.float()  # [1, (h,) pos, d]
            if per_head:
                if site.kind not in HEAD_SITES:
                    raise ValueError(f"per_head=True needs per-head sites, not {site.name}")
                est = delta[0].sum(dim=(1, 2))                                                     # [heads]
                cells = [(None, h, float(e)) for h, e in enumerate(est)]
            else:
                est = delta[0].sum(dim=(0, 2)) if site.per_head else delta[0].sum(-1)              # [pos]
                cells = [(p, None, float(e)) for p, e in enumerate(est)]
            for p, h, e in cells:
                rows.append({"pair": i, "site": site.name, "layer": site.layer, "head": h, "position": p,
                             "metric": m_corrupt + e, "normalized": e / span if span else np.nan})
    return PatchingResult(pd.DataFrame(rows), pd.DataFrame(pair_rows), "denoise", "attribution")


def compare(activation: PatchingResult, attribution: PatchingResult) -> pd.DataFrame:
    """Both estimates per cell (mean over pairs) side by side, with their Pearson correlation in ``.attrs``."""
    keys = [k for k in ("site", "layer", "head", "position") if k in activation.cells]
    a = activation.summary()[keys + ["normalized"]].rename(columns={"normalized": "activation"})
    b = attribution.summary()[keys + ["normalized"]].rename(columns={"normalized": "attribution"})
    both = a.merge(b, on=keys)
    both.attrs["pearson_r"] = float(np.corrcoef(both["activation"], both["attribution"])[0, 1]) \
        if len(both) > 1 else np.nan
    return both


# ---- ablations ----------------------------------------------------------------------------------------------------
def ablation_op(handle, site: str, mode: str = "zero", reference: Sequence[str] | None = None, seed: int = 0,
                add_bos: bool | None = None) -> Op:
    """An op that ablates ``site``: ``zero``; ``mean`` (its mean over every token of ``reference``, broadcast to
    every position: "mean ablation"); ``resample`` (the activation of one reference prompt drawn with ``seed``, at
    the same absolute positions; positions the donor does not reach keep their value)."""
    if mode == "zero":
        return Set(torch.zeros(()))
    if not reference:
        raise ValueError(f"{mode} ablation needs reference prompts (reference=[...])")
    name = resolve_sites(site, handle.n_layers, handle.adapter.unavailable)[0]
    if mode == "mean":
        with torch.inference_mode(), capture(handle, name.name, reduce="mean") as cache:
            handle.run(list(reference), add_bos=add_bos, logits=False, batch_size=1)  # no padding rows
        stats = cache.stats[name.name]
        mean = stats.mean.float()
        if name.per_head:  # stats flatten heads into features: [heads * d] -> [heads, 1, d]
            mean = mean.view(-1, 1, mean.numel() // (handle.adapter.n_kv_heads if name.kind in ("attn.k", "attn.v")
                                                       else handle.adapter.n_heads))
        return Set(mean)
    if mode == "resample":
        pick = str(reference[int(np.random.default_rng(seed).integers(len(reference)))])
        with torch.inference_mode(), capture(handle, name.name) as cache:
            handle.run([pick], add_bos=add_bos, logits=False)
        donor = cache[name.name][0]                     # [(heads,) pos, d] of the donor prompt

        def resample(region, where):
            axis = 1 if where.site.per_head else 0
            n = donor.shape[axis]
            out = region.clone()
            take = [j for j, p in enumerate(where.positions.tolist()) if p < n]
            for j in take:
                src = donor.select(axis, int(where.positions[j]))
                if where.heads is not None and where.site.per_head:
                    src = src[where.heads]
                out.select(axis + 1, j).copy_(src.to(out.dtype))
            return out
        return Apply(resample)
    raise ValueError(f"mode={mode!r}: choose 'zero', 'mean' or 'resample'")
