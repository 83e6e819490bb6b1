"""Intention metrics on the embedded model without generation: H_int, dim_eff per layer, recoverability.

Forward passes only (a few seconds per batch on CPU): 60 zero-shot direct-regime prompts, the intention state at
every layer, and a probe recovering the problem's difficulty level (1 vs 2-3) from the last-5-layer states.
Run from the repository root: python docs/examples/intention_metrics.py
Writes into $HIDDENLENS_OUT (default runs/examples; HIDDENLENS_OUT=docs/figures regenerates the docs'
figure).
"""
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import hiddenlens as hl
from hiddenlens.analyses.arithmetic import make_problems
from hiddenlens.analyses.intention import layered_dimensionality, recoverability
from hiddenlens.analyses.regimes import build_messages, chat_prompt_ids, intention_pass

OUT = Path(os.environ.get("HIDDENLENS_OUT", "runs/examples"))    # where figures and files go
OUT.mkdir(parents=True, exist_ok=True)

handle = hl.load_model()
problems = make_problems(60, seed=0)
prompts = [chat_prompt_ids(handle.tokenizer, build_messages(p, "direct")) for p in problems]
layers = list(range(handle.n_layers))
res = intention_pass(handle, prompts, layers, batch_size=10)          # states [60, 30, 576], H_int [60]

dims = layered_dimensionality({layer: res["states"][:, layer] for layer in layers})
print(dims.table.round(3).to_string(), "\naggregate PR:", round(dims.aggregate, 2))
print(f"H_int: top-100 {res['h_int'].mean():.2f} bits, full vocabulary {res['h_int_full'].mean():.2f} bits")
level_hard = [p.level > 1 for p in problems]
rec = recoverability(res["states"][:, -5:], level_hard)               # vec(I) over the last 5 layers
print(f"Recov(level > 1): AUROC {rec.auroc:.3f} [{rec.ci_low:.3f}, {rec.ci_high:.3f}], "
      f"shuffled {rec.shuffled_auroc:.3f}")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
axes[0].plot(dims.table["layer"], dims.table["dim_eff"], marker="o")
axes[0].set(xlabel="layer (resid_post, last prompt position)", ylabel="participation ratio",
            title=f"dim_eff over 60 items (aggregate {dims.aggregate:.1f})")
axes[1].hist(res["h_int"], bins=15, alpha=0.6, label="top-100")
axes[1].hist(res["h_int_full"], bins=15, alpha=0.6, label="full vocabulary")
axes[1].set(xlabel="H_int (bits)", ylabel="items", title="first-token entropy")
axes[1].legend()
fig.tight_layout()
fig.savefig(OUT / "intention_metrics.png", dpi=100)
