"""The Bigram-Backcopy reproduction study (``hiddenlens bb reproduce``; Guo et al., arXiv 2410.13835) in one report.

Variants (the issue's small configuration: width 64, sequence 32, batch 64, k = 3 triggers, AdamW lr 1e-3
wd 1e-4): softmax vs ReLU attention, AdamW vs SGD (momentum 0.9), 1 vs 3 layers, over a few seeds. Each run
records :func:`hiddenlens.analyses.bb_metrics.bb_metrics` every ``eval_every`` steps, so every metric is a
curve over training. The SGD learning rate is not given anywhere we could read ("Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs" (arXiv 2410.13835)): 0.1 is our
choice (INFERRED), large enough to reach the bigram optimum in 1,000 steps.
"""
from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import ClassVar

import pandas as pd
import torch
from tqdm.auto import tqdm

from hiddenlens.analyses.bb_metrics import sink_evaluator
from hiddenlens.analyses.sinks_figures import bb_curves_figure
from hiddenlens.common.stats import markdown_table
from hiddenlens.models.bb_model import BBConfig
from hiddenlens.models.bb_task import BBGenerator
from hiddenlens.models.bb_training import train

from .report import StudyResult

STUDY = "bigram_backcopy"
METRICS = ("bos_attn_nontrigger", "bos_attn_trigger", "copy_attn_trigger", "bos_share", "value_norm_ratio",
           "resid_ratio_mean")
CLAIMS = [
    ("softmax/adamw/L1", "bos_attn_nontrigger", "sink: the head attends to BOS at non-trigger queries (dormant)"),
    ("softmax/adamw/L1", "bos_attn_trigger", "the head leaves BOS at trigger queries (active)"),
    ("softmax/adamw/L1", "copy_attn_trigger", "at trigger queries it reads the token before the trigger"),
    ("softmax/adamw/L1", "value_norm_ratio", "value-state drain: BOS value after W_O is small"),
    ("relu/adamw/L1", "bos_share", "ReLU attention removes the sink (paper: mitigation)"),
    ("softmax/sgd/L1", "bos_attn_nontrigger", "SGD: sources disagree; the issue measured that the sink stays"),
    ("softmax/adamw/L3", "resid_ratio_mean", "residual-state peak (paper); the issue measured it weak in 3 layers"),
    ("softmax/sgd/L3", "resid_ratio_mean", "residual-state peak with SGD (said to need Adam)"),
]


def variants(sgd_lr: float = 0.1) -> dict[str, dict]:
    """Variant name -> :class:`BBConfig` overrides."""
    return {"softmax/adamw/L1": {}, "relu/adamw/L1": {"attention": "relu"},
            "softmax/sgd/L1": {"optimizer": "sgd", "lr": sgd_lr},
            "softmax/adamw/L3": {"n_layers": 3}, "softmax/sgd/L3": {"n_layers": 3, "optimizer": "sgd", "lr": sgd_lr}}


def _sink_layer(row: pd.Series, n_layers: int) -> int:
    """The layer whose head puts the most attention on BOS at non-trigger queries."""
    return max(range(n_layers), key=lambda i: row.get(f"L{i}_bos_attn_nontrigger", -1))


def _range(values) -> str:
    return f"{min(values):.3f} to {max(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def _run_one(job: tuple[str, dict, int, int, int]) -> tuple[pd.DataFrame, float]:
    """One training run (a worker process): ``(history with variant/seed columns, training seconds)``."""
    name, over, seed, steps, eval_every = job
    torch.set_num_threads(1)
    res = train(BBConfig(seed=seed, steps=steps, **over), eval_every=eval_every, evaluate=sink_evaluator())
    return res.history.assign(variant=name, seed=seed), res.seconds


@dataclass
class BBReproductionConfig:
    """``seeds`` per variant, ``steps`` of training with an evaluation every ``eval_every`` steps, the SGD learning
    rate ``sgd_lr`` (momentum 0.9; INFERRED), ``workers`` training processes (one thread each)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1])
    steps: int = 1000
    eval_every: int = 100
    sgd_lr: float = 0.1
    workers: int = 2


@dataclass
class Result(StudyResult):
    """Tables ``history`` (one row per run and evaluation) and ``final`` (last step per run, metrics of each run's
    sink layer); ``summary["variants"]`` the min-to-max ranges over seeds."""

    STUDY: ClassVar[str] = STUDY
    CONFIG: ClassVar[type] = BBReproductionConfig

    def figures(self) -> dict:
        h = self.tables["history"]
        return {"curves": bb_curves_figure(h[h.variant.str.endswith("L1")], layer=0),
                "resid_peak": _resid_peak_figure(h[h.variant.str.endswith("L3")])}

    def report(self) -> str:
        return _markdown(self.tables["final"], self.summary)


def run(config: BBReproductionConfig, handle=None, progress: bool = True) -> Result:
    """Train every variant over ``config.seeds`` in ``config.workers`` processes (one thread each). ``handle`` is
    not used (the study trains its own models); it is accepted so every study runs the same way."""
    seeds = list(config.seeds)
    if not seeds:
        raise ValueError("pass at least one seed")
    jobs = [(name, over, seed, config.steps, config.eval_every) for name, over in variants(config.sgd_lr).items()
            for seed in seeds]
    with ProcessPoolExecutor(max_workers=max(1, config.workers), mp_context=mp.get_context("spawn")) as pool:
        results = list(tqdm(pool.map(_run_one, jobs), total=len(jobs), desc="BB runs", unit="run",
                            disable=not progress))
    histories, finals, seconds = [], [], {}
    for (name, over, seed, _, _), (h, secs) in zip(jobs, results):
        n_layers = over.get("n_layers", 1)
        histories.append(h)
        seconds[f"{name}/seed{seed}"] = round(secs, 1)
        last = h.iloc[-1]
        layer = _sink_layer(last, n_layers)
        finals.append({"variant": name, "seed": seed, "sink_layer": layer, "trigger_loss": last.trigger_loss,
                       "nontrigger_excess": last.nontrigger_loss - last.bigram_optimum}
                      | {m: last[f"L{layer}_{m}"] for m in METRICS}
                      | {f"resid_ratio_mean_L{i}": last[f"L{i}_resid_ratio_mean"] for i in range(n_layers)})
    history = pd.concat(histories, ignore_index=True)
    final = pd.DataFrame(finals)
    summary = {"task": BBGenerator(k=3, seq_length=32).describe(), "seeds": seeds, "steps": config.steps,
               "eval_every": config.eval_every, "sgd_lr": config.sgd_lr, "train_seconds": seconds, "variants": {}}
    for name, g in final.groupby("variant", sort=False):
        summary["variants"][name] = {c: _range(g[c].tolist()) for c in
                                     ("trigger_loss", "nontrigger_excess") + METRICS}
        summary["variants"][name]["sink_layers"] = sorted(set(int(x) for x in g.sink_layer))
    return Result(config, summary, {"history": history, "final": final})


def _resid_peak_figure(h: pd.DataFrame):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for (variant, layer), style in zip([(v, i) for v in h.variant.unique() for i in range(3)],
                                       ["-", "--", ":"] * 4):
        s = h[h.variant == variant].groupby("step")[f"L{layer}_resid_ratio_mean"]
        ax.plot(s.mean().index, s.mean().values, ls=style, label=f"{variant} block {layer}",
                color="C0" if "adamw" in variant else "C3")
    ax.axhline(1, color="grey", lw=0.5)
    ax.set(xlabel="step", ylabel="||res_BOS|| / mean others", title="residual-state peak, 3-layer models")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _markdown(final: pd.DataFrame, summary: dict) -> str:
    rows = []
    for variant, metric, claim in CLAIMS:
        if variant in summary["variants"]:
            rows.append({"claim": claim, "variant": variant, "metric": metric,
                         "measured (min to max over seeds)": summary["variants"][variant][metric]})
    lines = ["# Bigram-Backcopy reproduction", "",
             f"Seeds {summary['seeds']}, {summary['steps']} steps, width 64, sequence 32, batch 64, k = 3 triggers; "
             f"AdamW lr 1e-3 wd 1e-4; SGD lr {summary['sgd_lr']} momentum 0.9 (INFERRED lr). Metrics of each run's "
             "sink layer (the layer with the most BOS attention at non-trigger queries) at the last step.", "",
             "## Paper claims beside our measurements", "", markdown_table(pd.DataFrame(rows)), "",
             "![curves](curves.png)", "", "![residual peak](resid_peak.png)", "",
             "## Every run (last step)", "", markdown_table(final, ".3f"), "",
             "Training seconds per run: " + ", ".join(f"{k} {v}" for k, v in summary["train_seconds"].items()), ""]
    return "\n".join(lines)
