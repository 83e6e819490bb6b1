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

An index that no forward of a run reaches (``positions=100`` on a 5-token prompt that is not followed by 95 decode
steps, ``-6`` on 5 tokens) raises :class:`PositionError` naming the index and the sequence length
(:class:`PositionRange` keeps the account); it never yields an empty or partial result.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from hiddenlens.common.errors import UserError

Positions = None | str | int | slice | Iterable[int] | torch.Tensor


class PositionError(UserError, IndexError):
    """A requested position lies outside every forward of a run (the sequence is shorter)."""


def check_positions(spec: Positions) -> None:
    """Fail at block entry (not mid-forward) on a spec that is none of the forms above."""
    if isinstance(spec, slice):
        if spec.step is not None and (not isinstance(spec.step, int) or spec.step < 1):
            raise ValueError(f"positions={spec!r}: a slice of positions needs a positive step")
        return
    if isinstance(spec, torch.Tensor):
        if spec.dtype == torch.bool:
            return
        if spec.ndim != 1 or spec.is_floating_point() or spec.is_complex() or spec.numel() == 0:
            raise ValueError(f"positions as a tensor (shape {tuple(spec.shape)}, {spec.dtype}): a bool [batch, pos] "
                             "mask or a non-empty 1-D integer tensor of indices")
        return
    if spec is None or isinstance(spec, int) and not isinstance(spec, bool):
        return
    if isinstance(spec, str):
        if spec not in ("all", "last"):
            raise ValueError(f"positions={spec!r}: use 'all', 'last', indices, a slice or a bool [batch, pos] mask")
        return
    if isinstance(spec, Iterator):
        raise ValueError(f"positions={spec!r}: pass the indices as a list or tuple, not a one-shot iterator")
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


def explicit_indices(spec: Positions) -> list[int]:
    """The integer indices a spec names (none for ``None``, ``"all"``, ``"last"``, slices and bool masks)."""
    if spec is None or isinstance(spec, (str, slice)):
        return []
    if isinstance(spec, torch.Tensor):
        return [] if spec.dtype == torch.bool else [int(i) for i in spec.tolist()]
    return [spec] if isinstance(spec, int) else [int(i) for i in spec]


class PositionRange:
    """Which explicit indices each run asked for and whether a forward of that run held them.

    ``note`` is called with each forward's spec, offset and length (a spec may change between forwards); ``verify``
    raises :class:`PositionError` for an index no forward of its run reached.
    """

    def __init__(self):
        self.asked: dict[int, dict[int, bool]] = {}
        self.length: dict[int, int] = {}

    def note(self, spec: Positions, run: int, offset: int, length: int) -> None:
        idx = explicit_indices(spec)
        if not idx:
            return
        end = offset + length
        self.length[run] = max(self.length.get(run, 0), end)
        asked = self.asked.setdefault(run, {})
        for i in idx:
            j = i if i >= 0 else end + i
            asked[i] = asked.get(i, False) or offset <= j < end

    def verify(self, spec: Positions) -> None:
        for run, asked in self.asked.items():
            missed = [i for i, hit in asked.items() if not hit]
            if missed:
                n = self.length[run]
                raise PositionError(
                    f"positions={spec!r}: position {missed[0]} is outside the input, whose sequence has {n} "
                    f"token(s) (positions 0..{n - 1}, or -{n}..-1 from the end); pass positions that exist in "
                    "every prompt (batches are left-padded to their longest prompt)")
