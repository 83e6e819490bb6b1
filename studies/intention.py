"""The Intention Collapse regime study (``hiddenlens analyze intention``): direct vs chain-of-thought vs babble on
arithmetic word problems, per checkpoint: accuracy (Wilson 95 % CI), H_int (bootstrap 95 % CI), dim_eff per layer
and Recov (a probe predicting correctness from the intention states), beside the paper's headline table.

The computations are :mod:`hiddenlens.analyses.regimes` (:func:`~hiddenlens.analyses.regimes.run_regimes`) and
:mod:`hiddenlens.analyses.intention`; this module runs them from an :class:`IntentionConfig` over one or more
checkpoints and keeps the result (:class:`Result`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, ClassVar

import numpy as np
import pandas as pd

from hiddenlens.analyses.arithmetic import gsm8k_problems, make_problems
from hiddenlens.analyses.checkpoints import (RayHandleError, check_ray_sweep, checkpoint_label, map_checkpoints,
                                             plot_over_checkpoints)
from hiddenlens.analyses.regimes import PAPER_TABLE, REGIMES, paired_differences, run_regimes
from hiddenlens.common.stats import markdown_table
from hiddenlens.probes.sites import parse_layers

from .report import ModelSpec, StudyResult

STUDY = "intention"


@dataclass
class IntentionConfig(ModelSpec):
    """``n`` problems (seeded by ``seed``; ``gsm8k`` uses GSM8K instead, which needs the hub), the ``regimes``,
    ``shots`` worked examples (``babble_shots``: ``none`` keeps babble zero-shot, ``varied`` gives it as many
    examples with a babble reply drawn per item; see :func:`~hiddenlens.analyses.regimes.run_regimes`),
    ``reuse_prefix`` (the shared prompt start's KV cache computed once per regime), intention-state ``layers``
    (block indices or a spec; None: the last 5), per-regime ``max_new_tokens`` overrides, ``post_collapse`` (the
    v1 variant), ``checkpoints`` run after ``model`` (dirs, hub ids, ``id@rev``), ``n_boot`` bootstrap resamples
    with ``boot_seed``, and ``notes`` for the report."""

    checkpoints: list[str] = field(default_factory=list)
    n: int = 200
    seed: int = 0
    regimes: list[str] = field(default_factory=lambda: list(REGIMES))
    shots: int = 0
    babble_shots: str = "none"
    layers: list[int] | str | None = None
    batch_size: int = 32
    max_new_tokens: dict[str, int] = field(default_factory=dict)
    post_collapse: bool = False
    reuse_prefix: bool = True
    gsm8k: bool = False
    n_boot: int = 1000
    boot_seed: int = 42
    notes: str = ""


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


@dataclass
class Result(StudyResult):
    """Tables ``items`` (one row per regime and item), ``regimes`` (one row per regime), ``dims`` (dim_eff per
    regime, state and layer), each with a ``checkpoint`` column when the run has one, and
    ``regimes_by_checkpoint`` for runs over several checkpoints. ``summary["config"]`` is the experiment's own
    record (model, layers, budgets, ...)."""

    STUDY: ClassVar[str] = STUDY
    CONFIG: ClassVar[type] = IntentionConfig

    @property
    def checkpoints(self) -> list[str]:
        items = self.tables.get("regimes")
        if items is None or "checkpoint" not in items:
            return []
        return list(dict.fromkeys(items["checkpoint"]))

    def part(self, checkpoint: str | None) -> tuple[dict, dict[str, pd.DataFrame]]:
        """``(experiment config, {items, regimes, dims})`` of one checkpoint (None: the whole run)."""
        cfg = self.summary.get("configs", {}).get(checkpoint) or self.summary.get("config", {})
        tables = {}
        for name in ("items", "regimes", "dims"):
            df = self.tables.get(name)
            if df is not None and checkpoint is not None and "checkpoint" in df:
                df = df[df["checkpoint"] == checkpoint]
            tables[name] = df
        return cfg, tables

    @property
    def several(self) -> bool:
        """A run over several checkpoints (figures per checkpoint, a by-checkpoint table)."""
        return "configs" in self.summary

    def figures(self) -> dict:
        labels = self.checkpoints
        out = {}
        for label in (labels if self.several else [None]):
            cfg, t = self.part(label)
            suffix = f"_{_slug(label)}" if label is not None else ""
            out |= {f"{k}{suffix}": fig for k, fig in _figures(cfg, t).items()}
        if "regimes_by_checkpoint" in self.tables:
            out["regimes_by_checkpoint"] = plot_over_checkpoints(
                self.tables["regimes_by_checkpoint"], "checkpoint", ["accuracy", "h_int_bits", "dim_eff_pr_agg"],
                "per regime over checkpoints", hue="regime")
        return out

    def report(self) -> str:
        labels = self.checkpoints
        if not self.several:
            cfg, t = self.part(None)
            return _report(cfg, t, self.summary.get("notes", ""))
        parts = ["# Intention Collapse regimes over checkpoints", "",
                 "![regimes by checkpoint](regimes_by_checkpoint.png)", "",
                 markdown_table(self.tables["regimes_by_checkpoint"][
                     ["checkpoint", "regime", "accuracy", "h_int_bits", "dim_eff_pr_agg", "recov_auroc"]]), ""]
        for label in labels:
            cfg, t = self.part(label)
            text = _report(cfg, t, "", suffix=f"_{_slug(label)}")
            parts += [f"## Checkpoint `{label}`", "", text.replace("\n#", "\n##").removeprefix("# ")]
        if self.summary.get("notes"):
            parts += ["", "## Notes", "", self.summary["notes"]]
        return "\n".join(parts) + "\n"


def _problems(config: IntentionConfig):
    return gsm8k_problems(config.n) if config.gsm8k else make_problems(config.n, seed=config.seed)


def run(config: IntentionConfig, handle=None, progress: bool = True,
        on_regime: Callable[[Result], None] | None = None, ray: str | None = None) -> Result:
    """Run the regimes on ``config.model`` (or ``handle``) and each of ``config.checkpoints``; ``on_regime`` gets the
    partial :class:`Result` after each regime (e.g. ``lambda r: r.write(folder)``, so a stopped run keeps what
    finished). ``ray`` (a Ray address: ``local`` | ``auto`` | a cluster address; needs checkpoints): one Ray task
    per checkpoint, each loading its model by spec (so no ``handle``), with the serial run's tables; ``on_regime``
    is then called as each checkpoint finishes."""
    problems = _problems(config)
    specs = [config.model] + [c for c in config.checkpoints if c]
    check_ray_sweep(ray, len(specs) - 1)
    if ray is not None and handle is not None:
        raise RayHandleError("run(..., ray=...) loads every checkpoint by spec in its Ray worker: call it without "
                             "handle= (config.model is loaded there)")
    several = len(specs) > 1
    done: dict[int, tuple[str, object]] = {}

    def result(extra=None) -> Result:
        return _result(config, [done[i] for i in sorted(done)] + ([extra] if extra else []), several)

    def finished(i: int, res) -> None:
        done[i] = (checkpoint_label(specs[i]), res)
        if on_regime is not None and ray is not None:
            on_regime(result())

    per_regime = None if on_regime is None or ray is not None else (
        lambda label, partial_res: on_regime(result((label, partial_res))))
    given = {} if handle is None else {specs[0]: handle}
    fn = partial(_regimes_of, config, problems, given, per_regime, progress and ray is None)
    map_checkpoints(fn, specs, ray=ray, progress=progress, on_result=finished)
    return result()


def _regimes_of(config: IntentionConfig, problems: list, given: dict, per_regime: Callable | None, progress: bool,
                spec: str):
    """:func:`~hiddenlens.analyses.regimes.run_regimes` on one checkpoint (``given[spec]`` if loaded, else loaded
    here and unloaded at the end); ``per_regime(label, partial)`` after each regime."""
    label = checkpoint_label(spec)
    with config.opened(spec, given) as h:
        layers = None if config.layers in (None, "", []) else parse_layers(config.layers, h.n_layers, "layers")
        return run_regimes(h, problems, regimes=config.regimes, shots=config.shots, layers=layers,
                           batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                           post_collapse=config.post_collapse, n_boot=config.n_boot, seed=config.boot_seed,
                           progress=progress, babble_shots=config.babble_shots, reuse_prefix=config.reuse_prefix,
                           on_regime=None if per_regime is None else partial(per_regime, label))


def result_of(config: IntentionConfig, res, label: str | None = None) -> Result:
    """The study's :class:`Result` of one :func:`~hiddenlens.analyses.regimes.run_regimes` run."""
    return _result(config, [(label or checkpoint_label(config.model), res)], False)


def _result(config: IntentionConfig, runs: list, several: bool) -> Result:
    tables: dict[str, list] = {"items": [], "regimes": [], "dims": []}
    configs = {}
    for label, res in runs:
        configs[label] = res.config
        for name in tables:
            df = getattr(res, name)
            tables[name].append(df.assign(checkpoint=label) if several else df)
    out = {k: pd.concat(v, ignore_index=True) for k, v in tables.items() if v}
    first = runs[0][1].config if runs else {}
    summary = {"config": first, "regimes": out["regimes"].to_dict(orient="records") if "regimes" in out else [],
               "paper": PAPER_TABLE.to_dict(orient="records"), "notes": config.notes}
    if several:
        summary["configs"] = configs
        out["regimes_by_checkpoint"] = out["regimes"]
    return Result(config, summary, out)


# ---- report composition ------------------------------------------------------------------------------------------
def _figures(cfg: dict, t: dict[str, pd.DataFrame]) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    reg = t["regimes"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    x = np.arange(len(reg))
    panels = ((axes[0], "accuracy", "accuracy", "accuracy"), (axes[1], "h_int_bits", "h_int", "H_int (bits, top-100)"),
              (axes[2], "recov_auroc", "recov", "Recov AUROC (correctness)"))
    for ax, col, ci, label in panels:
        lo, hi = reg[f"{ci}_ci_low"], reg[f"{ci}_ci_high"]
        err = np.vstack([reg[col] - lo, hi - reg[col]]).clip(min=0)
        ax.bar(x, reg[col], yerr=np.nan_to_num(err), capsize=4, color=["#4c72b0", "#dd8452", "#55a868"][: len(x)])
        ax.set_xticks(x, reg["regime"])
        ax.set_title(label)
        if col == "recov_auroc":
            ax.axhline(0.5, color="grey", lw=1, ls="--")
            ax.set_ylim(0, 1)
    fig.suptitle(f"{cfg.get('model', '')}: n = {cfg.get('n', '?')}, {cfg.get('shots', 0)}-shot, 95 % CIs")
    out["regimes"] = fig

    dims = t["dims"][t["dims"]["state"] == "pre"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for regime, df in dims.groupby("regime", sort=False):
        ax.plot(df["layer"], df["participation_ratio"], marker="o", label=regime)
    ax.set_xlabel("layer (resid_post, last prompt position)")
    ax.set_ylabel("participation ratio")
    ax.legend()
    out["dim_eff_by_layer"] = fig

    items = t["items"]
    if items is not None:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for regime, df in items.groupby("regime", sort=False):
            ax.hist(df["h_int_bits"], bins=20, alpha=0.5, label=regime)
        ax.set_xlabel("H_int (bits, top-100)")
        ax.set_ylabel("items")
        ax.legend()
        out["h_int_hist"] = fig
    return out


def _report(cfg: dict, t: dict[str, pd.DataFrame], notes: str = "", example_outputs: int = 3,
            suffix: str = "") -> str:
    """The report's Markdown: our per-regime table beside the paper's headline table."""
    reg = t["regimes"].copy()
    ours = pd.DataFrame({
        "regime": reg["regime"],
        "accuracy [95% CI]": [f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in
                              zip(reg["accuracy"], reg["accuracy_ci_low"], reg["accuracy_ci_high"])],
        "H_int top-100 bits [95% CI]": [f"{a:.2f} [{lo:.2f}, {hi:.2f}]" for a, lo, hi in
                                        zip(reg["h_int_bits"], reg["h_int_ci_low"], reg["h_int_ci_high"])],
        "H_int full-vocab bits": reg["h_int_full_bits"].round(2),
        "dim_eff PR (agg)": reg["dim_eff_pr_agg"].round(2),
        "dim_eff 90% (global, v1)": reg["dim_eff_90_global"],
        "Recov AUROC [95% CI] (shuffled)": [
            f"{a:.3f} [{lo:.3f}, {hi:.3f}] ({s:.3f})" if not math.isnan(a) else f"n/a: {note}"
            for a, lo, hi, s, note in zip(reg["recov_auroc"], reg["recov_ci_low"], reg["recov_ci_high"],
                                          reg["recov_shuffled"], reg["recov_note"])],
        "mean new tokens": reg["mean_new_tokens"].round(1),
    })
    lines = [
        "# Intention Collapse regime experiment", "",
        f"Model `{cfg['model']}`, {cfg['n']} project-made arithmetic word problems (seeded, exact answers), "
        f"{cfg['shots']}-shot prompts through the chat template{_babble_note(cfg)}, greedy decoding, new-token budgets "
        f"{cfg['max_new_tokens']}. Intention state: `resid_post` at the last prompt position of blocks "
        f"{cfg['layers']}. H_int: {cfg['h_int']}. Recov: {cfg['recoverability']}.", "",
        "## Ours", "", markdown_table(ours), "",
        "## Direction of effect (paired over the same items, bootstrap 95 % CI)", "",
        _paired_text(cfg, t["items"]), "",
        "## The paper's headline table (Mistral-7B-Instruct-v0.3 4-bit, GSM8K n = 200)", "",
        markdown_table(PAPER_TABLE.fillna("")), "",
        f"Differences that matter when comparing: `{cfg['model']}` instead of a 7B model, easier project-made "
        "problems instead of GSM8K, shorter generation budgets (CPU), and (unless shots = 0) worked examples in "
        "the prompt. The paper's v1 dim_eff and probe used post-collapse states (see `post_collapse`).", "",
        f"![regimes](regimes{suffix}.png)", "", f"![dim_eff by layer](dim_eff_by_layer{suffix}.png)", "",
        f"![H_int](h_int_hist{suffix}.png)", "",
    ]
    if "post_dim_eff_pr_agg" in reg:
        lines += ["## v1 post-collapse variant", "",
                  markdown_table(reg[["regime", "post_dim_eff_pr_agg", "post_recov_auroc", "post_recov_ci_low",
                                      "post_recov_ci_high", "post_recov_shuffled"]]), ""]
    text = "\n".join(lines) + (f"\n## Notes\n\n{notes.strip()}\n" if notes.strip() else "")
    items = t["items"]
    if items is not None and "output" in items:
        samples = items.groupby("regime", sort=False).head(example_outputs)
        text += "\n## Example outputs\n\n" + "\n".join(
            f"- **{r.regime}** (answer {r.answer}, parsed {r.parsed}, correct {r.correct}): "
            f"`{str(r.output).strip()[:160].replace('`', chr(39)).replace(chr(10), ' / ')}`"
            for r in samples.itertuples())
    return text + "\n"


def _babble_note(cfg: dict) -> str:
    """How the babble regime got its examples (runs before ``babble_shots`` existed used one fixed reply)."""
    if not cfg.get("shots") or "babble" not in cfg.get("regimes", []):
        return ""
    mode = cfg.get("babble_shots", "fixed")
    return {"none": " (babble zero-shot)", "varied": " (babble examples' replies drawn per item)",
            "fixed": " (babble examples share one fixed reply)"}[mode]


def _paired_text(cfg: dict, items: pd.DataFrame | None) -> str:
    if items is None:
        return "(no per-item table)"
    diff = paired_differences(items, n_boot=cfg.get("n_boot", 1000), seed=cfg.get("seed", 42))
    if diff.empty:
        return "(needs the direct regime and at least one other)"
    return markdown_table(pd.DataFrame({
        "regime - direct": diff["regime"],
        "accuracy difference [95% CI]": [f"{a:+.3f} [{lo:+.3f}, {hi:+.3f}]" for a, lo, hi in
                                         zip(diff["d_accuracy"], diff["d_accuracy_ci_low"],
                                             diff["d_accuracy_ci_high"])],
        "H_int difference, bits [95% CI]": [f"{a:+.2f} [{lo:+.2f}, {hi:+.2f}]" for a, lo, hi in
                                            zip(diff["d_h_int_bits"], diff["d_h_int_bits_ci_low"],
                                                diff["d_h_int_bits_ci_high"])]}))
