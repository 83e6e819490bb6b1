"""``hiddenlens.edit``: change any site while the block runs, on any backend, addressed like a read.

    with hl.edit(handle, {"blocks.6.resid_post": hl.Add(v), "blocks.3.attn.z": hl.Zero()}, heads=[2, 5],
                 positions="last") as log:
        handle.generate(prompts)
    log.changed("blocks.6.resid_post")       # [batch, positions]: L2 norm of the change at each absolute position

An edit is an :class:`Op` (or a tensor: :class:`Set`; or a function ``fn(value, where) -> value``: :class:`Apply`)
applied to the site's **canonical layout** (the one ``hl.capture`` returns, see :mod:`hiddenlens.probes.sites`):
``[batch, pos, d]`` for residual / MLP sites, ``[batch, head, pos, d]`` per head, ``[batch, head, q, k]`` for
``attn.scores`` / ``attn.pattern`` (positions select query rows; an edited pattern gives the output
``pattern @ v``, edited scores are softmaxed again).

Which entries change: the ``positions`` (absolute, correct under the KV cache; see
:mod:`hiddenlens.probes.positions`), the ``heads`` on per-head sites, never padding. The op sees only the
selected region, ``[batch, n_selected, ...]`` (heads selected first), and returns a tensor of that shape.

Order in one forward: edits apply in the order their blocks were entered (outermost first), several ops of one
block in forward order of their sites; every read sees the value after all edits at its site (a capture at the
edited site returns the edited tensor). Each ``with`` block belongs to the thread that entered it.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .block import Block
from .positions import PositionRange, Positions, check_positions, select
from .sites import HEAD_SITES, Site, resolve_sites


class EditNotAppliedError(RuntimeError):
    """An edit's site never ran, or its positions never occurred, during the block."""


@dataclass
class Where:
    """What an op is told about the region it edits: the site, the run, the absolute ``positions`` ``[n]`` of the
    selected entries along the position (query) axis, and the selected ``heads`` (None: all / no heads)."""

    site: Site
    run: int
    positions: torch.Tensor
    heads: list[int] | None


class Op:
    """An edit. ``__call__(region, where) -> new region`` (same shape). Ops with fixed values check them once at
    construction; the others (``checks_output``) have their output checked for NaN / Inf at every forward."""

    checks_output = True

    def __call__(self, region: torch.Tensor, where: Where) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def _check_values(t, what: str) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{what} takes a floating-point tensor, not {getattr(t, 'dtype', type(t).__name__)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} holds NaN or Inf")


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return t.to(device=ref.device, dtype=ref.dtype)


@dataclass(repr=False)
class Add(Op):
    """``region + vector`` (``vector`` broadcasts: ``[d]`` adds one vector at every selected entry)."""

    vector: torch.Tensor
    checks_output = False

    def __post_init__(self):
        _check_values(self.vector, "Add")

    def __call__(self, region, where):
        return region + _like(self.vector, region)

    def __repr__(self):
        return f"Add(|v|={float(self.vector.float().norm()):.4g})"


@dataclass(repr=False)
class Set(Op):
    """Replace the region with ``value`` (broadcast to the region's shape)."""

    value: torch.Tensor
    checks_output = False

    def __post_init__(self):
        _check_values(self.value, "Set")

    def __call__(self, region, where):
        return _like(self.value, region).expand_as(region).clone()

    def __repr__(self):
        return f"Set(shape={tuple(self.value.shape)})"


@dataclass
class Scale(Op):
    """``factor * region``."""

    factor: float
    checks_output = False

    def __post_init__(self):
        _check_values(torch.tensor(float(self.factor)), "Scale")

    def __call__(self, region, where):
        return region * self.factor


class Zero(Op):
    """Zero the region (zero ablation)."""

    checks_output = False

    def __call__(self, region, where):
        return torch.zeros_like(region)

    def __repr__(self):
        return "Zero()"


@dataclass(repr=False)
class Patch(Op):
    """Take the region from another run: ``source`` is an :class:`~hiddenlens.probes.capture.ActivationCache`
    that holds the site (captured with ``positions=None``), or a tensor in the site's canonical layout whose
    position axis holds absolute positions ``0..P-1``. Rows must match the edited batch (or be 1). A selected
    position the source does not hold raises."""

    source: object
    site: str | None = None  # read this site of the source instead of the edited one

    def __call__(self, region, where):
        src = self.source
        axis = 2 if where.site.per_head else 1
        if not isinstance(src, torch.Tensor):
            name = self.site or where.site.name
            src, held = src[name], src.positions(name)
            if not torch.equal(held, torch.arange(len(held))):
                raise ValueError(f"patch source for {name} holds positions {held.tolist()[:5]}...; capture it with "
                                 "positions=None so every absolute position is there")
        if where.positions.numel() and int(where.positions.max()) >= src.shape[axis]:
            raise ValueError(f"patch of {where.site.name}: the source holds positions 0..{src.shape[axis] - 1}, the "
                             f"edit needs {where.positions.tolist()}; patch only positions both runs have")
        if where.heads is not None:
            src = src.index_select(1, torch.tensor(where.heads, device=src.device))
        picked = src.index_select(axis, where.positions.to(src.device))
        if picked.shape[0] not in (1, region.shape[0]):
            raise ValueError(f"patch of {where.site.name}: source has {picked.shape[0]} rows, the edited run "
                             f"{region.shape[0]}")
        return _like(picked, region).expand_as(region).clone()

    def __repr__(self):
        return f"Patch(site={self.site!r})"


@dataclass(repr=False)
class Apply(Op):
    """Any function ``fn(region, where) -> new region``."""

    fn: Callable[[torch.Tensor, Where], torch.Tensor]

    def __call__(self, region, where):
        return self.fn(region, where)

    def __repr__(self):
        return f"Apply({getattr(self.fn, '__name__', 'fn')})"


def as_op(x) -> Op:
    """An :class:`Op`, a tensor (:class:`Set`) or a function (:class:`Apply`) -> an :class:`Op`."""
    if isinstance(x, Op):
        return x
    if isinstance(x, torch.Tensor):
        return Set(x)
    if callable(x):
        return Apply(x)
    raise TypeError(f"an edit is an Op (Add, Set, Scale, Zero, Patch, Apply), a tensor or a function, not "
                    f"{type(x).__name__}")


class Edit(Block):
    """One ``hl.edit`` block: ops by site, the positions and heads they touch, and a log of what changed.

    ``positions`` and ``heads`` may be reassigned between forwards (conditional steering switches itself on
    mid-generation this way). ``require_applied=False`` allows a block in which no entry was ever selected.
    ``grad=True`` runs the block's forwards with autograd, so gradients reach what its ops return (attribution
    patching differentiates through an identity op this way).
    """

    writes = True

    def __init__(self, handle, edits: Mapping[str, object], positions: Positions = None,
                 heads: list[int] | int | None = None, require_applied: bool = True, grad: bool = False):
        if not edits:
            raise ValueError("no edits given: pass {site: op}, e.g. {'blocks.3.resid_post': hl.Add(v)}")
        ops: dict[Site, Op] = {}
        for name, op in edits.items():
            # a pattern (blocks.*.mlp.out) edits every matching site
            for site in resolve_sites(name, handle.adapter.n_layers, handle.adapter.unavailable):
                if site in ops:
                    raise ValueError(f"{site.name} is edited twice in one block; combine the ops into one Apply")
                ops[site] = as_op(op)
        super().__init__(handle, [s.name for s in ops])
        self.ops = ops
        check_positions(positions)
        if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
            raise ValueError("edits take absolute positions ('last', indices, a slice), not a bool mask")
        self.positions = positions
        self.heads = [heads] if isinstance(heads, int) else (list(heads) if heads is not None else None)
        if self.heads is not None:
            per_head = [s.name for s in ops if s.kind not in HEAD_SITES]
            if per_head:
                raise ValueError(f"heads= applies to per-head sites only; {', '.join(per_head)} has no head axis")
            n = handle.adapter.n_heads
            bad = [h for h in self.heads if not 0 <= h < n]
            if bad or not self.heads:
                raise ValueError(f"heads {bad or self.heads}: this model has heads 0..{n - 1}")
        self.require_applied = require_applied
        self.grad = grad
        self._range = PositionRange()
        self.fired: dict[str, int] = {s.name: 0 for s in ops}
        self.selected: dict[str, int] = {s.name: 0 for s in ops}
        #: run -> site name -> [batch, positions] float32: L2 norm of the change at each absolute position
        self.changes: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)

    def apply(self, site: Site, value: torch.Tensor) -> torch.Tensor | None:
        """Edit one forward's canonical ``value`` of ``site``; returns the new tensor (None: nothing selected)."""
        self.fired[site.name] += 1
        axis = 2 if site.per_head else 1
        self._range.note(self.positions, max(self.run, 0), self.offset, value.shape[axis])
        local, absolute = select(self.positions, self.offset, value.shape[axis])
        heads = self.heads
        if heads is not None and site.kind in ("attn.k", "attn.v"):
            n_kv = value.shape[1]
            if any(h >= n_kv for h in heads):
                raise ValueError(f"{site.name} has {n_kv} key/value heads (GQA); heads {heads} do not all exist")
        region = value
        if heads is not None:
            region = region.index_select(1, torch.tensor(heads, device=value.device))
        if local is not None:
            if local.numel() == 0:
                return None
            region = region.index_select(axis, local.to(value.device))
        new = self.ops[site](region, Where(site, self.run, absolute, heads))
        if not isinstance(new, torch.Tensor) or new.shape != region.shape:
            raise ValueError(f"edit of {site.name} returned {getattr(new, 'shape', type(new))}; it must return the "
                             f"region's shape {tuple(region.shape)}")
        if self.ops[site].checks_output and not torch.isfinite(new).all() and torch.isfinite(region).all():
            raise FloatingPointError(f"edit of {site.name} produced NaN or Inf; check the op's values (e.g. alpha)")
        real = self.padding_free(value.shape[0], value.shape[axis], value.device)
        if real is not None:
            keep = real if local is None else real.index_select(1, local.to(value.device))
            shape = [keep.shape[0]] + [1] * (region.ndim - 1)
            shape[axis] = keep.shape[1]
            new = torch.where(keep.view(shape), new, region)
        self._log(site, region, new, absolute, axis)
        out = value
        if heads is not None:
            idx = torch.tensor(heads, device=value.device)
            full = value.index_select(1, idx)
            full = full.index_copy(axis, local.to(value.device), new) if local is not None else new
            return out.index_copy(1, idx, full)
        return out.index_copy(axis, local.to(value.device), new) if local is not None else new

    def _log(self, site: Site, old: torch.Tensor, new: torch.Tensor, absolute: torch.Tensor, axis: int) -> None:
        diff = (new.detach() - old.detach()).float()
        if site.kind in ("attn.scores", "attn.pattern"):
            norms = diff.pow(2).sum(dim=(1, 3)).sqrt()          # [b, q]
        elif site.per_head:
            norms = diff.pow(2).sum(dim=(1, 3)).sqrt()          # [b, pos]
        else:
            norms = diff.pow(2).sum(dim=-1).sqrt()              # [b, pos]
        self.selected[site.name] += int(absolute.numel())
        run = self.changes[max(self.run, 0)]
        end = int(absolute.max()) + 1 if absolute.numel() else 0
        old_t = run.get(site.name)
        if old_t is None or old_t.shape[1] < end or old_t.shape[0] != norms.shape[0]:
            grown = torch.zeros(norms.shape[0], max(end, 0 if old_t is None else old_t.shape[1]),
                                device=norms.device)
            if old_t is not None and old_t.shape[0] == norms.shape[0]:
                grown[:, :old_t.shape[1]] = old_t
            old_t = run[site.name] = grown
        old_t[:, absolute.to(norms.device)] = norms

    def changed(self, site: str | None = None, run: int = 0) -> torch.Tensor:
        """L2 norm of the change at each absolute position of ``run``, ``[batch, positions]`` (one site, or all
        sites combined when ``site`` is None)."""
        per = self.changes.get(run, {})
        if not per:
            raise KeyError(f"run {run} of this edit changed nothing")
        if site is not None:
            return per[resolve_sites(site, self.handle.adapter.n_layers)[0].name]
        width = max(t.shape[1] for t in per.values())
        total = sum(torch.nn.functional.pad(t, (0, width - t.shape[1])).pow(2) for t in per.values())
        return total.sqrt()

    def __enter__(self) -> "Edit":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        if exc_type is None:
            silent = [n for n, c in self.fired.items() if c == 0]
            if silent:
                raise EditNotAppliedError(f"edited sites never ran: {', '.join(silent)}; run the model inside the "
                                          "block (logits=False stops after the last site needed)")
            if self.require_applied:
                self._range.verify(self.positions)
                empty = [n for n, c in self.selected.items() if c == 0]
                if empty:
                    raise EditNotAppliedError(f"positions={self.positions!r} selected no entry of {', '.join(empty)}"
                                              " in any forward: the inputs were shorter")
        return False

    def __repr__(self) -> str:
        ops = ", ".join(f"{s.name}: {op!r}" for s, op in self.ops.items())
        return f"Edit({{{ops}}}, positions={self.positions!r}, heads={self.heads})"


def edit(handle, edits: Mapping[str, object], positions: Positions = None, heads: list[int] | int | None = None,
         require_applied: bool = True, grad: bool = False) -> Edit:
    """Apply ``edits`` (``{site or pattern: Op | tensor | fn}``) to every forward of ``handle`` run in this
    thread while the ``with`` block is open; yields the :class:`Edit` (its ``changes`` log what changed)."""
    return Edit(handle, edits, positions, heads, require_applied, grad)
