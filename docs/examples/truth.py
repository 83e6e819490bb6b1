"""Truthful directions on the embedded model (docs/truth.md): held-out AUROC per layer, ITI heads, transfer,
and per-token truth scores along a generated answer. Writes truth/ (the report folder, with the directions) and
truth.png.

Writes into $HIDDENLENS_OUT (default runs/examples; HIDDENLENS_OUT=docs/figures regenerates the docs'
figure).
"""
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import hiddenlens as hl
from hiddenlens.analyses.truth import token_scores
from hiddenlens.studies import truth as study

OUT = Path(os.environ.get("HIDDENLENS_OUT", "runs/examples"))    # where figures and files go
OUT.mkdir(parents=True, exist_ok=True)

handle = hl.load_model()                                   # SmolLM2-135M-Instruct, offline
res = study.run(study.TruthConfig(family="capitals", transfer=["negations", "arithmetic"], k_heads=0), handle)
res.write(OUT / "truth", overwrite=True)                   # tables, directions (.safetensors + .json), report.md
layers = res.tables["layers"]
print(layers.pivot(index="layer", columns="method", values="auroc").round(3))
print(res.tables["transfer"].pivot(index="train_family", columns="test_family", values="auroc").round(3))

probe = res.directions["probe"]                            # best layer, refitted on train + val countries
fig, ax = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1, 1.6]})
for method, g in layers.groupby("method", sort=False):
    ax[0].plot(g.layer, g.auroc, marker=".", label=method)
ax[0].axhline(0.5, color="grey", lw=0.8, ls=":")
ax[0].set(xlabel="layer (resid_post, last token)", ylabel="held-out AUROC",
          title="capital statements, split by country")
ax[0].legend()
s = token_scores(handle, probe, "The capital of Australia is Canberra. The capital of Chile is Lima.")
ax[1].bar(s.position, s.p_true)
ax[1].set_xticks(s.position, s.token, rotation=60, fontsize=8)
ax[1].axhline(0.5, color="grey", lw=0.8, ls=":")
ax[1].set(ylabel="p_true", title=f"per-token truth score ({probe.name})")
plt.savefig(OUT / "truth.png", dpi=90, bbox_inches="tight")
