"""Which reads and edits are open, per handle, in *this* run context (thread or asyncio task).

Every ``hiddenlens.capture`` / ``hiddenlens.edit`` block registers itself here on entry and leaves on exit. The
state lives in a :class:`contextvars.ContextVar`, so two threads (or two Streamlit sessions) using one handle at
the same time never see each other's blocks: the backend's hooks sit on the shared modules, but each hook looks
up the blocks of the context whose forward pass is running. Hooks are installed while any context needs them
(reference-counted by the backend) and do nothing for a context with no open block.

A new ``threading.Thread`` starts with an empty context; code that runs a forward in a helper thread on behalf of
an open block (e.g. a streamer that runs ``generate`` in a thread) must run it with
``contextvars.copy_context().run(...)``.
"""
from __future__ import annotations

from contextvars import ContextVar

#: id(handle) -> the open blocks of that handle in this context (a fresh dict on every change: copy-on-write)
_OPEN: ContextVar[dict[int, tuple]] = ContextVar("hiddenlens_open_blocks", default={})
#: id(handle) -> block index after which the running forward may stop (set by ``handle.run(logits=False)``)
_STOP: ContextVar[dict[int, int]] = ContextVar("hiddenlens_stop_after", default={})


class StopForward(Exception):
    """Raised by a backend's hook once every requested site of a forward has been read (caught by the backend)."""


def enter(handle, block) -> None:
    """Open ``block`` (a capture or an edit) on ``handle`` in this context; blocks keep their entry order."""
    current = _OPEN.get()
    _OPEN.set({**current, id(handle): current.get(id(handle), ()) + (block,)})


def leave(handle, block) -> None:
    current = _OPEN.get()
    rest = tuple(b for b in current.get(id(handle), ()) if b is not block)
    new = {k: v for k, v in current.items() if k != id(handle)}
    if rest:
        new[id(handle)] = rest
    _OPEN.set(new)


def open_blocks(handle) -> tuple:
    """The blocks open on ``handle`` in this context, in entry order (outermost first)."""
    return _OPEN.get().get(id(handle), ())


def stop_after(handle) -> int | None:
    """The block index after which this context's current forward on ``handle`` may stop, or None."""
    return _STOP.get().get(id(handle))


class stopping_after:
    """``with stopping_after(handle, layer):`` forwards of ``handle`` in this context may stop after block
    ``layer`` (``None``: run to the end)."""

    def __init__(self, handle, layer: int | None):
        self.key, self.layer, self.token = id(handle), layer, None

    def __enter__(self):
        if self.layer is not None:
            self.token = _STOP.set({**_STOP.get(), self.key: self.layer})
        return self

    def __exit__(self, *exc):
        if self.token is not None:
            _STOP.reset(self.token)
        return False
