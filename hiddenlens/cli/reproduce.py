"""``hiddenlens reproduce [--quick] --out DIR``: every study, one report of paper claims beside ours."""
from __future__ import annotations

import typer

from . import options as o
from .options import DEFAULT_MODEL, Backend, Device, Dtype, Model, Name, OptionalOut


def reproduce(quick: bool = typer.Option(False, "--quick", help="the small configuration (<= 10 min on 2 cores)"),
              model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "auto",
              studies: str = typer.Option("", help="comma list of studies to run (default: all)"),
              out: OptionalOut = None, name: Name = None) -> None:
    """Run every study (Bigram-Backcopy, sinks, intention, truth, leakage, iteration, patching) and write one
    report: paper, claim, paper's figure, ours with its interval, verdict, seconds; each study's folder beside it."""
    from hiddenlens.studies import reproduce as study

    folder = o.out_folder(out, study.STUDY, name)
    config = study.ReproduceConfig(model=model, backend=backend, device=device, dtype=dtype, quick=quick,
                                   **({"studies": [s.strip() for s in studies.split(",") if s.strip()]}
                                      if studies.strip() else {}))
    res = study.run(config, o.load(model, backend, device, dtype))
    res.write(folder)
    counts = ", ".join(f"{k} {v}" for k, v in res.summary["verdicts"].items())
    typer.echo(f"{len(res.tables['claims'])} claims ({counts}) in {res.summary['seconds_total']:.0f} s; "
               f"report {folder}/report.md")
