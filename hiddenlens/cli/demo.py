"""``hiddenlens demo``: load, capture a prompt, print a per-layer report in the terminal."""
from __future__ import annotations

import typer
from rich.table import Table

from hiddenlens.studies.report import PREPEND_BOS

from .analyze import AddBos
from .options import DEFAULT_MODEL, Backend, Device, Dtype, Model, console, load


def demo(model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "auto",
         prompt: str = typer.Option("The capital of France is", help="the prompt to look at"),
         add_bos: AddBos = PREPEND_BOS) -> None:
    """End-to-end demo: load, capture every block's residual stream and attention, print a short report
    (position 0 is the BOS unless ``--no-bos``)."""
    import torch

    import hiddenlens as hl

    handle = load(model, backend, device, dtype)
    n = handle.n_layers
    with hl.capture(handle, ["blocks.*.resid_post", "blocks.*.attn.pattern"]) as cache:
        out = handle.run([prompt], add_bos=add_bos)
    ids = out.input_ids[0].tolist()
    console.print(f"[bold]{handle!r}[/bold]\nprompt tokens: {[handle.tokenizer.decode([i]) for i in ids]}")
    probs = out.logits[0, -1].float().softmax(-1)
    top = probs.topk(5)
    console.print("next token: " + ", ".join(f"{handle.tokenizer.decode([int(i)])!r} {float(p):.2f}"
                                            for p, i in zip(top.values, top.indices)))
    table = Table(title="per layer (last position)")
    for col in ("layer", "|resid| last", "|resid| pos 0 / others", "attn to pos 0 (mean over heads)",
                "logit-lens top-1"):
        table.add_column(col)
    norm, unembed = handle.adapter.final_norm(handle.hf_model), handle.adapter.unembedding(handle.hf_model)
    for i in range(n):
        h = cache[f"blocks.{i}.resid_post"][0]
        norms = h.float().norm(dim=-1)
        ratio = float(norms[0] / norms[1:].mean()) if len(norms) > 1 else float("nan")
        attn0 = float(cache[f"blocks.{i}.attn.pattern"][0, :, 1:, 0].float().mean()) if h.shape[0] > 1 else 1.0
        with torch.inference_mode():
            lens = unembed(norm(h[-1:])) if i < n - 1 else out.logits[0, -1:]
        table.add_row(str(i), f"{float(norms[-1]):.1f}", f"{ratio:.1f}", f"{attn0:.2f}",
                      repr(handle.tokenizer.decode([int(lens[-1].argmax())])))
    console.print(table)
