"""Shared statistics, implemented once (``hiddenlens.common.stats``).

Bottom layer of the import stack: imports numpy, pandas, scipy, scikit-learn and torch, never another
``hiddenlens`` subpackage.

Distributions (torch; every function reduces over the **last axis** and broadcasts the others):

* :func:`log_probs` -- ``log_softmax`` in at least float32.
* :func:`kl_divergence`, :func:`js_divergence`, :func:`entropy` -- from logits by default; pass
  ``from_log_probs=True`` when the inputs already are log-probabilities (e.g. the output of :func:`log_probs`,
  reused for several statistics). Units: nats (``entropy`` takes a ``base``).

Classification and intervals (numpy):

* :func:`auroc` -- ``sklearn.metrics.roc_auc_score``; argument order ``(labels, scores)`` as in scikit-learn.
* :func:`bootstrap_ci` -- ``scipy.stats.bootstrap`` (percentile interval by default; paired data as a tuple).
* :func:`wilson_ci` -- Wilson score interval of a proportion through ``scipy.stats.binomtest``.

Reports:

* :func:`markdown_table` -- ``pandas.DataFrame.to_markdown`` with cells made safe for one table row.
"""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Callable, Literal

import numpy as np
import pandas as pd
import scipy.stats
import torch
from sklearn.metrics import roc_auc_score

__all__ = ["log_probs", "kl_divergence", "js_divergence", "entropy", "auroc", "bootstrap_ci", "wilson_ci",
           "markdown_table"]


# ---------------------------------------------------------------------------------------------------------------
# Distributions over the last axis
# ---------------------------------------------------------------------------------------------------------------
def log_probs(logits) -> torch.Tensor:
    """Log-probabilities ``log_softmax(logits)`` over the last axis.

    Args:
        logits: tensor (or array) ``[..., vocab]``, any float dtype.

    Returns:
        ``[..., vocab]`` on the input's device, float32 (float16 / bfloat16 / float32 inputs) or float64
        (float64 inputs are kept, so double-precision callers stay in double). Natural log (nats).
    """
    x = torch.as_tensor(logits)
    if x.dtype != torch.float64:
        x = x.float()
    return torch.log_softmax(x, dim=-1)


def _as_log_probs(x, from_log_probs: bool) -> torch.Tensor:
    if from_log_probs:
        return torch.as_tensor(x)
    return log_probs(x)


def _plogp_diff(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``p (log p - log q)`` elementwise, with the ``0 log 0 = 0`` convention (p = 0 terms are 0)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))


def kl_divergence(p, q, *, from_log_probs: bool = False) -> torch.Tensor:
    """Kullback-Leibler divergence ``KL(P || Q) = sum_i p_i (log p_i - log q_i)`` over the last axis, in nats.

    Args:
        p, q: logits ``[..., vocab]`` of P and Q (broadcastable against each other), or log-probabilities of P
            and Q when ``from_log_probs=True``.
        from_log_probs: the inputs are already normalised log-probabilities (e.g. from :func:`log_probs`).

    Returns:
        ``[...]`` (the broadcast shape without the last axis), >= 0 (rounding below 0 is clamped). Terms with
        ``p_i = 0`` contribute 0; ``q_i = 0 < p_i`` gives ``inf``.
    """
    logp, logq = _as_log_probs(p, from_log_probs), _as_log_probs(q, from_log_probs)
    return _plogp_diff(logp, logq).sum(-1).clamp_min(0.0)


def js_divergence(p, q, *, from_log_probs: bool = False) -> torch.Tensor:
    """Jensen-Shannon divergence ``0.5 KL(P || M) + 0.5 KL(Q || M)`` with ``M = (P + Q) / 2``, over the last axis.

    Args:
        p, q: logits ``[..., vocab]`` (broadcastable), or log-probabilities when ``from_log_probs=True``.

    Returns:
        ``[...]`` in nats, in ``[0, ln 2]``; symmetric in ``p`` and ``q``.
    """
    logp, logq = _as_log_probs(p, from_log_probs), _as_log_probs(q, from_log_probs)
    logp, logq = torch.broadcast_tensors(logp, logq)
    logm = torch.logsumexp(torch.stack([logp, logq]), 0) - math.log(2)
    js = 0.5 * _plogp_diff(logp, logm).sum(-1) + 0.5 * _plogp_diff(logq, logm).sum(-1)
    return js.clamp(0.0, math.log(2))


def entropy(x, base: float = math.e, *, from_log_probs: bool = False) -> torch.Tensor:
    """Shannon entropy ``-sum_i p_i log p_i`` over the last axis.

    Args:
        x: logits ``[..., vocab]``, or log-probabilities when ``from_log_probs=True`` (``-inf`` entries, i.e.
            zero probabilities, are allowed and contribute 0).
        base: logarithm base of the result: ``math.e`` (default) gives nats, ``2`` bits.

    Returns:
        ``[...]`` in units of ``log(base)``, >= 0 (rounding below 0 is clamped); at most ``log(vocab)``.
    """
    logp = _as_log_probs(x, from_log_probs)
    p = logp.exp()
    h = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    if base != math.e:
        h = h / math.log(base)
    return h.clamp_min(0.0)


# ---------------------------------------------------------------------------------------------------------------
# AUROC
# ---------------------------------------------------------------------------------------------------------------
def auroc(labels, scores, *, single_class: Literal["raise", "nan"] = "raise") -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (``sklearn.metrics.roc_auc_score``).

    Argument order as in scikit-learn: **labels first**. Ties count one half (constant scores give 0.5); the
    larger label value (``True`` / ``1``) is the positive class.

    Args:
        labels: ``[n]`` binary labels (bool or two distinct values).
        scores: ``[n]`` real scores, higher = more positive.
        single_class: what to do when ``labels`` hold one class (the AUROC is undefined): ``"raise"``
            (default) a ``ValueError``, ``"nan"`` return NaN (for tables over many groups, bootstrap resamples).

    Returns:
        AUROC in ``[0, 1]`` (a float).
    """
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).ravel()
    s = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must have the same length")
    classes = np.unique(y)
    if len(classes) > 2:
        raise ValueError(f"AUROC needs binary labels, got {len(classes)} classes ({classes.tolist()[:5]})")
    if len(classes) < 2:
        if single_class == "nan":
            return float("nan")
        raise ValueError(f"AUROC needs both classes among the labels; all {len(y)} labels are "
                         f"{classes.tolist()[0] if len(classes) else 'absent'}")
    return float(roc_auc_score(y, s))


def _auroc_by_ranks(positive, scores, axis: int = -1) -> np.ndarray:
    """AUROC of ``scores`` for boolean ``positive`` along ``axis`` (Mann-Whitney U over average ranks: equal to
    ``roc_auc_score``, ties one half), NaN where one class is absent. Vectorized: one call scores every
    bootstrap resample ``[resamples, n]``."""
    positive = np.asarray(positive, dtype=bool)
    ranks = scipy.stats.rankdata(scores, axis=axis)
    n_pos = positive.sum(axis=axis)
    n_neg = positive.shape[axis] - n_pos
    u = np.where(positive, ranks, 0.0).sum(axis=axis) - n_pos * (n_pos + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


# ---------------------------------------------------------------------------------------------------------------
# Confidence intervals
# ---------------------------------------------------------------------------------------------------------------
_BOOTSTRAP_RNG_KW = "rng" if "rng" in inspect.signature(scipy.stats.bootstrap).parameters else "random_state"


def bootstrap_ci(data, statistic: Callable | str = np.mean, level: float = 0.95, n_resamples: int = 1000,
                 seed: int = 0, method: Literal["percentile", "basic", "BCa"] = "percentile"
                 ) -> tuple[float, float]:
    """Bootstrap confidence interval of ``statistic(data)`` through ``scipy.stats.bootstrap``.

    Args:
        data: one sample ``[n]`` (array-like), or a tuple of equally long samples that are resampled **jointly**
            (paired, e.g. ``(labels, scores)``); ``statistic`` then takes them as separate arguments.
        statistic: ``f(sample) -> float`` (or ``f(*samples)``). Default ``np.mean``. The string ``"auroc"``
            selects :func:`auroc` on ``(labels, scores)``, NaN on resamples holding a single class.
        level: confidence level (0.95 = 95 %).
        n_resamples: bootstrap resamples.
        seed: seed of the resampling (``numpy.random.default_rng(seed)``): same seed and data, same interval.
        method: ``"percentile"`` (default, the quantiles of the bootstrap distribution), ``"basic"`` or
            ``"BCa"`` (scipy's bias-corrected and accelerated interval).

    Returns:
        ``(low, high)`` in the units of the statistic; ``(nan, nan)`` for fewer than 2 observations. Resamples
        where the statistic is NaN (undefined, e.g. a one-class AUROC resample) are dropped (percentile method).

    Raises:
        ValueError: samples of different lengths, or the statistic is undefined on every resample.
    """
    paired = isinstance(data, tuple)
    samples = tuple(np.asarray(d.cpu() if isinstance(d, torch.Tensor) else d) for d in (data if paired else (data,)))
    n = len(samples[0])
    if any(len(s) != n for s in samples):
        raise ValueError(f"paired samples must have the same length, got {[len(s) for s in samples]}")
    vectorized = False
    if isinstance(statistic, str):
        if statistic != "auroc" or len(samples) != 2:
            raise ValueError(f"statistic={statistic!r}: pass a callable, or 'auroc' with data=(labels, scores)")
        labels, scores = samples
        classes = np.unique(labels)
        if len(classes) > 2:
            raise ValueError(f"AUROC needs binary labels, got {len(classes)} classes ({classes.tolist()[:5]})")
        samples = (labels == classes[-1], scores.astype(np.float64))  # the larger label value is positive
        statistic, vectorized = _auroc_by_ranks, True
    if n < 2:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        if method == "percentile":  # NaN resamples are handled below; scipy warns about them in BCa terms
            warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
        res = scipy.stats.bootstrap(samples, statistic, n_resamples=n_resamples, paired=paired,
                                    vectorized=vectorized, confidence_level=level, method=method,
                                    **{_BOOTSTRAP_RNG_KW: np.random.default_rng(seed)})
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    if np.isnan(dist).all():
        raise ValueError("the statistic is undefined (NaN) on every bootstrap resample")
    if np.isnan(dist).any() and method == "percentile":
        alpha = (1 - level) / 2
        return float(np.nanpercentile(dist, 100 * alpha)), float(np.nanpercentile(dist, 100 * (1 - alpha)))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def wilson_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n`` (``scipy.stats.binomtest(k, n).proportion_ci``).

    Args:
        k: successes, ``0 <= k <= n``.
        n: trials.
        level: confidence level (0.95 = 95 %).

    Returns:
        ``(low, high)`` within ``[0, 1]``; ``(nan, nan)`` when ``n == 0``.
    """
    if n == 0:
        return float("nan"), float("nan")
    ci = scipy.stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


# ---------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------
def _cell(v, floatfmt: str) -> str:
    text = format(v, floatfmt) if isinstance(v, (float, np.floating)) else str(v)
    return text.replace("\r\n", "\n").replace("|", "\\|").replace("\n", "<br>")


def markdown_table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A GitHub-flavoured (pipe) Markdown table of ``df`` through ``DataFrame.to_markdown`` (no index).

    Floats (Python and numpy) are formatted with ``floatfmt``; every other cell with ``str``. In cells and headers
    ``|`` is escaped (``\\|``) and newlines become ``<br>``, so every row of ``df`` stays one table row.
    """
    cells = pd.DataFrame([[_cell(v, floatfmt) for v in row] for row in df.itertuples(index=False)],
                         columns=[_cell(c, floatfmt) for c in df.columns], dtype=object)
    return cells.to_markdown(index=False, disable_numparse=True)
