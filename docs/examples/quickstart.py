"""Quickstart: load the embedded model, capture every block's residual stream, plot its norms (docs/quickstart.md).

Writes into $HIDDENLENS_OUT (default runs/examples; HIDDENLENS_OUT=docs/figures regenerates the docs'
figure).
"""
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import hiddenlens as hl

OUT = Path(os.environ.get("HIDDENLENS_OUT", "runs/examples"))    # where figures and files go
OUT.mkdir(parents=True, exist_ok=True)
handle = hl.load_model()                                     # SmolLM2-135M-Instruct, offline, fp32 on CPU
with hl.capture(handle, "blocks.*.resid_post") as cache:
    handle.run(["The capital of France is Paris, and the capital of Italy is"], add_bos=True)
norms = [cache[f"blocks.{i}.resid_post"][0].norm(dim=-1) for i in range(handle.n_layers)]
plt.semilogy([float(n[0]) for n in norms], label="position 0 (<|im_start|>)")
plt.semilogy([float(n[1:].max()) for n in norms], label="max over other positions")
plt.xlabel("block"), plt.ylabel("residual norm"), plt.legend(), plt.title("residual-state peak")
plt.savefig(OUT / "quickstart.png", dpi=100, bbox_inches="tight")
