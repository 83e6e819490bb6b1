"""``hiddenlens truth directions``: fit, evaluate and save truthful directions."""
from __future__ import annotations

import typer

from . import options as o
from .options import DEFAULT_MODEL, Backend, BatchSize, Device, Dtype, Layers, Model, Name, OptionalOut

app = typer.Typer(help="Truthful directions: fit, evaluate and save them.", no_args_is_help=True)


@app.command("directions")
def directions(model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "auto",
               batch_size: BatchSize = 32,
               family: str = typer.Option("capitals", help="capitals | negations | arithmetic | comparisons"),
               transfer: str = typer.Option("negations,arithmetic,comparisons",
                                            help="families to test transfer on (comma list, '' for none)"),
               layers: Layers = None,
               k_heads: int = typer.Option(16, help="ITI top-K heads (0 skips the per-head analysis)"),
               seed: int = typer.Option(0), out: OptionalOut = None, name: Name = None):
    """Fit mass-mean / probe / RepE directions per layer (default: every block) and ITI heads; write a run folder
    with the directions as safetensors + JSON (``direction_<method>``, ``iti_heads``)."""
    from hiddenlens.studies import truth as study

    folder = o.out_folder(out, study.STUDY, name)
    handle = o.load(model, backend, device, dtype)
    config = study.TruthConfig(model=model, backend=backend, device=device, dtype=dtype, family=family,
                               transfer=[f for f in transfer.split(",") if f], layers=o.layers(layers, handle.n_layers),
                               k_heads=k_heads, seed=seed, batch_size=batch_size)
    res = study.run(config, handle)
    res.write(folder)
    typer.echo(f"best layer {res.best_layer} (held-out probe AUROC {res.summary['best_probe_auroc']:.3f}); "
               f"report in {folder}; directions: {folder}/direction_mass_mean.json ...")
