"""Reference-counted dispatcher hooks on shared modules, through which every read and edit of a backend runs.

A *point* is one module's input (``"input"``: a forward pre-hook seeing ``(args, kwargs)``) or output
(``"output"``). Each point carries one dispatcher hook, installed when the first open block (in any thread) needs
one of its sites and removed when the last one leaves. When the point fires, the dispatcher asks
:mod:`hiddenlens.probes.context` for the blocks open on the handle *in the running context* and, for every site at
that point that one of them touches:

1. applies the edits, in the order their blocks were entered (outermost first), to a clone of the tensor; the
   site's canonical layout is a *view* into that clone (``extract``), so an edit of one head writes that head's
   slice and nothing else;
2. hands the (edited) value to the reads, so a read at an edited site sees the edited value.

Sites at one point are processed in forward order (``embed`` before ``blocks.0.resid_pre``, which share a point).
A context with no open block costs one dictionary lookup per point.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable

import torch

from .. import context
from ..sites import Site, forward_key

Extract = Callable[[torch.Tensor], torch.Tensor]


def untuple(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def hidden_arg(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def forward_offset(args, kwargs) -> tuple[int, torch.Tensor | None, int]:
    """Absolute position of the first input token of a backbone forward, its 2-D attention mask (or None) and the
    number of input positions."""
    cache_position = kwargs.get("cache_position")
    if cache_position is not None and cache_position.numel():
        offset = int(cache_position.reshape(-1)[0])
    else:
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        offset = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
    mask = kwargs.get("attention_mask")
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    return offset, mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None, int(ids.shape[1])


@dataclass
class _Point:
    where: str  # "input" | "output"
    sites: dict[Site, list] = field(default_factory=dict)  # site -> [extract, refcount]
    stop_layer: int | None = None
    stop_refs: int = 0
    hook: object = None


class HookRegistry:
    """The dispatcher hooks one backend has installed on its modules (thread-safe install / removal)."""

    def __init__(self, handle):
        self.handle = handle
        self._lock = threading.Lock()
        self._points: dict[tuple[int, str], _Point] = {}
        self._modules: dict[int, torch.nn.Module] = {}
        self._begin: dict[int, list] = {}  # id(module) -> [hook handle, refcount, begin_fn]

    # ---- installing --------------------------------------------------------------------------------------
    def add_site(self, module: torch.nn.Module, where: str, site: Site, extract: Extract) -> Callable[[], None]:
        """Make ``site`` (read at ``module``'s ``where``, canonical layout from ``extract``) available."""
        key = (id(module), where)
        with self._lock:
            point = self._point(module, where)
            entry = point.sites.setdefault(site, [extract, 0])
            entry[1] += 1

        def release() -> None:
            with self._lock:
                e = point.sites.get(site)
                if e is not None:
                    e[1] -= 1
                    if e[1] == 0:
                        del point.sites[site]
                self._maybe_remove(key)
        return release

    def add_stop(self, module: torch.nn.Module, layer: int) -> Callable[[], None]:
        """After ``module``'s output (block ``layer``), forwards of a context that asked to stop there end."""
        key = (id(module), "output")
        with self._lock:
            point = self._point(module, "output")
            point.stop_layer = layer
            point.stop_refs += 1

        def release() -> None:
            with self._lock:
                point.stop_refs -= 1
                self._maybe_remove(key)
        return release

    def add_begin(self, module: torch.nn.Module, begin: Callable) -> Callable[[], None]:
        """A pre-hook on the backbone: ``begin(args, kwargs) -> (offset, mask, length)`` tells every open block
        that a forward starts."""
        with self._lock:
            entry = self._begin.get(id(module))
            if entry is None:
                def pre(mod, args, kwargs):
                    blocks = context.open_blocks(self.handle)
                    if blocks:
                        offset, mask, length = begin(args, kwargs)
                        for b in blocks:
                            b.begin_forward(offset, mask, length)
                hook = module.register_forward_pre_hook(pre, with_kwargs=True)
                entry = self._begin[id(module)] = [hook, 0]
            entry[1] += 1

        def release() -> None:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    entry[0].remove()
                    self._begin.pop(id(module), None)
        return release

    def _point(self, module, where) -> _Point:
        key = (id(module), where)
        point = self._points.get(key)
        if point is None:
            point = self._points[key] = _Point(where)
            self._modules[key[0]] = module
            if where == "output":
                point.hook = module.register_forward_hook(self._output_hook(point))
            else:
                point.hook = module.register_forward_pre_hook(self._input_hook(point), with_kwargs=True)
        return point

    def _maybe_remove(self, key) -> None:
        point = self._points.get(key)
        if point is not None and not point.sites and point.stop_refs == 0:
            point.hook.remove()
            del self._points[key]

    @property
    def installed(self) -> int:
        """Number of dispatcher hooks installed now (0 once every block has closed)."""
        return len(self._points) + len(self._begin)

    # ---- dispatching -------------------------------------------------------------------------------------
    def _check_stop(self, point: _Point) -> None:
        if point.stop_layer is not None and context.stop_after(self.handle) == point.stop_layer:
            raise context.StopForward

    def _output_hook(self, point: _Point):
        def hook(module, args, output):
            new = process(self.handle, point.sites, untuple(output))
            self._check_stop(point)
            if new is None:
                return None
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    def _input_hook(self, point: _Point):
        def hook(module, args, kwargs):
            new = process(self.handle, point.sites, hidden_arg(args, kwargs))
            if new is None:
                return None
            if args:
                return (new,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}
        return hook


def process(handle, sites: dict[Site, list], value: torch.Tensor, blocks: tuple | None = None) -> torch.Tensor | None:
    """Run the edits, then the reads, of the blocks open on ``handle`` (default: in this context) for ``sites``
    (site -> ``[extract, ...]``) at one point whose tensor is ``value``; returns the edited tensor, or None if no
    edit ran."""
    blocks = context.open_blocks(handle) if blocks is None else blocks
    if not blocks:
        return None
    edited = None
    for site, (extract, *_) in sorted(list(sites.items()), key=lambda kv: forward_key(kv[0])):
        users = [b for b in blocks if site in b.site_set]
        if not users:
            continue
        for b in users:
            if b.writes:
                if edited is None:
                    edited = value.clone()
                view = extract(edited)
                if view.untyped_storage().data_ptr() != edited.untyped_storage().data_ptr():
                    raise NotImplementedError(f"{site.name} is not a view of its module's tensor on this "
                                              "architecture, so it cannot be edited in place")
                new = b.apply(site, view)
                if new is not None:
                    view.copy_(new)
        current = edited if edited is not None else value
        for b in users:
            if not b.writes:
                b.record(site, extract(current))
    return edited


def release_all(releases: list[Callable[[], None]]) -> None:
    """Undo ``releases`` in reverse order; every one runs even if an earlier one raised (the first error is
    re-raised afterwards)."""
    errors = []
    for r in reversed(releases):
        try:
            r()
        except Exception as exc:  # keep removing the others
            errors.append(exc)
    releases.clear()
    if errors:
        raise errors[0]


def acquire_all(steps: Iterable[Callable[[], Callable[[], None]]]) -> Callable[[], None]:
    """Run each step (each installs something and returns its undo); if one fails, undo the ones before and
    re-raise. Returns the function that undoes them all."""
    releases: list[Callable[[], None]] = []
    try:
        for step in steps:
            releases.append(step())
    except BaseException:
        release_all(releases)
        raise
    return partial(release_all, releases)
