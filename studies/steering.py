"""The steering-evaluation study (``hiddenlens steer eval``): does steering along a truthful direction turn wrong
answers right, how many right answers does it break, what does it cost, and does it beat random directions?

**Items** (:mod:`hiddenlens.analyses.fact_items`): 195 countries x 4 facts (capital, continent, currency,
language) and 149 misconceptions, each a prompt with a correct and a wrong continuation, split by entity (the
country, the misconception) into ``train`` (called *fit* here) / ``val`` / ``test`` (0.5 / 0.25 / 0.25).

**Directions**, fitted on the fit split's statements only (``prompt + correct`` true, ``prompt + wrong`` false;
last-token activations, :func:`hiddenlens.analyses.truth.extract_last_token`):

``mass_mean``  mean(h | true) - mean(h | false) at ``blocks.{l}.resid_post`` (ITI's released setting)
``probe``      logistic-regression coefficient at ``blocks.{l}.resid_post``
``repe``       RepE's first principal component of paired differences ("Representation Engineering: A Top-Down
               Approach to AI Transparency", arXiv 2310.01405)
``caa``        contrastive activation addition ("Steering Llama 2 via Contrastive Activation Addition", arXiv
               2312.06681): mean over fit items of h(true answer letter) - h(false answer letter) in an A/B
               multiple-choice prompt (:func:`caa_texts`), at ``blocks.{l}.resid_post``
``iti``        ITI's top-K heads ("Inference-Time Intervention: Eliciting Truthful Answers from a Language Model",
               arXiv 2306.03341): a probe per head on the fit split, heads ranked by *validation* accuracy, a
               mass-mean direction per head at ``blocks.{l}.attn.z``

Every direction is a unit vector ``u`` with ``sigma = std(h . u)`` over the fit statements, and steering adds
``alpha * sigma * u`` (so alpha is in units of the spread of the projection, the same for every method).

**Choices, on validation only**: each method's layer is the one whose direction separates the validation
statements best (AUROC of ``h . u``, ties: the earlier layer; as :func:`~hiddenlens.analyses.truth.select_layer`);
ITI's K and every method's alpha are chosen by the validation *net change* among the alphas whose KL on neutral
prose stays within ``kl_budget`` (ties: the smaller alpha). Test labels reach no choice
(``tests/test_steering_eval.py`` flips them and checks the choices do not move).

**Scoring** (teacher-forced, two-way): an item is right when ``log P(correct) > log P(wrong)`` (sums over the
answer tokens, nats), steered at the positions that choose the answer: the last prompt position and the answer
positions (mode ``generated``). The prompt's other positions are never edited, so their KV cache is computed once
per batch of items and reused by every condition, and the last prompt position is shared by both answers
(:func:`item_margins`).

**Metrics on test**, per method at its chosen setting (and, for the figure, at every alpha): fix rate (items the
unsteered model gets wrong that steering makes right, over those wrong items), break rate (right -> wrong, over the
right items), net change ``(fixes - breaks) / n`` with a bootstrap 95 % CI over items; KL(plain || steered) and
CE on neutral prose (``pydoc_data.topics``, steering at every position; nats/token); and the method's percentile
among ``n_random`` random unit directions at the same sites with the same sigma and alpha (same edit norm), with
the random nets' 2.5-97.5 % range. A prompting baseline (:data:`PROMPT_PREFIX` before every prompt) gets the same
metrics (no percentile: it has no site).
"""
from __future__ import annotations

import contextlib
import copy
import random
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from hiddenlens.analyses.fact_items import FAMILIES, answer_token_ids, fact_items
from hiddenlens.analyses.truth import extract_last_token, fit_direction, head_sweep, iti_directions, top_k_heads, unit
from hiddenlens.analyses.truth_data import data_hash
from hiddenlens.common.batching import batch_starts
from hiddenlens.common.stats import auroc, bootstrap_ci, kl_divergence, log_probs, markdown_table
from hiddenlens.interventions.steer import Steering, check_alpha, check_directions, steering_vectors
from hiddenlens.models.tiny import offline_prose
from hiddenlens.probes.direction import Direction
from hiddenlens.probes.edit import Add, Edit
from hiddenlens.probes.sites import parse_layers

from .report import ModelSpec, StudyResult

STUDY = "steering"
RESID_METHODS = ("mass_mean", "probe", "repe", "caa")
METHODS = RESID_METHODS + ("iti",)
#: the prompting baseline's instruction, put before every prompt (and before every prose chunk for its cost)
PROMPT_PREFIX = "Answer truthfully.\n"


def random_like(directions: list[Direction], seed: int = 0) -> list[Direction]:
    """Random unit vectors at the same sites with the same sigma (the same edit norm at every alpha)."""
    g = torch.Generator().manual_seed(seed)
    return [replace(d, vector=torch.nn.functional.normalize(torch.randn(d.vector.numel(), generator=g), dim=0),
                    method="random", detector=(1.0, 0.0), metrics={}) for d in directions]


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(1) - 1).clamp(min=0)


def _encode(tokenizer, texts) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def answer_logprobs(handle, prompts, answers, directions=None, alpha: float = 0.0, batch_size: int = 32,
                    add_bos: bool | None = None) -> torch.Tensor:
    """Sum of log P(answer tokens | prompt), ``[n]`` (nats), with steering in mode ``generated`` when given.

    Prompts are left-padded and answers right-padded, so every prompt ends at the same column P and steering's
    ``generated`` positions are the last prompt position and the answer positions, as during ``generate``.
    Prompt and answer are tokenised separately (the study itself scores with :func:`item_margins`).
    """
    if len(prompts) != len(answers) or not prompts:
        raise ValueError(f"need as many answers as prompts (got {len(prompts)} and {len(answers)}), at least one")
    tok = handle.tokenizer
    p_ids = [handle.tokenize([p], add_bos=add_bos).input_ids[0].tolist() for p in prompts]
    a_ids = _encode(tok, answers)
    if any(len(a) == 0 for a in a_ids):
        raise ValueError("an answer tokenized to zero tokens")
    out = torch.zeros(len(prompts), dtype=torch.float64)
    pad = tok.pad_token_id
    for s in batch_starts(len(prompts), batch_size):
        ps, as_ = p_ids[s:s + batch_size], a_ids[s:s + batch_size]
        P, A = max(map(len, ps)), max(map(len, as_))
        ids = torch.full((len(ps), P + A), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (p, a) in enumerate(zip(ps, as_)):
            ids[j, P - len(p):P] = torch.tensor(p)
            ids[j, P:P + len(a)] = torch.tensor(a)
            mask[j, P - len(p):P + len(a)] = 1
        ids, mask = ids.to(handle.device), mask.to(handle.device)
        with torch.inference_mode():
            if directions:
                with Steering(handle, directions, alpha, "generated", prompt_length=P):
                    logits = handle.hf_model(input_ids=ids, attention_mask=mask,
                                             position_ids=_position_ids(mask)).logits
            else:
                logits = handle.hf_model(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask)).logits
        lp = log_probs(logits[:, P - 1:P + A - 1].double())
        got = lp.gather(-1, ids[:, P:P + A, None]).squeeze(-1) * mask[:, P:P + A]
        out[s:s + len(ps)] = got.sum(1).cpu()
    return out


# ---- scoring items under many conditions, the prompt's KV cache computed once ---------------------------------
def tokenize_items(tokenizer, items: pd.DataFrame) -> list[tuple[list[int], list[int], list[int]]]:
    """Per item ``(prompt ids, correct ids, wrong ids)``, tokenised as :func:`~hiddenlens.analyses.fact_items.
    answer_token_ids` does (prompt + answer together, so the first answer token merges as in running text)."""
    out = []
    for p, c, w in zip(items.prompt, items.correct, items.wrong):
        full_c, n_c = answer_token_ids(tokenizer, p, c)
        full_w, n_w = answer_token_ids(tokenizer, p, w)
        head = full_c[:len(full_c) - n_c]
        if full_w[:len(full_w) - n_w] != head or len(head) < 2:
            raise ValueError(f"prompt {p!r} must tokenise to the same >= 2 tokens before both answers")
        out.append((head, full_c[len(head):], full_w[len(head):]))
    return out


class _PrefixBatch:
    """A batch of items whose prompts (but their last token) ran once, unsteered, into a KV cache.

    Every condition then feeds only the last prompt token (shared by both answers) and the answers' tokens, so
    a steering edit in mode ``all`` inside :meth:`margins` touches exactly the positions mode ``generated``
    edits in a full forward (``>= P - 1``), and the prompt before them is computed once for all conditions.
    """

    def __init__(self, handle, toks):
        from transformers import DynamicCache  # heavy: only when items are scored

        self.model, dev = handle.hf_model, handle.device
        pad = handle.tokenizer.pad_token_id if handle.tokenizer.pad_token_id is not None else 0
        b, P = len(toks), max(len(t[0]) for t in toks)
        ids = torch.full((b, P), pad, dtype=torch.long)
        self.mask = torch.zeros(b, P, dtype=torch.long)
        for j, (p, _, _) in enumerate(toks):
            ids[j, P - len(p):] = torch.tensor(p)
            self.mask[j, P - len(p):] = 1
        self.answers = [self._pad([t[k] for t in toks], pad) for k in (1, 2)]
        self.ids, self.mask = ids.to(dev), self.mask.to(dev)
        self.kv = DynamicCache(config=self.model.config)
        self._forward(self.ids[:, :P - 1], self.mask[:, :P - 1])

    @staticmethod
    def _pad(rows, pad) -> tuple[torch.Tensor, torch.Tensor]:
        A = max(map(len, rows))
        ids = torch.full((len(rows), A), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), A, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
        return ids, mask

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Feed ``ids [b, t]`` after the cache; ``mask [b, cache + t]``. Returns log-probs ``[b, t, vocab]``."""
        pos = _position_ids(mask)[:, -ids.shape[1]:]
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=self.kv,
                            use_cache=True).logits
        return log_probs(logits.double())

    def repeat(self, n: int) -> "_PrefixBatch":
        """The same items with every row repeated ``n`` times in a row (row ``r`` is item ``r // n``), on a copy
        of the prompt's KV cache: ``n`` conditions scored in one forward."""
        out = object.__new__(_PrefixBatch)
        out.model, out.ids, out.mask = self.model, self.ids.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0)
        out.answers = [(i.repeat_interleave(n, 0), m.repeat_interleave(n, 0)) for i, m in self.answers]
        out.kv = copy.deepcopy(self.kv)
        out.kv.batch_repeat_interleave(n)
        return out

    def margins(self) -> np.ndarray:
        """``log P(correct) - log P(wrong)`` per item ``[b]`` (nats), under whatever edit is active."""
        first = self._forward(self.ids[:, -1:], self.mask)[:, 0]                         # [b, vocab]
        total = []
        for ids, amask in self.answers:
            ids, amask = ids.to(first.device), amask.to(first.device)
            lp = first.gather(1, ids[:, :1])[:, 0]
            if ids.shape[1] > 1:                                                          # later answer tokens
                rest = self._forward(ids[:, :-1], torch.cat([self.mask, amask[:, :-1]], 1))
                lp = lp + (rest.gather(-1, ids[:, 1:, None])[..., 0] * amask[:, 1:]).sum(1)
                self.kv.crop(-(ids.shape[1] - 1))
            total.append(lp)
        self.kv.crop(-1)
        return (total[0] - total[1]).cpu().numpy()


def stacked_edit(handle, conditions: list, items: int):
    """One edit for ``len(conditions)`` = C conditions scored together in a batch of ``items * C`` rows, row ``r``
    holding item ``r // C`` under condition ``r % C`` (:meth:`_PrefixBatch.repeat`). Condition ``c`` =
    ``(directions, alpha)`` adds ``alpha * sigma * u`` (checked as :class:`~hiddenlens.interventions.steer.Steering`
    checks it) at every position of its own rows, also when a forward continues a KV cache; ``None`` (unsteered)
    and sites a condition does not name add exact zeros. A null context when no condition steers."""
    per = [steering_vectors(handle, c[0], check_alpha(c[1])) if c else {} for c in conditions]
    sites = sorted(set().union(*per))
    if not sites:
        return contextlib.nullcontext()
    ops = {}
    for site in sites:
        ref = next(p[site] for p in per if site in p)
        stack = torch.stack([p.get(site, torch.zeros_like(ref)) for p in per])    # [C, d] or [C, heads, 1, hd]
        stack = stack[:, None] if ref.ndim == 1 else stack                         # [C, 1, d]: broadcast over pos
        ops[site] = Add(stack.repeat(items, *[1] * (stack.ndim - 1)))
    return Edit(handle, ops, positions=None, require_applied=False)


def item_margins(handle, items: pd.DataFrame, conditions: dict, batch_size: int = 64, progress: bool = False,
                 desc: str = "scoring", tokens_per_forward: int = 1024) -> dict[str, np.ndarray]:
    """``{condition: log P(correct) - log P(wrong) per item [n]}`` (nats; item order as in ``items``).

    ``conditions`` maps a name to ``(directions, alpha)``, or to ``None`` for the unsteered model. Steering is
    applied at the last prompt position and at the answer positions (mode ``generated``); see
    :class:`_PrefixBatch` for why the prompt runs once per batch for every condition. Several conditions run as
    one forward (:func:`stacked_edit`), as many as keep a forward within about ``tokens_per_forward`` tokens.
    """
    if items.empty:
        raise ValueError("no items to score")
    for cond in conditions.values():
        if cond:
            check_directions(handle, cond[0])
    toks = tokenize_items(handle.tokenizer, items)
    # batches of one answer length: every condition pays for the answers' padding, the prompt's only once
    width = [max(len(c), len(w)) for _, c, w in toks]
    order = sorted(range(len(toks)), key=lambda j: (width[j], len(toks[j][0])))
    batches = [rows[s:s + batch_size] for a in sorted(set(width)) for rows in [[j for j in order if width[j] == a]]
               for s in batch_starts(len(rows), batch_size)]
    out = {name: np.zeros(len(toks)) for name in conditions}
    names = list(conditions)
    with tqdm(total=len(batches) * len(conditions), desc=desc, disable=not progress) as bar, torch.inference_mode():
        for rows in batches:
            batch = _PrefixBatch(handle, [toks[j] for j in rows])
            per = max(1, tokens_per_forward // (len(rows) * width[rows[0]]))
            for s in range(0, len(names), per):
                group = names[s:s + per]
                stacked = batch.repeat(len(group)) if len(group) > 1 else batch
                with stacked_edit(handle, [conditions[n] for n in group], len(rows)):
                    m = stacked.margins()
                for c, name in enumerate(group):
                    out[name][rows] = m[c::len(group)]
                bar.update(len(group))
    return out


# ---- cost on neutral prose --------------------------------------------------------------------------------------
def prose_batch(handle, n_chunks: int = 8, chunk_tokens: int = 64) -> torch.Tensor:
    """``[n_chunks, chunk_tokens]`` token ids of neutral prose (``pydoc_data.topics``), fixed order."""
    ids = _encode(handle.tokenizer, [offline_prose(n_chunks * chunk_tokens * 8)])[0]
    if len(ids) < n_chunks * chunk_tokens:
        raise ValueError("not enough prose for the requested chunks")
    return torch.tensor(ids[: n_chunks * chunk_tokens]).view(n_chunks, chunk_tokens).to(handle.device)


def prose_logprobs(handle, ids: torch.Tensor, directions=None, alpha: float = 0.0, prefix: str = "") -> torch.Tensor:
    """Log-probabilities ``[n, T-1, vocab]`` (float64) of the prose tokens' next tokens, steered in mode ``all``
    (every position) when ``directions`` are given, or with the text ``prefix`` before every chunk."""
    if prefix:
        pre = torch.tensor(_encode(handle.tokenizer, [prefix])[0], device=ids.device)
        ids = torch.cat([pre.expand(ids.shape[0], -1), ids], 1)
    with torch.inference_mode():
        ctx = Steering(handle, directions, alpha, "all") if directions else contextlib.nullcontext()
        with ctx:
            logits = handle.hf_model(input_ids=ids).logits
    return log_probs(logits[:, len(pre) if prefix else 0:-1].double())


def cost(plain_lp: torch.Tensor, steered_lp: torch.Tensor, ids: torch.Tensor) -> tuple[float, float]:
    """``(ce, kl)``: cross-entropy of the steered model on ``ids`` and mean KL(plain || steered), nats/token."""
    target = ids[:, 1:, None]
    ce = -steered_lp.gather(-1, target).mean()
    kl = kl_divergence(plain_lp, steered_lp, from_log_probs=True).mean()
    return float(ce), float(kl)


# ---- metrics --------------------------------------------------------------------------------------------------
def flip_metrics(base: np.ndarray, steered: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Fixes and breaks of ``steered`` margins against ``base`` margins (both ``[n]``; right = margin > 0).

    ``fix_rate`` = fixes / items wrong at base, ``break_rate`` = breaks / items right at base, ``net`` =
    (fixes - breaks) / n with a bootstrap 95 % CI over items (``net_lo``, ``net_hi``; NaN when ``n_boot`` is 0),
    ``accuracy`` after.
    """
    before, after = np.asarray(base) > 0, np.asarray(steered) > 0
    change = after.astype(float) - before.astype(float)                                 # +1 fix, -1 break
    n_wrong, n_right = int((~before).sum()), int(before.sum())
    fixes, breaks = int((change > 0).sum()), int((change < 0).sum())
    if not n_boot:
        lo = hi = np.nan
    else:
        lo, hi = bootstrap_ci(change, np.mean, n_resamples=n_boot, seed=seed) if change.any() else (0.0, 0.0)
    return dict(n=len(change), n_wrong=n_wrong, fixes=fixes, fix_rate=fixes / n_wrong if n_wrong else np.nan,
                breaks=breaks, break_rate=breaks / n_right if n_right else np.nan, net=float(change.mean()),
                net_lo=lo, net_hi=hi, accuracy=float(after.mean()))


def percentile_among(value: float, randoms) -> dict:
    """Where ``value`` stands among ``randoms``: percentile (share below, ties counted half, in %), and the
    randoms' mean and 2.5-97.5 % range."""
    r = np.asarray(randoms, dtype=float)
    pct = 100.0 * (np.sum(r < value) + 0.5 * np.sum(r == value)) / len(r)
    return dict(percentile=float(pct), random_mean=float(r.mean()), random_lo=float(np.percentile(r, 2.5)),
                random_hi=float(np.percentile(r, 97.5)), n_random=len(r))


# ---- fitting, on the fit split; choices, on the validation split --------------------------------------------------
def statements(items: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``prompt + correct`` (label 1) and ``prompt + wrong`` (label 0) per item: texts, labels, pair ids."""
    texts = [t for r in items.itertuples() for t in (r.prompt + r.correct, r.prompt + r.wrong)]
    labels = np.tile([1, 0], len(items))
    return texts, labels, np.repeat(items.item_id.to_numpy(), 2)


def caa_texts(items: pd.DataFrame, seed: int = 0) -> tuple[list[str], list[str]]:
    """CAA's A/B prompts: per item, the question, the two answers in a seeded random order, ``Answer: (`` and
    then the true answer's letter (first list) or the false one's (second list); the activation is read at the
    letter, the last token."""
    rng = random.Random(f"caa-{seed}")
    pos, neg = [], []
    for r in items.itertuples():
        true_first = rng.random() < 0.5
        a, b = (r.correct, r.wrong) if true_first else (r.wrong, r.correct)
        stem = f"{r.prompt}\n(A){a}\n(B){b}\nAnswer: ("
        pos.append(stem + ("A" if true_first else "B"))
        neg.append(stem + ("B" if true_first else "A"))
    return pos, neg


def _resid_direction(u: np.ndarray, X_fit: torch.Tensor, layer: int, method: str, spec: str, dh: str,
                     metrics: dict, det=(1.0, 0.0)) -> Direction:
    sigma = float((X_fit.double().numpy() @ u).std())
    return Direction(torch.from_numpy(u).float(), sigma, f"blocks.{layer}.resid_post", None, method, spec, dh, det,
                     metrics)


def fit_directions(handle, fit: pd.DataFrame, val: pd.DataFrame, methods, layers: list[int], k_heads: list[int],
                   caa_items: int, seed: int = 0, batch_size: int = 32, progress: bool = False):
    """Fit every method on ``fit`` and choose each resid method's layer on ``val`` (AUROC of ``h . u`` on the
    validation statements). Returns ``(candidates, layer_table, head_table)``: ``candidates[method]`` is
    ``{set name: directions}`` (one set per resid method at its chosen layer; one per K for ITI)."""
    n_layers = handle.adapter.n_layers
    all_layers = list(range(n_layers))
    tf, yf, pf = statements(fit)
    tv, yv, _ = statements(val)
    heads = "iti" in methods
    af = extract_last_token(handle, tf, all_layers, heads=heads, batch_size=batch_size, progress=progress)
    av = extract_last_token(handle, tv, all_layers, heads=heads, batch_size=batch_size, progress=progress)
    dh, spec = data_hash(pd.DataFrame({"text": tf, "label": yf})), handle.spec
    caa_vec = None
    if "caa" in methods:
        pos, neg = caa_texts(fit.sample(min(caa_items, len(fit)), random_state=seed), seed)
        hp = extract_last_token(handle, pos, all_layers, batch_size=batch_size, progress=progress)["resid"]
        hn = extract_last_token(handle, neg, all_layers, batch_size=batch_size, progress=progress)["resid"]
        caa_vec = (hp - hn).double().mean(0)                                              # [L, d]
    rows, fitted = [], {}
    for method in (m for m in methods if m in RESID_METHODS):
        for layer in layers:
            Xf = af["resid"][:, layer]
            if method == "caa":
                u, det = unit(caa_vec[layer].numpy()), (1.0, 0.0)
                metrics = {"caa_vector_norm": float(caa_vec[layer].norm())}
            else:
                u, _, det = fit_direction(Xf, yf, method, pf, seed)
                metrics = {}
            val_auc = auroc(yv, av["resid"][:, layer].double().numpy() @ u)
            rows.append(dict(method=method, layer=layer, val_auroc=val_auc))
            fitted[(method, layer)] = _resid_direction(u, Xf, layer, method, spec, dh, metrics | {"val_auroc": val_auc},
                                                       det)
    layer_table = pd.DataFrame(rows, columns=["method", "layer", "val_auroc"])
    candidates = {}
    for method, g in layer_table.groupby("method", sort=False):
        best = int(g.sort_values(["val_auroc", "layer"], ascending=[False, True], kind="stable").iloc[0].layer)
        candidates[method] = {f"{method}@L{best}": [fitted[(method, best)]]}
    head_table = None
    if heads:
        head_table = head_sweep(af["heads"], yf, av["heads"], yv, av["heads"], yv, all_layers, seed, progress)
        head_table = head_table.drop(columns="test_auroc")                               # that was val again
        candidates["iti"] = {f"iti@K{k}": iti_directions(af["heads"], yf, all_layers, top_k_heads(head_table, k),
                                                         spec, dh) for k in k_heads}
    return candidates, layer_table, head_table


def choose(val_rows: pd.DataFrame, kl_budget: float) -> pd.DataFrame:
    """Per method, the (set, alpha) with the highest validation net change among rows with ``kl <= kl_budget``
    (ties: smaller alpha, then set name); if no alpha fits the budget, the smallest-KL row. Reads only the
    ``method, set, alpha, net, kl`` columns of validation rows."""
    picks = []
    for method, g in val_rows.groupby("method", sort=False):
        ok = g[g.kl <= kl_budget]
        if ok.empty:
            pick = g.sort_values(["kl", "alpha"], kind="stable").iloc[0]
        else:
            pick = ok.sort_values(["net", "alpha", "set"], ascending=[False, True, True], kind="stable").iloc[0]
        picks.append(dict(method=method, set=pick["set"], alpha=float(pick.alpha), val_net=float(pick.net),
                          val_kl=float(pick.kl), within_budget=not ok.empty))
    return pd.DataFrame(picks)


def _sites(ds: list[Direction]) -> str:
    names = sorted({d.name.split("@")[1] for d in ds})
    return ", ".join(names) if len(names) <= 3 else f"{len(ds)} heads"


# ---- the study -------------------------------------------------------------------------------------------------
@dataclass
class SteeringConfig(ModelSpec):
    """``families`` of :mod:`~hiddenlens.analyses.fact_items`; ``methods`` (of :data:`METHODS`); candidate
    ``layers`` for the resid methods (block indices or a spec such as ``"*"``); the ``alphas`` grid; ITI's
    candidate ``k_heads``; ``caa_items`` fit items for CAA's A/B prompts; ``n_random`` random directions per
    method; ``kl_budget`` (nats/token) an alpha must keep on validation to be chosen (ITI's own KL, 0.65);
    ``n_prose`` 64-token prose chunks for the cost; ``test_all_alphas`` also scores test at every alpha of the
    chosen sets (for the figure; never used for a choice); ``limit`` items per family and split at most (None:
    all)."""

    families: list[str] | str = field(default_factory=lambda: list(FAMILIES))
    limit: int | None = None
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    layers: list[int] | str = "*"
    alphas: list[float] = field(default_factory=lambda: [4.0, 8.0, 16.0])
    k_heads: list[int] = field(default_factory=lambda: [16, 48])
    caa_items: int = 32
    n_random: int = 20
    kl_budget: float = 0.65
    n_prose: int = 2
    test_all_alphas: bool = False
    batch_size: int = 64
    n_boot: int = 1000
    seed: int = 0


@dataclass
class Result(StudyResult):
    """Tables ``methods`` (test, each method at its chosen setting, plus the baselines), ``test_alphas`` (test at
    every alpha of the chosen sets), ``validation`` (every candidate on validation: what the choices read),
    ``random`` (each random direction's test net change), ``layers`` (validation AUROC per method and layer),
    ``families`` (test fixes and breaks per family at the chosen settings)."""

    STUDY: ClassVar[str] = STUDY
    CONFIG: ClassVar[type] = SteeringConfig

    def figures(self) -> dict:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        m, val = self.tables["methods"], self.tables["validation"]
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        colours = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
        for (method, _), g in val[val.set.isin(set(m.set))].groupby(["method", "set"], sort=False):
            g = g.sort_values("alpha")
            ax.plot(g.kl, g.net, ":", marker=".", color=colours.get(method, "grey"), alpha=0.6)
        for r in m.itertuples():
            if r.method in colours:
                ax.errorbar(r.kl, r.net, yerr=[[r.net - r.net_lo], [r.net_hi - r.net]], fmt="o",
                            color=colours[r.method], capsize=3, label=f"{r.method} (alpha {r.alpha:g})")
                ax.vlines(r.kl, r.random_lo, r.random_hi, color=colours[r.method], lw=7, alpha=0.25)
            elif r.method == "prompting":
                ax.errorbar(r.kl, r.net, yerr=[[r.net - r.net_lo], [r.net_hi - r.net]], fmt="s", color="black",
                            capsize=3, label="prompt 'Answer truthfully.'")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="KL(plain || steered) on neutral prose, nats/token",
               ylabel="net change on test: (fixes - breaks) / items",
               title=f"Steering on held-out facts ({self.summary.get('model', '')})")
        ax.legend(fontsize=7, loc="best")
        fig.text(0.01, -0.04, "markers: test, chosen alpha, bootstrap 95% CI; shaded bar: 2.5-97.5% of same-norm "
                 "random directions (test); dotted: validation at every alpha of the chosen set", fontsize=7)
        return {"pareto": fig}

    def report(self) -> str:
        s, m = self.summary, self.tables["methods"]
        cols = ["method", "sites", "alpha", "fixes", "fix_rate", "breaks", "break_rate", "net", "net_lo", "net_hi",
                "kl", "ce", "percentile", "random_mean", "random_lo", "random_hi"]
        md = [f"# Steering evaluation: {s.get('model', '')}", "",
              f"Items split by entity: {s.get('n_fit', '?')} fit / {s.get('n_val', '?')} validation / "
              f"{s.get('n_test', '?')} test. Directions fitted on the fit split; every layer, K and alpha chosen on "
              f"validation (KL budget {s.get('kl_budget', '?')} nats/token); numbers below are on test only. "
              f"The unsteered model gets {s.get('test_wrong', '?')} of {s.get('n_test', '?')} test items wrong "
              f"(accuracy {s.get('test_accuracy', float('nan')):.3f}).", "",
              "## Verdict", "", s.get("verdict", ""), "",
              "![net change vs KL](pareto.png)", "",
              "## Each method at its chosen setting (test)", "",
              "`net` = (fixes - breaks) / items with its bootstrap 95 % CI; `percentile` = where the net change "
              f"stands among {s.get('n_random', '?')} random directions with the same sites and edit norm "
              "(`random_lo`/`random_hi`: their 2.5-97.5 % range). KL and CE on neutral prose, nats/token.", "",
              markdown_table(m[[c for c in cols if c in m]]), "",
              "## Per family (test, chosen settings)", "", markdown_table(self.tables["families"]), "",
              "## Choices (validation only)", "", markdown_table(self.tables["validation"]), "",
              *(["## Every alpha of the chosen sets (test; not used for any choice)", "",
                 markdown_table(self.tables["test_alphas"]), ""] if len(self.tables["test_alphas"]) > len(m) - 1
                else []),
              "## Layer choice: validation AUROC of each direction", "",
              markdown_table(self.tables["layers"].pivot(index="layer", columns="method", values="val_auroc")
                             .reset_index())]
        return "\n".join(md) + "\n"


def verdict(methods: pd.DataFrame) -> str:
    """One plain paragraph: which methods beat the random distribution (percentile >= 95) with a net change whose
    CI excludes 0, which only beat it, and the prompting baseline."""
    steer = methods[methods.percentile.notna()]
    strong = steer[(steer.percentile >= 95) & (steer.net_lo > 0)]
    weak = steer[(steer.percentile >= 95) & ~(steer.net_lo > 0)]
    lines = []
    if strong.empty and weak.empty:
        lines.append("**Nothing beats the random distribution.** No steering method's net change on test is above "
                     "the 95th percentile of same-norm random directions at its sites.")
    for r in strong.itertuples():
        lines.append(f"**{r.method}** beats the random distribution (percentile {r.percentile:.0f}) and its net "
                     f"change {r.net:+.3f} has a 95 % CI above 0 ({r.net_lo:+.3f} to {r.net_hi:+.3f}).")
    for r in weak.itertuples():
        lines.append(f"{r.method} is above the random distribution (percentile {r.percentile:.0f}) but its net "
                     f"change {r.net:+.3f} has a CI that includes 0 ({r.net_lo:+.3f} to {r.net_hi:+.3f}).")
    rest = steer[steer.percentile < 95]
    if not rest.empty:
        lines.append("Within the random distribution: " + ", ".join(
            f"{r.method} (net {r.net:+.3f}, percentile {r.percentile:.0f})" for r in rest.itertuples()) + ".")
    p = methods[methods.method == "prompting"]
    if not p.empty:
        r = p.iloc[0]
        lines.append(f"Prompting ('Answer truthfully.'): net {r.net:+.3f} ({r.net_lo:+.3f} to {r.net_hi:+.3f}), "
                     f"{r.fixes} fixes, {r.breaks} breaks, KL {r.kl:.3f}.")
    return " ".join(lines)


def evaluate(handle, items: pd.DataFrame, config: SteeringConfig, progress: bool = True) -> Result:
    """The study on ``items`` (columns of :data:`~hiddenlens.analyses.fact_items.COLUMNS`). Fit and choose on the
    ``train`` / ``val`` rows; the ``test`` rows are read only after every choice is fixed."""
    methods = list(config.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown steering methods {unknown or methods}; choose from {METHODS}")
    alphas = [float(a) for a in config.alphas]
    if not alphas or not all(np.isfinite(alphas)) or min(alphas) <= 0:
        raise ValueError(f"alphas {config.alphas}: give positive finite numbers (alpha 0 is the baseline, always run)")
    if config.n_random < 1:
        raise ValueError(f"n_random={config.n_random}: at least 1 random direction per method (20 for a percentile)")
    layers = parse_layers(config.layers, handle.n_layers, what="layers")
    fit, val, test = (items[items.split == s].reset_index(drop=True) for s in ("train", "val", "test"))
    if min(len(fit), len(val), len(test)) < 2:
        raise ValueError("every split (train, val, test) needs at least 2 items")
    bs = config.batch_size
    candidates, layer_table, head_table = fit_directions(handle, fit, val, methods, layers,
                                                         [int(k) for k in config.k_heads], config.caa_items,
                                                         config.seed, progress=progress)
    sets = {name: ds for c in candidates.values() for name, ds in c.items()}
    method_of = {name: m for m, c in candidates.items() for name in c}
    prose = prose_batch(handle, config.n_prose)
    plain_lp = prose_logprobs(handle, prose)
    costs: dict[tuple[str, float], tuple[float, float]] = {}

    def prose_cost(name: str, alpha: float) -> tuple[float, float]:
        if (name, alpha) not in costs:
            costs[(name, alpha)] = cost(plain_lp, prose_logprobs(handle, prose, sets[name], alpha), prose)
        return costs[(name, alpha)]

    def rows_for(margins: dict, keys, split: str) -> list[dict]:
        out = []
        for name, alpha in keys:
            ce, kl = prose_cost(name, alpha)
            out.append(dict(split=split, method=method_of[name], set=name, sites=_sites(sets[name]), alpha=alpha,
                            **flip_metrics(margins["base"], margins[(name, alpha)], config.n_boot, config.seed),
                            kl=kl, ce=ce))
        return out

    # validation: every candidate set at every alpha; the choices read these rows only
    keys = [(name, a) for name in sets for a in alphas]
    vm = item_margins(handle, val, {"base": None} | {k: (sets[k[0]], k[1]) for k in keys}, bs, progress,
                      "validation")
    validation = pd.DataFrame(rows_for(vm, keys, "val"))
    picks = choose(validation, config.kl_budget)
    chosen = {r.method: (r.set, r.alpha) for r in picks.itertuples()}
    # test: read only now, with every choice fixed
    tkeys = [(name, a) for name, a0 in chosen.values() for a in (alphas if config.test_all_alphas else [a0])]
    randoms = {("random", m, k): (random_like(sets[name], seed=1000 * (j + 1) + k), alpha)
               for j, (m, (name, alpha)) in enumerate(chosen.items()) for k in range(config.n_random)}
    tm = item_margins(handle, test, {"base": None} | {k: (sets[k[0]], k[1]) for k in tkeys} | randoms, bs, progress,
                      "test")
    test_alphas = pd.DataFrame(rows_for(tm, tkeys, "test"))
    rand_rows = [dict(method=m, seed=1000 * (list(chosen).index(m) + 1) + k, alpha=chosen[m][1],
                      net=flip_metrics(tm["base"], tm[key], 0)["net"]) for key in randoms for m, k in [key[1:]]]
    random_table = pd.DataFrame(rand_rows)
    rows = []
    for method, (name, alpha) in chosen.items():
        r = test_alphas[(test_alphas.set == name) & (test_alphas.alpha == alpha)].iloc[0].to_dict()
        rows.append(r | percentile_among(r["net"], random_table[random_table.method == method].net))
    # the prompting baseline: the same test items with PROMPT_PREFIX before each prompt
    prompted = test.assign(prompt=PROMPT_PREFIX + test.prompt)
    pm = item_margins(handle, prompted, {"prompted": None}, bs, progress, "prompting")["prompted"]
    ce, kl = cost(plain_lp, prose_logprobs(handle, prose, prefix=PROMPT_PREFIX), prose)
    rows.append(dict(split="test", method="prompting", set="prompt prefix", sites="", alpha=np.nan,
                     **flip_metrics(tm["base"], pm, config.n_boot, config.seed), kl=kl, ce=ce, percentile=np.nan))
    methods_table = pd.DataFrame(rows)
    families = []
    for r in methods_table.itertuples():
        steered = pm if r.method == "prompting" else tm[(r.set, r.alpha)]
        for fam in sorted(set(test.family)):
            sel = (test.family == fam).to_numpy()
            f = flip_metrics(tm["base"][sel], steered[sel], 0)
            families.append(dict(method=r.method, family=fam, n=f["n"], n_wrong=f["n_wrong"], fixes=f["fixes"],
                                 breaks=f["breaks"], net=f["net"]))
    base_right = tm["base"] > 0
    summary = {"model": handle.spec, "families": sorted(set(items.family)), "n_fit": len(fit), "n_val": len(val),
               "n_test": len(test), "test_wrong": int((~base_right).sum()),
               "test_accuracy": float(base_right.mean()), "alphas": alphas, "kl_budget": config.kl_budget,
               "n_random": config.n_random, "layers_considered": layers,
               "choices": {r.method: {"set": r.set, "alpha": r.alpha} for r in picks.itertuples()},
               "data_hash": next(iter(sets.values()))[0].data_hash, "verdict": verdict(methods_table),
               "sigmas": {name: [d.sigma for d in sets[name]] for name in sets}}
    validation["chosen"] = [chosen.get(m) == (name, a) for m, name, a in
                            zip(validation.method, validation.set, validation.alpha)]
    tables = {"methods": methods_table, "test_alphas": test_alphas, "validation": validation, "random": random_table,
              "layers": layer_table, "families": pd.DataFrame(families)}
    if head_table is not None:
        summary["iti_heads"] = {name: [[d.layer, d.head] for d in sets[name]] for name in candidates["iti"]}
    return Result(config, summary, tables)


def run(config: SteeringConfig, handle=None, progress: bool = True) -> Result:
    """Build the items (:func:`~hiddenlens.analyses.fact_items.fact_items`, split by entity) and run
    :func:`evaluate`."""
    handle = handle if handle is not None else config.load()
    return evaluate(handle, fact_items(config.families, seed=config.seed, limit=config.limit), config, progress)
