"""The steering-evaluation study (``hiddenlens steer eval``): does a truthful direction make answers more correct,
and what does it cost? With a random-direction control and ITI's published table beside ours.

Benefit, on held-out question/answer pairs (entities never seen when the directions were fitted): each pair is
a prompt with a correct and a wrong completion (``"The capital of France is"`` -> ``" Paris"`` / ``" Madrid"``).
Both completions are scored teacher-forced under the steering (mode ``generated``: the last prompt position and
every answer position, exactly the positions ``generate`` would edit) and we report

``accuracy``   share of pairs where log P(correct) > log P(wrong)
``p_true``     mean of P(correct) / (P(correct) + P(wrong)) (two-way normalised, over the whole completion)
``margin``     mean log P(correct) - log P(wrong), in nats

Cost, as ITI reports it, on neutral prose (Python's ``pydoc_data.topics``), steering at every position (mode
``all``): ``ce`` the next-token cross-entropy (nats/token) and ``kl`` the mean per-token KL(plain || steered).

Control: for every direction set, a random direction set with the same sites and the same sigma (seeded), so
its edits have exactly the same norm. ITI's numbers (Llama-2-chat-7B, TruthfulQA, alpha 15, K 48) are quoted
for reference only: different model, different benchmark; their "True" is a judged open-ended answer rate,
ours is two-way accuracy on capital questions.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from hiddenlens.analyses.truth import extract_last_token, fit_direction, head_sweep, iti_directions, top_k_heads
from hiddenlens.analyses.truth_data import data_hash, make_statements
from hiddenlens.common.batching import batch_starts
from hiddenlens.common.stats import kl_divergence, log_probs, markdown_table
from hiddenlens.interventions.steer import Steering
from hiddenlens.models.tiny import offline_prose
from hiddenlens.probes.direction import Direction
from hiddenlens.probes.sites import parse_layers

from .report import ModelSpec, StudyResult

STUDY = "steering"


#: ITI's replication file (validation/iti_replication_results.md; "Inference-Time Intervention: Eliciting Truthful Answers from a Language Model" (arXiv 2306.03341)).
ITI_TABLE = pd.DataFrame([
    dict(source="ITI paper, Llama-2-chat-7B", setting="baseline", alpha=0.0, true=0.58, ce=2.51, kl=0.0),
    dict(source="ITI paper, Llama-2-chat-7B", setting="ITI, K=48 heads", alpha=15.0, true=0.83, ce=2.82, kl=0.65),
])


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


def prose_batch(handle, n_chunks: int = 8, chunk_tokens: int = 64) -> torch.Tensor:
    """``[n_chunks, chunk_tokens]`` token ids of neutral prose (``pydoc_data.topics``), fixed order."""
    ids = _encode(handle.tokenizer, [offline_prose(n_chunks * chunk_tokens * 8)])[0]
    if len(ids) < n_chunks * chunk_tokens:
        raise ValueError("not enough prose for the requested chunks")
    return torch.tensor(ids[: n_chunks * chunk_tokens]).view(n_chunks, chunk_tokens).to(handle.device)


def prose_logprobs(handle, ids: torch.Tensor, directions=None, alpha: float = 0.0) -> torch.Tensor:
    """Log-probabilities ``[n, T-1, vocab]`` (float64) of the prose tokens' next tokens, steered in mode ``all``."""
    with torch.inference_mode():
        if directions:
            with Steering(handle, directions, alpha, "all"):
                logits = handle.hf_model(input_ids=ids).logits
        else:
            logits = handle.hf_model(input_ids=ids).logits
    return log_probs(logits[:, :-1].double())


def cost(plain_lp: torch.Tensor, steered_lp: torch.Tensor, ids: torch.Tensor) -> tuple[float, float]:
    """``(ce, kl)``: cross-entropy of the steered model on ``ids`` and mean KL(plain || steered), nats/token."""
    target = ids[:, 1:, None]
    ce = -steered_lp.gather(-1, target).mean()
    kl = kl_divergence(plain_lp, steered_lp, from_log_probs=True).mean()
    return float(ce), float(kl)


def evaluate_steering(handle, direction_sets: dict[str, list[Direction]], pairs: pd.DataFrame, alphas,
                      random_control: bool = True, seed: int = 0, n_prose: int = 8,
                      progress: bool = False) -> pd.DataFrame:
    """Accuracy / p_true / margin on ``pairs`` (columns ``prompt, correct, wrong``) and CE / KL on prose for each
    direction set and alpha; ``random_control`` adds ``random<name>`` sets (same sites, same sigma).

    Returns one row per (set, alpha): ``set, kind, sites, alpha, accuracy, p_true, margin, ce, kl, edit_norm``
    (``edit_norm``: the L2 norm added at each edited token, summed over the set's sites in quadrature).
    """
    if pairs.empty:
        raise ValueError("no evaluation pairs")
    alphas = [float(a) for a in alphas]
    sets = dict(direction_sets)
    if random_control:
        for k, (name, ds) in enumerate(direction_sets.items()):
            sets[f"random[{name}]"] = random_like(ds, seed + k + 1)
    ids = prose_batch(handle, n_prose)
    plain_lp = prose_logprobs(handle, ids)
    prompts = pairs.prompt.tolist()
    rows = []
    jobs = [(name, a) for name in sets for a in alphas]
    base = None
    for name, alpha in tqdm(jobs, desc="steer eval", disable=not progress):
        ds = sets[name]
        if alpha == 0.0 and base is not None:
            lc, lw, ce, kl = base
        else:
            lc = answer_logprobs(handle, prompts, pairs.correct.tolist(), ds, alpha)
            lw = answer_logprobs(handle, prompts, pairs.wrong.tolist(), ds, alpha)
            ce, kl = cost(plain_lp, prose_logprobs(handle, ids, ds, alpha), ids)
            if alpha == 0.0:
                base = (lc, lw, ce, kl)
        m = (lc - lw).numpy()
        rows.append(dict(set=name, kind="random" if name.startswith("random[") else "truth",
                         sites=", ".join(d.name.split("@")[1] for d in ds), alpha=alpha,
                         accuracy=float(np.mean(m > 0)), p_true=float(np.mean(1 / (1 + np.exp(-m)))),
                         margin=float(m.mean()), ce=ce, kl=kl,
                         edit_norm=float(abs(alpha) * np.sqrt(sum(d.sigma ** 2 for d in ds)))))
    return pd.DataFrame(rows)


def comparison_table(results: pd.DataFrame, kl_budget: float = 0.65) -> pd.DataFrame:
    """ITI's table beside ours: for each truth set, alpha 0 and the largest alpha whose KL stays within
    ``kl_budget`` (ITI's own KL at its operating point), plus the random control at that alpha."""
    rows = [r | {"accuracy": r.pop("true"), "p_true": np.nan, "margin": np.nan} for r in
            ITI_TABLE.to_dict("records")]
    for name, g in results[results.kind == "truth"].groupby("set", sort=False):
        ok = g[g.kl <= kl_budget]
        pick = ok.alpha.max() if not ok.empty else 0.0
        for alpha in sorted({0.0, pick}):
            r = g[g.alpha == alpha].iloc[0]
            rows.append(dict(source="ours, embedded model, held-out capitals", setting=name, alpha=alpha,
                             accuracy=r.accuracy, p_true=r.p_true, margin=r.margin, ce=r.ce, kl=r.kl))
            ctl = results[(results.set == f"random[{name}]") & (results.alpha == alpha)]
            if alpha > 0 and not ctl.empty:
                c = ctl.iloc[0]
                rows.append(dict(source="ours, random control", setting=f"random[{name}]", alpha=alpha,
                                 accuracy=c.accuracy, p_true=c.p_true, margin=c.margin, ce=c.ce, kl=c.kl))
    return pd.DataFrame(rows)[["source", "setting", "alpha", "accuracy", "p_true", "margin", "ce", "kl"]]


def fit_eval_sets(handle, family: str, layers: list[int], k_heads: int, seed: int = 0):
    """Directions for :func:`evaluate_steering`: mass-mean at each of ``layers`` and ITI's top-K heads, fitted on
    train + val entities (split 0.5 / 0.15 / 0.35 so about 40 countries stay held out); returns
    ``(sets, held-out pairs, info)``."""
    df = make_statements([family], seed=seed, fractions=(0.5, 0.15, 0.35))
    all_layers = list(range(handle.adapter.n_layers)) if k_heads > 0 else layers
    acts = extract_last_token(handle, df.text.tolist(), all_layers, heads=k_heads > 0)
    y = torch.tensor(df.label.to_numpy())
    tr, va = torch.tensor((df.split == "train").to_numpy()), torch.tensor((df.split == "val").to_numpy())
    te = torch.tensor((df.split == "test").to_numpy())
    trva, dh = tr | va, data_hash(df)
    sets = {}
    for layer in layers:
        u, sigma, det = fit_direction(acts["resid"][trva][:, all_layers.index(layer)], y[trva], "mass_mean")
        sets[f"mass_mean@L{layer}"] = [Direction(torch.from_numpy(u).float(), sigma, f"blocks.{layer}.resid_post",
                                                 model=handle.spec, data_hash=dh, detector=det)]
    if k_heads > 0:
        H = acts["heads"]
        table = head_sweep(H[tr], y[tr], H[va], y[va], H[te], y[te], all_layers, seed)
        sets[f"iti_top{k_heads}_heads"] = iti_directions(H[trva], y[trva], all_layers, top_k_heads(table, k_heads),
                                                         handle.spec, dh, table)
    pairs = df[(df.split == "test") & (df.label == 1)][["prompt", "correct", "wrong", "entity"]]
    info = {"sigmas": {k: [d.sigma for d in v] for k, v in sets.items()}, "data_hash": dh,
            "n_train_pairs": int((df.split == "train").sum() // 2)}
    return sets, pairs.reset_index(drop=True), info


# ---- the study -------------------------------------------------------------------------------------------------
@dataclass
class SteeringConfig(ModelSpec):
    """``family`` to fit on and evaluate (held-out entities), ``layers`` whose mass-mean directions are evaluated
    (block indices or a spec such as ``"8,12,16"``), the ``alphas`` grid, ``k_heads`` (ITI's top-K heads; 0: no ITI
    set), ``n_prose`` prose chunks for the cost."""

    family: str = "capitals"
    layers: list[int] | str = "8,12,16"
    alphas: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0, 8.0, 16.0])
    k_heads: int = 16
    seed: int = 0
    n_prose: int = 8


@dataclass
class Result(StudyResult):
    """Tables ``results`` (one row per direction set and alpha) and ``comparison`` (ITI's table beside ours)."""

    STUDY: ClassVar[str] = STUDY
    CONFIG: ClassVar[type] = SteeringConfig

    def figures(self) -> dict:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        results, meta = self.tables["results"], self.summary
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
        for name, g in results.groupby("set", sort=False):
            style = dict(ls=":" if name.startswith("random[") else "-", marker=".")
            for ax, col in zip(axes, ("accuracy", "margin", "ce", "kl")):
                ax.plot(g.alpha, g[col], label=name, **style)
        for ax, (col, unit) in zip(axes, (("accuracy", "share of pairs"), ("margin", "nats"),
                                          ("ce", "nats/token, prose"), ("kl", "nats/token, prose"))):
            ax.set(xlabel="alpha (edit = alpha * sigma)", ylabel=unit, title=col)
            ax.set_xscale("symlog", linthresh=1)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"steering on held-out {meta.get('family', '')} questions ({meta.get('model', '')}); "
                     "dotted = random direction, same norm")
        return {"steer_vs_alpha": fig}

    def report(self) -> str:
        meta, results = self.summary, self.tables["results"]
        comp = self.tables.get("comparison")
        comp = comparison_table(results) if comp is None else comp
        md = [f"# Steering evaluation: {meta.get('model', '')}", "",
              f"{meta.get('n_pairs', '?')} held-out `{meta.get('family', '')}` question pairs (entities unseen when "
              "fitting); benefit steered in mode `generated`, cost on neutral prose steered at every position.", "",
              "![steering vs alpha](steer_vs_alpha.png)", "",
              "## ITI's table beside ours", "",
              "ITI's row is quoted from its replication file (a different model and benchmark; its accuracy column "
              "is TruthfulQA 'True'). Our steered row per set is the largest alpha whose KL stays within ITI's 0.65.",
              "", markdown_table(comp), "", "## All results", "", markdown_table(results)]
        return "\n".join(md) + "\n"


def run(config: SteeringConfig, handle=None, progress: bool = True) -> Result:
    """Fit the directions on train entities, then steer on held-out questions over the alpha grid."""
    handle = handle if handle is not None else config.load()
    layers = parse_layers(config.layers, handle.n_layers, what="layers")
    alphas = [float(a) for a in config.alphas]
    sets, pairs, info = fit_eval_sets(handle, config.family, layers, config.k_heads, config.seed)
    results = evaluate_steering(handle, sets, pairs, alphas, seed=config.seed, n_prose=config.n_prose,
                                progress=progress)
    summary = info | {"model": handle.spec, "family": config.family, "n_pairs": len(pairs), "alphas": alphas,
                      "layers": layers, "n_rows": len(results)}
    return Result(config, summary, {"results": results, "comparison": comparison_table(results)})
