"""Effective dimensionality of N x d activations: streaming covariance vs materialising the matrix + sklearn PCA.

Both methods see the same seeded synthetic activations (chunks of ``[chunk, d]`` rows with a power-law spectrum
in a random rotation, standing in for residual-stream states; generating them costs the same on both sides).
Each method runs in its own child process, which reports its wall time and peak RSS above the baseline after
imports, so the two peaks are independent. Printed side by side with ratios; also written as JSON.

    hiddenlens bench dimensionality --n 100000 --d 576
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hiddenlens.common.files import write_json

_CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from hiddenlens.analyses.intention import participation_ratio, threshold_count, effective_dimensionality
from hiddenlens.probes.reducers import RunningStats
torch.set_num_threads(2)
method, n, d, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
rot = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].float()
scale = torch.arange(1, d + 1, dtype=torch.float32) ** -0.5
def chunks():
    for i, start in enumerate(range(0, n, chunk)):
        gi = torch.Generator().manual_seed(1000 + i)
        yield (torch.randn(min(chunk, n - start), d, generator=gi) * scale) @ rot.T
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if method == "streaming":
    stats = RunningStats()
    for x in chunks():
        stats.update(x)
    pr, k90 = effective_dimensionality(stats), effective_dimensionality(stats, "threshold")
else:
    from sklearn.decomposition import PCA
    X = torch.cat(list(chunks())).numpy()
    lam = PCA(svd_solver="full").fit(X).explained_variance_
    pr, k90 = participation_ratio(lam), threshold_count(lam)
print(json.dumps({"method": method, "seconds": time.perf_counter() - t, "participation_ratio": pr,
                  "threshold90": k90, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "baseline_rss_mib": base / 1024}))
"""


def run_benchmark(n: int = 100_000, d: int = 576, chunk: int = 4096, out: Path | None = None) -> dict:
    """Run both methods, print the side-by-side table, optionally write ``out`` (JSON); returns the results."""
    if n < 2 or d < 1 or chunk < 1:
        raise ValueError("n >= 2, d >= 1 and chunk >= 1 are required")
    rows = {}
    for method in ("streaming", "materialised"):
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", _CHILD, method, str(n), str(d), str(chunk)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"the {method} child failed:\n{res.stderr[-2000:]}")
        rows[method] = json.loads(res.stdout.strip().splitlines()[-1]) | {"wall_s": time.perf_counter() - t}
    s, m = rows["streaming"], rows["materialised"]
    extra = {k: r["peak_rss_mib"] - r["baseline_rss_mib"] for k, r in rows.items()}
    table = Table(title=f"effective dimensionality of {n:,} x {d} activations (synthetic, seeded)")
    for col in ("", "streaming RunningStats", "matrix + sklearn PCA", "ratio (matrix / streaming)"):
        table.add_column(col)
    table.add_row("time (s)", f"{s['seconds']:.2f}", f"{m['seconds']:.2f}", f"{m['seconds'] / s['seconds']:.2f}x")
    table.add_row("peak RSS above baseline (MiB)", f"{extra['streaming']:.0f}", f"{extra['materialised']:.0f}",
                  f"{extra['materialised'] / max(extra['streaming'], 1):.1f}x")
    table.add_row("participation ratio", f"{s['participation_ratio']:.4f}", f"{m['participation_ratio']:.4f}",
                  f"diff {abs(s['participation_ratio'] - m['participation_ratio']):.2e}")
    table.add_row("90% count", str(s["threshold90"]), str(m["threshold90"]), "")
    Console().print(table)
    result = {"n": n, "d": d, "chunk": chunk, "runs": rows, "extra_rss_mib": extra}
    if out is not None:
        write_json(out, result)
    return result


if __name__ == "__main__":
    run_benchmark()
