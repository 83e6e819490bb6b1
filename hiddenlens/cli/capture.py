"""``hiddenlens capture``: stream sites of a prompt set to safetensors shards (resumable)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import typer

from .options import DEFAULT_MODEL, Backend, BatchSize, Device, Dtype, Model, Out, console, load


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"warning: {' '.join(str(message).split())}", err=True)


def capture(prompts: Path = typer.Option(..., help="prompt file (UTF-8): .txt (one per line) or .jsonl "
                                                   "({'id','text'})"),
            sites: str = typer.Option(..., help="comma-separated sites, e.g. 'blocks.*.resid_post,embed'"),
            out: Out = ..., model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto",
            dtype: Dtype = "auto",
            store_dtype: str = typer.Option("float32", help="dtype of the stored activations: float32 | bfloat16 | "
                                                            "float16"),
            positions: str = typer.Option("all", help="all | last"),
            batch_size: BatchSize = 8,
            shard_rows: int = typer.Option(4096, help="rows (tokens) per shard"),
            add_bos: Optional[bool] = typer.Option(None, "--add-bos/--no-bos",
                                                   help="prepend BOS (default: tokenizer behaviour)"),
            resume: bool = typer.Option(False, help="continue an interrupted capture in OUT (re-captures missing or "
                                                    "damaged shards)")) -> None:
    """Stream the chosen sites of a prompt set to disk (atomic shards, resumable after kill -9).

    OUT is locked for the whole run (from before the model loads), so a second capture into it fails at once."""
    from hiddenlens.common.folders import locked
    from hiddenlens.models.loading import pick_dtype
    from hiddenlens.probes.store import read_prompts, write_activations

    prompt_list = read_prompts(prompts)
    with locked(out), warnings.catch_warnings():
        warnings.showwarning = _show_warning
        handle = load(model, backend, device, dtype)
        try:
            store_torch_dtype = pick_dtype(store_dtype, handle.device)
        except ValueError:
            raise ValueError(f"--store-dtype {store_dtype}: use float32, bfloat16 or float16") from None
        store = write_activations(handle, prompt_list, [s.strip() for s in sites.split(",") if s.strip()], out,
                                  positions=positions, batch_size=batch_size, dtype=store_torch_dtype,
                                  shard_rows=shard_rows, add_bos=add_bos, resume=resume, lock=False)
    console.print(f"wrote {len(store)} rows x {len(store.sites)} sites in {len(store.shards)} shards to {out}")
