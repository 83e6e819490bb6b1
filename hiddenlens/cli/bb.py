"""``hiddenlens bb train | reproduce``: the Bigram-Backcopy toy models where attention sinks emerge."""
from __future__ import annotations

from pathlib import Path

import typer

from .options import Name, OptionalOut, console, out_folder

app = typer.Typer(help="Bigram-Backcopy: train the toy models where attention sinks emerge.", no_args_is_help=True)


@app.command("train")
def train(out: Path = typer.Option(..., help="folder for the checkpoints (step_000000/, ...)"),
          steps: int = typer.Option(1000), d_model: int = typer.Option(64),
          layers: int = typer.Option(1, help="number of blocks of the model trained"),
          seq_length: int = typer.Option(32), k: int = typer.Option(3, help="number of triggers"),
          attention: str = typer.Option("softmax", help="softmax | relu"),
          optimizer: str = typer.Option("adamw", help="adamw | sgd"),
          lr: float = typer.Option(1e-3), weight_decay: float = typer.Option(1e-4),
          batch_size: int = typer.Option(64, help="sequences per training step"), seed: int = typer.Option(0),
          checkpoint_every: int = typer.Option(100, help="0: only the last step"),
          overwrite: bool = typer.Option(False, help="replace OUT when it already holds a run (default: refuse)")
          ) -> None:
    """Train one Bigram-Backcopy model; checkpoints load with `hiddenlens.load_model(folder)`."""
    from hiddenlens.analyses.bb_metrics import sink_evaluator
    from hiddenlens.models.bb_model import BBConfig
    from hiddenlens.models.bb_training import train as train_bb

    cfg = BBConfig(d_model=d_model, n_layers=layers, seq_length=seq_length, k=k, attention=attention,
                   optimizer=optimizer, lr=lr, weight_decay=weight_decay, batch_size=batch_size, steps=steps,
                   seed=seed, checkpoint_every=checkpoint_every)
    res = train_bb(cfg, out_dir=out, evaluate=sink_evaluator(), progress=True, overwrite=overwrite)
    last = res.history.iloc[-1]
    console.print(f"{steps} steps in {res.seconds:.1f} s; trigger loss {last.trigger_loss:.3f}, non-trigger loss "
                  f"{last.nontrigger_loss:.3f} (bigram optimum {last.bigram_optimum:.3f}); L0 BOS attention at "
                  f"non-trigger queries {last.L0_bos_attn_nontrigger:.3f}; {len(res.checkpoints)} checkpoints -> {out}")


@app.command("reproduce")
def reproduce(out: OptionalOut = None, name: Name = None,
              seeds: str = typer.Option("0,1", help="comma-separated seeds"),
              steps: int = typer.Option(1000), eval_every: int = typer.Option(100),
              sgd_lr: float = typer.Option(0.1, help="SGD learning rate (momentum 0.9)"),
              workers: int = typer.Option(2, help="training processes (one thread each)")) -> None:
    """Softmax vs ReLU attention, AdamW vs SGD, 1 vs 3 layers over seeds: curves and a report beside the paper."""
    from hiddenlens.studies import bigram_backcopy as study

    folder = out_folder(out, study.STUDY, name)
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError as exc:
        raise ValueError(f"--seeds {seeds!r}: write comma-separated integers, e.g. 0,1") from exc
    res = study.run(study.BBReproductionConfig(seeds=seed_list, steps=steps, eval_every=eval_every, sgd_lr=sgd_lr,
                                               workers=workers))
    res.write(folder)
    for v, d in res.summary["variants"].items():
        console.print(f"{v:28s} BOS attn (non-trigger) {d['bos_attn_nontrigger']}  BOS share {d['bos_share']}  "
                      f"trigger loss {d['trigger_loss']}")
    console.print(f"report -> {folder / 'report.md'}")
