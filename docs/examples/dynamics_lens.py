"""Logit lens of "The capital of France is" on the embedded model: rank of " Paris", entropy, KL and
geometry per layer. Run from the repository root: python docs/examples/dynamics_lens.py
Writes into $HIDDENLENS_OUT (default runs/examples; HIDDENLENS_OUT=docs/figures regenerates the docs'
figure)."""
import os
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import hiddenlens as hl
from hiddenlens.analyses.dynamics import logit_lens

OUT = Path(os.environ.get("HIDDENLENS_OUT", "runs/examples"))    # where figures and files go
OUT.mkdir(parents=True, exist_ok=True)

handle = hl.load_model()                                    # embedded SmolLM2-135M-Instruct
df = logit_lens(handle, "The capital of France is", target=" Paris")
last = df[df["position"] == df["position"].max()]           # the prediction after "is"
print(last[["site", "top1_token", "top1_prob", "target_rank", "entropy", "kl_to_final", "norm"]].to_string())

depth = ["embed" if s == "embed" else s.split(".")[1] for s in last["site"]]  # embed, then block indices
fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
axes[0].semilogy(depth, last["target_rank"], marker="o"); axes[0].set_title("rank of ' Paris' (1 = top)")
axes[1].plot(depth, last["entropy"], marker="o", label="entropy")
axes[1].plot(depth, last["kl_to_final"], marker="o", label="KL to final"); axes[1].legend()
axes[1].set_title("nats")
axes[2].plot(depth, last["cos_last"], marker="o"); axes[2].set_title("cos(h_l, h_last)")
for ax in axes:
    ax.set_xlabel("site: embed, then block"), ax.tick_params(axis="x", labelsize=6, rotation=90)
fig.tight_layout()
fig.savefig(OUT / "dynamics_paris.png", dpi=100)
