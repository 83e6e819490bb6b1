"""Plot a `hiddenlens bench capture` result (docs/performance.md).

    hiddenlens bench capture --reps 3 --out runs/bench-capture/capture.json
    python docs/examples/performance.py runs/bench-capture/capture.json

Writes into $HIDDENLENS_OUT (default runs/examples; HIDDENLENS_OUT=docs/figures regenerates the docs'
figure).
"""
import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

OUT = Path(os.environ.get("HIDDENLENS_OUT", "runs/examples"))    # where figures and files go
OUT.mkdir(parents=True, exist_ok=True)

result = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "runs/bench-capture/capture.json"))
fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), sharey=True)
clocks = (("wall", "seconds", "median_s"), ("CPU", "cpu_seconds", "cpu_median_s"))
for row, (clock, runs_key, median_key) in zip(axes, clocks):
    for ax, scenario in zip(row, result["ratio_to_plain"]):
        runs, med = result[runs_key][scenario], result[median_key][scenario]
        names = list(med)
        ax.barh(names, [med[n] / med["plain"] for n in names],
                color=["gray" if n == "plain" else "C0" if n == "hiddenlens" else "C1" for n in names])
        for n in names:  # every repetition, as a ratio to the plain forward's median (y: the category itself)
            ax.plot([t / med["plain"] for t in runs[n]], [n] * len(runs[n]), "k|", ms=8)
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.set_title(f"{scenario}: {clock} time (plain median {med['plain']:.1f} s)", fontsize=9)
        ax.set_xlabel(f"{clock} time / plain forward (bar: median; ticks: each repetition)", fontsize=8)
axes[0][0].invert_yaxis()
fig.suptitle(f"{result['model']} {result['device']} {result['dtype']}, batch {result['batch']} x {result['tokens']} "
             f"tokens, {result['reps']} interleaved reps, {result['torch_threads']} thread(s), shared CPU",
             fontsize=9)
fig.tight_layout()
fig.savefig(OUT / "performance.png", dpi=90, bbox_inches="tight")
