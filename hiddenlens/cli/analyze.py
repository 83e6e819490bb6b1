"""``hiddenlens analyze intention | dynamics | sinks | leakage | iteration``: studies that write a run folder
(default ``runs/<study>/<name>``), through :mod:`hiddenlens.studies`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from hiddenlens.analyses.checkpoints import check_ray_sweep
from hiddenlens.studies.report import PREPEND_BOS

from . import options as o
from .options import (DEFAULT_MODEL, Backend, BatchSize, Device, Dtype, Model, Name, OptionalOut, Threads, console,
                      out_folder)

app = typer.Typer(help="Studies over prompt sets and checkpoints; each writes a run folder (runs/<study>/<name>).",
                  no_args_is_help=True)

CHECKPOINTS_HELP = "more checkpoints (dirs, hub ids, id@rev); repeat or comma-separate"
RayAddress = Annotated[Optional[str], typer.Option(
    "--ray", metavar="ADDRESS", help="one Ray task per checkpoint (needs --checkpoints and pip install "
    "'hiddenlens\\[ray]'): local (a private cluster on this machine) | auto (the cluster this machine runs) | a "
    "cluster address such as ray://host:10001; the tables are those of the serial run")]
#: The one BOS option (``analyze dynamics``, ``analyze sinks``, ``demo``), default
#: :data:`hiddenlens.studies.report.PREPEND_BOS` like the dashboard's "Prepend BOS" toggle.
AddBos = Annotated[bool, typer.Option("--add-bos/--no-bos", help="prepend the tokenizer's BOS so position 0 is a fixed "
                                      "token (the dashboard's 'Prepend BOS' toggle has the same default)")]
#: ``analyze sinks`` options a run over ``--checkpoints`` does not use (giving one is an error, not ignored)
SINKS_IGNORED_WITH_CHECKPOINTS = ("model", "domain", "batch_size", "causal_heads", "causal_prompts", "tau", "eps")


def _refuse_given(ctx: typer.Context, names: tuple[str, ...], reason: str) -> None:
    """Raise naming the first of ``names`` given on the command line (or by environment): ``reason`` says why the
    command would not use it."""
    for param in ctx.command.params:
        source = getattr(ctx.get_parameter_source(param.name), "name", None)
        if param.name in names and source in ("COMMANDLINE", "ENVIRONMENT"):
            raise ValueError(f"{param.opts[0]} cannot be combined with --checkpoints: {reason} and would ignore "
                             f"{param.opts[0]}; drop one of the two")


def _budgets(spec: Optional[str]) -> dict[str, int]:
    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if not value.strip().isdigit():
            raise ValueError(f"--max-new-tokens {part!r}: write REGIME=TOKENS, e.g. direct=16,cot=96")
        out[key.strip()] = int(value)
    return out


def _read_domain(spec: str) -> tuple[str, list[str]]:
    if "=" not in spec:
        raise ValueError(f"--domain {spec!r}: use NAME=FILE (a text file, one prompt per line)")
    name, path = spec.split("=", 1)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--domain {name}: {p} is not a file")
    lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--domain {name}: {p} holds no prompts")
    return name, lines


@app.command("intention")
def intention(
        out: OptionalOut = None, name: Name = None,
        model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "auto",
        batch_size: BatchSize = 32,
        checkpoints: Optional[List[str]] = typer.Option(None, help=CHECKPOINTS_HELP),
        n: int = typer.Option(200, min=1, help="number of word problems"),
        seed: int = typer.Option(0, help="problem-set seed"),
        regimes: str = typer.Option("direct,cot,babble", help="comma-separated: direct, cot, babble"),
        shots: int = typer.Option(0, min=0, help="worked examples before each question (few-shot)"),
        babble_shots: str = typer.Option("none", help="babble examples: none (zero-shot babble) | varied (a "
                                         "different written reply per example and item, never one copied text)"),
        reuse_prefix: bool = typer.Option(True, help="compute the shared prompt start's KV cache once per regime"),
        layers: Optional[str] = typer.Option(None, help="intention-state blocks, e.g. 25-29 (default: the last 5); "
                                             + o.LAYERS_HELP),
        max_new_tokens: Optional[str] = typer.Option(None, help="per-regime budgets, e.g. direct=16,cot=96,babble=64"),
        post_collapse: bool = typer.Option(False, help="also the v1 post-collapse state (final decode step)"),
        gsm8k: bool = typer.Option(False, help="use GSM8K (needs `datasets` and the hub) instead of the offline set"),
        ray: RayAddress = None,
) -> None:
    """The regime experiment (direct / CoT / babble): accuracy, H_int, dim_eff, Recov, beside the paper."""
    from hiddenlens.studies import intention as study

    check_ray_sweep(ray, len(o.csv_list(checkpoints)))
    folder = out_folder(out, study.STUDY, name)
    handle = o.load(model, backend, device, dtype)
    config = study.IntentionConfig(model=model, backend=backend, device=device, dtype=dtype,
                                   checkpoints=o.csv_list(checkpoints), n=n, seed=seed,
                                   regimes=[r.strip() for r in regimes.split(",") if r.strip()], shots=shots,
                                   layers=o.layers(layers, handle.n_layers), batch_size=batch_size,
                                   max_new_tokens=_budgets(max_new_tokens), post_collapse=post_collapse, gsm8k=gsm8k,
                                   babble_shots=babble_shots, reuse_prefix=reuse_prefix)
    if ray is not None:
        handle.unload()  # loaded here for --layers only: every Ray worker loads its own checkpoint
    try:
        # each finished regime (checkpoint, with --ray) replaces the partial folder (marked incomplete); the last
        # write marks it complete
        res = study.run(config, None if ray is not None else handle, ray=ray,
                        on_regime=lambda partial: partial.write(folder, overwrite=True, complete=False))
    finally:
        handle.unload()
    res.write(folder, overwrite=True)
    console.print(res.tables["regimes"][[c for c in ("checkpoint", "regime", "accuracy", "h_int_bits",
                                                     "dim_eff_pr_agg", "recov_auroc") if c in res.tables["regimes"]]])
    console.print(f"report written to {folder}")


@app.command("dynamics")
def dynamics(
        out: OptionalOut = None, name: Name = None,
        model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "auto",
        batch_size: BatchSize = 8,
        checkpoints: Optional[List[str]] = typer.Option(None, help=CHECKPOINTS_HELP),
        prompts_file: Optional[Path] = typer.Option(None, help=".txt (one per line) or .jsonl ({'text'}); "
                                                    "default: offline prose chunks"),
        n_prompts: int = typer.Option(32, min=1),
        chars: int = typer.Option(400, min=1, help="characters per prose chunk"),
        lens: Optional[Path] = typer.Option(None, help="tuned lens (.safetensors)"),
        belief: bool = typer.Option(True, help="also belief-state predictability per layer"),
        example: str = typer.Option("The capital of France is", help="prompt for the per-position lens table"),
        target: str = typer.Option(" Paris", help="target token for the example's rank trajectory"),
        add_bos: AddBos = PREPEND_BOS,
        ray: RayAddress = None,
) -> None:
    """Per-layer lens statistics, geometry, token dynamics and belief-state R^2 (streamed over prompts)."""
    from hiddenlens.studies import dynamics as study

    check_ray_sweep(ray, len(o.csv_list(checkpoints)))
    folder = out_folder(out, study.STUDY, name)
    config = study.DynamicsConfig(model=model, backend=backend, device=device, dtype=dtype,
                                  checkpoints=o.csv_list(checkpoints),
                                  prompts_file=str(prompts_file) if prompts_file else None, n_prompts=n_prompts,
                                  chars=chars, batch_size=batch_size, lens=str(lens) if lens else None,
                                  belief=belief, example=example, target=target, add_bos=add_bos)
    res = study.run(config, ray=ray)
    res.write(folder)
    console.print(res.tables["dynamics"].round(3).to_string())
    console.print(f"report written to {folder}")


@app.command("sinks")
def sinks(
        ctx: typer.Context,
        out: OptionalOut = None, name: Name = None,
        model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "float32",
        batch_size: BatchSize = 8,
        checkpoints: Optional[Path] = typer.Option(None, help="a folder of checkpoints (e.g. from `hiddenlens bb "
                                                   "train --checkpoint-every`): metrics as curves over steps"),
        domain: Optional[List[str]] = typer.Option(None, help="NAME=FILE, twice (default: prose vs Python code)"),
        n_prompts: int = typer.Option(32, min=1, help="passages per default domain"),
        n_tokens: int = typer.Option(128, min=2, help="tokens per passage (BOS included when prepended)"),
        causal_heads: int = typer.Option(4, min=1, help="heads per group (most active-dormant, most dormant) to "
                                         "ablate"),
        causal_prompts: int = typer.Option(8, min=1, help="prompts per domain for the causal confirmation"),
        tau: float = typer.Option(0.8, min=0.0, max=1.0, help="dormancy threshold (INFERRED default)"),
        eps: float = typer.Option(0.01, min=0.0, help="|delta CE| (nats) under which an intervention 'changes "
                                  "little'"),
        add_bos: AddBos = PREPEND_BOS,
        ray: RayAddress = None) -> None:
    """Attention sinks, value drains, residual peaks and active-dormant heads ("Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs" (arXiv 2410.13835))."""
    from hiddenlens.studies import sinks as study

    check_ray_sweep(ray, 0 if checkpoints is None else 1)
    if checkpoints is not None:
        _refuse_given(ctx, SINKS_IGNORED_WITH_CHECKPOINTS, "--checkpoints measures every checkpoint under it")
    folder = out_folder(out, study.STUDY, name)
    domains = dict(_read_domain(s) for s in domain) if domain else None
    if domains is not None and len(domains) != 2:
        raise ValueError("pass --domain exactly twice (two input domains to contrast)")
    config = study.SinksConfig(model=model, backend=backend, device=device, dtype=dtype,
                               checkpoints=str(checkpoints) if checkpoints else None, domains=domains,
                               n_prompts=n_prompts, n_tokens=n_tokens, batch_size=batch_size,
                               causal_heads=causal_heads, causal_prompts=causal_prompts, tau=tau, eps=eps,
                               add_bos=add_bos)
    res = study.run(config, ray=ray)
    res.write(folder)
    if res.over_checkpoints:
        df = res.tables["checkpoints"]
        console.print(f"{len(df)} rows over {df.step.nunique()} checkpoints -> {folder}")
        return
    for dom, d in res.summary["per_domain"].items():
        console.print(f"[bold]{dom}[/bold]: {d['frac_heads_attend_sink']:.1%} of heads attend the sink; most dormant "
                      f"L{int(d['most_dormant_head']['layer'])}H{int(d['most_dormant_head']['head'])}; residual peak "
                      f"layers {d['peak_layers_ratio_over_10']}")
    console.print(f"grid correlation {res.summary['grid_correlation']:.3f}; report -> {folder / 'report.md'}")


@app.command("leakage")
def leakage(
    out: OptionalOut = None, name: Name = None,
    model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "auto",
    prompts: Optional[Path] = typer.Option(None, help="JSON prompt pairs (default: the shipped set)"),
    limit: Optional[int] = typer.Option(None, min=1, help="use only the first N pairs"),
    ranges: Optional[str] = typer.Option(None, help="block ranges whose outputs are replaced, comma-separated, each "
                                         "read like --layers: e.g. '0-29,15-29,29' (default: 5 suffix ranges ending "
                                         "at the last block)"),
    samples: int = typer.Option(4, min=1, help="sampled continuations per prompt"),
    max_new_tokens: int = typer.Option(12, min=1, help="tokens per continuation"),
    mode: str = typer.Option("isolated", help="isolated | original (positions of the lone span run)"),
    tokens: str = typer.Option("all", help="all | last (which target tokens to replace)"),
    seed: int = typer.Option(0), threads: Threads = None,
):
    """Leak-rate before/after replacing the target clause with its uncontextualized states, per block range."""
    from hiddenlens.studies import leakage as study

    folder = out_folder(out, study.STUDY, name)
    o.set_threads(threads)
    handle = o.load(model, backend, device, dtype)
    blocks = o.layer_ranges(ranges, handle.n_layers)
    config = study.LeakageConfig(model=model, backend=backend, device=device, dtype=dtype,
                                 prompts=str(prompts) if prompts else None, limit=limit,
                                 ranges=None if blocks is None else [[r[0], r[-1]] for r in blocks], samples=samples,
                                 max_new_tokens=max_new_tokens, mode=mode, tokens=tokens, seed=seed)
    res = study.run(config, handle)
    res.write(folder)
    typer.echo(res.tables["summary"].to_string(index=False))
    typer.echo(f"report: {folder}")


@app.command("iteration")
def iteration(
    out: OptionalOut = None, name: Name = None,
    model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "auto",
    decider: Optional[Path] = typer.Option(None, help="folder of a trained MLP decider (hiddenlens train-decider)"),
    lora: Optional[Path] = typer.Option(None, help="folder of TaH's trained adapter (hiddenlens train-adapter): "
                                        "every decider also runs with iterations >= 1 on it"),
    threshold: Optional[float] = typer.Option(None, help="override the MLP decider's threshold"),
    entropy_threshold: float = typer.Option(2.5, min=0.0, help="entropy decider threshold (nats)"),
    chunks: int = typer.Option(16, min=1, help="evaluation prose chunks (second half of the offline prose)"),
    seq_len: int = typer.Option(128, min=2, help="tokens per chunk"),
    max_iter: int = typer.Option(2, min=1, help="passes per token at most (TaH: 2)"),
    topk: int = typer.Option(100, min=1, help="top-k of the soft-embedding feedback"),
    threads: Threads = None,
):
    """Teacher-forced selective iteration: share iterated, fix/break rates, accuracy change, decider AUROC."""
    from hiddenlens.studies import iteration as study

    folder = out_folder(out, study.STUDY, name)
    o.set_threads(threads)
    config = study.IterationConfig(model=model, backend=backend, device=device, dtype=dtype,
                                   decider=str(decider) if decider else None, threshold=threshold,
                                   lora=str(lora) if lora else None,
                                   entropy_threshold=entropy_threshold, chunks=chunks, seq_len=seq_len,
                                   max_iter=max_iter, topk=topk)
    res = study.run(config)
    res.write(folder)
    typer.echo(res.tables["summary"].to_string(index=False))
    typer.echo(f"report: {folder}")


@app.command("tuned-lens")
def tuned_lens(
        out: OptionalOut = None, name: Name = None,
        model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "auto",
        batch_size: BatchSize = 8,
        lens: Optional[Path] = typer.Option(None, help="tuned lens file (.safetensors; default: this model's cached "
                                            "lens, trained on first use, see `hiddenlens train-lens`)"),
        n_prompts: int = typer.Option(32, min=1, help="held-out prose chunks"),
        chars: int = typer.Option(400, min=1, help="characters per chunk"),
        skip: Optional[int] = typer.Option(None, min=0, help="first character of the held-out prose (default: past "
                                           "the cached lens's training text)"),
        add_bos: AddBos = PREPEND_BOS,
        n_boot: int = typer.Option(1000, min=1, help="bootstrap resamples over prompts"),
        seed: int = typer.Option(0), threads: Threads = None,
) -> None:
    """Per-layer KL(final || lens) of the tuned and logit lenses on held-out prose, with 95 % bootstrap intervals,
    and whether the tuned-lens paper's claim reproduces (arXiv 2303.08112)."""
    from hiddenlens.studies import tuned_lens as study

    folder = out_folder(out, study.STUDY, name)
    o.set_threads(threads)
    config = study.TunedLensConfig(model=model, backend=backend, device=device, dtype=dtype,
                                   lens=str(lens) if lens else None, n_prompts=n_prompts, chars=chars,
                                   **({} if skip is None else {"skip": skip}), batch_size=batch_size, add_bos=add_bos,
                                   n_boot=n_boot, seed=seed)
    res = study.run(config, progress=True)
    res.write(folder)
    table = res.tables["kl_by_layer"][["site", "kl_logit", "kl_tuned", "gain", "gain_lo", "gain_hi"]]
    console.print(table.round(3).to_string(index=False))
    console.print(f"verdict: {res.summary['verdict']} ({res.summary['verdict_text']})")
    console.print(f"report written to {folder}")
