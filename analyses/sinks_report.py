"""Report folders for the sink analyses: a model over two domains (``hiddenlens analyze sinks``) and a series of
checkpoints (``hiddenlens analyze sinks --checkpoints``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import sinks
from .report import ReportFolder, markdown_table
from .sinks_figures import bb_curves_figure, norm_profile_figure, sink_map_figure


def _candidates(contrast: pd.DataFrame, names: list[str], k: int) -> list[tuple[int, int]]:
    """The ``k`` most active-dormant heads (largest |diff|) and the ``k`` most dormant on both domains."""
    both = contrast.assign(low=contrast[[f"dormancy_{n}" for n in names]].min(axis=1))
    picks = list(contrast.head(k)[["layer", "head"]].itertuples(index=False, name=None))
    dormant = both.sort_values("low", ascending=False).head(k)
    picks += list(dormant[["layer", "head"]].itertuples(index=False, name=None))
    return list(dict.fromkeys((int(a), int(b)) for a, b in picks))


def _peak_layers(layers: pd.DataFrame, factor: float = 10.0) -> list[int]:
    return [int(x) for x in layers.loc[layers.resid_ratio_max > factor, "layer"]]


def model_report(handle, out: str | Path, domains: dict[str, list] | None = None, n_prompts: int = 32,
                 n_tokens: int = 128, batch_size: int = 8, causal_heads: int = 4, causal_prompts: int = 8,
                 tau: float = sinks.TAU, eps: float = sinks.EPS_CE, progress: bool = True) -> dict:
    """Sink maps on two domains (default prose vs Python code), norm profiles, the most active-dormant and most
    dormant heads with their causal confirmation, and the tokens that make the first 3 of those heads leave the
    sink (on the first ``causal_prompts`` prompts of the domain where the head is less dormant).

    Writes ``heads_<domain>``, ``layers_<domain>``, ``contrast``, ``causal``, ``leaving_tokens`` (Parquet + CSV),
    ``sink_map.png``, ``norms.png``, ``summary.json`` and ``report.md`` into ``out``; returns the summary.
    """
    rep = ReportFolder(out)
    if domains is None:
        domains = sinks.default_domains(handle, n_prompts, n_tokens)
    if len(domains) != 2:
        raise ValueError(f"the report contrasts exactly 2 domains, got {list(domains)}")
    names = list(domains)
    res = {n: sinks.sink_analysis(handle, p, add_bos=True, max_tokens=n_tokens, batch_size=batch_size, tau=tau,
                                  progress=progress) for n, p in domains.items()}
    for n, r in res.items():
        rep.table(f"heads_{n}", r.heads)
        rep.table(f"layers_{n}", r.layers)
    contrast = sinks.domain_contrast(res)
    rep.table("contrast", contrast)
    heads = _candidates(contrast, names, causal_heads)
    causal = []
    for n in names:
        abl = sinks.head_ablation(handle, domains[n][:causal_prompts], heads, add_bos=True, max_tokens=n_tokens,
                                  batch_size=batch_size, progress=progress)
        causal.append(sinks.classify_dormant(res[n].heads, abl, eps=eps).assign(domain=n))
    causal = pd.concat(causal, ignore_index=True)
    keep = ["domain", "layer", "head", "dormancy", "attends_sink", "delta_ce_zero", "delta_ce_bos", "dormant"]
    rep.table("causal", causal[keep])
    leaving = []
    for layer, head in heads[:3]:
        row = contrast[(contrast["layer"] == layer) & (contrast["head"] == head)].iloc[0]
        active = min(names, key=lambda n: row[f"dormancy_{n}"])
        df = sinks.sink_leaving_tokens(handle, domains[active][:causal_prompts], layer, head,
                                       max_tokens=n_tokens, batch_size=batch_size)
        leaving.append(df.head(10).assign(layer=layer, head=head, domain=active))
    leaving = pd.concat(leaving, ignore_index=True)
    rep.table("leaving_tokens", leaving)
    rep.figure("sink_map", sink_map_figure({n: r.heads for n, r in res.items()}))
    rep.figure("norms", norm_profile_figure({n: (r.layers, r.heads) for n, r in res.items()}))

    grid = {n: r.heads.sort_values(["layer", "head"]).dormancy.to_numpy() for n, r in res.items()}
    summary = {"model": handle.spec, "domains": {n: r.settings for n, r in res.items()}, "tau": tau, "eps": eps,
               "grid_correlation": float(np.corrcoef(grid[names[0]], grid[names[1]])[0, 1]),
               "n_switching_heads": int(contrast.switches.sum()),
               "per_domain": {}, "top_active_dormant": contrast.head(causal_heads).to_dict("records")}
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
    rep.summary(summary)
    rep.markdown(_model_markdown(handle, names, res, contrast, causal[keep], leaving, summary))
    return summary


def _model_markdown(handle, names, res, contrast, causal, leaving, summary) -> str:
    lines = [f"# Attention sinks and active-dormant heads: {handle.spec}", "",
             "Domains: " + ", ".join(f"{n} ({r.settings['n_prompts']} prompts, up to "
                                     f"{r.settings['tokens_per_prompt_max']} tokens, BOS first)"
                                     for n, r in res.items()) + ".",
             f"Dormancy = mean attention of queries i >= 1 to position 0; attends the sink when > {summary['tau']} "
             f"(INFERRED threshold). Dormant = attends the sink and |delta CE| < {summary['eps']} nats for both "
             "zeroing the head and moving all its attention to position 0.", "",
             f"Prose vs code dormancy grids: r = {summary['grid_correlation']:.3f}; heads switching across tau: "
             f"{summary['n_switching_heads']}.", "", "![sink map](sink_map.png)", "", "![norms](norms.png)", ""]
    for n in names:
        d = summary["per_domain"][n]
        lines += [f"## {n}", "",
                  f"- heads attending the sink (> tau): {d['frac_heads_attend_sink']:.1%}; entropy-detector sink "
                  f"heads: {d['n_sink_heads_entropy']}",
                  f"- most dormant head: layer {int(d['most_dormant_head']['layer'])} head "
                  f"{int(d['most_dormant_head']['head'])} ({d['most_dormant_head']['dormancy']:.3f})",
                  f"- layers where ||res_0|| > 10x every other position: {d['peak_layers_ratio_over_10']}", ""]
        lay = res[n].layers[["layer", "resid_first", "resid_ratio_max", "resid_ratio_mean", "value_ratio_median",
                             "sink_first_mean", "frac_attends_sink"]]
        lines += [markdown_table(lay, ".3g"), ""]
    lines += ["## Most active-dormant heads (largest dormancy difference)", "",
              markdown_table(contrast.head(10).drop(columns=["switches"])), "",
              "## Causal confirmation", "", markdown_table(causal, ".4f"), "",
              "## Tokens that make the top heads leave the sink (lowest mean A_i0)", "",
              markdown_table(leaving[["layer", "head", "domain", "token", "count", "attn_first"]]), ""]
    return "\n".join(lines)


def checkpoints_report(folder: str | Path, out: str | Path, prompts: list | None = None, n_prompts: int = 16,
                       n_tokens: int = 64, eval_seqs: int = 256, progress: bool = True) -> pd.DataFrame:
    """Sink metrics of every checkpoint under ``folder``, as curves over training steps.

    Bigram-Backcopy checkpoints use :func:`hiddenlens.models.bigram_backcopy.bb_metrics` (trigger-aware);
    other checkpoints (transformers folders named by step, e.g. ``step_1000``) use :func:`sinks.sink_analysis` on
    ``prompts`` (default: prose passages) and report per-layer means. Writes ``checkpoints`` (table),
    ``curves.png``, ``summary.json`` and ``report.md``.
    """
    import hiddenlens as hl
    from hiddenlens.models import bigram_backcopy as bb
    from hiddenlens.models.loading import MARKER

    folder = Path(folder)
    rep = ReportFolder(out)
    marked = sorted(folder.glob(f"*/{MARKER}")) or sorted(folder.glob(MARKER))
    is_bb = bool(marked) and all(json.loads(m.read_text()).get("kind") == bb.KIND for m in marked)
    rows = []
    if is_bb:
        ckpts = bb.list_checkpoints(folder)
        meta = json.loads((ckpts[0] / MARKER).read_text())
        stats = bb.text_statistics()
        if stats.chars != meta["chars"]:
            raise ValueError("these BB checkpoints were trained on a different character set than this Python's "
                             "pydoc_data.topics; evaluate them with the Python that trained them")
        gen = bb.BBGenerator(stats, k=meta["config"]["k"], seq_length=meta["config"]["seq_length"])
        it = ckpts
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(ckpts, desc="checkpoints", unit="ckpt")
        for c in it:
            handle = hl.load_model(str(c))
            variant = meta["attention"] + "/" + meta["config"]["optimizer"]
            rows.append({"step": bb.checkpoint_step(c), "variant": variant, "seed": meta["config"]["seed"]}
                        | bb.flat_metrics(bb.bb_metrics(handle, gen, eval_seqs)))
        df = pd.DataFrame(rows)
        rep.figure("curves", bb_curves_figure(df))
    else:
        ckpts = sorted((p for p in folder.iterdir() if (p / "config.json").is_file() or (p / MARKER).is_file()),
                       key=lambda p: int("".join(ch for ch in p.name if ch.isdigit()) or 0))
        if not ckpts:
            raise FileNotFoundError(f"no checkpoints (folders with config.json or {MARKER}) under {folder}")
        for c in ckpts:
            handle = hl.load_model(str(c))
            ps = prompts or sinks.default_domains(handle, n_prompts, n_tokens)["prose"]
            r = sinks.sink_analysis(handle, ps, max_tokens=n_tokens, progress=progress)
            step = int("".join(ch for ch in c.name if ch.isdigit()) or 0)
            for _, lay in r.layers.iterrows():
                rows.append({"step": step, "checkpoint": c.name} | lay.to_dict())
        df = pd.DataFrame(rows)
        rep.figure("curves", _generic_curves(df))
    rep.table("checkpoints", df)
    rep.summary({"folder": str(folder), "n_checkpoints": len(ckpts), "bigram_backcopy": is_bb,
                 "last": df[df.step == df.step.max()].to_dict("records")})
    rep.markdown("\n".join([f"# Sink metrics over checkpoints: {folder}", "", "![curves](curves.png)", "",
                            markdown_table(df.drop(columns=[c for c in ("checkpoint",) if c in df]), ".3g"), ""]))
    return df


def _generic_curves(df: pd.DataFrame):
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
