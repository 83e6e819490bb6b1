"""The truthful-directions study (``hiddenlens truth directions``): mass-mean / probe / RepE directions per layer
and ITI heads, held-out AUROC, cross-family transfer; the directions are kept in the run folder as safetensors +
JSON (``direction_<method>``, ``iti_heads``), so ``hiddenlens steer --direction`` and the dashboard can use them.

The computations are :mod:`hiddenlens.analyses.truth` (:func:`~hiddenlens.analyses.truth.fit_truth`); this module
runs them from a :class:`TruthConfig` and keeps the result (:class:`Result`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from hiddenlens.analyses.truth import fit_truth
from hiddenlens.common.stats import markdown_table
from hiddenlens.probes.direction import Direction, load_directions, save_directions
from hiddenlens.probes.sites import parse_layers

from .report import ModelSpec, RunFolder, StudyResult

STUDY = "truth"


@dataclass
class TruthConfig(ModelSpec):
    """``family`` to fit on, ``transfer`` families to test on, ``layers`` (block indices or a spec such as
    ``"8-16"``; None: every block), ``k_heads`` (ITI's top-K heads; 0 skips the per-head analysis)."""

    family: str = "capitals"
    transfer: list[str] = field(default_factory=lambda: ["negations", "arithmetic", "comparisons"])
    layers: list[int] | str | None = None
    k_heads: int = 16
    seed: int = 0
    batch_size: int = 32


@dataclass
class Result(StudyResult):
    """Tables ``layers`` (per layer and method: auroc, accuracy, sigma), ``projections``, ``heads`` and ``transfer``
    (when computed); ``directions`` (best layer, one per method) and ``iti`` (the top-K head directions)."""

    STUDY: ClassVar[str] = STUDY
    CONFIG: ClassVar[type] = TruthConfig

    directions: dict[str, Direction] = field(default_factory=dict)
    iti: list[Direction] = field(default_factory=list)

    @property
    def best_layer(self) -> int:
        best = self.summary.get("best_layer")
        if best is None:
            raise KeyError("this run's summary names no best_layer; rerun `hiddenlens truth directions`")
        return int(best)

    def direction(self, method: str) -> Direction:
        if method not in self.directions:
            raise KeyError(f"no {method!r} direction in this run; available: {', '.join(self.directions) or 'none'}")
        return self.directions[method]

    def figures(self) -> dict:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = {}
        layers, proj = self.tables["layers"], self.tables.get("projections")
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        for method, g in layers.groupby("method", sort=False):
            ax[0].plot(g.layer, g.auroc, marker=".", label=method)
        ax[0].axhline(0.5, color="grey", lw=0.8, ls=":")
        ax[0].set(xlabel="layer", ylabel="held-out AUROC", title=f"{self.summary.get('family', '')}: probe per layer")
        ax[0].legend()
        if proj is not None:
            for label, g in proj.groupby("label"):
                ax[1].hist(g.projection, bins=20, alpha=0.6, label="true" if label == 1 else "false")
            name = next(iter(self.directions.values())).name if self.directions else "the best direction"
            ax[1].set(xlabel=f"projection on {name}", ylabel="test statements", title="held-out projections")
            ax[1].legend()
        out["auroc_by_layer"] = fig
        heads = self.tables.get("heads")
        if heads is not None:
            fig, ax = plt.subplots(figsize=(6, 4))
            grid = heads.pivot(index="layer", columns="head", values="val_accuracy")
            im = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", origin="lower",
                           extent=(-0.5, grid.shape[1] - 0.5, grid.index.min() - 0.5, grid.index.max() + 0.5))
            fig.colorbar(im, label="validation accuracy")
            ax.set(xlabel="head", ylabel="layer", title="per-head probe accuracy (attn.z, last token)")
            out["heads"] = fig
        return out

    def report(self) -> str:
        s, layers = self.summary, self.tables["layers"]
        md = [f"# Truthful directions: {s.get('model', '')}, family `{s.get('family', '')}`", "",
              f"Best layer by {'validation' if s.get('best_layer_chosen_on') == 'val' else 'held-out (test)'} "
              f"probe AUROC: **{self.best_layer}** (test AUROC {s.get('best_probe_auroc', float('nan')):.3f}"
              + (f", validation {s['best_probe_val_auroc']:.3f}" if "best_probe_val_auroc" in s else "")
              + "). Splits are by entity; the layer is chosen on the validation split and reported on the test "
              "split, which no choice sees." if s.get("best_layer_chosen_on") == "val" else
              f"Best layer: **{self.best_layer}** (chosen on the test split by an older hiddenlens: a selection "
              f"leak; AUROC {s.get('best_probe_auroc', float('nan')):.3f}). Splits are by entity.", "",
              "![AUROC by layer](auroc_by_layer.png)", "", "## Per layer (held-out)", "",
              markdown_table(layers.pivot(index="layer", columns="method", values="auroc").reset_index())]
        heads = self.tables.get("heads")
        if heads is not None:
            k = len(self.iti) or len(s.get("iti_heads", []))
            top = heads.sort_values("val_accuracy", ascending=False, kind="stable").head(k)
            md += ["", f"## ITI top-{k} heads (validation accuracy)", "", markdown_table(top.head(10)), "",
                   "![per-head accuracy](heads.png)"]
        transfer = self.tables.get("transfer")
        if transfer is not None:
            md += ["", f"## Cross-family transfer (mass-mean, layer {self.best_layer}, held-out AUROC)", "",
                   markdown_table(transfer.pivot(index="train_family", columns="test_family",
                                                 values="auroc").reset_index())]
        return "\n".join(md) + "\n"

    def write_extra(self, folder: Path) -> None:
        for method, d in self.directions.items():
            d.save(folder / f"direction_{method}")
        if self.iti:
            save_directions(self.iti, folder / "iti_heads")

    @classmethod
    def read_extra(cls, run: RunFolder) -> dict:
        if "layers" not in run.tables or not {"layer", "method", "auroc"} <= set(run.tables["layers"].columns):
            raise ValueError(f"{run.path} is not a truthful-directions run: no layers table with layer, method, "
                             "auroc (write one with `hiddenlens truth directions`)")
        directions = {}
        for meta in sorted(run.path.glob("direction_*.json")):
            d = Direction.load(meta)
            directions[d.method] = d
        iti = load_directions(run.path / "iti_heads") if (run.path / "iti_heads.json").is_file() else []
        return {"directions": directions, "iti": iti}


def run(config: TruthConfig, handle=None, progress: bool = True) -> Result:
    """Fit and evaluate the directions of ``config.family`` on ``handle`` (default: ``config``'s model)."""
    handle = handle if handle is not None else config.load()
    layers = None if config.layers in (None, "", []) else parse_layers(config.layers, handle.n_layers, what="layers")
    res = fit_truth(handle, config.family, [f for f in config.transfer if f], layers, k_heads=config.k_heads,
                    seed=config.seed, batch_size=config.batch_size, progress=progress)
    tables = {"layers": res.layers, "projections": res.projections}
    if res.heads is not None:
        tables["heads"] = res.heads
    if res.transfer is not None:
        tables["transfer"] = res.transfer
    return Result(config, dict(res.summary), tables, directions=dict(res.directions), iti=list(res.iti))

