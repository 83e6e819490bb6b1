"""``hiddenlens train-decider``: train the MLP iteration decider (safetensors + JSON)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import options as o
from .options import DEFAULT_MODEL, Backend, Device, Dtype, Model, Threads


def train_decider(
    out: Path = typer.Option(Path("runs/decider"), help="folder for decider.safetensors + decider.json"),
    model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "auto",
    layers: Optional[str] = typer.Option(None, help="blocks whose outputs the decider reads, e.g. '1,9,17,25' "
                                  "(default: the decider's own, blocks 1,9,17,25); " + o.LAYERS_HELP),
    chunks: int = typer.Option(48, help="training prose chunks (first half of the offline prose)"),
    seq_len: int = typer.Option(128, help="tokens per chunk"),
    topk: int = typer.Option(100, help="top-k logit values fed to the decider"),
    hidden: int = typer.Option(256), blocks: int = typer.Option(2), epochs: int = typer.Option(8),
    lr: float = typer.Option(1e-3), threshold: float = typer.Option(0.5, help="iterate iff sigmoid > threshold"),
    seed: int = typer.Option(0), threads: Threads = None,
    overwrite: bool = typer.Option(False, help="replace OUT when it already holds a decider (default: refuse)"),
):
    """Train the MLP iteration decider (BCE on 'first pass mispredicted') on held-out prose; safetensors + JSON."""
    from hiddenlens.interventions.decider import (DEFAULT_SITES, MLPDeciderConfig, decider_dataset, prose_chunks,
                                                  save_decider, train_mlp_decider)

    from hiddenlens.common.folders import check_free

    check_free(out, overwrite)
    o.set_threads(threads)
    handle = o.load(model, backend, device, dtype)
    picked = o.layers(layers, handle.n_layers)
    sites = list(DEFAULT_SITES) if picked is None else [f"blocks.{l}.resid_post" for l in picked]
    feats, labels, _ = decider_dataset(handle, prose_chunks(handle, "train", chunks, seq_len), sites, topk)
    cfg = MLPDeciderConfig(sites=sites, d_model=handle.adapter.d_model, topk=topk, hidden=hidden, n_blocks=blocks,
                           threshold=threshold, model=handle.spec)
    dec = train_mlp_decider(feats, labels, cfg, epochs=epochs, lr=lr, seed=seed)
    save_decider(dec, out, overwrite=overwrite)
    typer.echo(f"validation: {dec.config.metrics}")
    typer.echo(f"decider: {out}")
