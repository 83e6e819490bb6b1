"""Backends (``hiddenlens.probes.backends``): one protocol, one module per way of running a model.

Every backend implements :class:`Backend`: ``tap`` (make a capture's sites readable), ``edit`` (make an edit's
sites writable), ``forward`` and ``generate``. A handle holds exactly one backend object; nothing outside this
package asks which backend a handle has. A backend that cannot do something raises :class:`BackendError` naming
itself and what it lacks.

``hf``                native transformers modules with PyTorch hooks (:mod:`.hf`)
``transformer_lens``  a TransformerBridge over the same weights, through its hook points (:mod:`.transformer_lens`)
``nnsight``           an nnsight model over the same modules, reads and edits inside its traces (:mod:`.nnsight`)
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from .errors import BackendError
from .hf import HFBackend

BACKENDS = ("hf", "transformer_lens", "nnsight")


class Backend(Protocol):
    """What a handle needs from a backend. ``batch`` is a :class:`~hiddenlens.probes.handle.Batch`."""

    name: str

    @property
    def model(self) -> torch.nn.Module:
        """The torch module this backend runs (HF model, TransformerBridge, nnsight model)."""

    def tap(self, block) -> Callable[[], None]:
        """Make ``block.sites`` readable for a capture; returns the function that undoes it."""

    def edit(self, block) -> Callable[[], None]:
        """Make ``block.sites`` writable for an edit; returns the function that undoes it."""

    def forward(self, batch, logits: bool, stop_after: int | None, **kwargs) -> torch.Tensor | None:
        """One forward pass; logits ``[batch, pos, vocab]`` or None. ``stop_after``: the run may end after that
        block (every open block's sites lie at or before it and no logits are wanted)."""

    def generate(self, batch, max_new_tokens: int, do_sample: bool, output_scores: bool, streamer=None,
                 **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decode with the KV cache; returns ``sequences [batch, prompt + new]`` and per-step scores."""


def make_backend(name: str, handle) -> Backend:
    """The backend object ``name`` for ``handle`` (imports transformer_lens / nnsight only when asked for)."""
    if name == "hf":
        return HFBackend(handle)
    if name == "transformer_lens":  # heavy optional dependency: imported on use
        from .transformer_lens import TransformerLensBackend
        return TransformerLensBackend(handle)
    if name == "nnsight":  # heavy optional dependency: imported on use
        from .nnsight import NNsightBackend
        return NNsightBackend(handle)
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


__all__ = ["BACKENDS", "Backend", "BackendError", "make_backend"]
