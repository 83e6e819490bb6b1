"""The selective-iteration study (``hiddenlens analyze iteration``): training-free Think-at-Hard iteration,
teacher-forced over held-out prose, per decider.

For every position ``t`` with a next token, iteration 0 predicts ``argmax z^(0)_t``; the decider picks positions
to iterate (``max_iter`` passes at most, top-``k`` soft-embedding feedback, additive logits, duo-causal KV slots;
see :mod:`hiddenlens.interventions.iterate`), and the final prediction is the argmax of the cumulative logits.
Per decider: share of tokens iterated, fix rate, break rate, accuracy before/after, decider AUROC (the per-token
table and metrics are :mod:`hiddenlens.analyses.iteration`). Deciders: ``always`` (INFERRED to be the setting
closest to TaH's fix/break figures), ``oracle``, ``entropy`` and ``mlp`` (when a trained decider is given).

TaH (project page) reports that its second iteration fixes 8.7 % of first-pass mispredictions and breaks 2.1 % of
correct ones, and that 94 % of tokens skip iteration; TaH trains a depth-aware LoRA for iterations >= 1, while
this evaluation is **training-free**, so the numbers answer a different question: what the feedback mechanism
alone does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_curve
from tqdm.auto import tqdm

from hiddenlens.analyses.iteration import summarize, token_table
from hiddenlens.common.stats import auroc, entropy, markdown_table
from hiddenlens.interventions.decider import EntropyDecider, MaskDecider, cached_decider, load_decider, prose_chunks
from hiddenlens.interventions.iterate import DEFAULT_TOPK, first_pass, iterate_from
from hiddenlens.interventions.tah_adapter import cached_adapter, load_adapter

from .report import ModelSpec, StudyResult

STUDY = "iteration"
#: ``decider`` / ``lora`` value meaning "this model's cached one, trained on first use"
CACHED = "cached"
TAH_REFERENCE = {"fix_rate": 0.087, "break_rate": 0.021, "share_iterated": 0.06}


@dataclass
class IterationEval:
    """``tokens``: one row per (decider, chunk, position); ``summary``: one row per decider; ``meta``."""

    tokens: pd.DataFrame
    summary: pd.DataFrame
    meta: dict


def evaluate_iteration(handle, chunks: list[list[int]], deciders: dict, max_iter: int = 2, k: int = DEFAULT_TOPK,
                       with_always: bool = True, with_oracle: bool = True, progress: bool = True,
                       lora=None) -> IterationEval:
    """Run every decider (plus ``always`` / ``oracle``) over each chunk, sharing one first pass per chunk; with
    ``lora`` (TaH's adapted handle, :func:`hiddenlens.interventions.tah_adapter.load_adapter`) every decider also
    runs with its iterations >= 1 on the adapter, as ``<decider>+lora``."""
    if not chunks:
        raise ValueError("no chunks to evaluate")
    sites = sorted({s for d in deciders.values() for s in d.sites})
    tables = []
    with torch.inference_mode():
        for c, ids in enumerate(tqdm(chunks, desc="iteration eval", disable=not progress)):
            fp = first_pass(handle, ids, sites)
            T = fp.length
            wrong = torch.zeros(T, dtype=torch.bool)
            wrong[:-1] = fp.logits[:-1].argmax(-1) != fp.input_ids[1:]
            run = dict(deciders)
            if with_always:
                run = {"always": MaskDecider(torch.ones(T, dtype=torch.bool)), **run}
            if with_oracle:
                run = {**run, "oracle": MaskDecider(wrong)}
            for name, dec in run.items():
                for suffix, iterate_on in [("", None)] + ([("+lora", lora)] if lora is not None else []):
                    res = iterate_from(handle, fp, dec, max_iter=max_iter, k=k, lora=iterate_on)
                    table = token_table(handle, res, name + suffix, c)
                    if name in ("always", "oracle"):  # a fixed mask has no informative score: use the entropy
                        table["score"] = entropy(fp.logits[:-1]).numpy()  # nats
                    tables.append(table)
    tokens = pd.concat(tables, ignore_index=True)
    meta = {"model": handle.spec, "n_chunks": len(chunks), "seq_len": len(chunks[0]), "max_iter": max_iter, "k": k,
            "deciders": {n: {"threshold": float(d.threshold), "sites": list(d.sites)} for n, d in deciders.items()},
            "tah_reference": TAH_REFERENCE, "lora": None if lora is None else lora.info.get("adapter_config")}
    return IterationEval(tokens, summarize(tokens), meta)


def plot_iteration(summary: pd.DataFrame, tokens: pd.DataFrame):
    """Left: fix / break rate and share iterated per decider beside TaH's figures; right: ROC curves."""
    import matplotlib  # heavy optional dependency: imported on use
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = list(summary.decider) + ["TaH (trained)"]
    vals = {m: list(summary[m]) + [TAH_REFERENCE[m]] for m in ("fix_rate", "break_rate", "share_iterated")}
    x = np.arange(len(names))
    for j, (m, v) in enumerate(vals.items()):
        ax.bar(x + (j - 1) * 0.27, v, 0.27, label=m.replace("_", " "))
    ax.set_xticks(x, names, rotation=20, fontsize=8)
    ax.set_ylabel("share")
    ax.legend(fontsize=7)
    ax.set_title("Selective iteration (teacher-forced)")
    for name, t in tokens.groupby("decider", sort=False):
        if name in ("always", "oracle"):
            continue
        y = (~t.first_correct).to_numpy()
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, t.score.to_numpy())
        ax2.plot(fpr, tpr, label=f"{name} (AUROC {auroc(y, t.score.to_numpy()):.2f})")
    ax2.plot([0, 1], [0, 1], color="grey", ls=":")
    ax2.set_xlabel("false positive rate")
    ax2.set_ylabel("true positive rate")
    ax2.set_title("Deciders: predicting a first-pass misprediction")
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---- the study -------------------------------------------------------------------------------------------------
@dataclass
class IterationConfig(ModelSpec):
    """``decider``: the folder of a trained MLP decider (``hiddenlens train-decider``; ``"cached"``: this model's
    cached one, trained on first use; None: entropy only), its ``threshold`` override; ``lora``: the folder of
    TaH's trained adapter (``hiddenlens train-adapter``; ``"cached"`` likewise; every decider then also runs with
    it); ``entropy_threshold`` (nats); ``chunks`` evaluation chunks of ``seq_len`` tokens
    (second half of the offline prose); ``max_iter`` passes; ``topk`` of the soft-embedding feedback."""

    decider: str | None = None
    lora: str | None = None
    threshold: float | None = None
    entropy_threshold: float = 2.5
    chunks: int = 16
    seq_len: int = 128
    max_iter: int = 2
    topk: int = DEFAULT_TOPK


@dataclass
class Result(StudyResult):
    """Tables ``tokens`` (one row per decider, chunk and position) and ``summary`` (one row per decider)."""

    STUDY: ClassVar[str] = STUDY
    CONFIG: ClassVar[type] = IterationConfig

    def figures(self) -> dict:
        return {"iteration": plot_iteration(self.tables["summary"], self.tables["tokens"])}

    def report(self) -> str:
        ev = IterationEval(self.tables.get("tokens"), self.tables["summary"], self.summary)
        m = ev.meta
        ref = pd.DataFrame([{"decider": "TaH paper (trained LoRA + decider)", "share_iterated": 0.06,
                             "fix_rate": 0.087, "break_rate": 0.021}])
        cols = ["decider", "share_iterated", "acc_first", "acc_final", "acc_change", "fix_rate", "break_rate",
                "fix_rate_iterated", "recall_mispredicted", "auroc"]
        always = ev.summary[ev.summary.decider == "always"]
        line = ""
        if len(always):
            a = always.iloc[0]
            line = (f"Iterating every token once, the untrained model fixes **{a.fix_rate:.1%}** of its first-pass "
                    f"mispredictions and breaks **{a.break_rate:.1%}** of its correct predictions (accuracy "
                    f"{a.acc_first:.3f} -> {a.acc_final:.3f}); TaH's trained second iteration fixes 8.7 % and breaks "
                    "2.1 %.")
        deciders = ", ".join(f"`{n}` (threshold {d['threshold']:.3g}, sites {d.get('sites', d.get('layers'))})"
                             for n, d in m["deciders"].items())
        text = f"""# Think-at-Hard selective iteration, training-free

Model `{m['model']}`, {m['n_chunks']} held-out prose chunks of {m['seq_len']} tokens, teacher-forced;
max_iter {m['max_iter']} (passes), top-k {m['k']} soft-embedding feedback, additive logits, duo-causal mask.
Deciders: {deciders};
`always` iterates every token, `oracle` exactly the first-pass mispredictions.

{markdown_table(ev.summary[cols])}

TaH reference (paper / project page, with trained depth-aware LoRA and decider):

{markdown_table(ref)}

{line} TaH trains a LoRA for iterations >= 1 and its decider; rows without `+lora` re-run the untouched model on
its own soft prediction (the feedback mechanism alone); rows with `+lora` run iterations >= 1 on the trained
adapter ({m.get('lora') or 'none in this run'}). The AUROC column says how well each decider's score
ranks first-pass mispredictions (for `always`/`oracle` it is the entropy score's AUROC).

![iteration](iteration.png)
"""
        return text


def result_of(config: IterationConfig, ev: IterationEval) -> Result:
    """The study's :class:`Result` of an :func:`evaluate_iteration`."""
    summary = {**ev.meta, "deciders_summary": ev.summary.to_dict(orient="records")}
    return Result(config, summary, {"tokens": ev.tokens, "summary": ev.summary})


def run(config: IterationConfig, handle=None, progress: bool = True) -> Result:
    """Evaluate the entropy decider (and the MLP decider of ``config.decider``) on ``handle`` (default: its
    model), beside ``always`` and ``oracle``."""
    handle = handle if handle is not None else config.load()
    deciders = {"entropy": EntropyDecider(config.entropy_threshold)}
    if config.decider == CACHED:
        deciders["mlp"] = cached_decider(handle, config.threshold, progress)
    elif config.decider:
        deciders["mlp"] = load_decider(config.decider, config.threshold)
    if config.lora == CACHED:
        lora = cached_adapter(handle, progress)
    else:
        lora = load_adapter(handle, config.lora) if config.lora else None
    ev = evaluate_iteration(handle, prose_chunks(handle, "eval", config.chunks, config.seq_len), deciders,
                            max_iter=config.max_iter, k=config.topk, progress=progress, lora=lora)
    return result_of(config, ev)
