"""``hiddenlens bench ray``: rows/s of ``capture --ray`` with 1 and 2 workers beside the plain single-process run.

One prompt set of offline prose, one site, the same batch size everywhere; every worker runs one torch thread,
and so does the plain run (the fair comparison on a machine with as many cores as workers). Each store is checked
equal to the plain one (``torch.equal`` of every row). Reported per run: rows, seconds of the capture phase (first
part started to last part finished: model loads and the cluster start are shown apart, as "whole call"), rows/s,
the ratio to 1 worker, the worker-seconds per capture second (how many workers really ran at once) and the peak
RSS of each worker process.
"""
from __future__ import annotations

import collections
import os
import tempfile
import time
from pathlib import Path

import torch

from hiddenlens.common.files import write_json
from hiddenlens.common.ray_cluster import ray_session
from hiddenlens.models.tiny import offline_prose
from hiddenlens.probes.handle import load_model
from hiddenlens.probes.ray_capture import write_activations_ray
from hiddenlens.probes.store import write_activations


def prose_prompts(n: int, words: int = 24) -> list[str]:
    """``n`` prompts of ``words`` words each, cut from the offline prose."""
    tokens = offline_prose(200_000).split()
    if len(tokens) < n * words:
        raise ValueError(f"{n} prompts x {words} words need more prose than ships ({len(tokens)} words)")
    return [" ".join(tokens[i * words:(i + 1) * words]) for i in range(n)]


def _ray_run(model: str, prompts, site: str, out: Path, workers: int, batch_size: int) -> dict:
    parts: list[dict] = []
    start = time.perf_counter()
    store = write_activations_ray(model, prompts, site, out, workers=workers, part_prompts=batch_size,
                                  batch_size=batch_size, progress=False, on_part=parts.append)
    whole = time.perf_counter() - start
    phase = max(p["finished_at"] for p in parts) - min(p["started_at"] for p in parts)
    rss: dict[int, int] = collections.defaultdict(int)
    for p in parts:
        rss[p["pid"]] = max(rss[p["pid"]], p["peak_rss_bytes"])
    return {"run": f"--ray local, {workers} worker(s)", "rows": len(store), "seconds": phase, "whole_call_s": whole,
            "rows_per_s": len(store) / phase, "concurrency": sum(p["finished_at"] - p["started_at"] for p in parts)
            / phase, "peak_rss_mib_per_worker": sorted(round(v / 2 ** 20) for v in rss.values()), "store": store}


def run_ray_benchmark(model: str = "smollm2-135m-instruct", n_prompts: int = 160, site: str = "blocks.15.resid_post",
                      batch_size: int = 8, out: str | Path | None = None) -> dict:
    """Plain vs ``--ray local`` with 1 and 2 workers (see the module docstring); returns (and writes) the rows."""
    prompts = prose_prompts(n_prompts)
    load_before = os.getloadavg()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        handle = load_model(model)
        start = time.perf_counter()
        plain = write_activations(handle, prompts, site, tmp / "plain", batch_size=batch_size, progress=False)
        plain_s = time.perf_counter() - start
        handle.unload()
        rows = [{"run": "plain, 1 process", "rows": len(plain), "seconds": plain_s, "whole_call_s": plain_s,
                 "rows_per_s": len(plain) / plain_s, "concurrency": 1.0, "peak_rss_mib_per_worker": []}]
        with ray_session("local", num_cpus=2):
            for workers in (1, 2):
                row = _ray_run(model, prompts, site, tmp / f"ray{workers}", workers, batch_size)
                same = torch.equal(row.pop("store").read(site), plain.read(site))
                rows.append(row | {"equal_to_plain": same})
    torch.set_num_threads(threads)
    one = rows[1]["rows_per_s"]
    for r in rows:
        r["ratio_to_1_worker"] = r["rows_per_s"] / one
    result = {"model": model, "site": site, "n_prompts": n_prompts, "batch_size": batch_size, "torch_threads": 1,
              "cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "rows": rows}
    if out:
        write_json(out, result)
    return result


def print_table(result: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"capture --ray on {result['cpus']} CPUs ({result['model']}, {result['site']}, "
                        f"{result['n_prompts']} prompts, 1 torch thread per process)")
    for col in ("run", "rows", "capture s", "rows/s", "x 1 worker", "workers at once", "whole call s", "RSS MiB"):
        table.add_column(col)
    for r in result["rows"]:
        table.add_row(r["run"], str(r["rows"]), f"{r['seconds']:.1f}", f"{r['rows_per_s']:.0f}",
                      f"{r['ratio_to_1_worker']:.2f}", f"{r['concurrency']:.2f}", f"{r['whole_call_s']:.1f}",
                      ", ".join(map(str, r["peak_rss_mib_per_worker"])) or "-")
    console.print(table)
    console.print(f"load average before {result['load_average_before'][0]:.1f}, after "
                  f"{result['load_average_after'][0]:.1f}")
