"""Which positions of a forward pass a read or an edit touches: one rule for both.

Positions are **absolute** (counted from the first token of the sequence, also under the KV cache, where a decode
step's single token sits at position ``offset``). A spec is one of:

``None`` / ``"all"``   every position of every forward
``"last"``             the last position of every forward (the prompt's last token, then each decode step)
``int`` / list         absolute indices; negative ones count from the end of each forward's input
``slice``              a slice over absolute positions (``slice(5, None)``: position 5 and everything after)
bool ``[batch, pos]``  a mask over the input of a single forward (reads: rows are flattened to ``[n_tokens, ...]``)

Padding (left padding of a batch, from the attention mask) is never edited; reads keep it (the attention mask
tells which entries are real).
"""
from __future__ import annotations

from typing import Iterable

import torch

Positions = None | str | int | slice | Iterable[int] | torch.Tensor


def check_positions(spec: Positions) -> None:
    """Fail at block entry (not mid-forward) on a spec that is none of the forms above."""
    if spec is None or isinstance(spec, (slice, int, torch.Tensor)) and not isinstance(spec, bool):
        if isinstance(spec, torch.Tensor) and spec.dtype != torch.bool and spec.ndim != 1:
            raise ValueError("positions as a tensor: a bool [batch, pos] mask or a 1-D tensor of indices")
        return
    if isinstance(spec, str):
        if spec not in ("all", "last"):
            raise ValueError(f"positions={spec!r}: use 'all', 'last', indices, a slice or a bool [batch, pos] mask")
        return
    try:
        idx = list(spec)
    except TypeError:
        raise ValueError(f"positions={spec!r}: use 'all', 'last', indices, a slice or a bool mask") from None
    if not idx or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise ValueError(f"positions={spec!r}: a list of positions must hold at least one int")


def select(spec: Positions, offset: int, length: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Local indices (into this forward's position axis) of the positions ``spec`` keeps, or None for all of them,
    plus their absolute positions. Bool masks are handled by the caller (they are not positional)."""
    absolute = torch.arange(offset, offset + length)
    if spec is None or (isinstance(spec, str) and spec == "all"):
        return None, absolute
    if isinstance(spec, str):  # "last"
        return torch.tensor([length - 1]), absolute[-1:]
    if isinstance(spec, slice):
        keep = torch.arange(0, offset + length)[spec]
    else:
        idx = [spec] if isinstance(spec, int) else [int(i) for i in spec]
        keep = torch.tensor([i if i >= 0 else offset + length + i for i in idx], dtype=torch.long)
    local = keep[(keep >= offset) & (keep < offset + length)] - offset
    return local, absolute[local]
