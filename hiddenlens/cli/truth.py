"""``hiddenlens truth directions | truthprint``: truthful directions (fit, evaluate, save) and TruthPrInt's claims."""
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


@app.command("truthprint")
def truthprint(model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "auto",
               batch_size: BatchSize = 64,
               families: str = typer.Option("capital,continent,currency,language,misconception",
                                            help="fact-set families (comma list)"),
               layers: Layers = None,
               limit: int = typer.Option(0, min=0, help="items per split and family at most (0: all)"),
               max_new_tokens: int = typer.Option(6, min=1, help="greedy answer length"),
               alphas: str = typer.Option("4,8", help="steering strengths to choose from on val (x sigma)"),
               thresholds: str = typer.Option("0.5", help="detector thresholds to choose from on val"),
               seed: int = typer.Option(0), out: OptionalOut = None, name: Name = None):
    """TruthPrInt's claims on the model's own answers: per-token hallucination detection AUROC per layer, and
    detect-then-steer vs steering every token (fixes, breaks, net with CI, rollbacks, seconds)."""
    from hiddenlens.studies import truthprint as study

    folder = o.out_folder(out, study.STUDY, name)
    handle = o.load(model, backend, device, dtype)
    config = study.TruthPrIntConfig(model=model, backend=backend, device=device, dtype=dtype,
                                    families=[f for f in families.split(",") if f], limit=limit or None,
                                    layers=o.layers(layers, handle.n_layers), max_new_tokens=max_new_tokens,
                                    alphas=[float(a) for a in alphas.split(",") if a],
                                    thresholds=[float(t) for t in thresholds.split(",") if t], seed=seed,
                                    batch_size=batch_size)
    res = study.run(config, handle)
    res.write(folder)
    s = res.summary
    typer.echo(f"detection at layer {s['layer']} (chosen on val): test AUROC {s['test_auroc']:.3f} "
               f"[{s['test_auroc_ci'][0]:.3f}, {s['test_auroc_ci'][1]:.3f}]; {s['verdict_text']} Report in {folder}")
