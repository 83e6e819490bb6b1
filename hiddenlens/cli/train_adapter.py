"""``hiddenlens train-adapter``: train TaH's LoRA for iterations >= 1 (safetensors + JSON)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import options as o
from .options import DEFAULT_MODEL, Backend, Device, Dtype, Model, Threads


def train_adapter(
    out: Path = typer.Option(..., help="folder for adapter.safetensors + adapter.json"),
    model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "auto",
    decider: Optional[Path] = typer.Option(None, help="folder of a trained MLP decider whose positions the adapter "
                                           "learns on (default: the entropy decider)"),
    entropy_threshold: float = typer.Option(2.5, min=0.0, help="entropy decider threshold (nats)"),
    chunks: int = typer.Option(32, min=1, help="training prose chunks (first half of the offline prose)"),
    seq_len: int = typer.Option(128, min=4, help="tokens per chunk"),
    steps: int = typer.Option(64, min=1, help="optimizer steps, one chunk each"),
    rank: int = typer.Option(8, min=1), alpha: float = typer.Option(16.0), lr: float = typer.Option(1e-3),
    seed: int = typer.Option(0), threads: Threads = None,
    overwrite: bool = typer.Option(False, help="replace OUT when it already holds an adapter"),
):
    """Train the LoRA that TaH runs in iterations >= 1: next-token CE of the cumulative logits at the positions
    the decider iterates, teacher forced on offline prose; the base model is not modified."""
    from hiddenlens.common.folders import check_free
    from hiddenlens.interventions.decider import EntropyDecider, load_decider, prose_chunks
    from hiddenlens.interventions.tah_adapter import AdapterConfig, save_adapter, train_adapter as train

    check_free(out, overwrite)
    o.set_threads(threads)
    handle = o.load(model, backend, device, dtype)
    dec = load_decider(decider) if decider else EntropyDecider(entropy_threshold)
    config = AdapterConfig(rank=rank, alpha=alpha, lr=lr, steps=steps, seed=seed)
    lora, history = train(handle, prose_chunks(handle, "train", chunks, seq_len), dec, config)
    folder = save_adapter(lora, out, history, overwrite=overwrite)
    typer.echo(f"train loss (cumulative logits, nats): first 8 steps {history['loss'].head(8).mean():.3f}, "
               f"last 8 {history['loss'].tail(8).mean():.3f}; adapter: {folder}")
