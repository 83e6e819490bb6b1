"""``hiddenlens train-decider``: train the MLP iteration decider (safetensors + JSON)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import options as o
from .options import DEFAULT_MODEL, Backend, Device, Dtype, Model, Threads


def train_decider(
    out: Optional[Path] = typer.Option(None, help="folder for decider.safetensors + decider.json (default: the user "
                                       "cache, where the dashboard and `analyze iteration` find the trained decider "
                                       "of this model)"),
    model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "auto",
    layers: Optional[str] = typer.Option(None, help="blocks whose outputs the decider reads, e.g. '1,9,17,25' "
                                  "(default: TaH's four depths scaled to the model, blocks 1,9,17,25 of 30); "
                                  + o.LAYERS_HELP),
    chunks: int = typer.Option(48, min=1, help="training prose chunks (first half of the offline prose)"),
    seq_len: int = typer.Option(128, min=4, help="tokens per chunk"),
    topk: int = typer.Option(100, min=1, help="top-k logit values fed to the decider"),
    hidden: int = typer.Option(256, min=1), blocks: int = typer.Option(2, min=0), epochs: int = typer.Option(8, min=1),
    lr: float = typer.Option(1e-3), threshold: float = typer.Option(0.5, help="iterate iff sigmoid > threshold"),
    seed: int = typer.Option(0), threads: Threads = None,
    overwrite: bool = typer.Option(False, help="replace OUT when it already holds a decider (default: refuse; the "
                                   "cache folder is always replaced)"),
):
    """Train the MLP iteration decider (BCE on 'first pass mispredicted') on held-out prose; safetensors + JSON."""
    from hiddenlens.common.folders import check_free
    from hiddenlens.interventions.decider import cached_decider_dir, save_decider, train_decider_for

    if out is not None:
        check_free(out, overwrite)
    o.set_threads(threads)
    handle = o.load(model, backend, device, dtype)
    picked = o.layers(layers, handle.n_layers)
    dec = train_decider_for(handle, None if picked is None else [f"blocks.{l}.resid_post" for l in picked],
                            chunks=chunks, seq_len=seq_len, topk=topk, hidden=hidden, n_blocks=blocks,
                            epochs=epochs, lr=lr, threshold=threshold, seed=seed)
    folder = save_decider(dec, out if out is not None else cached_decider_dir(handle),
                          overwrite=overwrite or out is None)
    typer.echo(f"validation: {dec.config.metrics}")
    typer.echo(f"decider: {folder}")
