"""Edit: zero each attention head of the embedded model in turn and measure the answer's logit (docs/edit.md).

One forward per layer: row 0 is the plain prompt, row 1 + h has head h of that layer zeroed (an ``hl.Apply`` op
that edits a different head in each row). Writes edit.png into $HIDDENLENS_OUT (default runs/examples).
"""
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import hiddenlens as hl

OUT = Path(os.environ.get("HIDDENLENS_OUT", "runs/examples"))
OUT.mkdir(parents=True, exist_ok=True)
handle = hl.load_model()                                     # SmolLM2-135M-Instruct, offline, fp32 on CPU
prompt, answer = "The capital of France is", " Paris"
target = handle.tokenizer(answer, add_special_tokens=False)["input_ids"][0]
H, L = handle.adapter.n_heads, handle.n_layers


def zero_own_head(z, where):
    """``z`` [rows, heads, pos, head_dim]: row 1 + h loses head h; row 0 stays plain."""
    z = z.clone()
    for h in range(H):
        z[1 + h, h] = 0
    return z


effect = torch.zeros(L, H)
with torch.inference_mode():
    for layer in range(L):
        with hl.edit(handle, {f"blocks.{layer}.attn.z": hl.Apply(zero_own_head)}):
            logits = handle.run([prompt] * (1 + H)).logits[:, -1, target]
        effect[layer] = logits[1:] - logits[0]              # change of the answer's logit, per head
worst = divmod(int(effect.argmin()), H)
print(f"plain logit of {answer!r}: {float(logits[0]):.2f}; largest drop {float(effect.min()):.2f} "
      f"(layer {worst[0]}, head {worst[1]}); heads that move it by > 0.5: {int((effect.abs() > 0.5).sum())} of {L * H}")
lim = float(effect.abs().max())
plt.figure(figsize=(5, 7))
plt.imshow(effect, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
plt.colorbar(label=f"change of the logit of {answer!r}")
plt.xlabel("head"), plt.ylabel("layer (block)"), plt.title(f"zero one head: {prompt!r}")
plt.savefig(OUT / "edit.png", dpi=100, bbox_inches="tight")
