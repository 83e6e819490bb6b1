"""``hiddenlens info MODEL``: the architecture and every capturable site."""
from __future__ import annotations

import typer
from rich.table import Table

from .options import DEFAULT_MODEL, Backend, Device, Dtype, console, load


def info(model: str = typer.Argument(DEFAULT_MODEL, help="model spec: embedded, tiny-llama, tiny-gpt2, a folder or "
                                                        "a hub id"),
         backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "auto") -> None:
    """Print the architecture and every capturable site of MODEL."""
    handle = load(model, backend, device, dtype)
    table = Table(title=f"{handle.spec} ({handle.adapter.family}, backend {handle.backend.name})")
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
