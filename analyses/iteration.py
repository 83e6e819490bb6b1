"""Per-token tables and metrics of Think-at-Hard selective iteration (the evaluation over held-out prose is the
study :mod:`hiddenlens.studies.iteration`).

For every position ``t`` with a next token, iteration 0 predicts ``argmax z^(0)_t``; the decider picks positions
to iterate (``max_iter`` passes at most, top-``k`` soft-embedding feedback, additive logits, duo-causal KV slots;
see :mod:`hiddenlens.interventions.iterate`), and the final prediction is the argmax of the cumulative logits.

Per decider: share of tokens iterated; **fix rate** = first-pass mispredictions that end right / all first-pass
mispredictions; **break rate** = first-pass correct predictions that end wrong / all first-pass correct ones;
accuracy before/after; fixes among iterated mispredictions; decider AUROC for "first pass mispredicted".
Deciders: ``always`` (iterate every token; INFERRED to be the setting closest to TaH's fix/break figures, whose
token selection the project page does not state), ``oracle`` (iterate exactly the first-pass mispredictions),
``entropy`` and ``mlp`` (if a trained decider is given).

TaH (project page) reports that its second iteration fixes 8.7 % of first-pass mispredictions and breaks 2.1 % of
correct ones, and that 94 % of tokens skip iteration; TaH trains a depth-aware LoRA for iterations >= 1, while
this evaluation is **training-free** (the untouched model re-reads its own soft prediction), so the numbers answer
a different question: what the feedback mechanism alone does.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from hiddenlens.common.stats import auroc


def token_table(handle, result, decider: str = "", chunk: int = 0) -> pd.DataFrame:
    """Per position with a next token of an ``IterationResult`` (:mod:`hiddenlens.interventions.iterate`): token,
    target, predictions before/after, depth, decider score, and whether iteration fixed or broke the prediction."""
    ids = result.input_ids
    n = len(ids) - 1
    target = ids[1:]
    p0, p1 = result.pred0[:n], result.pred[:n]
    dec = handle.tokenizer.convert_ids_to_tokens
    return pd.DataFrame({
        "decider": decider, "chunk": chunk, "position": np.arange(n),
        "token": dec(ids[:n].tolist()), "target": dec(target.tolist()),
        "pred_first": dec(p0.tolist()), "pred_final": dec(p1.tolist()),
        "depth": result.depth[:n].numpy(), "score": result.scores[:n].numpy(),
        "first_correct": (p0 == target).numpy(), "final_correct": (p1 == target).numpy(),
        "fixed": ((p0 != target) & (p1 == target)).numpy(), "broken": ((p0 == target) & (p1 != target)).numpy(),
    })


def summarize(tokens: pd.DataFrame) -> pd.DataFrame:
    """One row of metrics per decider from a :func:`token_table` concatenation."""
    rows = []
    for name, t in tokens.groupby("decider", sort=False):
        wrong0, right0 = ~t.first_correct, t.first_correct
        iterated = t.depth > 0
        rows.append({
            "decider": name, "n_tokens": len(t), "share_iterated": float(iterated.mean()),
            "acc_first": float(t.first_correct.mean()), "acc_final": float(t.final_correct.mean()),
            "acc_change": float(t.final_correct.mean() - t.first_correct.mean()),
            "fix_rate": float(t.fixed[wrong0].mean()) if wrong0.any() else np.nan,
            "break_rate": float(t.broken[right0].mean()) if right0.any() else np.nan,
            "fix_rate_iterated": float(t.fixed[wrong0 & iterated].mean()) if (wrong0 & iterated).any() else np.nan,
            "break_rate_iterated": float(t.broken[right0 & iterated].mean()) if (right0 & iterated).any() else np.nan,
            "recall_mispredicted": float(iterated[wrong0].mean()) if wrong0.any() else np.nan,
            "auroc": auroc((~t.first_correct).to_numpy(), t.score.to_numpy(), single_class="nan"),
        })
    return pd.DataFrame(rows)
