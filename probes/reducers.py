"""Running statistics computed inside capture hooks, so large captures never need the activations in memory."""
from __future__ import annotations

import torch


class RunningStats:
    """Exact running mean and covariance of rows ``[n, d]``, mergeable across batches (Chan et al. 1979).

    Accumulates in float64. ``cov`` is the sample covariance (divides by ``n - 1``) ``[d, d]``; ``mean`` is ``[d]``.
    """

    def __init__(self, dim: int | None = None, covariance: bool = True):
        self.n = 0
        self.covariance = covariance
        self._mean = None if dim is None else torch.zeros(dim, dtype=torch.float64)
        self._m2 = None  # sum of outer products of deviations [d, d]

    def update(self, rows: torch.Tensor) -> "RunningStats":
        """Add rows ``[n, d]`` (any leading shape is flattened into rows)."""
        x = rows.detach().reshape(-1, rows.shape[-1]).to(device="cpu", dtype=torch.float64)
        if x.shape[0] == 0:
            return self
        other = RunningStats(covariance=self.covariance)
        other.n = x.shape[0]
        other._mean = x.mean(0)
        if self.covariance:
            xc = x - other._mean
            other._m2 = xc.T @ xc
        return self.merge(other)

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Fold another accumulator into this one (exact, order-independent up to float64 rounding)."""
        if other.n == 0:
            return self
        if self.n == 0:
            self.n, self._mean, self._m2 = other.n, other._mean.clone(), None if other._m2 is None else other._m2.clone()
            return self
        if self._mean.shape != other._mean.shape:
            raise ValueError(f"cannot merge statistics of dim {self._mean.shape[0]} and {other._mean.shape[0]}")
        n = self.n + other.n
        delta = other._mean - self._mean
        mean = self._mean + delta * (other.n / n)
        if self.covariance:
            self._m2 = self._m2 + other._m2 + torch.outer(delta, delta) * (self.n * other.n / n)
        self.n, self._mean = n, mean
        return self

    @property
    def mean(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no rows were accumulated")
        return self._mean

    @property
    def cov(self) -> torch.Tensor:
        if not self.covariance:
            raise ValueError("this accumulator was built with covariance=False")
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 rows, got {self.n}")
        return self._m2 / (self.n - 1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"n": torch.tensor(self.n), "mean": self.mean}
        if self.covariance:
            out["m2"] = self._m2
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "RunningStats":
        obj = cls(covariance="m2" in state)
        obj.n, obj._mean, obj._m2 = int(state["n"]), state["mean"], state.get("m2")
        return obj
