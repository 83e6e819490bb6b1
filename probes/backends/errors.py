"""The error every backend raises for something it cannot do."""


class BackendError(NotImplementedError):
    """A backend lacks a capability; the message names the backend and what it lacks."""

    def __init__(self, backend: str, lacks: str, instead: str = "use backend='hf'"):
        super().__init__(f"backend {backend!r} cannot {lacks}; {instead}")
        self.backend, self.lacks = backend, lacks
