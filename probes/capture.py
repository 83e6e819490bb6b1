"""``hiddenlens.capture``: record chosen sites of any backend into an :class:`ActivationCache`.

    with hiddenlens.capture(handle, ["blocks.*.resid_post", "blocks.3.attn.pattern"], positions="last") as cache:
        handle.run(["The capital of France is"])          # or handle.model(**inputs), handle.generate(...)
    cache["blocks.5.resid_post"]                           # [batch, pos, d_model]

Every requested site must fire at least once, hooks are removed in ``finally`` (also when the block raises), and
the block runs under ``torch.inference_mode()`` unless ``grad=True``.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .block import Block
from .positions import PositionRange, Positions, check_positions, select
from .reducers import RunningStats
from .sites import Site, resolve_sites


class HookNotFiredError(RuntimeError):
    """A requested site never produced a tensor during the capture block."""


class NonFiniteActivationError(FloatingPointError):
    """A captured tensor held NaN or Inf."""


@dataclass
class Chunk:
    """One forward pass's slice of a site: ``value`` and the absolute position of its first entry."""

    value: Any
    offset: int
    run: int
    positions: torch.Tensor | None  # absolute positions kept along the pos axis (None when rows were flattened)


def _pos_axis(site: Site) -> int:
    return 2 if site.per_head else 1


class ActivationCache:
    """What a capture block recorded. ``cache[site]`` assembles the chunks of every forward pass.

    Assembly rules: the chunks of one run (a prompt pass plus, during ``generate``, one pass per new token) are
    concatenated along the position axis, so they hold absolute positions in order; attention patterns are
    zero-padded on the key axis (the causal zeros) so prompt and decode steps stack into one matrix. Several runs
    (batches) are stacked along the batch axis, left-padded with zeros to a common length, in prompt order when
    they came from ``handle.run`` / ``handle.generate``.
    """

    def __init__(self, sites: list[Site], n_layers: int):
        self.sites = sites
        self.n_layers = n_layers
        self._chunks: dict[str, list[Chunk]] = defaultdict(list)
        self.stats: dict[str, RunningStats] = {}
        self.fire_counts: dict[str, int] = {s.name: 0 for s in sites}
        self.row_ids: dict[int, list[int]] = {}
        self.attention_masks: dict[int, torch.Tensor] = {}
        self._by_name = {s.name: s for s in sites}

    # ---- access --------------------------------------------------------------------------------------
    def _site(self, name: str) -> Site:
        """Look a site up by name or alias (``blocks.-1.resid_post``, ``blocks.5.hook_resid_post``)."""
        if name in self._by_name:
            return self._by_name[name]
        resolved = resolve_sites(name, self.n_layers)
        if len(resolved) == 1 and resolved[0].name in self._by_name:
            return self._by_name[resolved[0].name]
        raise KeyError(f"{name!r} was not captured; captured sites: {', '.join(self._by_name)}")

    def keys(self):
        return list(self._by_name)

    def __repr__(self) -> str:
        kept = sum(1 for n in self._by_name if self._chunks.get(n))
        return (f"ActivationCache({len(self._by_name)} sites, {kept} with tensors, {len(self.stats)} reduced, "
                f"{len(self.row_ids) or 1} run(s))")

    def __contains__(self, name: str) -> bool:
        try:
            self._site(name)
            return True
        except Exception:
            return False

    def __iter__(self):
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def chunks(self, name: str) -> list[Chunk]:
        """The raw per-forward chunks of a site, in the order they were recorded."""
        return self._chunks[self._site(name).name]

    def __getitem__(self, name: str) -> torch.Tensor:
        site = self._site(name)
        if site.name in self.stats and not self._chunks.get(site.name):
            raise KeyError(f"{site.name} was reduced to running statistics: use cache.stats[{site.name!r}]")
        chunks = self._chunks.get(site.name)
        if not chunks:
            raise KeyError(f"no tensor was recorded for {site.name}")
        if not isinstance(chunks[0].value, torch.Tensor):
            raise TypeError(f"{site.name} holds the outputs of a user reduce function; use cache.chunks()")
        if chunks[0].positions is None:  # rows were flattened by a boolean position mask
            return torch.cat([c.value for c in chunks], 0)
        runs: dict[int, list[Chunk]] = defaultdict(list)
        for c in chunks:
            runs[c.run].append(c)
        pieces = [self._assemble_run(site, cs) for cs in runs.values()]
        if len(pieces) == 1:
            out = pieces[0]
        else:
            out = self._stack_runs(site, pieces)
        order = [i for r in runs for i in self.row_ids.get(r, [])]
        if order and len(order) == out.shape[0] and order != list(range(len(order))):
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            out = out[inverse.to(out.device)]
        return out

    def positions(self, name: str) -> torch.Tensor:
        """Absolute positions along the position axis of ``cache[name]`` (first run)."""
        chunks = self.chunks(name)
        run0 = [c for c in chunks if c.run == chunks[0].run]
        return torch.cat([c.positions for c in run0])

    # ---- assembly ------------------------------------------------------------------------------------
    @staticmethod
    def _pad(t: torch.Tensor, axis: int, length: int, left: bool, value: float) -> torch.Tensor:
        missing = length - t.shape[axis]
        if missing <= 0:
            return t
        shape = list(t.shape)
        shape[axis] = missing
        fill = torch.full(shape, value, dtype=t.dtype, device=t.device)
        return torch.cat([fill, t] if left else [t, fill], axis)

    def _fill(self, site: Site, dtype) -> float:
        return torch.finfo(dtype).min if site.kind == "attn.scores" and dtype.is_floating_point else 0.0

    def _assemble_run(self, site: Site, chunks: list[Chunk]) -> torch.Tensor:
        vals = [c.value for c in chunks]
        if len(vals) == 1:
            return vals[0]
        if site.kind in ("attn.pattern", "attn.scores"):
            k = max(v.shape[-1] for v in vals)
            vals = [self._pad(v, -1, k, left=False, value=self._fill(site, v.dtype)) for v in vals]
        return torch.cat(vals, _pos_axis(site))

    def _stack_runs(self, site: Site, pieces: list[torch.Tensor]) -> torch.Tensor:
        axis = _pos_axis(site)
        p = max(t.shape[axis] for t in pieces)
        pieces = [self._pad(t, axis, p, left=True, value=0.0) for t in pieces]
        if site.kind in ("attn.pattern", "attn.scores"):
            k = max(t.shape[-1] for t in pieces)
            pieces = [self._pad(t, -1, k, left=True, value=self._fill(site, t.dtype)) for t in pieces]
        return torch.cat(pieces, 0)


class Capture(Block):
    """State of one capture block; the backend's hooks call :meth:`record` with each forward's tensor."""

    def __init__(self, handle, sites, positions: Positions = None, reduce: str | Callable | None = None,
                 to: str = "memory", dtype: torch.dtype | None = None, grad: bool = False,
                 check_finite: bool = True, require_all: bool = True):
        super().__init__(handle, sites)
        check_positions(positions)
        if to not in ("memory", "cpu"):
            raise ValueError(f"to={to!r}: use 'memory' (keep each tensor on its module's device) or 'cpu'; for disk "
                             "use hiddenlens.probes.store.write_activations")
        if reduce not in (None, "stats", "mean") and not callable(reduce):
            raise ValueError(f"reduce={reduce!r}: use None, 'stats' (mean + covariance), 'mean' or a function")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype}: activations are real numbers; use a floating dtype such as "
                             "torch.float16, torch.bfloat16 or torch.float32")
        self.positions, self.reduce, self.to, self.dtype = positions, reduce, to, dtype
        self.grad, self.check_finite, self.require_all = grad, check_finite, require_all
        self.cache = ActivationCache(self.sites, handle.adapter.n_layers)
        self.cache.row_ids = self.row_ids
        self._range = PositionRange()
        self._grad_ctx = None

    def on_new_run(self, attention_mask: torch.Tensor | None) -> None:
        if attention_mask is not None:
            self.cache.attention_masks[self.run] = attention_mask.detach().to("cpu")

    def _select(self, site: Site, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        axis = _pos_axis(site)
        pos = self.positions
        if isinstance(pos, torch.Tensor) and pos.dtype == torch.bool:
            length = t.shape[axis]
            if pos.shape != (t.shape[0], length):
                raise ValueError(f"position mask {tuple(pos.shape)} does not match this forward's "
                                 f"[batch, pos] = {(t.shape[0], length)}")
            moved = t.movedim(axis, 1) if axis != 1 else t
            return moved[pos.to(t.device)], None
        self._range.note(pos, max(self.run, 0), self.offset, t.shape[axis])
        local, absolute = select(pos, self.offset, t.shape[axis])
        if local is None:
            return t, absolute
        return t.index_select(axis, local.to(t.device)), absolute

    def record(self, site: Site, value: torch.Tensor) -> None:
        """Store (or reduce) one forward pass's tensor for ``site`` (canonical layout, see ``sites``)."""
        name = site.name
        self.cache.fire_counts[name] += 1
        if not self.grad:
            value = value.detach()
        if self.check_finite and value.is_floating_point() and site.kind != "attn.scores":
            if not torch.isfinite(value).all():
                raise NonFiniteActivationError(
                    f"{name} holds NaN or Inf (dtype {value.dtype}); in fp16 try dtype=torch.bfloat16 or float32, "
                    "or pass check_finite=False to record it anyway")
        value, absolute = self._select(site, value)
        if self.dtype is not None:
            value = value.to(self.dtype)
        if self.reduce in ("stats", "mean"):
            rows = value
            if site.per_head:  # heads become features: [.., head, pos, d] -> [.., pos, head * d]
                rows = value.movedim(_pos_axis(site), 1).flatten(2) if absolute is not None else value.flatten(1)
            acc = self.cache.stats.setdefault(name, RunningStats(covariance=self.reduce == "stats"))
            acc.update(rows)
            return
        if callable(self.reduce):
            value = self.reduce(name, value)
            if value is None:
                return
        if self.to == "cpu" and isinstance(value, torch.Tensor):
            value = value.to("cpu")
        self.cache._chunks[name].append(Chunk(value, self.offset, max(self.run, 0), absolute))

    # ---- context manager -----------------------------------------------------------------------------
    def __enter__(self) -> ActivationCache:
        self._grad_ctx = torch.enable_grad() if self.grad else torch.inference_mode()
        self._grad_ctx.__enter__()
        try:
            self.open()
        except BaseException:
            self._grad_ctx.__exit__(None, None, None)
            raise
        return self.cache

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self.close()
        finally:
            self._grad_ctx.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self._range.verify(self.positions)
        if exc_type is None and self.require_all:
            self.verify()
        return False

    def verify(self) -> None:
        """Raise :class:`HookNotFiredError` unless every requested site fired (and kept at least one position)."""
        if self.n_forwards == 0 and not any(self.cache.fire_counts.values()):
            raise HookNotFiredError("no forward pass ran inside the capture block: call handle.run(...), "
                                    "handle.generate(...) or the model inside the `with` block")
        silent = [n for n, c in self.cache.fire_counts.items() if c == 0]
        if silent:
            raise HookNotFiredError(
                f"requested sites never fired: {', '.join(silent)}. (logits do not fire with "
                "handle.run(..., logits=False); attention sites need an attention module that goes through "
                "transformers' attention interface)")
        if self.reduce is None and self.positions is not None:
            empty = [n for n in self.cache.fire_counts
                     if self.cache._chunks.get(n) and all(c.value.numel() == 0 for c in self.cache._chunks[n])]
            if empty:
                raise HookNotFiredError(f"positions={self.positions!r} selected no position of any forward for "
                                        f"{', '.join(empty)}: the inputs were shorter; pass positions that exist")


def capture(handle, sites, positions: Positions = None, reduce=None, to: str = "memory",
            dtype: torch.dtype | None = None, grad: bool = False, check_finite: bool = True,
            require_all: bool = True) -> Capture:
    """Record ``sites`` of ``handle`` while the ``with`` block runs; returns the :class:`ActivationCache`.

    Args:
        handle: a :class:`hiddenlens.models.ModelHandle` (any backend).
        sites: names, globs or ranges (see :mod:`hiddenlens.probes.sites`).
        positions: ``None``/``"all"``, ``"last"`` (last position of every forward), absolute indices (negative
            ones count from the end of each forward's input), a ``slice`` over absolute positions, or a boolean
            ``[batch, pos]`` mask of the input (rows are then flattened to ``[n_tokens, ...]``).
        reduce: ``None`` (keep tensors), ``"stats"`` (running mean and covariance per site in
            ``cache.stats``; rows are tokens, features the last axis, heads flattened into features), ``"mean"``,
            or ``fn(site_name, tensor) -> tensor | None`` whose outputs are kept per forward
            (``cache.chunks(site)``).
        to: ``"memory"``: each tensor stays on the device of the module that produced it (for a model split
            across devices by accelerate, block 30's ``resid_post`` on block 30's GPU; a disk-offloaded module
            runs on its execution device), or ``"cpu"``. For disk, use
            :func:`hiddenlens.probes.store.write_activations`.
        dtype: cast captured tensors (e.g. ``torch.float16`` to halve memory).
        grad: keep autograd graphs (otherwise the block runs under ``torch.inference_mode()``).
        check_finite: raise :class:`NonFiniteActivationError` on NaN/Inf.
        require_all: raise :class:`HookNotFiredError` if a requested site never fired.
    """
    return Capture(handle, sites, positions=positions, reduce=reduce, to=to, dtype=dtype, grad=grad,
                   check_finite=check_finite, require_all=require_all)
