"""The tuned-lens study (``hiddenlens analyze tuned-lens``): per-layer ``KL(p_final || p_lens)`` of the tuned lens
and of the logit lens on held-out prose, with bootstrap confidence intervals over prompts.

The claim measured, from Belrose et al., "Eliciting Latent Predictions from Transformers with the Tuned Lens"
(arXiv 2303.08112): the tuned lens has lower KL to the model's final distribution than the logit lens at every
layer, and the gain is largest in the early layers. The lens is the model's cached one
(:func:`hiddenlens.analyses.tuned_lens.cached_tuned_lens`, trained on first use on the offline prose before
character :data:`~hiddenlens.analyses.tuned_lens.HELD_OUT_SKIP`) or a lens file; the evaluation prose starts at
``skip`` (by default that held-out offset) and a run whose evaluation text overlaps the cached lens's training text
is refused. KL is in nats, per token, averaged within each prompt and then over prompts; the 95 % intervals
resample prompts (a prompt's tokens are not independent).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd

from hiddenlens.analyses.tuned_lens import (CACHE_RECIPE, HELD_OUT_SKIP, TunedLens, cached_lens_path,
                                            cached_tuned_lens, collect_states, lens_kl_per_token, training_prompts)
from hiddenlens.common.stats import bootstrap_ci, markdown_table
from hiddenlens.probes.sites import block_of

from .report import PREPEND_BOS, ModelSpec, StudyResult

STUDY = "tuned_lens"
PAPER = ('Belrose et al., "Eliciting Latent Predictions from Transformers with the Tuned Lens" (arXiv 2303.08112)')
#: the paper's claim, as the report states it
CLAIM = "lower KL to the final distribution than the logit lens at every layer, most in early layers"


@dataclass
class TunedLensConfig(ModelSpec):
    """``lens``: a lens file (.safetensors), or None for the model's cached lens (trained on first use).
    Evaluation: ``n_prompts`` chunks of ``chars`` characters of the offline prose from character ``skip``, BOS
    prepended when ``add_bos``; ``n_boot`` bootstrap resamples over prompts (seed ``seed``)."""

    lens: str | None = None
    n_prompts: int = 32
    chars: int = 400
    skip: int = HELD_OUT_SKIP
    batch_size: int = 8
    add_bos: bool = PREPEND_BOS
    n_boot: int = 1000
    seed: int = 0


@dataclass
class Result(StudyResult):
    """Tables ``kl_by_layer`` (one row per depth: ``site``, ``layer``, ``kl_logit`` / ``kl_tuned`` and
    their ``_lo`` / ``_hi`` 95 % bounds, ``gain`` = logit - tuned with its bounds, ``gain_share`` = gain / logit)
    and ``per_prompt`` (``prompt``, ``site``, ``n_tokens``, ``kl_logit``, ``kl_tuned``: each prompt's token mean)."""

    STUDY: ClassVar[str] = STUDY
    CONFIG: ClassVar[type] = TunedLensConfig

    def figures(self) -> dict:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        t = self.tables["kl_by_layer"]
        x = np.arange(len(t))
        fig, ax = plt.subplots(figsize=(9, 4.2))
        for name, colour in (("logit", "tab:red"), ("tuned", "tab:blue")):
            ax.plot(x, t[f"kl_{name}"], marker="o", ms=3, color=colour, label=f"{name} lens")
            ax.fill_between(x, t[f"kl_{name}_lo"], t[f"kl_{name}_hi"], color=colour, alpha=0.2, lw=0)
        ax.set_yscale("log")
        ax.set_xticks(x, ["embed" if s == "embed" else str(block_of(s)) for s in t["site"]], fontsize=7)
        ax.set_xlabel("depth (embed, then the output of block l)")
        ax.set_ylabel("KL(final || lens), nats (log scale)")
        s = self.summary
        ax.set_title(f"{s.get('model', '')}: held-out prose, {s.get('n_prompts', '?')} prompts, "
                     f"{s.get('n_tokens', '?')} tokens (bands: 95 % bootstrap over prompts)", fontsize=9)
        ax.legend()
        ax.grid(alpha=0.3, which="both")
        return {"kl_by_layer": fig}

    def report(self) -> str:
        s, t = self.summary, self.tables["kl_by_layer"]
        shown = t[["site", "kl_logit", "kl_logit_lo", "kl_logit_hi", "kl_tuned", "kl_tuned_lo", "kl_tuned_hi", "gain",
                   "gain_lo", "gain_hi", "gain_share"]]
        return "\n".join([
            "# Tuned lens vs logit lens", "",
            f"Paper: {PAPER}. Claim: {CLAIM}.", "",
            f"Model {s['model']}; lens: {s['lens']}; held-out offline prose: {s['n_prompts']} prompts of "
            f"{self.config.chars} characters from character {self.config.skip} ({s['n_tokens']} tokens, BOS "
            f"{'prepended' if self.config.add_bos else 'not prepended'}), never used to train the lens. KL in nats "
            "per token (mean within a prompt, then over prompts); 95 % intervals from "
            f"{self.config.n_boot} bootstrap resamples of prompts.", "",
            f"**Verdict: {s['verdict']}.** {s['verdict_text']}", "",
            "![KL by layer](kl_by_layer.png)", "",
            markdown_table(shown.round(4)), ""])


def _verdict(t: pd.DataFrame) -> tuple[str, str, dict]:
    """(verdict, one sentence, numbers) for the claim from the per-depth table."""
    every = bool((t["gain_lo"] > 0).all())
    n = len(t)
    third = max(1, n // 3)
    early, late = float(t["gain"].iloc[:third].mean()), float(t["gain"].iloc[-third:].mean())
    biggest = str(t.loc[t["gain"].idxmax(), "site"])
    numbers = {"lower_at_every_layer": every, "n_depths_lower": int((t["gain_lo"] > 0).sum()), "n_depths": n,
               "mean_gain_first_third": early, "mean_gain_last_third": late, "largest_gain_site": biggest}
    most_early = early > late
    text = (f"The tuned lens's KL is below the logit lens's (the 95 % interval of the difference above 0) at "
            f"{numbers['n_depths_lower']} of {n} depths; the mean gain is {early:.3f} nats over the first third of "
            f"the depths and {late:.3f} over the last third (largest at {biggest}).")
    if every and most_early:
        return "reproduced", text, numbers
    if numbers["n_depths_lower"] > n // 2:
        return "direction only", text, numbers
    return "not reproduced", text, numbers


def run(config: TunedLensConfig, handle=None, progress=True) -> Result:
    """Measure the tuned and logit lenses on held-out prose (see the module doc). ``progress``: True / False for
    tqdm bars, or a callback ``(fraction, what)`` (training the cached lens on first use is the first half)."""
    training_end = CACHE_RECIPE["n_prompts"] * CACHE_RECIPE["chars"]
    if config.lens is None and config.skip < training_end:
        raise ValueError(f"skip={config.skip}: the cached lens trained on the offline prose up to character "
                         f"{training_end}; evaluate from there on (e.g. skip={HELD_OUT_SKIP})")
    for name in ("n_prompts", "chars", "batch_size", "n_boot"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name}={getattr(config, name)}: must be >= 1")
    h = handle if handle is not None else config.load()
    step = (lambda f, w: progress(0.5 * f, w)) if callable(progress) else progress
    lens = TunedLens.load(config.lens, h) if config.lens else cached_tuned_lens(h, progress=step)
    prompts = training_prompts(config.n_prompts, config.chars, config.skip)
    add_bos = bool(config.add_bos) and h.tokenizer.bos_token_id is not None
    counts = h.tokenize(prompts, add_bos=add_bos).attention_mask.sum(1).tolist()
    if callable(progress):
        progress(0.5, "reading the held-out residual states")
    states, finals = collect_states(h, prompts, lens.sites, max_tokens=int(sum(counts)),
                                    batch_size=config.batch_size, progress=progress is True, add_bos=add_bos)
    if callable(progress):
        progress(0.6, "KL of both lenses at every depth")
    kl = {"logit": lens_kl_per_token(h, TunedLens.for_model(h), states, finals),
          "tuned": lens_kl_per_token(h, lens, states, finals)}
    prompt_of = np.repeat(np.arange(len(prompts)), counts)
    per_prompt = {k: np.stack([v[prompt_of == i].mean(0) for i in range(len(prompts))]) for k, v in kl.items()}
    rows = []
    for j, site in enumerate(lens.sites):
        row = {"site": site, "layer": np.nan if block_of(site) is None else block_of(site)}
        for name, values in (("logit", per_prompt["logit"][:, j]), ("tuned", per_prompt["tuned"][:, j]),
                             ("gain", per_prompt["logit"][:, j] - per_prompt["tuned"][:, j])):
            col = name if name == "gain" else f"kl_{name}"
            row[col] = float(values.mean())
            row[f"{col}_lo"], row[f"{col}_hi"] = bootstrap_ci(values, n_resamples=config.n_boot, seed=config.seed)
        row["gain_share"] = row["gain"] / row["kl_logit"] if row["kl_logit"] > 0 else np.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    long = pd.DataFrame([{"prompt": i, "site": site, "n_tokens": int(counts[i]),
                          "kl_logit": float(per_prompt["logit"][i, j]), "kl_tuned": float(per_prompt["tuned"][i, j])}
                         for i in range(len(prompts)) for j, site in enumerate(lens.sites)])
    verdict, text, numbers = _verdict(table)
    summary = {"model": h.spec, "lens": config.lens or f"cached, trained on first use ({cached_lens_path(h).name})",
               "lens_recipe": None if config.lens else dict(CACHE_RECIPE), "n_prompts": len(prompts),
               "n_tokens": int(sum(counts)), "claim": CLAIM, "paper": PAPER, "verdict": verdict,
               "verdict_text": text, **numbers,
               "mean_kl_logit": float(table["kl_logit"].mean()), "mean_kl_tuned": float(table["kl_tuned"].mean())}
    if callable(progress):
        progress(1.0, "done")
    return Result(config, summary, {"kl_by_layer": table, "per_prompt": long})
