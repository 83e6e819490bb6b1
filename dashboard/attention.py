"""Attention helpers for display: a layer x head grid from a per-head table, and downsampled patterns."""
from __future__ import annotations

import numpy as np
import pandas as pd


def head_grid(heads: pd.DataFrame, value: str) -> np.ndarray:
    """``heads`` (one row per layer x head, as ``hiddenlens.analyses.sinks`` returns) -> ``[n_layers, n_heads]``."""
    grid = heads.pivot(index="layer", columns="head", values=value).sort_index().sort_index(axis=1)
    return grid.to_numpy(dtype=float)


def pool(matrix: np.ndarray, max_size: int) -> tuple[np.ndarray, int]:
    """Average-pool the last two axes by the smallest integer factor that brings them to ``<= max_size``."""
    n = matrix.shape[-1]
    factor = max(1, -(-n // max_size))
    if factor == 1:
        return matrix, 1
    pad = (-n) % factor
    m = np.pad(matrix, [(0, 0)] * (matrix.ndim - 2) + [(0, pad), (0, pad)])
    shape = m.shape[:-2] + (m.shape[-2] // factor, factor, m.shape[-1] // factor, factor)
    return m.reshape(shape).mean(axis=(-1, -3)), factor
