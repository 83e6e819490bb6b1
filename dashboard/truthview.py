"""What the Truthful-directions page shows, from the truth study (:mod:`hiddenlens.studies.truth`): fitted live or
read from a run folder."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


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
    """From a :class:`hiddenlens.studies.truth.Result`: fitted live or read from a run folder."""
    return TruthView(result.tables["layers"], result.tables.get("heads"), result.tables.get("projections"),
                     dict(result.directions), result.best_layer)
