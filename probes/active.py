"""Which captures are active on which handle (so ``handle.run`` can tell them the prompt order)."""
from __future__ import annotations

_ACTIVE: dict[int, list] = {}


def push(handle, capture) -> None:
    _ACTIVE.setdefault(id(handle), []).append(capture)


def pop(handle, capture) -> None:
    stack = _ACTIVE.get(id(handle), [])
    if capture in stack:
        stack.remove(capture)
    if not stack:
        _ACTIVE.pop(id(handle), None)


def active_captures(handle) -> list:
    return list(_ACTIVE.get(id(handle), []))


def active_capture(handle):
    """The innermost active capture on ``handle``, or None. ``set_rows`` is forwarded to all of them."""
    stack = _ACTIVE.get(id(handle), [])
    if not stack:
        return None
    if len(stack) == 1:
        return stack[0]
    return _Fanout(stack)


class _Fanout:
    def __init__(self, caps):
        self.caps = list(caps)

    def set_rows(self, rows):
        for c in self.caps:
            c.set_rows(rows)
