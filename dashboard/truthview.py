"""What the Truthful-directions page shows, from a live ``fit_truth`` or from a report folder on disk."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from .results import Results, ResultsError


@dataclass(frozen=True)
class TruthView:
    """``layers`` (layer, method, auroc, accuracy), ``heads`` (layer, head, val_accuracy, test_auroc; may be None),
    ``projections`` (text, label, projection), ``directions`` {method: Direction}, ``best_layer``."""

    layers: pd.DataFrame
    heads: pd.DataFrame | None
    projections: pd.DataFrame | None
    directions: dict
    best_layer: int

    def direction(self, method: str):
        if method not in self.directions:
            raise KeyError(f"no {method!r} direction here; available: {', '.join(self.directions)}")
        return self.directions[method]


def from_result(result) -> TruthView:
    """From a :class:`hiddenlens.analyses.truth.TruthResult`."""
    return TruthView(result.layers, result.heads, result.projections, dict(result.directions), result.best_layer)


def from_folder(res: Results) -> TruthView:
    """From a report folder written by ``write_truth_report`` (tables + ``direction_<method>`` safetensors/JSON)."""
    from hiddenlens.analyses.truth import Direction

    if "layers" not in res.tables or not {"layer", "method", "auroc"} <= set(res.tables["layers"].columns):
        raise ResultsError(f"{res.path} is not a truthful-directions report: no layers table with layer, method, "
                           "auroc (write one with `hiddenlens truth directions`)")
    directions = {}
    for meta in sorted(res.path.glob("direction_*.json")):
        try:
            d = Direction.load(meta)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ResultsError(f"cannot read the direction {meta.name}: {exc}") from exc
        directions[d.method] = d
    layers = res.tables["layers"]
    best = (res.summary or {}).get("best_layer")
    if best is None:
        best = int(layers.sort_values("auroc", ascending=False).iloc[0]["layer"])
    return TruthView(layers, res.tables.get("heads"), res.tables.get("projections"), directions, int(best))
