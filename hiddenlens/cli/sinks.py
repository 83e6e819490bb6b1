"""``hiddenlens analyze sinks`` (a model or a checkpoint series) and ``hiddenlens bb train|reproduce``."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from . import analyze_app, app

console = Console()
bb_app = typer.Typer(help="Bigram-Backcopy: train the toy models where attention sinks emerge.", no_args_is_help=True)
app.add_typer(bb_app, name="bb")


def _read_domain(spec: str) -> tuple[str, list[str]]:
    if "=" not in spec:
        raise typer.BadParameter(f"--domain {spec!r}: use NAME=FILE (a text file, one prompt per line)")
    name, path = spec.split("=", 1)
    p = Path(path)
    if not p.is_file():
        raise typer.BadParameter(f"--domain {name}: {p} is not a file")
    lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise typer.BadParameter(f"--domain {name}: {p} holds no prompts")
    return name, lines


@analyze_app.command("sinks")
def analyze_sinks(
        out: Path = typer.Option(..., help="report folder"),
        model: str = typer.Option("smollm2-135m-instruct", help="model spec (embedded, tiny-llama, a folder, an id)"),
        checkpoints: Optional[Path] = typer.Option(None, help="a folder of checkpoints (e.g. from `hiddenlens bb "
                                                   "train --checkpoint-every`): metrics as curves over steps"),
        backend: str = typer.Option("hf", help="hf | transformer_lens | nnsight"),
        device: str = typer.Option("auto"), dtype: str = typer.Option("float32"),
        domain: Optional[List[str]] = typer.Option(None, help="NAME=FILE, twice (default: prose vs Python code)"),
        n_prompts: int = typer.Option(32, help="passages per default domain"),
        n_tokens: int = typer.Option(128, help="tokens per passage (BOS included)"),
        batch_size: int = typer.Option(8),
        causal_heads: int = typer.Option(4, help="heads per group (most active-dormant, most dormant) to ablate"),
        causal_prompts: int = typer.Option(8, help="prompts per domain for the causal confirmation"),
        tau: float = typer.Option(0.8, help="dormancy threshold (INFERRED default)"),
        eps: float = typer.Option(0.01, help="|delta CE| (nats) under which an intervention 'changes little'")) -> None:
    """Attention sinks, value drains, residual peaks and active-dormant heads (methods.md section 2)."""
    import hiddenlens as hl
    from hiddenlens.analyses.sinks_report import checkpoints_report, model_report

    if checkpoints is not None:
        df = checkpoints_report(checkpoints, out)
        console.print(f"{len(df)} rows over {df.step.nunique()} checkpoints -> {out}")
        return
    domains = dict(_read_domain(s) for s in domain) if domain else None
    if domains is not None and len(domains) != 2:
        raise typer.BadParameter("pass --domain exactly twice (two input domains to contrast)")
    with console.status(f"loading {model}"):
        handle = hl.load_model(model, backend=backend, device=device, dtype=dtype)
    summary = model_report(handle, out, domains, n_prompts=n_prompts, n_tokens=n_tokens, batch_size=batch_size,
                           causal_heads=causal_heads, causal_prompts=causal_prompts, tau=tau, eps=eps)
    for name, d in summary["per_domain"].items():
        console.print(f"[bold]{name}[/bold]: {d['frac_heads_attend_sink']:.1%} of heads attend the sink; most dormant "
                      f"L{int(d['most_dormant_head']['layer'])}H{int(d['most_dormant_head']['head'])}; residual peak "
                      f"layers {d['peak_layers_ratio_over_10']}")
    console.print(f"grid correlation {summary['grid_correlation']:.3f}; report -> {out / 'report.md'}")


@bb_app.command("train")
def bb_train(out: Path = typer.Option(..., help="folder for the checkpoints (step_000000/, ...)"),
             steps: int = typer.Option(1000), d_model: int = typer.Option(64), layers: int = typer.Option(1),
             seq_length: int = typer.Option(32), k: int = typer.Option(3, help="number of triggers"),
             attention: str = typer.Option("softmax", help="softmax | relu"),
             optimizer: str = typer.Option("adamw", help="adamw | sgd"),
             lr: float = typer.Option(1e-3), weight_decay: float = typer.Option(1e-4),
             batch_size: int = typer.Option(64), seed: int = typer.Option(0),
             checkpoint_every: int = typer.Option(100, help="0: only the last step")) -> None:
    """Train one Bigram-Backcopy model; checkpoints load with `hiddenlens.load_model(folder)`."""
    from hiddenlens.models.bigram_backcopy import BBConfig, train

    cfg = BBConfig(d_model=d_model, n_layers=layers, seq_length=seq_length, k=k, attention=attention,
                   optimizer=optimizer, lr=lr, weight_decay=weight_decay, batch_size=batch_size, steps=steps,
                   seed=seed, checkpoint_every=checkpoint_every)
    res = train(cfg, out_dir=out, progress=True)
    last = res.history.iloc[-1]
    console.print(f"{steps} steps in {res.seconds:.1f} s; trigger loss {last.trigger_loss:.3f}, non-trigger loss "
                  f"{last.nontrigger_loss:.3f} (bigram optimum {last.bigram_optimum:.3f}); L0 BOS attention at "
                  f"non-trigger queries {last.L0_bos_attn_nontrigger:.3f}; {len(res.checkpoints)} checkpoints -> {out}")


@bb_app.command("reproduce")
def bb_reproduce(out: Path = typer.Option(Path("bb_reproduction"), help="report folder"),
                 seeds: str = typer.Option("0,1", help="comma-separated seeds"),
                 steps: int = typer.Option(1000), eval_every: int = typer.Option(100),
                 sgd_lr: float = typer.Option(0.1, help="SGD learning rate (momentum 0.9)"),
                 workers: int = typer.Option(2, help="training processes (one thread each)")) -> None:
    """Softmax vs ReLU attention, AdamW vs SGD, 1 vs 3 layers over seeds: curves and a report beside the paper."""
    from hiddenlens.analyses.bb_reproduce import reproduce

    summary = reproduce(out, seeds=[int(s) for s in seeds.split(",") if s.strip()], steps=steps,
                        eval_every=eval_every, sgd_lr=sgd_lr, workers=workers)
    for v, d in summary["variants"].items():
        console.print(f"{v:28s} BOS attn (non-trigger) {d['bos_attn_nontrigger']}  BOS share {d['bos_share']}  "
                      f"trigger loss {d['trigger_loss']}")
    console.print(f"report -> {out / 'report.md'}")
