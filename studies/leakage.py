"""The semantic-leakage study (``hiddenlens analyze leakage``): leak-rate before and after Follow-the-Flow token
replacement of the leaked-into clause, per block range, with the fluency cost.

The measurement (prompt pairs, sentence embeddings, leak indicators, continuation NLL) is
:mod:`hiddenlens.analyses.leakage`; the replacement is :mod:`hiddenlens.interventions.replace`. This module sweeps
the block ranges (:func:`leakage_sweep`), runs it from a :class:`LeakageConfig` and keeps the result
(:class:`Result`): the reduction is ``1 - (leak_after - 0.5) / (leak_before - 0.5)`` (INFERRED: the excess over the
50 % chance level), beside Follow-the-Flow's 85 % for text-to-image encoders (a different setting and metric).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from hiddenlens.analyses.leakage import (PromptPair, SentenceEmbedder, continuation_nll, last_logprobs,
                                         leak_indicators, load_prompt_pairs, reduction)
from hiddenlens.common.stats import kl_divergence, markdown_table
from hiddenlens.interventions.replace import (MODES, TOKEN_CHOICES, isolated_states, locate_span, replacement,
                                              replacement_sites)

from .report import ModelSpec, StudyResult

STUDY = "leakage"


# ---- the sweep ------------------------------------------------------------------------------------------------
def default_ranges(n_layers: int, n: int = 5) -> list[tuple[int, int]]:
    """Suffix block ranges ``(start, n_layers - 1)`` (inclusive block indices) for ``n`` evenly spaced starts."""
    starts = sorted(set(int(round(x)) for x in np.linspace(0, n_layers - 1, n)))
    return [(s, n_layers - 1) for s in starts]


@dataclass
class LeakageResult:
    """``samples``: one row per (pair, sample, condition) with the continuation, its similarity to the concept,
    the leak indicator (vs the paired control sample) and its NLL; ``summary``: one row per condition;
    ``meta``: settings."""

    samples: pd.DataFrame
    summary: pd.DataFrame
    meta: dict


def leakage_sweep(handle, pairs: list[PromptPair], ranges: list[tuple[int, int]] | None = None,
                  n_samples: int = 4, max_new_tokens: int = 12, mode: str = "isolated", tokens: str = "all",
                  temperature: float = 1.0, top_k: int = 50, seed: int = 0, embedder: SentenceEmbedder | None = None,
                  progress: bool = True) -> LeakageResult:
    """Leak-rate before and after replacing the target clause's states at each layer range in ``ranges``.

    Every condition of a pair samples with the same seed, so conditions differ only through the prompt and the
    replacement. All prompts get BOS (``add_bos=True``)."""
    if not pairs:
        raise ValueError("no prompt pairs given")
    if n_samples < 1 or max_new_tokens < 1:
        raise ValueError("n_samples and max_new_tokens must be >= 1")
    L = handle.n_layers
    ranges = ranges or default_ranges(L)
    ranges = [tuple(r) for r in ranges]
    for r in ranges:
        replacement_sites(r, L)  # validates: block indices, low-high
    embedder = embedder or SentenceEmbedder(handle)
    gen_kw = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=1.0)
    conditions = ["control", "concept"] + [f"replace {a}-{b}" for a, b in ranges]
    rows, kls = [], []
    it = tqdm(list(enumerate(pairs)), desc="leakage pairs", disable=not progress)
    for i, pair in it:
        control_span = locate_span(handle, pair.control_prompt, pair.target)
        span = locate_span(handle, pair.concept_prompt, pair.target)
        all_states = isolated_states(handle, span, f"0-{L - 1}", mode)  # [block, token, d]
        lp_control = last_logprobs(handle, list(control_span.input_ids))
        texts, conts = {}, {}
        for cond in conditions:
            ids = list((control_span if cond == "control" else span).input_ids)
            torch.manual_seed(seed + i)
            with torch.inference_mode():
                if cond in ("control", "concept"):
                    gen = handle.generate([ids] * n_samples, max_new_tokens=max_new_tokens, add_bos=None, **gen_kw)
                    lp_last = last_logprobs(handle, ids)
                else:
                    a, b = map(int, cond.split()[1].split("-"))
                    with replacement(handle, span, (a, b), mode, tokens, states=all_states[a:b + 1]):
                        gen = handle.generate([ids] * n_samples, max_new_tokens=max_new_tokens, add_bos=None,
                                              **gen_kw)
                        lp_last = last_logprobs(handle, ids)
            texts[cond], conts[cond] = gen.texts, gen.new_tokens
            kl = float(kl_divergence(lp_control, lp_last, from_log_probs=True))
            kls.append({"pair": pair.id, "condition": cond, "kl_from_control": kl})
        concept_emb = embedder.encode([pair.concept] * n_samples)
        emb = {c: embedder.encode(texts[c]) for c in conditions}
        for cond in conditions:
            sim = (concept_emb * emb[cond]).sum(1)
            leak = leak_indicators(concept_emb, emb["control"], emb[cond])
            prompt = control_span if cond == "control" else span
            nll = continuation_nll(handle, list(prompt.input_ids), conts[cond])
            for j in range(n_samples):
                rows.append({"pair": pair.id, "concept": pair.concept, "sample": j, "condition": cond,
                             "continuation": texts[cond][j], "similarity": float(sim[j]), "leak": float(leak[j]),
                             "nll": float(nll[j])})
    samples = pd.DataFrame(rows)
    kl_df = pd.DataFrame(kls)
    summary = _summarize(samples, kl_df, conditions)
    meta = {"model": handle.spec, "n_pairs": len(pairs), "n_samples": n_samples, "max_new_tokens": max_new_tokens,
            "mode": mode, "tokens": tokens, "temperature": temperature, "top_k": top_k, "seed": seed,
            "ranges": [list(r) for r in ranges], "embedder": embedder.kind, "n_layers": L}
    return LeakageResult(samples, summary, meta)


def _summarize(samples: pd.DataFrame, kl_df: pd.DataFrame, conditions: list[str]) -> pd.DataFrame:
    before = samples[samples.condition == "concept"]
    leak_before = float(before.leak.mean())
    ppl_before = float(np.exp(before.nll.mean()))
    out = []
    for cond in conditions:
        s = samples[samples.condition == cond]
        leak = float(s.leak.mean()) if cond != "control" else float("nan")
        per_pair = s.groupby("pair").leak.mean()
        start = int(cond.split()[1].split("-")[0]) if cond.startswith("replace") else None
        ppl = float(np.exp(s.nll.mean()))
        out.append({"condition": cond, "start_layer": start, "leak_rate": leak,
                    "leak_rate_se": float(s.leak.std(ddof=1) / np.sqrt(len(s))) if cond != "control" else np.nan,
                    "pairs_leaking": float((per_pair > 0.5).mean()) if cond != "control" else np.nan,
                    "reduction": reduction(leak_before, leak) if cond.startswith("replace") else np.nan,
                    "similarity": float(s.similarity.mean()), "ppl_unpatched_model": ppl,
                    "ppl_ratio_vs_concept": ppl / ppl_before,
                    "kl_from_control": float(kl_df[kl_df.condition == cond].kl_from_control.mean())})
    return pd.DataFrame(out)


# ---- report -----------------------------------------------------------------------------------------------------
FTF_REDUCTION = 0.85


def plot_leakage(summary: pd.DataFrame, n_layers: int):
    """Leak-rate and perplexity ratio against the first replaced layer (ranges run to the last layer)."""
    import matplotlib  # heavy optional dependency: imported on use
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = summary[summary.condition.str.startswith("replace")].sort_values("start_layer")
    concept = summary[summary.condition == "concept"].iloc[0]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.errorbar(rep.start_layer, rep.leak_rate, yerr=rep.leak_rate_se, marker="o", color="C0",
                label="leak-rate after replacement")
    ax.axhline(concept.leak_rate, color="C3", ls="--", label=f"no replacement ({concept.leak_rate:.2f})")
    ax.axhline(0.5, color="grey", ls=":", label="chance (no leak)")
    ax.set_xlabel(f"first replaced block (range runs to block {n_layers - 1})")
    ax.set_ylabel("leak-rate")
    ax2 = ax.twinx()
    ax2.plot(rep.start_layer, rep.ppl_ratio_vs_concept, marker="s", color="C2", label="perplexity ratio")
    ax2.set_ylabel("continuation perplexity / unpatched", color="C2")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
    ax.set_title("Semantic leakage vs replaced layer range")
    fig.tight_layout()
    return fig


# ---- the study -------------------------------------------------------------------------------------------------
@dataclass
class LeakageConfig(ModelSpec):
    """``prompts``: a JSON file of prompt pairs (None: the shipped set), ``limit`` pairs at most; ``ranges``: block
    ranges ``[[start, stop], ...]`` (inclusive; None: 5 suffix ranges ending at the last block); ``samples``
    continuations of ``max_new_tokens`` per prompt; replacement ``mode`` and ``tokens``."""

    prompts: str | None = None
    limit: int | None = None
    ranges: list[list[int]] | None = None
    samples: int = 4
    max_new_tokens: int = 12
    mode: str = "isolated"
    tokens: str = "all"
    temperature: float = 1.0
    top_k: int = 50
    seed: int = 0


@dataclass
class Result(StudyResult):
    """Tables ``samples`` (one row per pair, sample and condition) and ``summary`` (one row per condition)."""

    STUDY: ClassVar[str] = STUDY
    CONFIG: ClassVar[type] = LeakageConfig

    def figures(self) -> dict:
        return {"leakage": plot_leakage(self.tables["summary"], int(self.summary["n_layers"]))}

    def report(self) -> str:
        s, m = self.tables["summary"], self.summary
        concept = s[s.condition == "concept"].iloc[0]
        rep = s[s.condition.str.startswith("replace")]
        best = rep.loc[rep.leak_rate.idxmin()]
        cols = ["condition", "leak_rate", "leak_rate_se", "pairs_leaking", "reduction", "ppl_unpatched_model",
                "ppl_ratio_vs_concept", "kl_from_control"]
        return f"""# Semantic leakage and token replacement

Model `{m['model']}`, {m['n_pairs']} prompt pairs x {m['n_samples']} sampled continuations of {m['max_new_tokens']}
tokens (temperature {m['temperature']}, top-k {m['top_k']}, seed {m['seed']}), similarity from `{m['embedder']}`.
Replacement: the target clause's states are swapped for its uncontextualized states (`[BOS] + target` alone,
mode `{m['mode']}`, tokens `{m['tokens']}`) at the output of every block of each range.

Leak-rate = share of sample pairs where the concept prompt's continuation is closer to the concept than the
control prompt's (0.5 = no leak). Reduction = 1 - (after - 0.5) / (before - 0.5).

{markdown_table(s[cols])}

Before replacement the leak-rate is **{concept.leak_rate:.3f}**. The lowest after replacement is
**{best.leak_rate:.3f}** ({best.condition}), a reduction of **{best.reduction:.0%}** of the excess over chance, at a
perplexity ratio of {best.ppl_ratio_vs_concept:.2f}. Follow-the-Flow reports an **85 %** reduction of semantic
leakage in text-to-image encoders, judged on generated images; that number is not comparable in setting, model or
metric, and ours comes from a small sample (see the standard errors), so read it as a direction, not a replication.
In a causal LM the continuation can still attend to the concept tokens directly, which the replacement of the
target clause does not touch.

![leakage](leakage.png)
"""


def result_of(config: LeakageConfig, sweep: LeakageResult) -> Result:
    """The study's :class:`Result` of a :func:`leakage_sweep`."""
    s = sweep.summary
    concept = s[s.condition == "concept"].iloc[0]
    rep = s[s.condition.str.startswith("replace")]
    best = rep.loc[rep.leak_rate.idxmin()]
    summary = {**sweep.meta, "leak_rate_before": concept.leak_rate, "best_range": best.condition,
               "leak_rate_best": best.leak_rate, "reduction_best": best.reduction,
               "ppl_ratio_best": best.ppl_ratio_vs_concept, "follow_the_flow_reduction": FTF_REDUCTION,
               "conditions": s.to_dict(orient="records")}
    return Result(config, summary, {"samples": sweep.samples, "summary": s})


def run(config: LeakageConfig, handle=None, progress: bool = True,
        embedder: SentenceEmbedder | None = None) -> Result:
    """Load the prompt pairs and sweep the block ranges of ``config`` on ``handle`` (default: its model)."""
    if config.mode not in MODES or config.tokens not in TOKEN_CHOICES:
        raise ValueError(f"mode must be one of {MODES} and tokens one of {TOKEN_CHOICES}")
    pairs = load_prompt_pairs(Path(config.prompts) if config.prompts else None, config.limit)
    handle = handle if handle is not None else config.load()
    ranges = [tuple(r) for r in config.ranges] if config.ranges else None
    sweep = leakage_sweep(handle, pairs, ranges, n_samples=config.samples, max_new_tokens=config.max_new_tokens,
                          mode=config.mode, tokens=config.tokens, temperature=config.temperature,
                          top_k=config.top_k, seed=config.seed, embedder=embedder, progress=progress)
    return result_of(config, sweep)
