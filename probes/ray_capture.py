"""Capture on Ray (``hiddenlens capture ... --ray ADDRESS``, ``write_activations(..., ray=...)``): the prompt set is
cut into parts of ``part_prompts`` contiguous prompts, a pool of Ray actors (one model load each) writes every part
as its own store with global prompt indices, and the driver commits the top manifest once all parts are in.

Layout of ``OUT``::

    parts/plan.json          n_prompts, the hash of the prompt set and ``part_prompts`` (fixed by the first run)
    parts/part-00003/        a store of prompts 3*part_prompts .. (``probes.store.write_part``): its own manifest
                             (with ``prompt_offset``) and shards whose ``_prompt`` and prompt ranges are global
    manifest.json            written once, atomically, at the end: the parts' shard entries in prompt order, files
                             by relative path (``parts/part-00003/shard-00000.safetensors``), fresh entry checksums,
                             ``complete: true``; it reads exactly like a single-process store

Guarantees: ``part_prompts`` is a multiple of ``batch_size``, so every forward pass holds the very prompts of the
single-process run and the rows are the same. Every part is written with ``resume``: when a worker is killed, Ray
restarts it (``max_restarts=-1``) and retries its part (``max_task_retries=-1``), which keeps the part's verified
shards and re-captures the rest; ``--resume`` after the driver died does the same for every part. A part whose
weights, settings or library versions differ from the others is refused at the commit. Ray is imported only here.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from hiddenlens.common.errors import FolderExistsError, FolderLockedError, UserError
from hiddenlens.common.files import write_json
from hiddenlens.common.folders import locked
from hiddenlens.common.ray_cluster import LOCAL, ray_session

from . import store as st

PLAN_FORMAT = "hiddenlens-ray-plan/1"
#: parts per worker when ``part_prompts`` is not given (several each: load balance, little lost when one dies)
PARTS_PER_WORKER = 4
#: manifest fields that belong to one part; every other field must be the same in all parts
PER_PART = ("n_prompts", "prompt_ids_sha256", "prompt_offset", "prompt_ids", "shards", "complete", "manifest_sha256")
#: seconds a retried part waits for the part lock still held by a worker of an earlier (dead) driver
LOCK_WAIT_S = 120


class RayCaptureError(UserError, RuntimeError):
    """A capture on Ray that cannot be planned, run or committed as asked."""


def _part_dir(index: int) -> str:
    return f"parts/part-{index:05d}"


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process (bytes; ``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class PartWriter:
    """A Ray actor: loads the model once (from its spec: nothing is pickled but names) and writes parts."""

    def __init__(self, model: dict, threads: int):
        torch.set_num_threads(threads)
        self.error: Exception | None = None
        try:
            from .handle import load_model

            self.handle = load_model(**model)
        except Exception as exc:  # raised by ready(), so the driver shows the cause instead of a dead actor
            self.error = exc

    def ready(self, sites) -> dict:
        """``{"pid", "weights_sha256"}`` of this worker; raises the error of its model load, or of ``sites``."""
        if self.error is not None:
            raise self.error
        st.resolve_sites(sites, self.handle.adapter.n_layers, self.handle.adapter.unavailable)
        if "weights_sha256" not in self.handle.info:
            self.handle.info["weights_sha256"] = st.weights_hash(self.handle.hf_model)
        return {"pid": os.getpid(), "weights_sha256": self.handle.info["weights_sha256"]}

    @staticmethod
    def _report(queue, index: int, n: int) -> None:
        """Progress: ``n`` prompts of part ``index`` are done."""
        queue.put_nowait((index, n))

    def capture(self, index: int, offset: int, prompts: list, job: dict, queue) -> dict:
        """Write (or finish) part ``index``: ``prompts`` are global prompts ``offset ..``; progress goes to
        ``queue`` (a ``ray.util.queue.Queue``). Returns a summary: part, prompts, rows, pid, restarted (this actor
        was restarted by Ray), started_at and finished_at (unix time, s), peak_rss_bytes (of this worker)."""
        import ray

        self.ready(job["sites"])
        started_at = time.time()
        out = Path(job["out"]) / _part_dir(index)
        report = functools.partial(self._report, queue, index)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                part = st.write_part(self.handle, prompts, job["sites"], out, offset, report,
                                     **{k: job[k] for k in ("positions", "batch_size", "dtype", "shard_rows",
                                                            "add_bos")})
                break
            except FolderLockedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        with warnings.catch_warnings():  # Ray's own use of a deprecated property inside this one
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        return {"part": index, "prompts": len(prompts), "rows": len(part), "pid": os.getpid(), "restarted": restarted,
                "started_at": started_at, "finished_at": time.time(), "peak_rss_bytes": _peak_rss_bytes()}


def worker_model(model, worker_gpus: float) -> tuple[dict, str | None]:
    """What a worker loads, and the weights hash it must find (None when ``model`` is not a loaded handle).

    ``model`` is a :class:`~hiddenlens.probes.handle.ModelHandle` (its spec, backend and dtype; its weights hash is
    checked in every worker, so an edited in-memory model is refused), a spec string, or a dict of
    :func:`~hiddenlens.probes.handle.load_model` arguments (spec, backend, device, dtype, revision). Device ``auto``
    means ``cuda`` when the workers have GPUs, else ``cpu``."""
    expect = None
    if isinstance(model, str):
        spec = {"spec": model}
    elif isinstance(model, dict):
        spec = dict(model)
    elif hasattr(model, "hf_model") and hasattr(model, "spec"):
        if "weights_sha256" not in model.info:
            model.info["weights_sha256"] = st.weights_hash(model.hf_model)
        expect = model.info["weights_sha256"]
        spec = {"spec": model.spec, "backend": model.backend.name, "dtype": str(model.dtype).replace("torch.", "")}
    else:
        raise RayCaptureError(f"model={type(model).__name__}: with ray=..., pass a loaded model handle, a model spec "
                              "string or a dict of load_model arguments")
    if spec.get("device", "auto") == "auto":
        spec["device"] = "cuda" if worker_gpus > 0 else "cpu"
    return spec, expect


def _check_pool(workers, worker_cpus, worker_gpus, part_prompts, batch_size) -> None:
    """One-line errors for pool options that cannot run."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: must be an integer >= 1 (--workers)")
    for name, value in (("worker_cpus", worker_cpus), ("worker_gpus", worker_gpus)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name}={value!r}: must be a number >= 0 (--{name.replace('_', '-')})")
    if part_prompts is not None and (isinstance(part_prompts, bool) or not isinstance(part_prompts, int)
                                     or part_prompts < 1 or part_prompts % batch_size):
        raise ValueError(f"part_prompts={part_prompts!r}: must be a positive multiple of batch_size={batch_size} "
                         "(--part-prompts), so every forward pass holds the prompts of a single-process run")


def _part_size(out: Path, prompts: list, batch_size: int, part_prompts: int | None, workers: int,
               resume: bool) -> tuple[int, bool]:
    """Prompts per part, and whether ``parts/plan.json`` is still to be written: on resume the plan's size, else
    ``part_prompts`` or about ``PARTS_PER_WORKER`` parts per worker (a multiple of ``batch_size``)."""
    path, manifest = out / st.RAY_PLAN, out / "manifest.json"
    if not resume and (manifest.exists() or path.exists()):
        held = "a store" if manifest.exists() else "an interrupted capture on Ray"
        raise FolderExistsError(f"{out} already holds {held}; pass resume=True (--resume) to continue it or choose a "
                                "new folder")
    if manifest.exists() and not path.exists():
        raise st.StoreError(f"{out} was captured without Ray; resume it without --ray (ray=None)")
    if not path.exists():
        n = len(prompts)
        return part_prompts or batch_size * max(1, math.ceil(n / (batch_size * workers * PARTS_PER_WORKER))), True
    plan = json.loads(path.read_text(encoding="utf-8"))
    if plan.get("format") != PLAN_FORMAT or plan.get("n_prompts") != len(prompts) or \
            plan.get("prompt_ids_sha256") != st.prompt_ids_sha256(prompts):
        raise st.StoreError(f"cannot resume {out}: {path} was made for another prompt set; use a new folder")
    if part_prompts not in (None, plan["part_prompts"]):
        raise ValueError(f"part_prompts={part_prompts}: {out} was started with part_prompts={plan['part_prompts']}; "
                         "leave it out to resume")
    return plan["part_prompts"], False


def _write_plan(out: Path, prompts: list, part_prompts: int) -> None:
    write_json(out / st.RAY_PLAN, {"format": PLAN_FORMAT, "n_prompts": len(prompts),
                                   "prompt_ids_sha256": st.prompt_ids_sha256(prompts), "part_prompts": part_prompts})


def _unwrap(ray, exc: Exception) -> Exception:
    """The user error a Ray worker raised (shown as one line), else the Ray error itself."""
    cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else None
    return cause if isinstance(cause, (UserError, ValueError, KeyError, FileNotFoundError)) else exc


def _check_resources(ray, address: str, workers: int, worker_cpus: float, worker_gpus: float) -> None:
    """Refuse (local cluster) or warn (a cluster that may grow) when the pool does not fit: it would wait forever."""
    have = ray.cluster_resources()
    for what, each, option in (("CPU", worker_cpus, "--worker-cpus"), ("GPU", worker_gpus, "--worker-gpus")):
        need, total = workers * each, have.get(what, 0)
        if need > total:
            msg = (f"--workers {workers} x {option} {each:g} needs {need:g} {what}s, the Ray cluster has {total:g}; "
                   f"lower --workers or {option}")
            if address == LOCAL:
                raise RayCaptureError(msg)
            warnings.warn(msg + " (or let the cluster grow)", stacklevel=3)


def _check_ready(ray, actors, sites, model: dict, expect: str | None) -> None:
    """Wait for every worker's model; the sites must resolve and every worker hold the same weights (``expect``)."""
    try:
        infos = ray.get([a.ready.remote(sites) for a in actors])
    except ray.exceptions.RayError as exc:
        raise _unwrap(ray, exc) from None
    hashes = {i["weights_sha256"] for i in infos}
    if len(hashes) > 1 or (expect is not None and hashes != {expect}):
        raise RayCaptureError(f"the Ray workers loaded {model['spec']!r} with other weights than "
                              f"{'the model handle passed in' if expect else 'one another'}; a handle edited in "
                              "memory cannot be rebuilt from its spec: save it (save_pretrained) and pass the folder")


def _run_parts(ray, actors, queue, parts: list[tuple[int, int, list]], job: dict, n_prompts: int, progress: bool,
               on_part: Callable[[dict], None] | None) -> None:
    """Run every part on the actor pool (Ray's ``ActorPool``); a tqdm bar over prompts, fed by the workers."""
    from ray.util import ActorPool

    pool = ActorPool(actors)
    for part in parts:
        pool.submit(lambda a, p: a.capture.remote(*p, job, queue), part)
    done = {index: 0 for index, _, _ in parts}
    with tqdm(total=n_prompts, desc="capture (ray)", unit="prompt", disable=not progress) as bar:
        while pool.has_next():
            try:
                summary = pool.get_next_unordered(timeout=0.5)
            except TimeoutError:
                summary = None
            except ray.exceptions.RayError as exc:
                raise _unwrap(ray, exc) from None
            for index, n in queue.get_nowait_batch(queue.size()):
                done[index] = n
            if summary is not None:
                done[summary["part"]] = summary["prompts"]
                if on_part is not None:
                    on_part(summary)
            bar.n = sum(done.values())
            bar.refresh()


def _part_manifests(out: Path, n_parts: int) -> list[dict]:
    """Each part's manifest, checked (checksums, contiguous global prompt ranges, complete)."""
    manifests = []
    for i in range(n_parts):
        path = out / _part_dir(i) / "manifest.json"
        if not path.is_file():
            raise RayCaptureError(f"{path} is missing after its worker finished: on a cluster of several machines "
                                  "OUT must be a folder every machine shares (the same path everywhere)")
        manifest = st._load_manifest(path)
        st._check_manifest(path, manifest, allow_incomplete=False)
        manifests.append(manifest)
    return manifests


def _commit(out: Path, prompts: list, part_prompts: int, manifests: list[dict], expect: str | None) -> None:
    """Write ``out/manifest.json`` once: the parts' shard entries in prompt order, by relative path. Every part must
    have the settings of part 0 (weights ``expect`` when given), its own prompts and its place."""
    common = {k: v for k, v in manifests[0].items() if k not in PER_PART}
    if expect is not None and common["weights_sha256"] != expect:
        raise RayCaptureError(f"{out / _part_dir(0)} was captured with other weights than the model handle passed "
                              "in; re-capture into a new folder")
    for i, m in enumerate(manifests):
        chunk = prompts[i * part_prompts:(i + 1) * part_prompts]
        differ = sorted(k for k in set(common) | set(m) if k not in PER_PART and m.get(k) != common.get(k))
        if differ or m["prompt_offset"] != i * part_prompts or m["prompt_ids_sha256"] != st.prompt_ids_sha256(chunk):
            raise RayCaptureError(f"{out / _part_dir(i)} differs from part 0 in {differ or ['prompts']} (e.g. "
                                  "workers with other library versions); re-capture into a new folder")
    shards = []
    for i, m in enumerate(manifests):
        for e in m["shards"]:
            entry = dict({k: v for k, v in e.items() if k != "entry_sha256"}, file=f"{_part_dir(i)}/{e['file']}")
            shards.append(dict(entry, entry_sha256=st._entry_digest(len(shards), entry)))
    manifest = dict(common, n_prompts=len(prompts), prompt_ids_sha256=st.prompt_ids_sha256(prompts),
                    prompt_ids=[p.id for p in prompts], shards=shards, complete=True)
    st._write_manifest(out / "manifest.json", manifest)


def write_activations_ray(model, prompts, sites, out: str | Path, ray: str = LOCAL, workers: int | None = None,
                          worker_cpus: float | None = None, worker_gpus: float | None = None,
                          part_prompts: int | None = None, positions: str = "all", batch_size: int = 8,
                          dtype: torch.dtype = torch.float32, shard_rows: int = 4096, add_bos: bool | None = None,
                          resume: bool = False, progress: bool = True, lock: bool = True,
                          on_part: Callable[[dict], None] | None = None) -> st.ActivationStore:
    """:func:`~hiddenlens.probes.store.write_activations` on a pool of Ray workers (see the module docstring).

    Args:
        model: a loaded handle, a model spec string or a dict of ``load_model`` arguments (see :func:`worker_model`).
        ray: ``"local"`` (a private local cluster), ``"auto"`` (this machine's cluster) or a cluster address;
            an already initialised Ray session is used as it is.
        workers: Ray actors (default 2), each with ``worker_cpus`` CPUs (default 1; also its torch threads) and
            ``worker_gpus`` GPUs (default 0).
        part_prompts: prompts per part, a multiple of ``batch_size`` (default: about 4 parts per worker).
        on_part: called in the driver with each part's summary as it finishes (part, prompts, rows, pid,
            restarted, started_at, finished_at, peak_rss_bytes).

    The other arguments are those of ``write_activations``. Returns the committed store.
    """
    workers = 2 if workers is None else workers
    worker_cpus, worker_gpus = 1 if worker_cpus is None else worker_cpus, 0 if worker_gpus is None else worker_gpus
    prompts = st.as_prompts(prompts)
    st._check_args(batch_size, shard_rows, dtype, positions)
    _check_pool(workers, worker_cpus, worker_gpus, part_prompts, batch_size)
    spec, expect = worker_model(model, worker_gpus)
    out = Path(out).absolute()
    with locked(out) if lock else contextlib.nullcontext():
        size, new_plan = _part_size(out, prompts, batch_size, part_prompts, workers, resume)
        parts = [(i, o, prompts[o:o + size]) for i, o in enumerate(range(0, len(prompts), size))]
        job = {"out": str(out), "sites": sites, "positions": positions, "batch_size": batch_size, "dtype": dtype,
               "shard_rows": shard_rows, "add_bos": add_bos}
        with ray_session(ray) as ray_mod:
            _check_resources(ray_mod, ray, min(workers, len(parts)), worker_cpus, worker_gpus)
            pool = {"workers": min(workers, len(parts)), "cpus": worker_cpus, "gpus": worker_gpus}
            _capture_parts(ray_mod, spec, expect, pool, parts, job,
                           (lambda: _write_plan(out, prompts, size)) if new_plan else None, progress, on_part)
        _commit(out, prompts, size, _part_manifests(out, len(parts)), expect)
    return st.ActivationStore(out)


def _capture_parts(ray, spec: dict, expect: str | None, pool: dict, parts: list, job: dict, write_plan, progress: bool,
                   on_part) -> None:
    """Start the workers and their progress queue, check them, write the plan (``write_plan``, once the model and
    sites are known good), run ``parts``, and stop every worker whatever happens."""
    from ray.util.queue import Queue

    queue = Queue(actor_options={"num_cpus": 0})
    actor = ray.remote(num_cpus=pool["cpus"], num_gpus=pool["gpus"], max_restarts=-1,
                       max_task_retries=-1)(PartWriter)
    actors = [actor.remote(spec, max(1, int(pool["cpus"]))) for _ in range(pool["workers"])]
    try:
        _check_ready(ray, actors, job["sites"], spec, expect)
        if write_plan is not None:
            write_plan()
        _run_parts(ray, actors, queue, parts, job, sum(len(p[2]) for p in parts), progress, on_part)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        queue.shutdown()
