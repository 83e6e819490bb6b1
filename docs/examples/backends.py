"""Three backends, one site scheme: how far TransformerLens and nnsight are from the hf backend (docs/backends.md).

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
prompts = ["The capital of France is Paris, and the capital of Italy is", "Two plus two equals"]
sites = ["blocks.*.resid_post", "blocks.*.attn.z", "final_norm", "logits"]
caches = {}
for backend in ("hf", "transformer_lens", "nnsight"):
    handle = hl.load_model("smollm2-135m-instruct", backend=backend)   # same weights, default SDPA attention
    with hl.capture(handle, sites) as cache:
        handle.run(prompts)                                          # same call whatever the backend
    caches[backend] = cache
    del handle

real = caches["hf"].attention_masks[0].bool()                        # [batch, pos]: skip prompt 2's left padding


def fold(t):
    """Largest |value| per token over heads and features: [batch, pos]."""
    return t.abs().amax(dim=(1, 3)) if t.ndim == 4 else t.abs().amax(-1)


def max_diff(backend, site, relative=False):
    """Largest |difference| from the hf backend over real tokens (relative: divided by the largest |hf value|)."""
    d = float(fold(caches[backend][site] - caches["hf"][site])[real].max())
    return d / float(fold(caches["hf"][site])[real].max()) if relative else d


for backend, marker in (("transformer_lens", "o"), ("nnsight", "s")):
    for kind, style in (("resid_post", "-"), ("attn.z", ":")):
        err = [max_diff(backend, f"blocks.{i}.{kind}", relative=True) for i in range(30)]
        plt.semilogy(range(30), [max(e, 1e-12) for e in err], style, marker=marker, ms=3, label=f"{backend}: {kind}")
        largest = max(max_diff(backend, f"blocks.{i}.{kind}") for i in range(30))
        print(f"{backend} {kind}: largest absolute difference {largest:.1e}")
    print(f"{backend}: max |logit difference| vs hf = {max_diff(backend, 'logits'):.2e}")
plt.axhline(2 ** -23, color="gray", lw=0.8, label="fp32 machine epsilon")
plt.xlabel("block"), plt.ylabel("max |difference| / max |value| vs hf (0 drawn at 1e-12)")
plt.title("SmolLM2-135M fp32: hf (SDPA) vs the other backends"), plt.legend(fontsize=7)
plt.savefig(OUT / "backends.png", dpi=100, bbox_inches="tight")
