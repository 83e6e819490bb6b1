"""The attention-sink study (``hiddenlens analyze sinks``): sink maps on two input domains (default prose vs
Python code), value drains, residual peaks, the most active-dormant and most dormant heads with their causal
confirmation and the tokens that make heads leave the sink; or, over a folder of checkpoints, the same metrics as
curves over training steps (Bigram-Backcopy checkpoints get the trigger-aware metrics).

The computations are :mod:`hiddenlens.analyses.sinks` and :mod:`hiddenlens.analyses.bb_metrics` (figures:
:mod:`hiddenlens.analyses.sinks_figures`); this module runs them from a :class:`SinksConfig` and keeps the result
(:class:`Result`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from hiddenlens.analyses import sinks
from hiddenlens.analyses.checkpoints import check_ray_sweep, map_checkpoints
from hiddenlens.analyses.bb_metrics import bb_metrics, flat_metrics
from hiddenlens.analyses.sinks_figures import bb_curves_figure, norm_profile_figure, sink_map_figure
from hiddenlens.common.stats import markdown_table
from hiddenlens.models.bb_model import KIND, checkpoint_step, list_checkpoints
from hiddenlens.models.bb_task import BBGenerator, text_statistics
from hiddenlens.models.loading import MARKER

from .report import PREPEND_BOS, ModelSpec, StudyResult

STUDY = "sinks"
CAUSAL_COLUMNS = ["domain", "layer", "head", "dormancy", "attends_sink", "delta_ce_zero", "delta_ce_bos", "dormant"]


@dataclass
class SinksConfig(ModelSpec):
    """``domains``: two named prompt lists (None: prose vs Python code, ``n_prompts`` passages of ``n_tokens``
    tokens); ``causal_heads`` per group to ablate on ``causal_prompts`` prompts per domain; ``tau`` the dormancy
    threshold, ``eps`` the |delta CE| (nats) under which an intervention changes little. With ``checkpoints`` (a
    folder of checkpoints) the study measures every checkpoint instead (``eval_seqs`` BB sequences, or
    ``n_prompts`` prose passages of ``n_tokens`` tokens for other models). ``add_bos``: prepend the tokenizer's BOS
    so position 0 is a fixed token (the one convention, :data:`~hiddenlens.studies.report.PREPEND_BOS`; the
    Bigram-Backcopy checkpoints carry their own BOS)."""

    dtype: str = "float32"
    checkpoints: str | None = None
    domains: dict[str, list[str]] | None = None
    n_prompts: int = 32
    n_tokens: int = 128
    batch_size: int = 8
    causal_heads: int = 4
    causal_prompts: int = 8
    tau: float = sinks.TAU
    eps: float = sinks.EPS_CE
    eval_seqs: int = 256
    add_bos: bool = PREPEND_BOS


@dataclass
class Result(StudyResult):
    """A model run: tables ``heads_<domain>``, ``layers_<domain>``, ``contrast``, ``causal`` and
    ``leaving_tokens``. A checkpoint run: table ``checkpoints`` (one row per checkpoint, or per checkpoint and
    layer) and ``summary["bigram_backcopy"]``."""

    STUDY: ClassVar[str] = STUDY
    CONFIG: ClassVar[type] = SinksConfig

    @property
    def over_checkpoints(self) -> bool:
        return "checkpoints" in self.tables

    @property
    def domains(self) -> list[str]:
        return [n.removeprefix("heads_") for n in self.tables if n.startswith("heads_")]

    def figures(self) -> dict:
        if self.over_checkpoints:
            df = self.tables["checkpoints"]
            return {"curves": bb_curves_figure(df) if self.summary.get("bigram_backcopy") else _generic_curves(df)}
        names = self.domains
        return {"sink_map": sink_map_figure({n: self.tables[f"heads_{n}"] for n in names}),
                "norms": norm_profile_figure({n: (self.tables[f"layers_{n}"], self.tables[f"heads_{n}"])
                                              for n in names})}

    def report(self) -> str:
        if self.over_checkpoints:
            df = self.tables["checkpoints"]
            return "\n".join([f"# Sink metrics over checkpoints: {self.summary.get('folder', '')}", "",
                              "![curves](curves.png)", "",
                              markdown_table(df.drop(columns=[c for c in ("checkpoint",) if c in df]), ".3g"), ""])
        s, names = self.summary, self.domains
        settings = s.get("domains", {})
        lines = [f"# Attention sinks and active-dormant heads: {s.get('model', '')}", "",
                 "Domains: " + ", ".join(f"{n} ({settings.get(n, {}).get('n_prompts', '?')} prompts, up to "
                                         f"{settings.get(n, {}).get('tokens_per_prompt_max', '?')} tokens, "
                                         f"{'BOS first' if settings.get(n, {}).get('add_bos', True) else 'no BOS'})"
                                         for n in names) + ".",
                 f"Dormancy = mean attention of queries i >= 1 to position 0; attends the sink when > {s['tau']} "
                 f"(INFERRED threshold). Dormant = attends the sink and |delta CE| < {s['eps']} nats for both "
                 "zeroing the head and moving all its attention to position 0.", "",
                 f"{' vs '.join(names)} dormancy grids: r = {s['grid_correlation']:.3f}; heads switching across tau: "
                 f"{s['n_switching_heads']}.", "", "![sink map](sink_map.png)", "", "![norms](norms.png)", ""]
        for n in names:
            d = s["per_domain"][n]
            lines += [f"## {n}", "",
                      f"- heads attending the sink (> tau): {d['frac_heads_attend_sink']:.1%}; entropy-detector sink "
                      f"heads: {d['n_sink_heads_entropy']}",
                      f"- most dormant head: layer {int(d['most_dormant_head']['layer'])} head "
                      f"{int(d['most_dormant_head']['head'])} ({d['most_dormant_head']['dormancy']:.3f})",
                      f"- layers where ||res_0|| > 10x every other position: {d['peak_layers_ratio_over_10']}", ""]
            lay = self.tables[f"layers_{n}"][["layer", "resid_first", "resid_ratio_max", "resid_ratio_mean",
                                              "value_ratio_median", "sink_first_mean", "frac_attends_sink"]]
            lines += [markdown_table(lay, ".3g"), ""]
        leaving = self.tables["leaving_tokens"]
        lines += ["## Most active-dormant heads (largest dormancy difference)", "",
                  markdown_table(self.tables["contrast"].head(10).drop(columns=["switches"])), "",
                  "## Causal confirmation", "", markdown_table(self.tables["causal"], ".4f"), "",
                  "## Tokens that make the top heads leave the sink (lowest mean A_i0)", "",
                  markdown_table(leaving[["layer", "head", "domain", "token", "count", "attn_first"]]), ""]
        return "\n".join(lines)


def run(config: SinksConfig, handle=None, progress: bool = True, ray: str | None = None) -> Result:
    """The model study on ``handle`` (default: ``config``'s model), or the checkpoint study when
    ``config.checkpoints`` names a folder; ``ray`` (a Ray address: ``local`` | ``auto`` | a cluster address, only
    with checkpoints) runs that one as one Ray task per checkpoint, with the serial run's table."""
    check_ray_sweep(ray, 1 if config.checkpoints else 0)
    if config.checkpoints:
        return _checkpoints(config, progress, ray)
    if config.domains is not None and len(config.domains) != 2:
        raise ValueError(f"the study contrasts exactly 2 domains, got {list(config.domains)}")
    handle = handle if handle is not None else config.load()
    return _model(config, handle, progress)


def _candidates(contrast: pd.DataFrame, names: list[str], k: int) -> list[tuple[int, int]]:
    """The ``k`` most active-dormant heads (largest |diff|) and the ``k`` most dormant on both domains."""
    both = contrast.assign(low=contrast[[f"dormancy_{n}" for n in names]].min(axis=1))
    picks = list(contrast.head(k)[["layer", "head"]].itertuples(index=False, name=None))
    dormant = both.sort_values("low", ascending=False).head(k)
    picks += list(dormant[["layer", "head"]].itertuples(index=False, name=None))
    return list(dict.fromkeys((int(a), int(b)) for a, b in picks))


def _peak_layers(layers: pd.DataFrame, factor: float = 10.0) -> list[int]:
    return [int(x) for x in layers.loc[layers.resid_ratio_max > factor, "layer"]]


def _model(c: SinksConfig, handle, progress: bool) -> Result:
    """Sink maps on two domains, norm profiles, the most active-dormant and most dormant heads with their causal
    confirmation, and the tokens that make the first 3 of those heads leave the sink (on the first
    ``causal_prompts`` prompts of the domain where the head is less dormant)."""
    domains = c.domains if c.domains is not None else sinks.default_domains(handle, c.n_prompts, c.n_tokens)
    names = list(domains)
    res = {n: sinks.sink_analysis(handle, p, add_bos=c.add_bos, max_tokens=c.n_tokens, batch_size=c.batch_size,
                                  tau=c.tau, progress=progress) for n, p in domains.items()}
    tables = {}
    for n, r in res.items():
        tables[f"heads_{n}"], tables[f"layers_{n}"] = r.heads, r.layers
    contrast = sinks.domain_contrast(res)
    heads = _candidates(contrast, names, c.causal_heads)
    causal = []
    for n in names:
        abl = sinks.head_ablation(handle, domains[n][:c.causal_prompts], heads, add_bos=c.add_bos,
                                  max_tokens=c.n_tokens, batch_size=c.batch_size, progress=progress)
        causal.append(sinks.classify_dormant(res[n].heads, abl, eps=c.eps).assign(domain=n))
    causal = pd.concat(causal, ignore_index=True)
    leaving = []
    for layer, head in heads[:3]:
        row = contrast[(contrast["layer"] == layer) & (contrast["head"] == head)].iloc[0]
        active = min(names, key=lambda n: row[f"dormancy_{n}"])
        df = sinks.sink_leaving_tokens(handle, domains[active][:c.causal_prompts], layer, head,
                                       add_bos=c.add_bos, max_tokens=c.n_tokens, batch_size=c.batch_size)
        leaving.append(df.head(10).assign(layer=layer, head=head, domain=active))
    tables |= {"contrast": contrast, "causal": causal[CAUSAL_COLUMNS],
               "leaving_tokens": pd.concat(leaving, ignore_index=True)}
    grid = {n: r.heads.sort_values(["layer", "head"]).dormancy.to_numpy() for n, r in res.items()}
    summary = {"model": handle.spec, "domains": {n: r.settings for n, r in res.items()}, "tau": c.tau, "eps": c.eps,
               "grid_correlation": float(np.corrcoef(grid[names[0]], grid[names[1]])[0, 1]),
               "n_switching_heads": int(contrast.switches.sum()),
               "per_domain": {}, "top_active_dormant": contrast.head(c.causal_heads).to_dict("records")}
    for n, r in res.items():
        h, lay = r.heads, r.layers
        by_layer = h.groupby("layer").dormancy.max()
        summary["per_domain"][n] = {
            "max_dormancy_by_layer": by_layer.round(4).tolist(),
            "frac_heads_attend_sink": float(h.attends_sink.mean()),
            "frac_heads_dormancy_over_0.5_by_layer": (h.dormancy > 0.5).groupby(h.layer).mean().tolist(),
            "most_dormant_head": h.loc[h.dormancy.idxmax(), ["layer", "head", "dormancy"]].to_dict(),
            "resid_ratio_max_by_layer": lay.resid_ratio_max.round(3).tolist(),
            "resid_first_by_layer": lay.resid_first.round(1).tolist(),
            "peak_layers_ratio_over_10": _peak_layers(lay),
            "value_ratio_median_by_layer": lay.value_ratio_median.round(3).tolist(),
            "n_sink_heads_entropy": int(h.sink_head.sum()),
            "dormant_causal": causal[(causal.domain == n) & causal.dormant][["layer", "head"]].values.tolist()}
    return Result(c, summary, tables)


def _checkpoints(c: SinksConfig, progress: bool, ray: str | None = None) -> Result:
    """Sink metrics of every checkpoint under ``c.checkpoints``, as curves over training steps, one checkpoint at a
    time or one Ray task per checkpoint (``ray``, see :func:`hiddenlens.analyses.checkpoints.map_checkpoints`).

    Bigram-Backcopy checkpoints use :func:`hiddenlens.analyses.bb_metrics.bb_metrics` (trigger-aware); other
    checkpoints (transformers folders named by step, e.g. ``step_1000``) use :func:`sinks.sink_analysis` on prose
    passages and report per-layer means."""
    folder = Path(c.checkpoints)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    marked = sorted(folder.glob(f"*/{MARKER}")) or sorted(folder.glob(MARKER))
    is_bb = bool(marked) and all(json.loads(m.read_text()).get("kind") == KIND for m in marked)
    if is_bb:
        ckpts = list_checkpoints(folder)
        meta = json.loads((ckpts[0] / MARKER).read_text())
        stats = text_statistics()
        if stats.chars != meta["chars"]:
            raise ValueError("these BB checkpoints were trained on a different character set than this Python's "
                             "pydoc_data.topics; evaluate them with the Python that trained them")
        gen = BBGenerator(stats, k=meta["config"]["k"], seq_length=meta["config"]["seq_length"])
        fn = partial(_bb_rows, c, gen, meta)
    else:
        ckpts = sorted((p for p in folder.iterdir() if (p / "config.json").is_file() or (p / MARKER).is_file()),
                       key=lambda p: int("".join(ch for ch in p.name if ch.isdigit()) or 0))
        if not ckpts:
            raise FileNotFoundError(f"no checkpoints (folders with config.json or {MARKER}) under {folder}")
        fn = partial(_prose_rows, c, progress and ray is None)
    parts = map_checkpoints(fn, [str(ck) for ck in ckpts], ray=ray, progress=progress)
    df = pd.DataFrame([row for rows in parts for row in rows])
    summary = {"folder": str(folder), "n_checkpoints": len(ckpts), "bigram_backcopy": is_bb,
               "last": df[df.step == df.step.max()].to_dict("records")}
    return Result(c, summary, {"checkpoints": df})


def _bb_rows(c: SinksConfig, gen: BBGenerator, meta: dict, checkpoint: str) -> list[dict]:
    """One row of trigger-aware metrics (:func:`flat_metrics` of :func:`bb_metrics` on ``c.eval_seqs`` sequences)
    for the BB checkpoint folder ``checkpoint``."""
    with c.opened(checkpoint) as handle:
        metrics = flat_metrics(bb_metrics(handle, gen, c.eval_seqs))
    variant = meta["attention"] + "/" + meta["config"]["optimizer"]
    return [{"step": checkpoint_step(checkpoint), "variant": variant, "seed": meta["config"]["seed"]} | metrics]


def _prose_rows(c: SinksConfig, progress: bool, checkpoint: str) -> list[dict]:
    """One row per layer (:func:`sinks.sink_analysis` layer means on ``c.n_prompts`` prose passages of
    ``c.n_tokens`` tokens) for the transformers checkpoint folder ``checkpoint``, its step read from its name."""
    with c.opened(checkpoint) as handle:
        ps = sinks.default_domains(handle, c.n_prompts, c.n_tokens)["prose"]
        r = sinks.sink_analysis(handle, ps, add_bos=c.add_bos, max_tokens=c.n_tokens, progress=progress)
    name = Path(checkpoint).name
    step = int("".join(ch for ch in name if ch.isdigit()) or 0)
    return [{"step": step, "checkpoint": name} | lay.to_dict() for _, lay in r.layers.iterrows()]


def _generic_curves(df: pd.DataFrame):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for layer, g in df.groupby("layer"):
        axes[0].plot(g.step, g.sink_first_mean, label=f"L{layer}")
        axes[1].plot(g.step, g.resid_ratio_max, label=f"L{layer}")
    axes[0].set(xlabel="step", ylabel="mean sink mass of position 0")
    axes[1].set(xlabel="step", ylabel="||res_0|| / max others", yscale="log")
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig
