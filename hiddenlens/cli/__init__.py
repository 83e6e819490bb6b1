"""The ``hiddenlens`` command line (typer). Each feature adds its commands in its own module below."""
from __future__ import annotations

import typer

app = typer.Typer(help="hiddenlens: look inside language models and change what they do.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
analyze_app = typer.Typer(help="Analyses over prompt sets and checkpoints; each writes a report folder.",
                          no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print side-by-side ratios and write JSON.", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")
app.add_typer(bench_app, name="bench")


def main() -> None:
    # Each module registers its commands on the apps above when imported.
    from . import bench_capture, dashboard, foundation, intention, leakage, sinks, truth  # noqa: F401
    app()
