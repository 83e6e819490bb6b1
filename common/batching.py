"""The one way to cut ``n`` items into batches: :func:`batch_starts` checks the batch size first."""
from __future__ import annotations

import numbers

from .errors import UserError


class BatchSizeError(UserError, ValueError):
    """A batch size that is not a positive integer (0 used to crash ``range``; a negative one did nothing)."""


def batch_starts(n: int, batch_size: int, what: str = "batch_size") -> range:
    """Start indices ``0, batch_size, 2 * batch_size, ... < n``; raises :class:`BatchSizeError` unless
    ``batch_size`` is an integer >= 1 (``what`` names the argument or option in the message)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise BatchSizeError(f"{what}={batch_size!r}: use a positive whole number of items per batch")
    return range(0, n, int(batch_size))
