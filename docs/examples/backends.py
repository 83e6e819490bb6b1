"""Three backends, one site scheme: how far TransformerLens and nnsight are from the hf backend (docs/backends.md)."""
import matplotlib.pyplot as plt

import hiddenlens as hl

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


def max_diff(backend, site):
    """Largest |difference| from the hf backend over real tokens (heads and features folded)."""
    d = (caches[backend][site] - caches["hf"][site]).abs()
    d = d.amax(dim=(1, 3)) if d.ndim == 4 else d.amax(-1)           # [batch, pos]
    return float(d[real].max())


for backend, marker in (("transformer_lens", "o"), ("nnsight", "s")):
    for kind, style in (("resid_post", "-"), ("attn.z", ":")):
        err = [max_diff(backend, f"blocks.{i}.{kind}") for i in range(30)]
        plt.semilogy(range(30), [max(e, 1e-9) for e in err], style, marker=marker, ms=3, label=f"{backend}: {kind}")
    print(f"{backend}: max |logit difference| vs hf = {max_diff(backend, 'logits'):.2e}")
plt.axhline(1e-4, color="gray", lw=0.8, label="1e-4 (parity tolerance, fp32 eager)")
plt.xlabel("block"), plt.ylabel("max |difference| vs hf backend (0 drawn at 1e-9)")
plt.title("SmolLM2-135M fp32: hf (SDPA) vs the other backends"), plt.legend(fontsize=7)
plt.savefig("docs/figures/backends.png", dpi=100, bbox_inches="tight")
