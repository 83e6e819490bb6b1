"""``hiddenlens capture``: stream sites of a prompt set to safetensors shards (resumable)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import DEFAULT_MODEL, Backend, BatchSize, Device, Dtype, Model, Out, console, load


def capture(prompts: Path = typer.Option(..., help="prompt file: .txt (one per line) or .jsonl ({'id','text'})"),
            sites: str = typer.Option(..., help="comma-separated sites, e.g. 'blocks.*.resid_post,embed'"),
            out: Out = ..., model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto",
            dtype: Dtype = "auto",
            store_dtype: str = typer.Option("float32", help="dtype of the stored activations"),
            positions: str = typer.Option("all", help="all | last"),
            batch_size: BatchSize = 8,
            shard_rows: int = typer.Option(4096, help="rows (tokens) per shard"),
            add_bos: Optional[bool] = typer.Option(None, "--add-bos/--no-bos",
                                                   help="prepend BOS (default: tokenizer behaviour)"),
            resume: bool = typer.Option(False, help="continue an interrupted capture in OUT")) -> None:
    """Stream the chosen sites of a prompt set to disk (atomic shards, resumable after kill -9)."""
    from hiddenlens.models.loading import pick_dtype
    from hiddenlens.probes.store import write_activations

    handle = load(model, backend, device, dtype)
    store = write_activations(handle, prompts, [s.strip() for s in sites.split(",") if s.strip()], out,
                              positions=positions, batch_size=batch_size,
                              dtype=pick_dtype(store_dtype, handle.device), shard_rows=shard_rows, add_bos=add_bos,
                              resume=resume)
    console.print(f"wrote {len(store)} rows x {len(store.sites)} sites in {len(store.shards)} shards to {out}")
