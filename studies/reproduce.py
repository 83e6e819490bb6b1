"""``hiddenlens reproduce``: run every study and put each paper's claim beside our measurement, in one report.

For every claim the report gives the paper, the claim, the paper's figure, our estimate with its interval, a
verdict and the seconds of the study that measured it. Each study's own run folder is written beside the report
(``OUT/<study>/``), readable with that study's ``Result.read``.

A claim is tested as a *direction against a null* (``null``, ``direction`` = +1 / -1: the paper says the quantity
is above / below the null), optionally with the paper's effect size (``paper_value``). :func:`verdict`:

``not comparable``   no estimate (the study could not measure it here, e.g. a one-class sample)
``not reproduced``   the estimate is on the null's side (or on it)
``direction only``   the estimate is on the paper's side but its interval reaches the null, or the effect is less
                     than half the paper's (``|ours - null| < |paper - null| / 2``)
``reproduced``       the whole interval is on the paper's side (and the effect is at least half the paper's)

Intervals are 95 % bootstrap intervals where the study keeps per-item data, and the range over seeds or
domains where it does not (the ``interval`` column says which). Nothing here chooses a layer, head or range on
the data it reports: claims read pre-declared conditions, or choices the studies made on validation splits.

Budgets (issue 15), on a 2-core machine idle: ``--quick`` <= 10 minutes, full <= 45 minutes; the report prints
each study's time.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from hiddenlens.common.stats import bootstrap_ci, markdown_table

from .report import ModelSpec, RunFolder, StudyResult

STUDY = "reproduce"
VERDICTS = ("reproduced", "direction only", "not reproduced", "not comparable")


@dataclass(frozen=True)
class Estimate:
    """Our measurement: ``value`` with the interval ``[low, high]`` (same units) of kind ``interval``."""

    value: float
    low: float
    high: float
    interval: str = "95% bootstrap CI"

    @classmethod
    def of_range(cls, values, what: str) -> "Estimate":
        """Mean of ``values`` with their min-max range (e.g. over seeds, where a CI of 2 values means nothing)."""
        v = np.asarray(list(values), dtype=float)
        if not len(v) or np.isnan(v).all():
            return cls.missing()
        return cls(float(np.nanmean(v)), float(np.nanmin(v)), float(np.nanmax(v)), f"range over {what}")

    @classmethod
    def of_mean(cls, values, seed: int = 0) -> "Estimate":
        """Mean of ``values`` with its bootstrap CI."""
        v = np.asarray(list(values), dtype=float)
        v = v[~np.isnan(v)]
        if len(v) < 2:
            return cls.missing()
        return cls(float(v.mean()), *bootstrap_ci(v, seed=seed))

    @classmethod
    def missing(cls, why: str = "not measured") -> "Estimate":
        return cls(float("nan"), float("nan"), float("nan"), why)

    def text(self) -> str:
        if np.isnan(self.value):
            return self.interval
        return f"{self.value:.3g} [{self.low:.3g}, {self.high:.3g}]"


@dataclass(frozen=True)
class Claim:
    """One paper claim: ``measure(result)`` reads our estimate from the study's result."""

    paper: str
    claim: str
    paper_figure: str
    study: str
    measure: Callable[[StudyResult], Estimate]
    null: float
    direction: int
    paper_value: float | None = None


def verdict(est: Estimate, null: float, direction: int, paper_value: float | None = None) -> str:
    """The verdict of ``est`` against ``null`` in the paper's ``direction`` (+1: above, -1: below); see the module
    docstring."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")
    if np.isnan(est.value):
        return "not comparable"
    effect = direction * (est.value - null)
    if effect <= 0:
        return "not reproduced"
    worst = min(direction * (est.low - null), direction * (est.high - null))
    if np.isnan(worst) or worst <= 0:
        return "direction only"
    if paper_value is not None and effect < abs(paper_value - null) / 2:
        return "direction only"
    return "reproduced"


# ---- how each claim is read ------------------------------------------------------------------------------------
def _bb(variant: str, metric: str):
    def measure(res) -> Estimate:
        final = res.tables["final"]
        return Estimate.of_range(final.loc[final["variant"] == variant, metric], "seeds")
    return measure


def _sink_mass(res) -> Estimate:
    """Mean attention on the first token over the heads of the second half of the layers (prose), bootstrap over
    heads."""
    heads = res.tables["heads_prose"]
    late = heads[heads["layer"] >= heads["layer"].max() / 2]
    return Estimate.of_mean(late["sink_first"])


def _uniform_first(res) -> float:
    return 1.0 / res.summary["domains"]["prose"]["tokens_per_prompt_mean"]


def _massive(res) -> Estimate:
    """The largest first-token / median-other residual norm ratio over layers, range over the two domains."""
    return Estimate.of_range([res.tables[f"layers_{d}"]["resid_ratio_max"].max() for d in ("prose", "code")
                              if f"layers_{d}" in res.tables], "domains")


def _switching(res) -> Estimate:
    contrast = res.tables.get("contrast")
    if contrast is None or not len(contrast):
        return Estimate.missing("one domain only")
    n = float(contrast["switches"].sum())
    return Estimate(n, n, n, "count (no interval)")


def _intention_h_int(res) -> Estimate:
    """Paired difference H_int(cot) - H_int(direct) over items (bits)."""
    items = res.tables["items"].pivot_table(index="item", columns="regime", values="h_int_bits")
    if not {"cot", "direct"} <= set(items.columns):
        return Estimate.missing("needs the direct and cot regimes")
    return Estimate.of_mean((items["cot"] - items["direct"]).dropna())


def _intention_recov(res) -> Estimate:
    row = res.tables["regimes"].set_index("regime")
    if "cot" not in row.index or np.isnan(row.loc["cot", "recov_auroc"]):
        return Estimate.missing(str(row.loc["cot", "recov_note"]) if "cot" in row.index else "no cot regime")
    r = row.loc["cot"]
    return Estimate(float(r["recov_auroc"]), float(r["recov_ci_low"]), float(r["recov_ci_high"]))


def _truth_auroc(res) -> Estimate:
    """Held-out AUROC of the mass-mean direction at the layer chosen on validation, bootstrap over statements."""
    proj = res.tables.get("projections")
    if proj is None or proj["label"].nunique() < 2:
        return Estimate.missing("held-out projections hold one class")
    from hiddenlens.common.stats import auroc

    labels, scores = proj["label"].to_numpy(), proj["projection"].to_numpy()
    return Estimate(auroc(labels, scores), *bootstrap_ci((labels, scores), "auroc"))


def _leak_rate(res) -> Estimate:
    s = res.tables["samples"]
    per_pair = s[s["condition"] == "concept"].groupby("pair")["leak"].mean()
    return Estimate.of_mean(per_pair)


def _leak_fix(res) -> Estimate:
    """Paired (over prompt pairs) drop in leak rate from the concept prompt to replacement over the widest range
    (the range starting lowest: declared, not chosen on the outcome)."""
    s = res.tables["samples"]
    conds = res.tables["summary"].dropna(subset=["start_layer"])
    if not len(conds):
        return Estimate.missing("no replacement range")
    widest = conds.sort_values("start_layer").iloc[0]["condition"]
    rate = s.groupby(["condition", "pair"])["leak"].mean()
    diff = (rate["concept"] - rate[widest]).dropna()
    return Estimate.of_mean(diff)


#: TaH's method first: trained decider with the trained adapter, then what the study had (a fixed order)
ITERATION_ORDER = ("mlp+lora", "entropy+lora", "mlp", "entropy")


def _iteration_gain(res) -> Estimate:
    """Accuracy change from iterating, bootstrap over tokens, for the first of :data:`ITERATION_ORDER` the study
    ran (a fixed order, not chosen on the outcome)."""
    tokens = res.tables["tokens"]
    decider = next(d for d in ITERATION_ORDER if d in set(tokens["decider"]))
    t = tokens[tokens["decider"] == decider]
    return Estimate.of_mean(t["final_correct"].astype(float) - t["first_correct"].astype(float))


def _truthprint_detection(res) -> Estimate:
    s = res.summary
    return Estimate(s["test_auroc"], *s["test_auroc_ci"])


def _truthprint_steering(res) -> Estimate:
    """Net change (fixes - breaks, share of test items) of detect-then-steer at the settings chosen on val."""
    row = res.tables["steering"].set_index("mode").loc["conditional"]
    return Estimate(float(row["net"]), float(row["net_ci_low"]), float(row["net_ci_high"]))


def _lens_worst_layer(res) -> Estimate:
    """KL gain of the tuned over the logit lens (nats) at its worst depth, with that depth's bootstrap interval
    (over prompts)."""
    table = res.tables["kl_by_layer"]
    worst = table.loc[table["gain"].idxmin()]
    return Estimate(float(worst["gain"]), float(worst["gain_lo"]), float(worst["gain_hi"]),
                    f"95% bootstrap CI at the worst depth ({worst['site']})")


def _lens_early_minus_late(res) -> Estimate:
    """Per prompt: mean KL gain over the first third of the blocks minus over the last third (nats; the embedding
    row left out: its gain is the unembedding of raw token embeddings, not an early layer's); bootstrap over
    prompts."""
    p = res.tables["per_prompt"]
    p = p[p["site"].str.startswith("blocks.")].assign(layer=lambda d: d["site"].str.split(".").str[1].astype(int),
                                                       gain=lambda d: d["kl_logit"] - d["kl_tuned"])
    n = p["layer"].max() + 1
    early = p[p["layer"] < n / 3].groupby("prompt")["gain"].mean()
    late = p[p["layer"] >= n - n / 3].groupby("prompt")["gain"].mean()
    return Estimate.of_mean((early - late).dropna())


def _steering_net(method: str):
    def measure(res) -> Estimate:
        """Net change (fixes - breaks, share of test items) of ``method`` at its validation-chosen setting."""
        row = res.tables["methods"].set_index("method").loc[method]
        return Estimate(float(row["net"]), float(row["net_lo"]), float(row["net_hi"]))
    return measure


def _attribution_r(res) -> Estimate:
    """Pearson r of attribution vs activation patching over cells, with a Fisher-z 95 % interval (cells are not
    independent: the interval is optimistic)."""
    att = res.tables.get("attribution")
    if att is None or len(att) < 4:
        return Estimate.missing("attribution patching not run")
    r = float(np.corrcoef(att["activation"], att["attribution"])[0, 1])
    half = 1.96 / np.sqrt(len(att) - 3)
    z = np.arctanh(np.clip(r, -0.999999, 0.999999))
    return Estimate(r, float(np.tanh(z - half)), float(np.tanh(z + half)), "Fisher-z 95% CI over cells")


GUO = "Active-Dormant Attention Heads (arXiv 2410.13835)"
TRUTHPRINT = "TruthPrInt (arXiv 2503.10602)"
BELROSE = "Eliciting Latent Predictions from Transformers with the Tuned Lens (arXiv 2303.08112)"
CLAIMS: list[Claim] = [
    Claim(GUO, "Bigram-Backcopy: at non-trigger tokens the head is dormant (attention on BOS > 0.5)",
          "attention mass on BOS near 1 (qualitative)", "bigram_backcopy",
          _bb("softmax/adamw/L1", "bos_attn_nontrigger"), 0.5, +1),
    Claim(GUO, "Bigram-Backcopy: at trigger tokens the head is active (attention on BOS < 0.5)",
          "attention leaves BOS (qualitative)", "bigram_backcopy", _bb("softmax/adamw/L1", "bos_attn_trigger"),
          0.5, -1),
    Claim(GUO, "Value-state drain: BOS value norm below the other tokens' (ratio < 1)", "small BOS value (qualitative)",
          "bigram_backcopy", _bb("softmax/adamw/L1", "value_norm_ratio"), 1.0, -1),
    Claim(GUO, "ReLU attention removes the sink (BOS share < 0.5)", "no sink with ReLU attention (qualitative)",
          "bigram_backcopy", _bb("relu/adamw/L1", "bos_share"), 0.5, -1),
    Claim(GUO, "Residual-state peak: BOS residual norm above the others' (ratio > 1), 3 layers",
          "BOS residual norm peaks (qualitative)", "bigram_backcopy", _bb("softmax/adamw/L3", "resid_ratio_mean"),
          1.0, +1),
    Claim("When Attention Sink Emerges in Language Models (arXiv 2410.10781)",
          "Later layers put more attention on the first token than uniform attention would",
          "sinks in every model studied (qualitative)", "sinks", _sink_mass, float("nan"), +1),
    Claim("Massive Activations in Large Language Models (arXiv 2402.17762)",
          "The first token's residual norm is orders of magnitude above the rest (ratio > 10)",
          "massive activations, orders of magnitude (qualitative)", "sinks", _massive, 10.0, +1),
    Claim(BELROSE, "The tuned lens is closer to the final distribution than the logit lens at every depth (KL "
          "gain, nats, worst depth)", "lower KL at every layer (Fig. 2, several models)", "tuned_lens",
          _lens_worst_layer, 0.0, +1),
    Claim(BELROSE, "The tuned lens gains most in early layers (gain in the first third of blocks minus the last "
          "third, nats)", "largest gap in early layers (qualitative)", "tuned_lens", _lens_early_minus_late, 0.0, +1),
    Claim(GUO, "Some heads are dormant on one domain and active on another (prose vs code)",
          "active-dormant switching heads exist (qualitative)", "sinks", _switching, 0.0, +1),
    Claim("Intention Collapse (arXiv 2601.01011)", "CoT lowers intention entropy H_int vs direct (bits, paired)",
          "1.42 -> 0.37 bits (v1, Mistral-7B)", "intention", _intention_h_int, 0.0, -1, paper_value=-1.05),
    Claim("Intention Collapse (arXiv 2601.01011)", "Correctness is recoverable from the CoT intention state (AUROC)",
          "0.65 [0.57, 0.72] (v1)", "intention", _intention_recov, 0.5, +1, paper_value=0.65),
    Claim("The Geometry of Truth (arXiv 2310.06824)", "Truth is linearly decodable: held-out AUROC of the mass-mean "
          "direction at the layer chosen on validation", "linear separability (qualitative)", "truth",
          _truth_auroc, 0.5, +1),
    Claim("Inference-Time Intervention (arXiv 2306.03341)", "Shifting the top-K truthful heads makes answers more "
          "truthful: net fixes on held-out facts and misconceptions (K, alpha chosen on validation)",
          "TruthfulQA truthfulness 32.5 % -> 65.1 % (Alpaca)", "steering", _steering_net("iti"), 0.0, +1),
    Claim("Steering Llama 2 via Contrastive Activation Addition (arXiv 2312.06681)", "Adding the contrastive A/B "
          "vector makes answers more truthful: net fixes on held-out items (layer, alpha chosen on validation)",
          "behaviour shifts in the steered direction (qualitative)", "steering", _steering_net("caa"), 0.0, +1),
    Claim(TRUTHPRINT, "Hidden states flag hallucinated answer tokens: detection AUROC of the model's own first "
          "answer token (layer chosen on val)", "high-specificity per-token indicators (qualitative)", "truthprint",
          _truthprint_detection, 0.5, +1),
    Claim(TRUTHPRINT, "Detect-then-steer (with rollback) fixes more answers than it breaks (net share of test items)",
          "hallucination reduced (LVLMs; qualitative)", "truthprint", _truthprint_steering, 0.0, +1),
    Claim("Does Liking Yellow Imply Driving a School Bus? (arXiv 2408.06518)",
          "Semantic leakage: the concept prompt's continuations lean to the concept (leak rate > 0.5)",
          "leakage in every model tested (qualitative)", "leakage", _leak_rate, 0.5, +1),
    Claim("Follow the Flow (arXiv 2504.01137)", "Replacing the span's states by uncontextualised ones lowers the "
          "leak rate (concept - replaced, widest range)", "leakage reduced (image models; qualitative)", "leakage",
          _leak_fix, 0.0, +1),
    Claim("Think-at-Hard (arXiv 2511.08577)", "Selective latent iteration raises next-token accuracy",
          "fix 8.7 %, break 2.1 %, 6 % of tokens iterated (trained LoRA + decider)", "iteration", _iteration_gain,
          0.0, +1),
    Claim("Attribution Patching Outperforms Automated Circuit Discovery (arXiv 2310.10348)",
          "Attribution patching approximates activation patching (Pearson r over cells)",
          "close agreement on resid_post (qualitative)", "patching", _attribution_r, 0.0, +1),
]


def claim_null(claim: Claim, res: StudyResult) -> float:
    """The claim's null; NaN nulls are study-dependent (uniform attention on the first token: 1 / tokens)."""
    return _uniform_first(res) if np.isnan(claim.null) else claim.null


# ---- which studies run, and how big --------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """A study in the reproduction: its module and its config overrides in quick and full runs (``quick=None``:
    not in a quick run unless named, e.g. a study that trains on first use)."""

    module: str
    quick: dict | None
    full: dict
    uses_model: bool = True


PLANS: dict[str, Plan] = {
    "bigram_backcopy": Plan("bigram_backcopy", {"seeds": [0], "steps": 300, "eval_every": 100},
                            {"seeds": [0, 1], "steps": 1000, "eval_every": 100}, uses_model=False),
    "sinks": Plan("sinks", {"n_prompts": 8, "n_tokens": 64, "causal_heads": 2, "causal_prompts": 4, "eval_seqs": 64},
                  {}),
    "tuned_lens": Plan("tuned_lens", None, {}),
    "intention": Plan("intention", {"n": 40, "shots": 2}, {"n": 200, "shots": 2}),
    "truth": Plan("truth", {"transfer": []}, {}),
    "steering": Plan("steering", {"families": ["misconception"], "limit": 20, "alphas": [4.0], "k_heads": [16],
                                  "n_random": 20, "n_boot": 200}, {}),
    "truthprint": Plan("truthprint", {"families": ["capital", "continent"], "limit": 12, "alphas": [4.0]}, {}),
    "leakage": Plan("leakage", {"limit": 6, "samples": 2}, {}),
    "iteration": Plan("iteration", {"chunks": 4}, {"decider": "cached", "lora": "cached"}),
    "patching": Plan("patching", {}, {}),
}


@dataclass
class ReproduceConfig(ModelSpec):
    """``quick``: the small configuration; ``studies``: which to run (default: all of :data:`PLANS`, in a quick
    run those with a quick plan);
    ``overrides``: per-study config overrides applied last (e.g. ``{"bigram_backcopy": {"steps": 20}}``)."""

    quick: bool = False
    studies: list[str] | None = None
    overrides: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        if self.studies is None:
            self.studies = [n for n, p in PLANS.items() if not self.quick or p.quick is not None]
        unknown = sorted(set(self.studies) - set(PLANS)) + sorted(set(self.overrides) - set(PLANS))
        if unknown:
            raise ValueError(f"unknown studies {unknown}; choose from {', '.join(PLANS)}")
        if not self.studies:
            raise ValueError("pass at least one study")


def study_config(config: ReproduceConfig, name: str):
    """The config of study ``name`` in this reproduction (model fields from ``config``, then the plan's quick or
    full overrides, then ``config.overrides``)."""
    plan = PLANS[name]
    mod = importlib.import_module(f"hiddenlens.studies.{plan.module}")
    cls = mod.Result.CONFIG
    base = cls()
    if plan.uses_model:
        base = replace(base, model=config.model, backend=config.backend, device=config.device, dtype=config.dtype)
    sizes = (plan.quick or {}) if config.quick else plan.full
    return replace(base, **{**sizes, **config.overrides.get(name, {})})


@dataclass
class Result(StudyResult):
    """Tables ``claims`` (paper, claim, paper_figure, ours, interval, value, low, high, null, verdict, study,
    seconds) and ``timings`` (study, seconds); ``parts``: each study's result, written to ``<folder>/<study>/``."""

    STUDY: ClassVar[str] = STUDY
    CONFIG: ClassVar[type] = ReproduceConfig
    parts: dict[str, StudyResult] = field(default_factory=dict, compare=False, repr=False)

    def write_extra(self, folder) -> None:
        for name, part in self.parts.items():
            part.write(folder / name)

    @classmethod
    def read_extra(cls, run: RunFolder) -> dict:
        parts = {}
        timings = run.tables["timings"]
        for name in timings.loc[timings["status"] == "ok", "study"]:
            mod = importlib.import_module(f"hiddenlens.studies.{PLANS[name].module}")
            parts[name] = mod.Result.read(run.path / name)
        return {"parts": parts}

    def figures(self) -> dict:
        return {"claims": claims_figure(self.tables["claims"])}

    def report(self) -> str:
        claims = self.tables["claims"]
        counts = claims["verdict"].value_counts().reindex(VERDICTS, fill_value=0)
        c = self.config
        lines = ["# Reproduction report", "",
                 f"Model `{c.model}` ({'quick' if c.quick else 'full'} run); {len(self.tables['timings'])} studies in "
                 f"{self.summary['seconds_total']:.0f} s. Verdicts: " + ", ".join(f"{k} {v}" for k, v in
                                                                               counts.items()) + ".", "",
                 "Verdict rule: the paper's direction against a null; *reproduced* when the whole interval is on the "
                 "paper's side (and the effect is at least half the paper's where it gives a number), *direction "
                 "only* when the estimate is but its interval reaches the null (or the effect is under half), *not "
                 "reproduced* otherwise; *not comparable* when we could not measure it. Different models and data "
                 "than the papers: a verdict says whether the claim's direction holds here, not that the numbers "
                 "match.", "",
                 markdown_table(claims[["paper", "claim", "paper_figure", "ours", "interval", "null", "verdict",
                                        "study", "seconds"]]), "",
                 "![claims](claims.png)", "", "## Time per study", "", markdown_table(self.tables["timings"], ".1f"), "",
                 "Each study's folder is beside this report (`<study>/report.md`)."]
        return "\n".join(lines)


VERDICT_COLOURS = {"reproduced": "#1a9850", "direction only": "#fdae61", "not reproduced": "#d73027",
                   "not comparable": "#999999"}


def claims_figure(claims: pd.DataFrame):
    """Forest plot: each claim's effect in the paper's direction, ``direction * (ours - null)`` with its interval
    (claim units, symmetric-log axis), coloured by verdict; right of 0 is the paper's side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    direction = claims["claim"].map({c.claim: c.direction for c in CLAIMS}).fillna(1).to_numpy()
    eff = direction * (claims["value"] - claims["null"]).to_numpy()
    ends = np.sort(np.stack([direction * (claims["low"] - claims["null"]),
                             direction * (claims["high"] - claims["null"])]), axis=0)
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(claims) + 1.4))
    y = np.arange(len(claims))[::-1]
    for yi, e, lo, hi, v in zip(y, eff, ends[0], ends[1], claims["verdict"]):
        colour = VERDICT_COLOURS[v]
        if not np.isnan(e):
            ax.plot([lo, hi], [yi, yi], color=colour, lw=2)
            ax.plot(e, yi, "o", color=colour)
        else:
            ax.text(0, yi, "not comparable", color=colour, va="center", ha="center", fontsize=7)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_yticks(y, [c if len(c) < 60 else c[:57] + "..." for c in claims["claim"]], fontsize=7)
    ax.set_xlabel("effect in the paper's direction (claim units; > 0: the paper's side)")
    for v, colour in VERDICT_COLOURS.items():
        ax.plot([], [], "o", color=colour, label=v)
    ax.set_ylim(-0.7, len(claims) - 0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def evaluate_claims(parts: dict[str, StudyResult], seconds: dict[str, float],
                    failed: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per claim of the studies in ``parts`` or ``failed`` (study -> why it stopped: its claims are
    *not comparable*, with the reason); see :class:`Result`."""
    failed = failed or {}
    rows = []
    for claim in CLAIMS:
        if claim.study not in parts and claim.study not in failed:
            continue
        if claim.study in failed:
            est, null = Estimate.missing(f"study failed: {failed[claim.study]}"), claim.null
        else:
            res = parts[claim.study]
            try:
                est, null = claim.measure(res), claim_null(claim, res)
            except (KeyError, ValueError) as exc:  # a table or column the study could not fill on this model
                est, null = Estimate.missing(f"not measured: {exc}"), claim.null
        rows.append({"paper": claim.paper, "claim": claim.claim, "paper_figure": claim.paper_figure,
                     "ours": est.text(), "interval": est.interval, "value": est.value, "low": est.low,
                     "high": est.high, "null": null,
                     "verdict": verdict(est, null, claim.direction, claim.paper_value), "study": claim.study,
                     "seconds": seconds[claim.study]})
    return pd.DataFrame(rows)


def run(config: ReproduceConfig, handle=None, progress: bool = True) -> Result:
    """Run the studies of ``config`` one after another (the model loaded once and shared), then read every
    claim. ``handle``: an already loaded model for ``config.model`` (default: loaded here)."""
    if handle is None and any(PLANS[name].uses_model for name in config.studies):
        handle = config.load()
    parts, seconds, failed = {}, {}, {}
    bar = tqdm(config.studies, desc="reproduce", unit="study", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        plan = PLANS[name]
        mod = importlib.import_module(f"hiddenlens.studies.{plan.module}")
        start = time.perf_counter()
        try:
            parts[name] = mod.run(study_config(config, name), handle if plan.uses_model else None, progress=progress)
        except ValueError as exc:  # includes UserError subclasses: this model cannot give this study's input
            failed[name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        seconds[name] = round(time.perf_counter() - start, 1)
    claims = evaluate_claims(parts, seconds, failed)
    timings = pd.DataFrame({"study": list(seconds), "seconds": list(seconds.values()),
                            "status": ["failed: " + failed[n] if n in failed else "ok" for n in seconds]})
    summary = {"model": config.model, "quick": config.quick, "seconds_total": float(sum(seconds.values())),
               "failed": failed,
               "verdicts": claims["verdict"].value_counts().reindex(VERDICTS, fill_value=0).astype(int).to_dict()}
    return Result(config, summary, {"claims": claims, "timings": timings}, parts=parts)
