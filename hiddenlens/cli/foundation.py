"""Foundation commands: ``hiddenlens info``, ``hiddenlens capture``, ``hiddenlens demo``, ``hiddenlens bench store``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import app, bench_app

console = Console()


def _load(model: str, backend: str = "hf", device: str = "auto", dtype: str = "auto"):
    import hiddenlens as hl

    with console.status(f"loading {model} ({backend})"):
        return hl.load_model(model, backend=backend, device=device, dtype=dtype)


@app.command()
def info(model: str = typer.Argument("smollm2-135m-instruct", help="model spec: embedded, tiny-llama, HF dir/id"),
         backend: str = typer.Option("hf", help="hf | transformer_lens | nnsight")) -> None:
    """Print the architecture and every capturable site of MODEL."""
    handle = _load(model, backend)
    table = Table(title=f"{handle.spec} ({handle.adapter.family}, backend {handle.backend})")
    table.add_column("field")
    table.add_column("value")
    for k, v in handle.adapter.describe().items():
        table.add_row(k, str(v))
    table.add_row("device / dtype", f"{handle.device} / {handle.dtype}")
    console.print(table)
    sites = handle.site_names()
    console.print(f"[bold]{len(sites)} capturable sites[/bold] (per block: resid_pre, attn.q|k|v|z|scores|pattern|out,"
                  " resid_mid, mlp.pre|post|out, resid_post):")
    for s in sites:
        console.print("  " + s)


@app.command("capture")
def capture_cmd(prompts: Path = typer.Option(..., help="prompt file: .txt (one per line) or .jsonl ({'id','text'})"),
                sites: str = typer.Option(..., help="comma-separated sites, e.g. 'blocks.*.resid_post,embed'"),
                out: Path = typer.Option(..., help="output folder (safetensors shards + manifest.json)"),
                model: str = typer.Option("smollm2-135m-instruct"), backend: str = typer.Option("hf"),
                positions: str = typer.Option("all", help="all | last"),
                batch_size: int = typer.Option(8), dtype: str = typer.Option("float32", help="stored dtype"),
                shard_rows: int = typer.Option(4096, help="rows (tokens) per shard"),
                add_bos: Optional[bool] = typer.Option(None, "--add-bos/--no-bos",
                                                       help="prepend BOS (default: tokenizer behaviour)"),
                resume: bool = typer.Option(False, help="continue an interrupted capture in OUT")) -> None:
    """Stream the chosen sites of a prompt set to disk (atomic shards, resumable after kill -9)."""
    from hiddenlens.models.loading import pick_dtype
    from hiddenlens.probes.store import write_activations

    handle = _load(model, backend)
    store = write_activations(handle, prompts, [s.strip() for s in sites.split(",") if s.strip()], out,
                              positions=positions, batch_size=batch_size,
                              dtype=pick_dtype(dtype, handle.device), shard_rows=shard_rows, add_bos=add_bos,
                              resume=resume)
    console.print(f"wrote {len(store)} rows x {len(store.sites)} sites in {len(store.shards)} shards to {out}")


@app.command()
def demo(model: str = typer.Option("smollm2-135m-instruct"),
         prompt: str = typer.Option("The capital of France is")) -> None:
    """End-to-end demo: load, capture every block's residual stream and attention, print a short report."""
    import torch

    import hiddenlens as hl

    handle = _load(model)
    n = handle.n_layers
    with hl.capture(handle, ["blocks.*.resid_post", "blocks.*.attn.pattern"]) as cache:
        out = handle.run([prompt], add_bos=True)
    ids = out.input_ids[0].tolist()
    console.print(f"[bold]{handle!r}[/bold]\nprompt tokens: {[handle.tokenizer.decode([i]) for i in ids]}")
    probs = out.logits[0, -1].softmax(-1)
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
        norms = h.norm(dim=-1)
        ratio = float(norms[0] / norms[1:].mean()) if len(norms) > 1 else float("nan")
        attn0 = float(cache[f"blocks.{i}.attn.pattern"][0, :, 1:, 0].mean()) if h.shape[0] > 1 else 1.0
        with torch.inference_mode():
            lens = unembed(norm(h[-1:])) if i < n - 1 else out.logits[0, -1:]
        table.add_row(str(i), f"{float(norms[-1]):.1f}", f"{ratio:.1f}", f"{attn0:.2f}",
                      repr(handle.tokenizer.decode([int(lens[-1].argmax())])))
    console.print(table)


@bench_app.command("store")
def bench_store(model: str = typer.Option("smollm2-135m-instruct"), prompts: int = typer.Option(2000),
                out: Path = typer.Option(Path("runs/bench-store"), help="folder for the JSON result and the store"),
                sites: str = typer.Option("blocks.12.resid_post,blocks.24.resid_post")) -> None:
    """Peak RSS while streaming PROMPTS prompts to disk: bounded, independent of the number of prompts."""
    from hiddenlens.benchmarks.store import run_store_benchmark

    run_store_benchmark(model, prompts, out, sites.split(","), console)
