"""``hiddenlens bench capture``: capture overhead vs a plain forward, HF hidden states, TransformerLens, nnsight."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from hiddenlens.cli import bench_app

console = Console()


@bench_app.command("capture")
def bench_capture(
    model: str = typer.Option("smollm2-135m-instruct", help="model spec (see `hiddenlens info`)"),
    batch: int = typer.Option(8, min=1, help="prompts per forward"),
    tokens: int = typer.Option(128, min=2, help="tokens per prompt"),
    reps: int = typer.Option(5, min=1, help="timed repetitions per contender (after one warm-up round)"),
    pattern_layer: int = typer.Option(None, help="layer whose attention pattern is added (default: the middle)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, mps"),
    dtype: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 elsewhere), float32, bfloat16, float16"),
    threads: int = typer.Option(None, min=1, help="torch CPU threads (default: torch's own choice)"),
    out: Path = typer.Option(Path("runs/bench-capture/capture.json"), help="JSON result (a .json file or a folder)"),
) -> None:
    """Time capture of every block's resid_post (and one attention pattern) against the alternatives.

    Interleaved repetitions, medians and ratios from one run, on two clocks (wall and process CPU time);
    prints a table and writes JSON.
    """
    from hiddenlens.benchmarks.capture import print_table, run_capture_benchmark, write_result

    result = run_capture_benchmark(model, batch=batch, tokens=tokens, reps=reps, device=device, dtype=dtype,
                                   pattern_layer=pattern_layer, threads=threads)
    print_table(result, console)
    console.print(f"wrote {write_result(result, out)}")
