"""Token replacement: how far the next-token distribution moves when a clause's state at one layer is swapped for
its uncontextualized state (docs/leakage.md). Writes replace.png.

Writes into $HIDDENLENS_OUT (default runs/examples; HIDDENLENS_OUT=docs/figures regenerates the docs'
figure).
"""
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import hiddenlens as hl
from hiddenlens.common.stats import kl_divergence, log_probs
from hiddenlens.interventions.replace import compare_replacement, isolated_inputs, locate_span, run_replaced

OUT = Path(os.environ.get("HIDDENLENS_OUT", "runs/examples"))    # where figures and files go
OUT.mkdir(parents=True, exist_ok=True)

torch.set_grad_enabled(False)
handle = hl.load_model()                                     # SmolLM2-135M-Instruct, offline, fp32 on CPU
prompt = "He likes yellow. His father works as a"
span = locate_span(handle, prompt, "His father works as a")  # the leaked-into item
ids, _ = isolated_inputs(handle, span)                       # [BOS] + the clause alone
alone = log_probs(handle.run([ids], add_bos=None).logits[0, -1])

layers = list(range(0, handle.n_layers, 3)) + [handle.n_layers - 1]
kl_ctx, kl_alone = [], []
for layer in layers:                                         # replace the clause at one block's output
    res = run_replaced(handle, prompt, span, layer)
    before, after = (log_probs(x[-1]) for x in (res.logits_before, res.logits_after))
    kl_ctx.append(float(kl_divergence(after, before, from_log_probs=True)))
    kl_alone.append(float(kl_divergence(alone, after, from_log_probs=True)))

cmp = compare_replacement(handle, prompt, span, (0, handle.n_layers - 1), max_new_tokens=12, top_k=5)
print(cmp.table.head(8).to_string(index=False))
print("before:", cmp.continuation_before, "| after:", cmp.continuation_after)

fig, ax = plt.subplots(figsize=(6, 3.4))
ax.plot(layers, kl_ctx, "o-", label="KL(after || unpatched)")
ax.plot(layers, kl_alone, "s-", label="KL(clause alone || after)")
ax.set_xlabel("replaced block output (blocks.l.resid_post; 29 = the last block)")
ax.set_ylabel("next-token KL (nats)")
ax.set_title(f"Replacing '{span.text}' in '{prompt}'", fontsize=9), ax.legend(fontsize=8)
fig.savefig(OUT / "replace.png", dpi=100, bbox_inches="tight")
