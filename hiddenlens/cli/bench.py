"""``hiddenlens bench capture | store | dimensionality | steer | gpu | ray``: benchmarks that print a table and write JSON."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from .options import DEFAULT_MODEL, BatchSize, Device, Dtype, Model, Threads, console

app = typer.Typer(help="Benchmarks that print side-by-side ratios and write JSON.", no_args_is_help=True)


@app.command("capture")
def capture(
    model: Model = DEFAULT_MODEL, device: Device = "auto", dtype: Dtype = "auto", batch_size: BatchSize = 8,
    tokens: int = typer.Option(128, min=2, help="tokens per prompt"),
    reps: int = typer.Option(5, min=1, help="timed repetitions per contender (after one warm-up round)"),
    pattern_layer: Optional[str] = typer.Option(None, help="block whose attention pattern is added, e.g. 15 or -1 "
                                                "(default: the middle)"),
    threads: Threads = None,
    out: Path = typer.Option(Path("runs/bench-capture/capture.json"), help="JSON result (a .json file or a folder)"),
) -> None:
    """Time capture of every block's resid_post (and one attention pattern) against the alternatives.

    Interleaved repetitions, medians and ratios from one run, on two clocks (wall and process CPU time);
    prints a table and writes JSON.
    """
    from hiddenlens.benchmarks.capture import print_table, run_capture_benchmark, write_result

    result = run_capture_benchmark(model, batch=batch_size, tokens=tokens, reps=reps, device=device, dtype=dtype,
                                   pattern_layer=pattern_layer, threads=threads)
    print_table(result, console)
    console.print(f"wrote {write_result(result, out)}")


@app.command("store")
def store(model: Model = DEFAULT_MODEL, prompts: int = typer.Option(2000, help="prompts streamed (and N/4)"),
          out: Path = typer.Option(Path("runs/bench-store"), help="folder for the JSON result and the store"),
          sites: str = typer.Option("blocks.12.resid_post,blocks.24.resid_post", help="comma-separated sites")) -> None:
    """Peak RSS while streaming PROMPTS prompts to disk: bounded, independent of the number of prompts."""
    from hiddenlens.benchmarks.store import run_store_benchmark

    run_store_benchmark(model, prompts, out, [s.strip() for s in sites.split(",") if s.strip()], console)


@app.command("dimensionality")
def dimensionality(n: int = typer.Option(100_000, help="rows (activations)"), d: int = typer.Option(576),
                   chunk: int = typer.Option(4096, help="rows per streamed chunk"),
                   out: Optional[Path] = typer.Option(None, help="JSON result")) -> None:
    """Effective dimensionality of N x d activations: streaming covariance vs materialised matrix + sklearn PCA."""
    from hiddenlens.benchmarks.dimensionality import run_benchmark

    run_benchmark(n=n, d=d, chunk=chunk, out=out)


@app.command("steer")
def steer(model: Model = DEFAULT_MODEL, device: Device = "auto", dtype: Dtype = "auto",
          layer: str = typer.Option("12", help="block whose output is steered (e.g. 12 or -1)"),
          alpha: float = typer.Option(4.0), new_tokens: int = typer.Option(64),
          repeats: int = typer.Option(3), peers: bool = typer.Option(True, help="include nnsight and TransformerLens"),
          out: Path = typer.Option(Path("runs/bench-steer/steer.json"), help="JSON result")) -> None:
    """Steered vs plain generate tokens/s at batch 1 and 8, beside nnsight and TransformerLens steering."""
    from hiddenlens.benchmarks.steer import run_steer_benchmark

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    res = run_steer_benchmark(model, layer, alpha, new_tokens, (1, 8), repeats, peers, str(out), device=device,
                              dtype=dtype)
    typer.echo(json.dumps({"written": str(out), "rows": len(res["rows"])}))


@app.command("gpu")
def gpu(cpu: bool = typer.Option(False, "--cpu", help="the small CPU smoke run (tiny models) instead of the GPU run"),
        out: Optional[Path] = typer.Option(None, help="JSON result")) -> None:
    """The prepared GPU check (benchmarks/gpu_check.py): bf16 parity, capture / steering / backend overheads, a
    random 1B Llama; one table, under 5 minutes on a lent GPU."""
    from hiddenlens.benchmarks.gpu_check import main as gpu_main

    status = gpu_main((["--cpu"] if cpu else []) + (["--out", str(out)] if out else []))
    if status:
        raise typer.Exit(status)


@app.command("ray")
def ray(model: Model = DEFAULT_MODEL, prompts: int = typer.Option(160, min=8, help="prompts captured"),
        site: str = typer.Option("blocks.15.resid_post", help="the site captured"), batch_size: BatchSize = 8,
        out: Optional[Path] = typer.Option(None, help="JSON result")) -> None:
    """Rows/s of `capture --ray local` with 1 and 2 workers beside the plain single-process capture."""
    from hiddenlens.benchmarks.ray_capture import print_table, run_ray_benchmark

    print_table(run_ray_benchmark(model, prompts, site, batch_size, out), console)
