"""``Block``: what a ``with hiddenlens.capture(...)`` or ``with hiddenlens.edit(...)`` block shares.

A block opens in the run context of the thread that enters it (:mod:`hiddenlens.probes.context`), asks the
handle's backend to make its sites available (``backend.attach``), and follows the forward passes of that context:
``begin_forward`` is called at the start of each one with the absolute offset of its first token and its 2-D
attention mask, so reads and edits address absolute positions, also under the KV cache. A forward that starts at
offset 0 starts a new *run* (a prompt pass plus its decode steps).
"""
from __future__ import annotations

from typing import Callable

import torch

from . import context
from .sites import Site, resolve_sites


class Block:
    """Base of reads (:class:`~hiddenlens.probes.capture.Capture`) and edits (:class:`~hiddenlens.probes.edit.Edit`)."""

    #: True for edits (the dispatcher applies them before any read at the same site)
    writes = False

    def __init__(self, handle, sites):
        self.handle = handle
        adapter = handle.adapter
        self.sites: list[Site] = resolve_sites(sites, adapter.n_layers, adapter.unavailable)
        self.site_set = frozenset(self.sites)
        self.grad = False
        self.n_forwards = 0
        self.run = -1
        self.offset = 0
        self.length: int | None = None
        self.mask: torch.Tensor | None = None
        self.row_ids: dict[int, list[int]] = {}
        self._pending_rows: list[int] | None = None
        self._detach: Callable[[], None] | None = None

    # ---- called by the handle and the backends ---------------------------------------------------------------
    def set_rows(self, rows: list[int]) -> None:
        """Tell the block which prompt indices the next run covers (``handle.run`` / ``generate`` do this)."""
        self._pending_rows = list(rows)

    def begin_forward(self, offset: int, attention_mask: torch.Tensor | None = None,
                      length: int | None = None) -> None:
        """A forward pass of ``length`` input positions starts whose first one sits at absolute position
        ``offset``; ``attention_mask`` ``[batch, offset + length]`` (None: no padding)."""
        if offset == 0 or self.run < 0:
            self.run += 1
            if self._pending_rows is not None:
                self.row_ids[self.run] = self._pending_rows
                self._pending_rows = None
            self.on_new_run(attention_mask)
        self.offset = int(offset)
        self.mask = attention_mask
        self.length = length
        self.n_forwards += 1

    def on_new_run(self, attention_mask: torch.Tensor | None) -> None:
        """Hook for subclasses: a run (offset 0) starts."""

    def padding_free(self, batch: int, length: int, device) -> torch.Tensor | None:
        """``[batch, length]`` bool: which entries of the running forward are real tokens (None: all are)."""
        if self.mask is None:
            return None
        return self.mask[:, -length:].to(device=device, dtype=torch.bool).expand(batch, length)

    # ---- context manager --------------------------------------------------------------------------------------
    def open(self) -> None:
        context.enter(self.handle, self)
        try:
            self._detach = self.handle.backend.attach(self)
        except BaseException:
            context.leave(self.handle, self)
            raise

    def close(self) -> None:
        try:
            if self._detach is not None:
                self._detach()
                self._detach = None
        finally:
            context.leave(self.handle, self)
