"""The patching study (``hiddenlens patch``): activation patching over layers x positions (or heads) for a set of
prompt pairs, attribution patching beside it, and the direct logit attribution of the clean prompts.

The methods are :mod:`hiddenlens.interventions.patching` and :mod:`hiddenlens.analyses.dla`; this module runs them
from a :class:`PatchingConfig` and keeps the result (:class:`Result`: tables ``cells`` (per pair and cell),
``summary`` (mean over pairs with a bootstrap CI), ``attribution`` (the first-order estimate per cell), ``pairs``
and ``dla``; figures of the map, the attribution-vs-activation scatter and the DLA bars).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import ClassVar

import pandas as pd

from hiddenlens.analyses.dla import direct_logit_attribution
from hiddenlens.common.stats import markdown_table
from hiddenlens.interventions.patching import (PatchingResult, PromptPair, activation_patching,
                                               attribution_patching, compare)

from .report import ModelSpec, StudyResult

STUDY = "patching"


def load_pairs(path: str | None = None) -> list[PromptPair]:
    """Prompt pairs from a JSON file (``{"pairs": [{clean, corrupted, answer, wrong}, ...]}``); None: the shipped
    factual-recall pairs (landmark -> city, 9 tokens each on the embedded model's tokenizer)."""
    if path is None:
        text = resources.files("hiddenlens.interventions").joinpath("data/patching_pairs.json").read_text("utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    data = json.loads(text)
    rows = data["pairs"] if isinstance(data, dict) else data
    try:
        return [PromptPair(r["clean"], r["corrupted"], r["answer"], r["wrong"]) for r in rows]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path or 'the shipped pairs'}: every pair needs clean, corrupted, answer and wrong "
                         f"({exc})") from None


@dataclass
class PatchingConfig(ModelSpec):
    """``pairs``: a JSON file of prompt pairs (None: the shipped ones), at most ``limit``; ``sites`` to patch
    (a pattern, e.g. ``blocks.*.resid_post``, or ``blocks.*.attn.z`` with ``per_head``); ``direction``
    ``denoise`` | ``noise``; ``metric``: ``logit_diff`` | ``prob``; ``attribution``: also run attribution
    patching; ``dla``: the clean prompts' DLA (of the logit difference)."""

    pairs: str | None = None
    limit: int | None = None
    sites: str = "blocks.*.resid_post"
    direction: str = "denoise"
    per_head: bool = False
    metric: str = "logit_diff"
    attribution: bool = True
    dla: bool = True


@dataclass
class Result(StudyResult):
    """Tables ``cells``, ``summary``, ``pairs`` and, when run, ``attribution`` and ``dla``."""

    STUDY: ClassVar[str] = STUDY
    CONFIG: ClassVar[type] = PatchingConfig

    def figures(self) -> dict:
        import matplotlib  # heavy optional dependency: imported on use

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = {}
        s = self.tables["summary"]
        per_head = s["head"].notna().any()
        grid = (s.pivot_table(index="layer", columns="head", values="normalized") if per_head else
                s.pivot_table(index="layer", columns="position", values="normalized"))
        fig, ax = plt.subplots(figsize=(max(5, 0.55 * grid.shape[1] + 2), max(4, 0.22 * grid.shape[0] + 1.5)))
        lim = max(1.0, float(abs(grid.to_numpy()).max()))
        im = ax.imshow(grid.to_numpy(), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", origin="lower")
        ax.set_yticks(range(grid.shape[0]), [str(int(i)) for i in grid.index])
        labels = self.summary.get("tokens") if not per_head else None
        ax.set_xticks(range(grid.shape[1]), labels if labels and len(labels) == grid.shape[1] else
                      [str(int(c)) for c in grid.columns], rotation=60, fontsize=7)
        ax.set_ylabel("layer (block)"), ax.set_xlabel("head" if per_head else "position (corrupted prompt's token)")
        ax.set_title(f"{self.config.direction} patching of {self.config.sites}: normalised logit difference\n"
                     f"(0 = corrupted, 1 = clean; mean of {self.summary.get('n_pairs')} pairs)", fontsize=9)
        fig.colorbar(im, ax=ax)
        out["patching"] = fig
        if "attribution" in self.tables:
            both = self.tables["attribution"]
            fig, ax = plt.subplots(figsize=(4.2, 4))
            ax.scatter(both["activation"], both["attribution"], s=8)
            lo, hi = float(both[["activation", "attribution"]].min().min()), float(both[["activation",
                                                                                            "attribution"]].max().max())
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
            ax.set_xlabel("activation patching"), ax.set_ylabel("attribution patching")
            ax.set_title(f"per cell, Pearson r = {self.summary.get('attribution_pearson_r', float('nan')):.2f}",
                         fontsize=9)
            out["attribution"] = fig
        if "dla" in self.tables:
            d = self.tables["dla"]
            fig, ax = plt.subplots(figsize=(9, 3))
            ax.bar(range(len(d)), d["logit_diff"])
            ax.set_xticks(range(len(d)), d["component"], rotation=90, fontsize=6)
            ax.set_ylabel("logit difference"), ax.set_title("direct logit attribution (mean over clean prompts)",
                                                            fontsize=9)
            out["dla"] = fig
        return out

    def report(self) -> str:
        s, m = self.tables["summary"], self.summary
        top = s.sort_values("normalized", ascending=False).head(10)
        lines = ["# Activation patching", "",
                 f"Model `{m.get('model')}`, {m.get('n_pairs')} prompt pairs, {self.config.direction} patching of "
                 f"`{self.config.sites}`{' per head' if self.config.per_head else ''}. Metric: "
                 + ("the answer's probability" if self.config.metric == "prob" else "logit difference (answer - wrong)")
                 + " at the last position, normalised (0 = corrupted run, 1 = clean run); mean over pairs with a 95 % "
                 "bootstrap CI.", "",
                 "Pairs (clean / corrupted metric):", "",
                 markdown_table(self.tables["pairs"][["clean", "corrupted", "answer", "wrong", "metric_clean",
                                                      "metric_corrupted"]]), "",
                 "The ten cells that restore the most:", "",
                 markdown_table(top[[c for c in ("site", "head", "position", "normalized", "ci_low", "ci_high")
                                     if c in top]]), "", "![patching map](patching.png)", ""]
        if "attribution" in self.tables:
            lines += [f"Attribution patching vs activation patching over the same cells: Pearson r = "
                      f"{m.get('attribution_pearson_r', float('nan')):.3f}.", "", "![attribution](attribution.png)",
                      ""]
        if "dla" in self.tables:
            lines += ["Direct logit attribution of the clean prompts (final-norm scale frozen at each clean run; the "
                      "parts add up to the logit difference):", "", "![dla](dla.png)", ""]
        return "\n".join(lines)


def run(config: PatchingConfig, handle=None, progress: bool = True) -> Result:
    """Patch every cell for each pair of ``config`` on ``config.model`` (or ``handle``)."""
    h = handle if handle is not None else config.load()
    pairs = load_pairs(config.pairs)[: config.limit]
    act = activation_patching(h, pairs, config.sites, config.direction, config.per_head, metric=config.metric,
                              progress=progress)
    tables = {"cells": act.cells, "summary": act.summary(), "pairs": act.pairs}
    ids = h.tokenize(pairs[0].corrupted).input_ids[0].tolist()
    summary = {"model": h.spec, "n_pairs": len(pairs), "tokens": [h.tokenizer.decode([t]) for t in ids],
               "clean_metric_mean": float(act.pairs["metric_clean"].mean()),
               "corrupted_metric_mean": float(act.pairs["metric_corrupted"].mean())}
    if config.attribution and config.direction == "denoise":
        att: PatchingResult = attribution_patching(h, pairs, config.sites, config.per_head, metric=config.metric,
                                                   progress=progress)
        both = compare(act, att)
        tables["attribution"] = both
        summary["attribution_pearson_r"] = both.attrs["pearson_r"]
    if config.dla:
        parts = []
        for p in pairs:
            d = direct_logit_attribution(h, p.clean, [p.answer, p.wrong], per_head=False)
            parts.append(d.assign(logit_diff=d[p.answer] - d[p.wrong])[["component", "layer", "logit_diff"]])
        dla = pd.concat(parts).groupby(["component", "layer"], sort=False, dropna=False)["logit_diff"].mean()
        dla = dla.reset_index()
        dla["component"] = [c if pd.isna(l) else f"{c}{int(l)}" for c, l in zip(dla["component"], dla["layer"])]
        tables["dla"] = dla[["component", "logit_diff"]]
    return Result(config, summary, tables)
