"""The one way hiddenlens reaches a Ray cluster (``--ray ADDRESS``): Ray is an optional extra, imported only here and
only when asked (``pip install hiddenlens[ray]``).

``ADDRESS`` is ``local`` (start a private local cluster for this run, stopped at the end), ``auto`` (join the
cluster this machine already runs, e.g. after ``ray start --head``) or a cluster address (``ray://host:10001``,
``host:6379``). When Ray is already initialised in this process (a test that called ``ray.init(num_cpus=2)``, a
notebook), that session is used as it is and left running.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from .errors import UserError

LOCAL = "local"


class RayUnavailableError(UserError, ImportError):
    """``--ray`` was asked for but Ray is not installed, or the cluster it names does not answer."""


def import_ray():
    """``ray``, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RayUnavailableError("--ray needs Ray: pip install 'hiddenlens[ray]' (or pip install 'ray>=2.60')") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str, num_cpus: int | None = None) -> Iterator[object]:
    """Yield the ``ray`` module connected to ``address`` (see the module docstring); a cluster this context started
    is shut down when it ends. ``num_cpus`` sizes a ``local`` cluster (default: this machine's CPUs)."""
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"--ray {address!r}: give 'local', 'auto' or a cluster address such as ray://host:10001")
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    os.environ.update({k: v for k, v in env.items() if k not in os.environ})
    if address == LOCAL:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    else:
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RayUnavailableError(f"--ray {address}: no Ray cluster answered ({first}); start one with "
                                      "`ray start --head`, or use --ray local for a private one") from exc
    try:
        yield ray
    finally:
        ray.shutdown()
