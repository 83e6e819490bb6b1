"""Intention metrics (Vera, "Intention Collapse: Intention-Level Metrics for Reasoning in Language Models", arXiv 2601.01011).

Three measures of the *intention state* -- the residual stream at the last prompt position, just before the
first output token is chosen:

* :func:`intention_entropy` -- H_int, entropy (bits) of the next-token distribution at that position.
  Default ``top_k=100`` (softmax renormalised over the 100 largest logits) is what the authors' code computes and
  what their tables report; ``top_k=None`` is the paper's Eq. 2 (full vocabulary).
* :func:`effective_dimensionality` / :func:`layered_dimensionality` -- dim_eff of a set of N intention states:
  participation ratio (v2 paper, canonical), the 90 %-variance count (v1 pilot), a Marchenko-Pastur-corrected
  participation ratio (reviewer notebook) and TwoNN (Facco et al.). Takes a matrix ``[N, d]`` or the
  :class:`~hiddenlens.probes.RunningStats` that ``hiddenlens.capture(..., reduce="stats")`` accumulates, so
  N = 100,000 items never need the matrix in memory (TwoNN excepted: it needs the points).
* :func:`recoverability` -- Recov(I; Z): a standardised logistic probe predicting a binary label from the
  states; out-of-fold AUROC with a bootstrap 95 % CI and a label-shuffle control. ``protocol="cv5"`` (default) is
  the authors' code (5-fold stratified CV at C = 1); ``protocol="split"`` is the paper's text (60/20/20 split,
  C chosen on validation AUROC).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hiddenlens.common.stats import auroc, bootstrap_ci, entropy
from hiddenlens.probes.reducers import RunningStats

DIM_METHODS = ("participation_ratio", "threshold", "mp_participation_ratio", "twonn")
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


# ---------------------------------------------------------------------------------------------------------------
# H_int
# ---------------------------------------------------------------------------------------------------------------
def intention_entropy(logits, top_k: int | None = 100, base: float = 2.0) -> torch.Tensor:
    """Entropy of the next-token distribution, per row.

    Args:
        logits: ``[vocab]`` or ``[n, vocab]`` logits at the last prompt position (pass ``logits[:, -1]`` of a
            left-padded batch). NaN/Inf raise.
        top_k: keep the ``top_k`` largest logits and renormalise the softmax over them (authors' code, default
            100); ``None`` uses the full vocabulary (paper Eq. 2).
        base: logarithm base (2 gives bits, ``math.e`` nats).

    Returns:
        float64 tensor ``[n]`` (a 0-d tensor for 1-D input), in units of ``log(base)``.
        The code's ``+1e-10`` inside the log is not used: ``p log p`` is computed exactly from ``log_softmax``
        (the two differ by < 1e-8 bits) by :func:`hiddenlens.common.stats.entropy`.
    """
    x = torch.as_tensor(logits).detach().to(dtype=torch.float64, device="cpu")
    if x.ndim not in (1, 2):
        raise ValueError(f"logits must be [vocab] or [n, vocab], got shape {tuple(x.shape)}; for [n, pos, vocab] "
                         "pass logits[:, -1] (the last prompt position of a left-padded batch)")
    if x.shape[-1] == 0:
        raise ValueError("logits have an empty vocabulary axis")
    if not torch.isfinite(x).all():
        raise ValueError("logits hold NaN or Inf; check the model's dtype (use float32) before computing H_int")
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k={top_k}: use a positive integer or None (full vocabulary)")
        x = x.topk(min(top_k, x.shape[-1]), dim=-1).values
    return entropy(x, base=base)


# ---------------------------------------------------------------------------------------------------------------
# Effective dimensionality
# ---------------------------------------------------------------------------------------------------------------
def _as_matrix(x) -> np.ndarray:
    arr = x.detach().to("cpu", torch.float64).numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected a matrix [N, d] (one row per item), got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"effective dimensionality needs at least 2 items, got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        raise ValueError("the activation matrix holds NaN or Inf")
    return arr


def covariance_spectrum(x) -> tuple[np.ndarray, int, int]:
    """Eigenvalues (descending, >= 0) of the sample covariance ``X~^T X~ / (N-1)`` of ``x``.

    ``x`` is a matrix ``[N, d]`` (tensor or array) or a :class:`RunningStats`. Returns ``(eigenvalues [d or
    min(N, d)], N, d)``. A matrix goes through the SVD of the centred data (float64); running statistics through
    ``eigh`` of the accumulated covariance.
    """
    if isinstance(x, RunningStats):
        if not x.covariance:
            raise ValueError("these RunningStats hold no covariance: capture with reduce='stats', not 'mean'")
        cov = x.cov.numpy()
        if not np.isfinite(cov).all():
            raise ValueError("the accumulated covariance holds NaN or Inf")
        lam = np.linalg.eigvalsh(cov)[::-1]
        return np.clip(lam, 0.0, None), x.n, cov.shape[0]
    arr = _as_matrix(x)
    n, d = arr.shape
    centred = arr - arr.mean(0, keepdims=True)
    s = np.linalg.svd(centred, compute_uv=False)
    return s ** 2 / (n - 1), n, d


def participation_ratio(eigenvalues: np.ndarray) -> float:
    """``(sum lambda)^2 / sum lambda^2`` (0 for an all-zero spectrum)."""
    lam = np.asarray(eigenvalues, np.float64)
    denom = float((lam ** 2).sum())
    return float(lam.sum() ** 2 / denom) if denom > 0 else 0.0


def threshold_count(eigenvalues: np.ndarray, variance_threshold: float = 0.90) -> int:
    """Smallest k whose top-k eigenvalues explain ``variance_threshold`` of the variance (v1 pilot)."""
    if not 0 < variance_threshold <= 1:
        raise ValueError(f"variance_threshold={variance_threshold}: use a fraction in (0, 1]")
    lam = np.sort(np.asarray(eigenvalues, np.float64))[::-1]
    total = lam.sum()
    if total <= 0:
        return 0
    cum = np.cumsum(lam) / total
    return int(min(np.searchsorted(cum, variance_threshold - 1e-12) + 1, len(lam)))


def mp_participation_ratio(eigenvalues: np.ndarray, n: int, d: int) -> float:
    """Participation ratio over the eigenvalues above the Marchenko-Pastur edge ``sigma^2 (1 + sqrt(gamma))^2``.

    ``gamma = min(N, d) / max(N, d)``. ``sigma^2`` is the median eigenvalue of the non-degenerate part of the
    spectrum (the top ``min(N - 1, d)`` eigenvalues): INFERRED -- the reviewer notebook takes "the median
    eigenvalue", which is 0 whenever N <= d/2 because the rest of the spectrum is exactly zero.
    """
    lam = np.sort(np.asarray(eigenvalues, np.float64))[::-1][: max(1, min(n - 1, d))]
    gamma = min(n, d) / max(n, d)
    edge = float(np.median(lam)) * (1 + math.sqrt(gamma)) ** 2
    return participation_ratio(lam[lam > edge])


def twonn_dimension(x, discard_fraction: float = 0.0) -> float:
    """TwoNN intrinsic dimension (Facco et al. 2017), maximum-likelihood form ``d = n / sum log(r2 / r1)``.

    ``x`` is ``[N, d]``; points with a duplicate (r1 = 0) are dropped. ``discard_fraction`` drops the largest
    ratios (the original paper discards 10 %; the default keeps all, like the MLE in the reviewer notebook).
    """
    if isinstance(x, RunningStats):
        raise ValueError("TwoNN needs the points themselves (nearest-neighbour distances), not running statistics; "
                         "capture the states with reduce=None or use method='participation_ratio'")
    arr = _as_matrix(x)
    if arr.shape[0] < 3:
        raise ValueError("TwoNN needs at least 3 points")
    dist, _ = NearestNeighbors(n_neighbors=3).fit(arr).kneighbors(arr)
    r1, r2 = dist[:, 1], dist[:, 2]
    keep = r1 > 0
    mu = np.sort(r2[keep] / r1[keep])
    if discard_fraction:
        mu = mu[: max(1, int(len(mu) * (1 - discard_fraction)))]
    logs = np.log(mu)
    if len(mu) == 0 or logs.sum() <= 0:
        raise ValueError("TwoNN is undefined here: every point has a duplicate or equidistant neighbours")
    return float(len(mu) / logs.sum())


def effective_dimensionality(x, method: str = "participation_ratio", variance_threshold: float = 0.90) -> float:
    """dim_eff of one set of states: a matrix ``[N, d]`` (one row per item) or a :class:`RunningStats`.

    Methods: ``participation_ratio`` (v2 Def. 3, default), ``threshold`` (v1: count for ``variance_threshold``
    of the variance), ``mp_participation_ratio`` (Marchenko-Pastur corrected), ``twonn`` (matrix only).
    PR is capped near N - 1 because the sample covariance has rank <= N - 1.
    """
    if method not in DIM_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(DIM_METHODS)}")
    if method == "twonn":
        return twonn_dimension(x)
    lam, n, d = covariance_spectrum(x)
    if method == "participation_ratio":
        return participation_ratio(lam)
    if method == "threshold":
        return float(threshold_count(lam, variance_threshold))
    return mp_participation_ratio(lam, n, d)


@dataclass
class LayeredDimensionality:
    """dim_eff per layer plus the trace-weighted aggregate ``sum_l w_l d^(l)``, ``w_l = tr C_l / sum tr C``.

    ``table`` has one row per layer: ``layer``, ``dim_eff``, ``trace`` (total variance), ``weight``.
    """

    method: str
    table: pd.DataFrame
    aggregate: float


def _trace(x) -> float:
    if isinstance(x, RunningStats):
        return float(torch.diagonal(x.cov).sum())
    arr = _as_matrix(x)
    return float(arr.var(0, ddof=1).sum())


def layered_dimensionality(layers: Mapping, method: str = "participation_ratio",
                           variance_threshold: float = 0.90) -> LayeredDimensionality:
    """Per-layer dim_eff and the variance-weighted aggregate (v2 Def. 4) of ``{layer: matrix | RunningStats}``.

    If every layer has the same dim_eff, the aggregate equals it; scaling one layer's data by c changes only its
    weight (proportional to c^2).
    """
    if not layers:
        raise ValueError("no layers given: pass {layer: [N, d] matrix or RunningStats}")
    rows = [{"layer": k, "dim_eff": effective_dimensionality(v, method, variance_threshold), "trace": _trace(v)}
            for k, v in layers.items()]
    table = pd.DataFrame(rows)
    total = table["trace"].sum()
    if total <= 0:
        raise ValueError("every layer has zero variance: all items have the same state")
    table["weight"] = table["trace"] / total
    return LayeredDimensionality(method, table, float((table["weight"] * table["dim_eff"]).sum()))


def global_threshold_dimensionality(layers: Mapping, variance_threshold: float = 0.90) -> int:
    """v1 "global dim_eff": the 90 %-variance count of all layers' states stacked as extra rows.

    With :class:`RunningStats` the per-layer accumulators are merged, which is exactly the stacked matrix's
    covariance. With matrices they are concatenated along the item axis.
    """
    values = list(layers.values())
    if not values:
        raise ValueError("no layers given")
    if all(isinstance(v, RunningStats) for v in values):
        merged = RunningStats()
        for v in values:
            merged.merge(v)
        lam, _, _ = covariance_spectrum(merged)
    else:
        lam, _, _ = covariance_spectrum(np.concatenate([_as_matrix(v) for v in values], 0))
    return threshold_count(lam, variance_threshold)


# ---------------------------------------------------------------------------------------------------------------
# Recoverability
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RecoverabilityResult:
    """Outcome of :func:`recoverability`. ``auroc`` is out-of-fold (cv5) or test-set (split) AUROC."""

    protocol: str
    auroc: float
    ci_low: float
    ci_high: float
    shuffled_auroc: float | None
    n: int
    n_positive: int
    n_splits: int | None = None
    C: float | None = None
    train_auroc: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _features(features) -> np.ndarray:
    x = features.detach().to("cpu", torch.float64).numpy() if isinstance(features, torch.Tensor) else \
        np.asarray(features, np.float64)
    if x.ndim > 2:  # [N, layers, d] -> vec(I) = concatenated layers
        x = x.reshape(x.shape[0], -1)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, d] or [N, layers, d], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features hold NaN or Inf")
    return x


def _probe(C: float, seed: int):
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, solver="lbfgs", max_iter=1000, random_state=seed))


def _cv_scores(x: np.ndarray, y: np.ndarray, n_splits: int, C: float, seed: int) -> np.ndarray:
    oof = np.zeros(len(y))
    for train, test in StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(x, y):
        oof[test] = _probe(C, seed).fit(x[train], y[train]).predict_proba(x[test])[:, 1]
    return oof


def _split_scores(x: np.ndarray, y: np.ndarray, seed: int, c_grid) -> tuple[np.ndarray, np.ndarray, float, float]:
    idx = np.arange(len(y))
    train, rest = train_test_split(idx, test_size=0.4, stratify=y, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=seed)
    for part, name in ((train, "train"), (val, "validation"), (test, "test")):
        if len(np.unique(y[part])) < 2:
            raise ValueError(f"the {name} split holds a single class; use protocol='cv5' for so few positives")
    best = max(c_grid, key=lambda c: auroc(y[val],
                                           _probe(c, seed).fit(x[train], y[train]).predict_proba(x[val])[:, 1]))
    model = _probe(best, seed).fit(x[train], y[train])
    return model.predict_proba(x[test])[:, 1], y[test], best, auroc(y[train], model.predict_proba(x[train])[:, 1])


def recoverability(features, labels, protocol: str = "cv5", C: float = 1.0, n_boot: int = 1000, seed: int = 42,
                   shuffle_control: bool = True, c_grid=C_GRID) -> RecoverabilityResult:
    """Recov(I; Z): how well a standardised logistic probe recovers binary ``labels`` from ``features``.

    Args:
        features: ``[N, d]`` or ``[N, layers, d]`` (layers are concatenated: vec(I)).
        labels: ``[N]`` binary (e.g. answer correctness).
        protocol: ``"cv5"`` (authors' code, default): StratifiedKFold(5, shuffle, seed), C = ``C``, AUROC of the
            out-of-fold probabilities over all N items; folds drop to the minority-class count (with a warning)
            when a class has fewer than 5 items. ``"split"`` (paper text): 60/20/20 stratified split, C from
            ``c_grid`` by validation AUROC, test AUROC reported (and ``train_auroc`` to show overfitting).
        n_boot: bootstrap resamples of the evaluated scores for the 95 % CI (percentiles 2.5 / 97.5).
        shuffle_control: also run the same protocol on permuted labels (should give about 0.5).

    Raises ``ValueError`` when the labels hold a single class or the minority class has fewer than 2 items.
    """
    if protocol not in ("cv5", "split"):
        raise ValueError(f"protocol={protocol!r}: use 'cv5' (authors' code) or 'split' (paper's 60/20/20)")
    x = _features(features)
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if y.ndim != 1 or len(y) != x.shape[0]:
        raise ValueError(f"labels must be [N] with N = {x.shape[0]} (the number of feature rows), got {y.shape}")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) != 2:
        raise ValueError(f"recoverability needs exactly 2 classes, got {len(classes)} ({classes.tolist()[:5]}); "
                         "a single class (e.g. 0 % or 100 % accuracy) leaves nothing to predict")
    y = (y == classes[1]).astype(int)
    minority = int(counts.min())
    if minority < 2:
        raise ValueError(f"the minority class has {minority} item; a probe needs at least 2 per class")
    rng = np.random.default_rng(seed)
    if protocol == "cv5":
        n_splits = min(5, minority)
        if n_splits < 5:
            warnings.warn(f"only {minority} items in the minority class: using {n_splits} folds instead of 5",
                          stacklevel=2)
        scores = _cv_scores(x, y, n_splits, C, seed)
        value = auroc(y, scores)
        lo, hi = bootstrap_ci((y, scores), "auroc", n_resamples=n_boot, seed=seed)
        shuffled = None
        if shuffle_control:
            perm = rng.permutation(y)
            shuffled = auroc(perm, _cv_scores(x, perm, n_splits, C, seed))
        return RecoverabilityResult("cv5", value, lo, hi, shuffled, len(y), int(y.sum()), n_splits=n_splits, C=C)
    scores, y_test, best, train_auc = _split_scores(x, y, seed, c_grid)
    value = auroc(y_test, scores)
    lo, hi = bootstrap_ci((y_test, scores), "auroc", n_resamples=n_boot, seed=seed)
    shuffled = None
    if shuffle_control:
        perm = rng.permutation(y)
        s_scores, s_y, _, _ = _split_scores(x, perm, seed, c_grid)
        shuffled = auroc(s_y, s_scores)
    return RecoverabilityResult("split", value, lo, hi, shuffled, len(y), int(y.sum()), C=best,
                                train_auroc=train_auc)
