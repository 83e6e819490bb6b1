"""CLI: ``hiddenlens analyze leakage``, ``hiddenlens analyze iteration`` and ``hiddenlens train-decider``."""
from __future__ import annotations

from pathlib import Path

import typer

from hiddenlens.cli import analyze_app, app


def _ranges(spec: str | None) -> list[tuple[int, int]] | None:
    if not spec:
        return None
    out = []
    for part in spec.split(","):
        a, _, b = part.strip().partition("-")
        if not a.strip().isdigit() or (b and not b.strip().isdigit()):
            raise typer.BadParameter(f"range {part!r}: use START-STOP, e.g. '1-30,16-30,30-30'")
        out.append((int(a), int(b or a)))
    return out


def _layers(spec: str) -> list[int]:
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"layers {spec!r}: use comma-separated hidden-state indices, e.g. '2,10,18,26'") \
            from exc


def _threads(n: int | None) -> None:
    if n:
        import torch
        torch.set_num_threads(n)


@analyze_app.command("leakage")
def leakage_cmd(
    out: Path = typer.Option(Path("reports/leakage"), help="report folder"),
    model: str = typer.Option("smollm2-135m-instruct", help="model spec (see hiddenlens.load_model)"),
    prompts: Path | None = typer.Option(None, help="JSON prompt pairs (default: the shipped set)"),
    limit: int | None = typer.Option(None, help="use only the first N pairs"),
    ranges: str | None = typer.Option(None, help="layer ranges START-STOP, comma-separated (default: 5 suffix "
                                                 "ranges ending at the last layer)"),
    samples: int = typer.Option(4, help="sampled continuations per prompt"),
    max_new_tokens: int = typer.Option(12, help="tokens per continuation"),
    mode: str = typer.Option("isolated", help="isolated | original (positions of the lone span run)"),
    tokens: str = typer.Option("all", help="all | last (which target tokens to replace)"),
    seed: int = typer.Option(0),
    threads: int | None = typer.Option(None, help="torch CPU threads"),
):
    """Leak-rate before/after replacing the target clause with its uncontextualized states, per layer range."""
    import hiddenlens as hl
    from hiddenlens.analyses.leakage import leakage_sweep, load_prompt_pairs, write_leakage_report

    from hiddenlens.interventions.replace import MODES, TOKEN_CHOICES

    if mode not in MODES or tokens not in TOKEN_CHOICES:
        raise typer.BadParameter(f"--mode must be one of {MODES} and --tokens one of {TOKEN_CHOICES}")
    parsed, pairs = _ranges(ranges), load_prompt_pairs(prompts, limit)
    _threads(threads)
    handle = hl.load_model(model)
    result = leakage_sweep(handle, pairs, parsed, n_samples=samples,
                           max_new_tokens=max_new_tokens, mode=mode, tokens=tokens, seed=seed)
    path = write_leakage_report(result, out)
    typer.echo(result.summary.to_string(index=False))
    typer.echo(f"report: {path}")


@app.command("train-decider")
def train_decider_cmd(
    out: Path = typer.Option(Path("reports/decider"), help="folder for decider.safetensors + decider.json"),
    model: str = typer.Option("smollm2-135m-instruct", help="model spec"),
    layers: str = typer.Option("2,10,18,26", help="HF hidden_states indices read by the decider"),
    chunks: int = typer.Option(48, help="training prose chunks (first half of the offline prose)"),
    seq_len: int = typer.Option(128, help="tokens per chunk"),
    topk: int = typer.Option(100, help="top-k logit values fed to the decider"),
    hidden: int = typer.Option(256), blocks: int = typer.Option(2), epochs: int = typer.Option(8),
    lr: float = typer.Option(1e-3), threshold: float = typer.Option(0.5, help="iterate iff sigmoid > threshold"),
    seed: int = typer.Option(0), threads: int | None = typer.Option(None, help="torch CPU threads"),
):
    """Train the MLP iteration decider (BCE on 'first pass mispredicted') on held-out prose; safetensors + JSON."""
    import hiddenlens as hl
    from hiddenlens.interventions.decider import (MLPDeciderConfig, decider_dataset, prose_chunks, save_decider,
                                                  train_mlp_decider)

    lay = _layers(layers)
    _threads(threads)
    handle = hl.load_model(model)
    feats, labels, _ = decider_dataset(handle, prose_chunks(handle, "train", chunks, seq_len), lay, topk)
    cfg = MLPDeciderConfig(layers=lay, d_model=handle.adapter.d_model, topk=topk, hidden=hidden, n_blocks=blocks,
                           threshold=threshold, model=handle.spec)
    dec = train_mlp_decider(feats, labels, cfg, epochs=epochs, lr=lr, seed=seed)
    save_decider(dec, out)
    typer.echo(f"validation: {dec.config.metrics}")
    typer.echo(f"decider: {out}")


@analyze_app.command("iteration")
def iteration_cmd(
    out: Path = typer.Option(Path("reports/iteration"), help="report folder"),
    model: str = typer.Option("smollm2-135m-instruct", help="model spec"),
    decider: Path | None = typer.Option(None, help="folder of a trained MLP decider (hiddenlens train-decider)"),
    threshold: float | None = typer.Option(None, help="override the MLP decider's threshold"),
    entropy_threshold: float = typer.Option(2.5, help="entropy decider threshold (nats)"),
    chunks: int = typer.Option(16, help="evaluation prose chunks (second half of the offline prose)"),
    seq_len: int = typer.Option(128, help="tokens per chunk"),
    max_iter: int = typer.Option(2, help="passes per token at most (TaH: 2)"),
    topk: int = typer.Option(100, help="top-k of the soft-embedding feedback"),
    threads: int | None = typer.Option(None, help="torch CPU threads"),
):
    """Teacher-forced selective iteration: share iterated, fix/break rates, accuracy change, decider AUROC."""
    import hiddenlens as hl
    from hiddenlens.analyses.iteration import evaluate_iteration, write_iteration_report
    from hiddenlens.interventions.decider import EntropyDecider, load_decider, prose_chunks

    deciders = {"entropy": EntropyDecider(entropy_threshold)}
    if decider is not None:
        deciders["mlp"] = load_decider(decider, threshold)
    _threads(threads)
    handle = hl.load_model(model)
    ev = evaluate_iteration(handle, prose_chunks(handle, "eval", chunks, seq_len), deciders, max_iter=max_iter,
                            k=topk)
    path = write_iteration_report(ev, out)
    typer.echo(ev.summary.to_string(index=False))
    typer.echo(f"report: {path}")
