"""Past one machine: capture a prompt set on a local Ray cluster with 2 workers, check that the store equals the
single-process one row for row, then draw the measured rows/s of `hiddenlens bench ray` on the embedded model
(docs/results/scale/ray.json). Writes scale.png into $HIDDENLENS_OUT (default runs/examples)."""
import json
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import hiddenlens as hl  # noqa: E402
from hiddenlens.probes.store import write_activations  # noqa: E402

OUT = Path(os.environ.get("HIDDENLENS_OUT", "runs/examples"))
prompts = [f"Prompt number {i} says something about the weather in town {i % 7}." for i in range(24)]
with tempfile.TemporaryDirectory() as tmp:
    plain = write_activations(hl.load_model("tiny-llama"), prompts, "blocks.*.resid_post", Path(tmp) / "plain",
                              batch_size=4, progress=False)
    on_ray = write_activations("tiny-llama", prompts, "blocks.*.resid_post", Path(tmp) / "ray", batch_size=4,
                               ray="local", workers=2, progress=False)        # starts and stops a local cluster
    same = all(torch.equal(plain.read(s), on_ray.read(s)) for s in plain.sites)
    print(f"{len(on_ray)} rows x {len(on_ray.sites)} sites on 2 Ray workers; equal to one process: {same}")

bench = json.loads((Path(__file__).resolve().parents[1] / "results" / "scale" / "ray.json").read_text())
rows = bench["rows"]
fig, ax = plt.subplots(figsize=(7, 3.2))
bars = ax.barh([r["run"] for r in rows], [r["rows_per_s"] for r in rows], color=["#999999", "#4c72b0", "#55a868"])
for bar, r in zip(bars, rows):
    ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r['rows_per_s']:.0f} rows/s "
            f"({r['ratio_to_1_worker']:.2f}x 1 worker)", va="center", fontsize=9)
ax.invert_yaxis()
ax.set_xlim(0, max(r["rows_per_s"] for r in rows) * 1.45)
ax.set_xlabel(f"rows/s, capture phase ({bench['model']}, {bench['site']}, 1 torch thread per process, "
              f"{bench['cpus']} cores)", fontsize=8)
ax.set_title("capture --ray: 2 workers vs 1 on a 2-core machine")
fig.tight_layout()
OUT.mkdir(parents=True, exist_ok=True)
fig.savefig(OUT / "scale.png", dpi=120)
print(f"figure -> {OUT / 'scale.png'}")
