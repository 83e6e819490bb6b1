"""Direct logit attribution (``hiddenlens.analyses.dla``): how much each component writes toward a token's logit.

The final residual stream at one position is a sum of what was written into it:
``blocks.{L-1}.resid_post = embed + sum_l (attn.out_l + mlp.out_l)`` (true for sequential and parallel residual
blocks alike), and each attention output splits further into heads: ``attn.out = sum_h z_h W_O[:, h] + b_O``.
The logit of token t is ``W_U[t] . FinalNorm(x) (+ b_U[t])``. The final norm is not linear, so its scale is
**frozen at the clean run** (the standard DLA convention, as in TransformerLens): with ``r = 1 / rms(x)`` (RMSNorm)
or ``r = 1 / std(x)`` (LayerNorm, which also centres each part) taken from the actual final residual ``x``, every
part ``c`` contributes ``W_U[t] . (w * r * c)``, the norm's bias and the unembedding bias are parts of their own,
and the parts add up to the logit exactly (up to float rounding; checked at run time within 1e-4, raising if this
model's final norm is of a kind this decomposition does not know).

The result is read from one forward through ``hl.capture`` (``embed``, every ``attn.out``, ``attn.z`` and
``mlp.out``, and ``final_norm`` for the check).
"""
from __future__ import annotations

import pandas as pd
import torch

from hiddenlens.probes.capture import capture


def _norm_parts(module: torch.nn.Module, x: torch.Tensor):
    """``(weight [d], r (scalar), centred: bool, bias [d] | None)`` of the final norm frozen at residual ``x [d]``."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    weight = module.weight.detach().float()
    name = type(module).__name__.lower()
    xf = x.float()
    if isinstance(module, torch.nn.LayerNorm) or ("layernorm" in name and "rms" not in name):
        r = 1.0 / torch.sqrt(xf.var(unbiased=False) + eps)
        bias = module.bias.detach().float() if getattr(module, "bias", None) is not None else None
        return weight, r, True, bias
    if "gemma" in name:  # Gemma's RMSNorm scales by (1 + weight)
        weight = 1.0 + weight
    return weight, 1.0 / torch.sqrt(xf.pow(2).mean() + eps), False, None


def direct_logit_attribution(handle, prompt, tokens: list[str] | list[int], position: int = -1,
                             per_head: bool = True, add_bos: bool | None = None, atol: float = 1e-4) -> pd.DataFrame:
    """Per component (``embed``, each layer's ``attn`` (or each head and the output bias), each ``mlp``, the
    norm and unembedding biases): its contribution to the logit of each of ``tokens`` at ``position``.

    Returns one row per component: ``component``, ``layer``, ``head`` and one column per token (logit units); the
    rows sum to the model's logits (``df.attrs["logits"]``). Pass two tokens and take the column difference for a
    logit-difference attribution.
    """
    a = handle.adapter
    ids = [handle.tokenizer(t, add_special_tokens=False)["input_ids"] if isinstance(t, str) else [int(t)]
           for t in tokens]
    if not ids or any(len(i) != 1 for i in ids):
        raise ValueError(f"tokens {tokens!r}: each must be one token (e.g. ' Paris' with its leading space)")
    tok = torch.tensor([i[0] for i in ids])
    sites = ["embed", "blocks.*.attn.out", "blocks.*.mlp.out", "final_norm", f"blocks.{a.n_layers - 1}.resid_post"]
    if per_head:
        sites.append("blocks.*.attn.z")
    with torch.inference_mode(), capture(handle, sites) as cache:
        logits = handle.run([prompt] if isinstance(prompt, str) else [list(prompt)], add_bos=add_bos).logits[0]
    model = handle.hf_model
    unembed = a.unembedding(model)
    W_U = unembed.weight.detach().float()[tok]                                        # [t, d]
    x = cache[f"blocks.{a.n_layers - 1}.resid_post"][0, position].float()
    weight, r, centred, bias = _norm_parts(a.final_norm(model), x)

    def contrib(c: torch.Tensor) -> torch.Tensor:                                      # [d] -> [t]
        c = c.float()
        if centred:
            c = c - c.mean()
        return W_U @ (weight * r * c)

    rows = [("embed", None, None, contrib(cache["embed"][0, position]))]
    for layer in range(a.n_layers):
        attn = cache[f"blocks.{layer}.attn.out"][0, position]
        if per_head:
            z = cache[f"blocks.{layer}.attn.z"][0, :, position].float()                # [heads, head_dim]
            o = a.sub(model, layer, a.o_path)
            w = o.weight.detach().float()
            w = w.T if type(o).__name__ == "Conv1D" else w   # GPT-2's Conv1D stores [in, out]
            W_O = w.reshape(a.d_model, a.n_heads, a.head_dim)                             # [d, heads, hd]
            heads = torch.einsum("hk,dhk->hd", z, W_O)                                  # [heads, d]
            rest = attn.float() - heads.sum(0)   # the output bias (and nothing else, checked by the sum below)
            rows += [("attn_head", layer, h, contrib(heads[h])) for h in range(a.n_heads)]
            rows.append(("attn_bias", layer, None, contrib(rest)))
        else:
            rows.append(("attn", layer, None, contrib(attn)))
        rows.append(("mlp", layer, None, contrib(cache[f"blocks.{layer}.mlp.out"][0, position])))
    if bias is not None:
        rows.append(("final_norm_bias", None, None, W_U @ bias))
    if getattr(unembed, "bias", None) is not None:
        rows.append(("unembed_bias", None, None, unembed.bias.detach().float()[tok]))
    names = [str(t) for t in tokens]
    df = pd.DataFrame([{"component": c, "layer": l, "head": h, **dict(zip(names, v.tolist()))}
                       for c, l, h, v in rows])
    target = logits[position, tok].float().cpu()
    total = torch.tensor(df[names].sum().to_numpy(), dtype=torch.float32)
    err = float((total - target).abs().max())
    if err > atol * max(1.0, float(target.abs().max())):
        raise RuntimeError(f"direct logit attribution does not add up on this model (parts sum {total.tolist()}, "
                           f"logits {target.tolist()}): its final norm {type(a.final_norm(model)).__name__} or "
                           "residual structure is not one this decomposition knows")
    df.attrs["logits"] = dict(zip(names, target.tolist()))
    df.attrs["max_abs_error"] = err
    return df
