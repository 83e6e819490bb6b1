"""Plot a `hiddenlens bench capture` result (docs/performance.md).

    hiddenlens bench capture --reps 3 --out runs/bench-capture/capture.json
    python docs/examples/performance.py runs/bench-capture/capture.json
"""
import json
import sys

import matplotlib.pyplot as plt

result = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "runs/bench-capture/capture.json"))
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
for ax, (scenario, ratios) in zip(axes, result["ratio_to_plain"].items()):
    names = list(ratios)
    runs = result["seconds"][scenario]
    plain = result["median_s"][scenario]["plain"]
    ax.barh(names, [ratios[n] for n in names], color=["gray" if n == "plain" else "C0" if n == "hiddenlens"
                                                       else "C1" for n in names])
    for y, n in enumerate(names):  # every repetition, as a ratio to the plain forward's median
        ax.plot([t / plain for t in runs[n]], [y] * len(runs[n]), "k|", ms=8)
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.set_title(scenario, fontsize=9)
    ax.set_xlabel("time / plain forward (median; ticks: each repetition)")
axes[0].invert_yaxis()
fig.suptitle(f"{result['model']} {result['device']} {result['dtype']}, batch {result['batch']} x {result['tokens']} "
             f"tokens, {result['reps']} interleaved reps, plain forward {1000 * result['median_s']['resid_post']['plain']:.0f} ms",
             fontsize=9)
fig.savefig("docs/figures/performance.png", dpi=100, bbox_inches="tight")
