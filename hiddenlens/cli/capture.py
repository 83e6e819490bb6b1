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
                                                    "damaged shards)"),
            ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS",
                                              help="capture on Ray workers: 'local' (start a local cluster), 'auto' "
                                                   "(this machine's cluster) or a cluster address"),
            workers: Optional[int] = typer.Option(None, help="Ray workers, each loading the model once (with --ray; "
                                                             "default 2)"),
            worker_cpus: Optional[float] = typer.Option(None, help="CPUs (and torch threads) per Ray worker (with "
                                                                   "--ray; default 1)"),
            worker_gpus: Optional[float] = typer.Option(None, help="GPUs per Ray worker (with --ray; default 0)"),
            part_prompts: Optional[int] = typer.Option(None, help="prompts per part, a multiple of --batch-size "
                                                                  "(with --ray; default: about 4 parts per worker)"),
            ) -> None:
    """Stream the chosen sites of a prompt set to disk (atomic shards, resumable after kill -9).

    OUT is locked for the whole run (from before the model loads), so a second capture into it fails at once.
    With --ray the model is loaded only in the Ray workers (docs/store.md)."""
    from hiddenlens.common.folders import locked
    from hiddenlens.probes.store import read_prompts, write_activations

    pool = {"workers": workers, "worker_cpus": worker_cpus, "worker_gpus": worker_gpus, "part_prompts": part_prompts}
    given = [f"--{k.replace('_', '-')}" for k, v in pool.items() if v is not None]
    if given and ray is None:
        raise ValueError(f"{', '.join(given)} only apply with --ray ADDRESS (e.g. --ray local); add --ray or leave "
                         "them out")
    prompt_list = read_prompts(prompts)
    site_list = [s.strip() for s in sites.split(",") if s.strip()]
    with locked(out), warnings.catch_warnings():
        warnings.showwarning = _show_warning
        if ray is None:
            handle = load(model, backend, device, dtype)
            store_torch_dtype = _store_dtype(store_dtype, handle.device)
        else:
            handle = {"spec": model, "backend": backend, "device": device, "dtype": dtype}
            store_torch_dtype = _store_dtype(store_dtype, None)
        store = write_activations(handle, prompt_list, site_list, out, positions=positions, batch_size=batch_size,
                                  dtype=store_torch_dtype, shard_rows=shard_rows, add_bos=add_bos, resume=resume,
                                  lock=False, ray=ray, **pool)
    console.print(f"wrote {len(store)} rows x {len(store.sites)} sites in {len(store.shards)} shards to {out}")


def _store_dtype(name: str, device):
    """``--store-dtype`` -> a torch dtype (``auto`` follows the model's device; on Ray, float32)."""
    import torch

    from hiddenlens.models.loading import pick_dtype

    try:
        return pick_dtype(name, device or torch.device("cpu"))
    except ValueError:
        raise ValueError(f"--store-dtype {name}: use float32, bfloat16 or float16") from None
