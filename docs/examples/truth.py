"""Truthful directions on the embedded model (docs/truth.md): held-out AUROC per layer, ITI heads, transfer,
and per-token truth scores along a generated answer. Writes results/truth/ and docs/figures/truth.png."""
import matplotlib.pyplot as plt

import hiddenlens as hl
from hiddenlens.analyses.truth import fit_truth, token_scores, write_truth_report

handle = hl.load_model()                                   # SmolLM2-135M-Instruct, offline
res = fit_truth(handle, "capitals", transfer_families=["negations", "arithmetic"], k_heads=0)
write_truth_report(res, "results/truth")                   # tables, directions (.safetensors + .json), report.md
print(res.layers.pivot(index="layer", columns="method", values="auroc").round(3))
print(res.transfer.pivot(index="train_family", columns="test_family", values="auroc").round(3))

probe = res.directions["probe"]                            # best layer, refitted on train + val countries
fig, ax = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1, 1.6]})
for method, g in res.layers.groupby("method", sort=False):
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
plt.savefig("docs/figures/truth.png", dpi=90, bbox_inches="tight")
