"""Peak resident memory while streaming a prompt set to the activation store.

Streams the first N/4 and N prompts (of offline prose, 24-word chunks, about 32 tokens) in separate child processes
and reads each child's peak RSS, so the numbers are independent. Bounded memory means the peaks are about equal.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.table import Table

from hiddenlens.common.files import write_json
from hiddenlens.models.tiny import offline_prose

_CHILD = r"""
import json, resource, sys, time
import hiddenlens as hl
from hiddenlens.probes.store import write_activations
model, n, out, sites = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].split(",")
prompts = json.loads(open(sys.argv[5]).read())[:n]
handle = hl.load_model(model)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
write_activations(handle, prompts, sites, out, batch_size=8, shard_rows=2048, progress=False)
print(json.dumps({"prompts": n, "seconds": time.perf_counter() - t,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_after_load_mib": base / 1024}))
"""


def _prompts(n: int, words: int = 24) -> list[str]:
    tokens = offline_prose().split()
    return [" ".join(tokens[i * words:(i + 1) * words]) for i in range(n)]


def run_store_benchmark(model: str, n_prompts: int, out: Path, sites: list[str], console) -> dict:
    """Run the three sizes, print a table, write ``out/store_rss.json``; returns the result dict."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pfile = Path(tmp) / "prompts.json"
        pfile.write_text(json.dumps(_prompts(n_prompts)))
        for n in (max(1, n_prompts // 4), n_prompts):
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", _CHILD, model, str(n), str(Path(tmp) / f"store{n}"),
                                  ",".join(sites), str(pfile)], capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]) | {"wall_s": time.perf_counter() - t})
    table = Table(title=f"streaming {sites} of {model} to disk")
    for c in ("prompts", "capture s", "RSS after load MiB", "peak RSS MiB", "peak / peak at N/4"):
        table.add_column(c)
    for r in rows:
        table.add_row(str(r["prompts"]), f"{r['seconds']:.1f}", f"{r['rss_after_load_mib']:.0f}",
                      f"{r['peak_rss_mib']:.0f}", f"{r['peak_rss_mib'] / rows[0]['peak_rss_mib']:.3f}")
    console.print(table)
    result = {"model": model, "sites": sites, "runs": rows}
    write_json(out / "store_rss.json", result)
    return result
