"""``hiddenlens bench capture | store | dimensionality | steer | gpu | ray | dashboard | bb | prefix | sinks-ablation |
steer-eval``: benchmarks that print a table and write JSON."""
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


@app.command("dashboard")
def dashboard(model: Model = DEFAULT_MODEL,
              repeats: int = typer.Option(3, min=1, max=8, help="new values timed per interaction"),
              new_tokens: int = typer.Option(16, min=4, max=48, help="new tokens per continuation on both pages"),
              threads: Threads = None,
              truth_run: Optional[Path] = typer.Option(None, help="a `hiddenlens truth directions` run folder "
                                                     "fitted on MODEL (default: docs/results/truth for the "
                                                     "embedded model, else the page fits the directions live)"),
              out: Path = typer.Option(Path("runs/bench-dashboard/dashboard.json"), help="JSON result")) -> None:
    """Time the dashboard's interactions headless (Streamlit's AppTest on the real app) against their budgets:
    a steering alpha change <= 1.5x plain generation of its new tokens, a leakage span or block-range change
    <= 3 s; prints seconds, baseline seconds and ratios measured side by side, and writes JSON."""
    from hiddenlens.benchmarks.dashboard import run_dashboard_benchmark

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_dashboard_benchmark(model, repeats, new_tokens, threads, out, console, truth_run)
    console.print(f"wrote {out}")



@app.command("bb")
def bb(steps: int = typer.Option(200, min=1, help="training steps per round and contender"),
       layers: int = typer.Option(1, min=1, max=12, help="layers of both models"),
       reps: int = typer.Option(3, min=1, help="timed rounds (after one warm-up round)"),
       eval_every: int = typer.Option(100, min=1, help="sink-metric evaluation interval of the study contender"),
       threads: int = typer.Option(1, min=1, help="torch threads (1: steadiest CPU time)"),
       out: Optional[Path] = typer.Option(None, help="JSON result")) -> None:
    """Bigram-Backcopy training ms/step: hiddenlens (train, with and without the study's sink evaluation) beside a
    minimal plain-PyTorch model of the same architecture, and the ratio."""
    from hiddenlens.benchmarks.bb import run_bb_benchmark

    run_bb_benchmark(steps, layers, reps, eval_every, threads, str(out) if out else None)


@app.command("prefix")
def prefix(model: Model = DEFAULT_MODEL, device: Device = "auto", dtype: Dtype = "auto",
           n: int = typer.Option(16, min=2, help="problems"), shots: int = typer.Option(2, min=1),
           regime: str = typer.Option("cot", help="direct | cot | babble"),
           new_tokens: int = typer.Option(8, min=1), batch_size: BatchSize = 8,
           reps: int = typer.Option(3, min=1, help="timed rounds (after one warm-up round)"), threads: Threads = None,
           out: Optional[Path] = typer.Option(None, help="JSON result")) -> None:
    """Few-shot generation (the intention study's path) with the shared prompt prefix's KV cache reused vs
    recomputed per batch: s/item and the ratio, with an output-equality check."""
    from hiddenlens.benchmarks.prefix import run_prefix_benchmark

    run_prefix_benchmark(model, n, shots, regime, new_tokens, batch_size, reps, threads, device, dtype,
                         str(out) if out else None)


@app.command("sinks-ablation")
def sinks_ablation(model: Model = DEFAULT_MODEL, device: Device = "auto", dtype: Dtype = "auto",
                   prompts: int = typer.Option(8, min=1), tokens: int = typer.Option(64, min=2),
                   heads: int = typer.Option(8, min=1, help="heads ablated (x 2 modes)"),
                   stack_rows: int = typer.Option(32, min=1, help="rows per stacked forward"),
                   reps: int = typer.Option(3, min=1, help="timed rounds (after one warm-up round)"),
                   threads: Threads = None, out: Optional[Path] = typer.Option(None, help="JSON result")) -> None:
    """The sinks study's head interventions stacked in one forward vs one head at a time: s/intervention and
    the ratio, with a CE-equality check."""
    from hiddenlens.benchmarks.sinks_ablation import run_sinks_ablation_benchmark

    run_sinks_ablation_benchmark(model, prompts, tokens, heads, stack_rows, reps, threads, device, dtype,
                                 str(out) if out else None)


@app.command("steer-eval")
def steer_eval(model: Model = DEFAULT_MODEL, device: Device = "auto", dtype: Dtype = "auto",
               items: int = typer.Option(64, min=2, help="held-out fact items scored"),
               conditions: int = typer.Option(21, min=2, help="conditions scored (unsteered + random directions)"),
               prompts: int = typer.Option(32, min=1, help="prompts decoded with detect-then-steer"),
               new_tokens: int = typer.Option(6, min=1), layer: Optional[int] = typer.Option(
                   None, help="block of the directions and the probe (default: the middle)"),
               reps: int = typer.Option(2, min=1, help="timed rounds (after one warm-up round)"),
               threads: Threads = None, out: Optional[Path] = typer.Option(None, help="JSON result")) -> None:
    """The steering and TruthPrInt studies' speed-ups beside the paths they replaced: conditions stacked in one
    forward vs one per forward, batched vs one-prompt detect-then-steer decoding, Newton vs lbfgs probe fits;
    ratios with equality checks."""
    from hiddenlens.benchmarks.steer_eval import run_steer_eval_benchmark

    run_steer_eval_benchmark(model, items, conditions, prompts, new_tokens, layer, reps, threads, device, dtype,
                             str(out) if out else None)
