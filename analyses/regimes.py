"""The regime experiment of Intention Collapse ("Intention Collapse: Intention-Level Metrics for Reasoning in Language Models" (arXiv 2601.01011)): direct vs chain-of-thought vs babble.

For every problem and regime the prompt goes through the model's chat template (optionally after ``shots``
worked examples as earlier user/assistant turns), then:

1. one forward pass over the prompt records H_int (entropy of the first-token distribution, top-100 as in the
   authors' code and full-vocabulary as in the paper) and the *intention state*: ``resid_post`` at the last
   prompt position of the chosen layers (default: the last 5 blocks, like the code's ``extraction_layers``);
2. greedy batched generation produces the answer, which is parsed and scored against the exact answer;
3. optionally (``post_collapse=True``, the v1 pilot's variant) the state at the final decoding step is kept too.

Per regime: accuracy (Wilson 95 % CI), mean H_int (bootstrap 95 % CI), dim_eff per layer and aggregate, and
Recov: a probe predicting correctness from the intention states (AUROC, bootstrap CI, shuffle control).
The study :mod:`hiddenlens.studies.intention` runs it and writes the report folder with the paper's
headline table beside ours.

Prompts: the direct and CoT wordings are the authors' code's; the babble wording is INFERRED (the authors' description gives
only "write a long stream of consciousness ... Do NOT solve ...").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from hiddenlens.common.batching import batch_starts
from hiddenlens.common.stats import bootstrap_ci, wilson_ci
from hiddenlens.probes.capture import capture
from hiddenlens.probes.handle import common_prefix

from .arithmetic import Problem, few_shot_examples, is_correct, parse_answer
from .intention import (global_threshold_dimensionality, intention_entropy, layered_dimensionality,
                        recoverability)

PROMPTS = {
    "direct": "Solve this math problem. Give only the final numerical answer.\n\nProblem: {q}\nAnswer:",
    "cot": ("Solve this math problem step by step. Show your reasoning, then give the final answer after ####.\n\n"
            "Problem: {q}\nSolution:"),
    "babble": ("Read this math problem, then write a long stream of consciousness about anything it brings to "
               "mind. Do NOT solve the problem and do not give any number as an answer.\n\nProblem: {q}\n"),
}
REGIMES = tuple(PROMPTS)
#: Generation budgets (new tokens). The paper uses 50 / 512 / 512; these CPU-sized defaults are smaller.
MAX_NEW_TOKENS = {"direct": 16, "cot": 96, "babble": 64}
#: How each regime's answer is read: direct answers are the first number, worked solutions the last.
PARSE_MODE = {"direct": "first", "cot": "last", "babble": "last"}
#: Example babble replies (project-written). With ``babble_shots="varied"`` each worked example of each item gets one
#: of these, drawn per item (:func:`babble_replies`), so items do not all show the same reply to copy.
BABBLE_REPLIES = (
    "This makes me think of a quiet afternoon, the smell of paper, a window with rain on it, and how lists never "
    "quite end.",
    "Markets in the morning are loud; someone always argues about the price of onions while a dog sleeps by a crate.",
    "I keep picturing a train station in winter, steam from coffee cups, and a clock that is always a little fast.",
    "Gardens remind me of my grandmother's hands, dirt under the nails, and the patience it takes to wait for beans.",
    "There is something calming about folding laundry: the warm towels, the radio murmuring, socks that never pair.",
    "A bicycle ride along the river, wind in the face, gulls arguing overhead, the bell that sticks on every bump.",
    "Libraries have their own weather, dusty and still, with a cough somewhere and the creak of an old chair.",
    "Cooking soup on a cold evening: chopping carrots, the onion that makes you cry, steam fogging the glasses.",
    "Old photographs make me wonder who held the camera, what they laughed about, and where the blue car went.",
    "The ocean at night sounds like breathing, and the lighthouse blinks as if it is trying to remember a song.",
    "School hallways smell of floor wax and oranges; lockers bang, and someone is always running late.",
    "Clouds over a field look like slow animals, a whale, then a teapot, then nothing at all, drifting east.",
)
#: ``babble_shots`` of :func:`run_regimes`: ``none`` (the babble regime is zero-shot even when the others get
#: worked examples) or ``varied`` (as many examples as the others, each with a babble reply drawn per item).
BABBLE_SHOTS = ("none", "varied")

#: The paper's headline numbers (Mistral-7B-Instruct-v0.3 4-bit, GSM8K n = 200; "Intention Collapse: Intention-Level Metrics for Reasoning in Language Models" (arXiv 2601.01011)).
PAPER_TABLE = pd.DataFrame([
    {"source": "paper v1 (pilot code)", "regime": "direct", "accuracy": 0.055, "h_int_bits": 1.42, "auroc": 0.56,
     "auroc_ci": "includes 0.5"},
    {"source": "paper v1 (pilot code)", "regime": "cot", "accuracy": 0.53, "h_int_bits": 0.37, "auroc": 0.65,
     "auroc_ci": "[0.57, 0.72]"},
    {"source": "paper v2 Table 6", "regime": "direct", "accuracy": 0.11, "h_int_bits": 2.39, "auroc": float("nan"),
     "auroc_ci": ""},
    {"source": "paper v2 Table 6", "regime": "cot", "accuracy": 0.50, "h_int_bits": 0.37, "auroc": 0.56,
     "auroc_ci": "[0.49, 0.64]"},
])


def babble_replies(item: int, k: int, seed: int = 0) -> list[str]:
    """``k`` distinct example babble replies for item number ``item`` (seeded by ``seed`` and ``item``)."""
    if k > len(BABBLE_REPLIES):
        raise ValueError(f"{k} babble examples asked for, only {len(BABBLE_REPLIES)} written; use fewer shots")
    rng = np.random.default_rng([seed, item])
    return [BABBLE_REPLIES[i] for i in rng.choice(len(BABBLE_REPLIES), size=k, replace=False)]


def build_messages(problem: Problem, regime: str, shots: list[Problem] = (),
                   babble: Sequence[str] = ()) -> list[dict]:
    """Chat messages for one item: ``shots`` worked examples as earlier turns, then the question. The babble
    regime's example replies are ``babble`` (one per shot, e.g. from :func:`babble_replies`)."""
    if regime not in PROMPTS:
        raise ValueError(f"unknown regime {regime!r}; choose from {', '.join(REGIMES)}")
    if regime == "babble" and len(babble) != len(shots):
        raise ValueError(f"babble with {len(shots)} worked examples needs {len(shots)} example replies, got "
                         f"{len(babble)}; pass babble=babble_replies(item, {len(shots)}) or no shots")
    messages = []
    for i, ex in enumerate(shots):
        reply = {"direct": str(ex.answer), "cot": ex.solution}[regime] if regime != "babble" else babble[i]
        messages += [{"role": "user", "content": PROMPTS[regime].format(q=ex.question)},
                     {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": PROMPTS[regime].format(q=problem.question)})
    return messages


def regime_messages(problems: list[Problem], regime: str, examples: list[Problem], babble_shots: str = "none",
                    seed: int = 0) -> list[list[dict]]:
    """Every item's chat messages for one regime: the worked ``examples`` before each question, except babble,
    which gets none (``babble_shots="none"``) or the same number with replies drawn per item (``varied``)."""
    if regime != "babble":
        return [build_messages(p, regime, examples) for p in problems]
    if babble_shots == "none" or not examples:
        return [build_messages(p, regime) for p in problems]
    return [build_messages(p, regime, examples, babble_replies(i, len(examples), seed))
            for i, p in enumerate(problems)]


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, ending with the assistant header."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; the regime experiment needs a chat model")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def default_layers(n_layers: int, k: int = 5) -> list[int]:
    """The last ``k`` blocks (the code's ``extraction_layers``: 27-31 of 32)."""
    return list(range(max(0, n_layers - k), n_layers))


def _length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in batch_starts(len(order), batch_size)]


def intention_pass(handle, prompts: list[list[int]], layers: list[int], batch_size: int = 8, top_k: int = 100,
                   progress: bool = False) -> dict[str, np.ndarray]:
    """One forward pass per batch over the prompts (no generation).

    Returns ``h_int`` ``[n]`` (bits, top-``top_k``), ``h_int_full`` ``[n]`` (bits, full vocabulary) and
    ``states`` ``[n, len(layers), d_model]`` (float32: ``resid_post`` at the last prompt position).
    """
    n = len(prompts)
    sites = [f"blocks.{layer}.resid_post" for layer in layers]
    h_top, h_full = np.zeros(n), np.zeros(n)
    states = np.zeros((n, len(layers), handle.adapter.d_model), np.float32)
    for rows in tqdm(_length_batches([len(p) for p in prompts], batch_size), desc="intention pass",
                     disable=not progress, unit="batch"):
        with capture(handle, sites, positions="last", to="cpu") as cache:
            out = handle.run([prompts[i] for i in rows], logits_to_keep=1)
        last = out.logits[:, -1].float()
        h_top[rows] = intention_entropy(last, top_k=top_k).numpy()
        h_full[rows] = intention_entropy(last, top_k=None).numpy()
        states[rows] = torch.stack([cache[s][:, -1] for s in sites], 1).float().numpy()
    return {"h_int": h_top, "h_int_full": h_full, "states": states}


def _eos_ids(handle) -> set[int]:
    eos = handle.hf_model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if handle.tokenizer.eos_token_id is not None:
        ids.add(handle.tokenizer.eos_token_id)
    return ids


def generate_with_intention(handle, prompts: list[list[int]], layers: list[int], max_new_tokens: int,
                            batch_size: int = 8, post_collapse: bool = False, top_k: int = 100,
                            progress: bool = False, reuse_prefix: bool = True) -> dict:
    """Greedy batched generation that also records the intention measures (batches of similar prompt length).

    One capture (``positions="last"``) per batch keeps ``resid_post`` of ``layers`` and the logits at the last
    position of every forward: the prefill's entry is the pre-collapse state and the first-token distribution
    (the same numbers as a separate forward pass, which :func:`intention_pass` computes; the prefill reuses it
    instead of paying for the prompt twice).

    ``reuse_prefix`` (hf backend): the prompts' common start (chat header, few-shot turns) is run once and its KV
    cache reused by every batch (:meth:`~hiddenlens.probes.handle.ModelHandle.prefix_cache`); the captured last
    positions and the generated tokens equal the path without reuse within float error (tested).

    Returns ``h_int`` / ``h_int_full`` ``[n]`` (bits), ``states`` ``[n, len(layers), d_model]``, ``texts``
    (decoded new tokens), ``n_new`` (new tokens up to and including the first EOS) and, with ``post_collapse``,
    ``post_states`` ``[n, len(layers), d_model]``: the state at the decoding step that produced the item's last
    token (the v1 pilot's post-collapse state).
    """
    n, d = len(prompts), handle.adapter.d_model
    texts: list[str] = [""] * n
    n_new = np.zeros(n, dtype=int)
    h_top, h_full = np.zeros(n), np.zeros(n)
    states = np.zeros((n, len(layers), d), np.float32)
    post = np.zeros((n, len(layers), d), np.float32) if post_collapse else None
    eos = _eos_ids(handle)
    sites = [f"blocks.{layer}.resid_post" for layer in layers]
    prefix = None
    if reuse_prefix and handle.backend.name == "hf" and len(prompts) > 1:
        shared = common_prefix(prompts)
        prefix = handle.prefix_cache(shared) if shared else None

    def entropies(name, t):  # keep only H_int of each forward's last-position logits, not [batch, vocab]
        if name != "logits":
            return t
        last = t[:, -1].float()
        return torch.stack([intention_entropy(last, top_k), intention_entropy(last, None)], -1)

    for rows in tqdm(_length_batches([len(p) for p in prompts], batch_size),
                     desc=f"generate (<= {max_new_tokens} tokens)", disable=not progress, unit="batch"):
        with capture(handle, sites + ["logits"], positions="last", reduce=entropies, to="cpu") as cache:
            gen = handle.generate([prompts[i] for i in rows], max_new_tokens=max_new_tokens, prefix=prefix)
        first = cache.chunks("logits")[0].value
        h_top[rows], h_full[rows] = first[:, 0].numpy(), first[:, 1].numpy()
        per_step = torch.stack([torch.cat([c.value for c in cache.chunks(s)], 1) for s in sites], 2)  # [b, step, L, d]
        states[rows] = per_step[:, 0].float().numpy()
        new = gen.new_tokens.cpu()
        for j, i in enumerate(rows):
            toks = new[j].tolist()
            stop = next((k for k, t in enumerate(toks) if t in eos), None)
            n_new[i] = len(toks) if stop is None else stop + 1
            texts[i] = handle.decode(toks[: n_new[i]])
            if post is not None:
                post[i] = per_step[j, min(n_new[i], per_step.shape[1]) - 1].float().numpy()
    return {"h_int": h_top, "h_int_full": h_full, "states": states, "texts": texts, "n_new": n_new,
            "post_states": post}


@dataclass
class RegimeResults:
    """Everything the experiment produced.

    ``items``: one row per (regime, item); ``regimes``: one row per regime; ``dims``: dim_eff per (regime,
    layer); ``states[regime]``: ``[n, layers, d_model]`` pre-collapse states; ``post_states`` likewise (v1).
    """

    items: pd.DataFrame
    regimes: pd.DataFrame
    dims: pd.DataFrame
    states: dict[str, np.ndarray]
    post_states: dict[str, np.ndarray] = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def _recov_row(states: np.ndarray, correct: np.ndarray, n_boot: int, seed: int, prefix: str = "recov") -> dict:
    try:
        r = recoverability(states, correct, protocol="cv5", n_boot=n_boot, seed=seed)
    except ValueError as exc:
        return {f"{prefix}_auroc": float("nan"), f"{prefix}_ci_low": float("nan"),
                f"{prefix}_ci_high": float("nan"), f"{prefix}_shuffled": float("nan"), f"{prefix}_note": str(exc)}
    return {f"{prefix}_auroc": r.auroc, f"{prefix}_ci_low": r.ci_low, f"{prefix}_ci_high": r.ci_high,
            f"{prefix}_shuffled": r.shuffled_auroc, f"{prefix}_note": f"{r.n_splits}-fold CV"}


def run_regimes(handle, problems: list[Problem], regimes=REGIMES, shots: int = 0, layers: list[int] | None = None,
                batch_size: int = 8, max_new_tokens: dict | None = None, post_collapse: bool = False,
                n_boot: int = 1000, seed: int = 42, progress: bool = True, on_regime=None,
                babble_shots: str = "none", reuse_prefix: bool = True) -> RegimeResults:
    """Run every regime over ``problems`` and compute the per-item and per-regime metrics.

    Args:
        handle: a chat model's :class:`~hiddenlens.models.ModelHandle`.
        problems: from :func:`hiddenlens.analyses.arithmetic.make_problems` (or GSM8K).
        regimes: any of ``direct``, ``cot``, ``babble``.
        shots: worked examples before each question (0 = zero-shot, the paper's setting).
        babble_shots: ``none`` (babble stays zero-shot: with one fixed example reply the 135M model copied it
            verbatim) or ``varied`` (``shots`` examples with replies drawn per item by :func:`babble_replies`).
        reuse_prefix: run the prompts' shared start once per regime and reuse its KV cache
            (:func:`generate_with_intention`).
        layers: blocks whose ``resid_post`` forms the intention state (default: the last 5).
        max_new_tokens: per-regime overrides of :data:`MAX_NEW_TOKENS`.
        post_collapse: also keep the v1 post-collapse state (final decoding step) and its dim_eff / Recov.
        on_regime: called with the partial :class:`RegimeResults` after each regime (e.g. to write the report
            progressively, so a long run that is stopped still leaves the finished regimes on disk).
    """
    if not problems:
        raise ValueError("no problems given")
    n_layers = handle.adapter.n_layers
    layers = default_layers(n_layers) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} out of range: this model has {n_layers} blocks (0-{n_layers - 1})")
    if babble_shots not in BABBLE_SHOTS:
        raise ValueError(f"babble_shots={babble_shots!r}: use one of {', '.join(BABBLE_SHOTS)}")
    budgets = {**MAX_NEW_TOKENS, **(max_new_tokens or {})}
    examples = few_shot_examples(shots)
    item_rows, regime_rows, dim_rows = [], [], []
    states, post_states = {}, {}
    config = {"model": handle.spec, "n": len(problems), "regimes": list(regimes), "shots": shots, "layers": layers,
              "batch_size": batch_size, "max_new_tokens": {r: budgets[r] for r in regimes},
              "babble_shots": babble_shots if shots else "none", "reuse_prefix": reuse_prefix,
              "post_collapse": post_collapse, "n_boot": n_boot, "seed": seed, "decoding": "greedy",
              "h_int": "top-100 renormalised (authors' code); h_int_full: full vocabulary (paper Eq. 2)",
              "recoverability": "cv5: StratifiedKFold(5), C=1, out-of-fold AUROC, 1000-resample bootstrap CI"}
    for regime in regimes:
        prompts = [chat_prompt_ids(handle.tokenizer, m) for m in regime_messages(problems, regime, examples,
                                                                                  babble_shots, seed)]
        gen = generate_with_intention(handle, prompts, layers, budgets[regime], batch_size, post_collapse,
                                      progress=progress, reuse_prefix=reuse_prefix)
        correct = np.array([is_correct(t, p.answer, PARSE_MODE[regime]) for t, p in zip(gen["texts"], problems)])
        for p, text, k, c, h, hf, plen in zip(problems, gen["texts"], gen["n_new"], correct, gen["h_int"],
                                             gen["h_int_full"], map(len, prompts)):
            item_rows.append({"regime": regime, "item": p.id, "level": p.level, "question": p.question,
                              "answer": p.answer, "output": text, "parsed": parse_answer(text, PARSE_MODE[regime]),
                              "correct": bool(c), "h_int_bits": float(h), "h_int_full_bits": float(hf),
                              "prompt_tokens": plen, "new_tokens": int(k)})
        states[regime] = gen["states"]
        dims = layered_dimensionality({layer: gen["states"][:, j] for j, layer in enumerate(layers)})
        dims90 = layered_dimensionality({layer: gen["states"][:, j] for j, layer in enumerate(layers)},
                                        method="threshold")
        for (_, r), (_, r90) in zip(dims.table.iterrows(), dims90.table.iterrows()):
            dim_rows.append({"regime": regime, "state": "pre", "layer": int(r["layer"]),
                             "participation_ratio": r["dim_eff"], "threshold90": r90["dim_eff"],
                             "trace": r["trace"], "weight": r["weight"]})
        n, k = len(problems), int(correct.sum())
        lo, hi = wilson_ci(k, n)
        h_lo, h_hi = bootstrap_ci(gen["h_int"], np.mean, n_resamples=n_boot, seed=seed)
        row = {"regime": regime, "shots": shots, "n": n, "correct": k, "accuracy": k / n, "accuracy_ci_low": lo,
               "accuracy_ci_high": hi, "h_int_bits": float(gen["h_int"].mean()), "h_int_ci_low": h_lo,
               "h_int_ci_high": h_hi, "h_int_full_bits": float(gen["h_int_full"].mean()),
               "dim_eff_pr_agg": dims.aggregate, "dim_eff_90_global": global_threshold_dimensionality(
                   {layer: gen["states"][:, j] for j, layer in enumerate(layers)}),
               "mean_new_tokens": float(gen["n_new"].mean())}
        row |= _recov_row(gen["states"], correct, n_boot, seed)
        if post_collapse:
            post_states[regime] = gen["post_states"]
            pdims = layered_dimensionality({layer: gen["post_states"][:, j] for j, layer in enumerate(layers)})
            for _, r in pdims.table.iterrows():
                dim_rows.append({"regime": regime, "state": "post", "layer": int(r["layer"]),
                                 "participation_ratio": r["dim_eff"], "threshold90": float("nan"),
                                 "trace": r["trace"], "weight": r["weight"]})
            row["post_dim_eff_pr_agg"] = pdims.aggregate
            row |= _recov_row(gen["post_states"], correct, n_boot, seed, prefix="post_recov")
        regime_rows.append(row)
        if on_regime is not None:
            on_regime(_results(item_rows, regime_rows, dim_rows, states, post_states, config))
    return _results(item_rows, regime_rows, dim_rows, states, post_states, config)


def _results(item_rows, regime_rows, dim_rows, states, post_states, config) -> RegimeResults:
    return RegimeResults(pd.DataFrame(item_rows), pd.DataFrame(regime_rows), pd.DataFrame(dim_rows), states,
                         post_states, config)


def paired_differences(items: pd.DataFrame, baseline: str = "direct", n_boot: int = 1000,
                       seed: int = 42) -> pd.DataFrame:
    """Each regime minus ``baseline`` on the same items: accuracy and H_int differences with paired-bootstrap
    95 % CIs (items resampled jointly). One row per other regime; empty if ``baseline`` was not run."""
    if baseline not in set(items["regime"]):
        return pd.DataFrame()
    base = items[items["regime"] == baseline].set_index("item")
    rows = []
    for regime, part in items[items["regime"] != baseline].groupby("regime", sort=False):
        part = part.set_index("item").loc[base.index]
        d_acc = part["correct"].to_numpy(float) - base["correct"].to_numpy(float)
        d_h = part["h_int_bits"].to_numpy() - base["h_int_bits"].to_numpy()
        row = {"regime": regime, "baseline": baseline, "n": len(d_acc)}
        for name, d in (("accuracy", d_acc), ("h_int_bits", d_h)):
            # the same seed and length draw the same resamples: both differences are resampled jointly
            lo, hi = bootstrap_ci(d, np.mean, n_resamples=n_boot, seed=seed)
            row |= {f"d_{name}": float(d.mean()), f"d_{name}_ci_low": lo, f"d_{name}_ci_high": hi}
        rows.append(row)
    return pd.DataFrame(rows)
