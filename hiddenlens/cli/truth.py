"""CLI: ``hiddenlens truth directions``, ``hiddenlens steer "prompt" ...``, ``hiddenlens steer eval``,
``hiddenlens bench steer``."""
from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from typer.core import TyperGroup

from . import app, bench_app


class _DefaultRun(TyperGroup):
    """``hiddenlens steer "prompt" ...`` means ``hiddenlens steer run "prompt" ...`` (``eval`` stays a command)."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().resolve_command(ctx, args)

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


truth_app = typer.Typer(help="Truthful directions: fit, evaluate and save them.", no_args_is_help=True)
steer_app = typer.Typer(cls=_DefaultRun, no_args_is_help=True,
                        help='Steer generation with a direction: `hiddenlens steer "prompt" --direction FILE`, '
                             "or `hiddenlens steer eval`.")
app.add_typer(truth_app, name="truth")
app.add_typer(steer_app, name="steer")


def _csv_ints(text: str | None) -> list[int] | None:
    return None if not text else [int(x) for x in text.split(",") if x.strip()]


def _csv_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


@truth_app.command("directions")
def directions(model: str = typer.Option("smollm2-135m-instruct", help="model spec (see load_model)"),
               family: str = typer.Option("capitals", help="capitals | negations | arithmetic | comparisons"),
               transfer: str = typer.Option("negations,arithmetic,comparisons",
                                            help="families to test transfer on (comma list, '' for none)"),
               layers: str = typer.Option("", help="comma list of layers (default: all)"),
               k_heads: int = typer.Option(16, help="ITI top-K heads (0 skips the per-head analysis)"),
               seed: int = typer.Option(0), out: Path = typer.Option(Path("results/truth"), help="report folder")):
    """Fit mass-mean / probe / RepE directions per layer and ITI heads; write a report folder with the
    directions as safetensors + JSON (``direction_<method>``, ``iti_heads``)."""
    import hiddenlens as hl
    from hiddenlens.analyses.truth import fit_truth, write_truth_report

    handle = hl.load_model(model)
    res = fit_truth(handle, family, [f for f in transfer.split(",") if f], _csv_ints(layers), k_heads=k_heads,
                    seed=seed, progress=True)
    path = write_truth_report(res, out)
    typer.echo(f"best layer {res.best_layer} (held-out probe AUROC {res.summary['best_probe_auroc']:.3f}); "
               f"report in {path}; directions: {path}/direction_mass_mean.json ...")


@steer_app.command("run")
def run(prompt: str = typer.Argument(..., help="the prompt to continue"),
        direction: Path = typer.Option(..., "--direction", help="a direction file (.json/.safetensors)"),
        alpha: float = typer.Option(4.0, help="edit = alpha * sigma * unit direction"),
        mode: str = typer.Option("generated", help="all | prompt | generated | conditional"),
        max_new_tokens: int = typer.Option(48), threshold: float = typer.Option(0.5, help="conditional: flag a "
                                                                                          "token when p_true < this"),
        detector: Path = typer.Option(None, help="conditional: detector direction (default: the first one)"),
        model: str = typer.Option("smollm2-135m-instruct"), backend: str = typer.Option("hf"),
        chat: bool = typer.Option(False, help="wrap the prompt in the model's chat template"),
        compare: bool = typer.Option(True, help="also print the unsteered continuation")):
    """Generate with steering, streaming tokens as they come."""
    import hiddenlens as hl
    from hiddenlens.analyses.truth import load_directions
    from hiddenlens.interventions.steer import steer_generate

    handle = hl.load_model(model, backend=backend)
    dirs = load_directions(direction)
    det = load_directions(detector)[0] if detector else None
    if chat:
        prompt = handle.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
    if compare:
        typer.secho("plain:   ", fg="blue", nl=False)
        typer.echo(handle.generate([prompt], max_new_tokens=max_new_tokens).texts[0])
    typer.secho(f"steered ({mode}, alpha {alpha}, {', '.join(d.name for d in dirs)}): ", fg="green", nl=False)

    def on_event(kind, info):
        if kind == "token":
            typer.echo(info["text"], nl=False)
        else:
            typer.secho(f" [rollback at position {info['position']}, p_true {info['p_true']:.2f}; steering on] ",
                        fg="yellow", nl=False)

    streamer = None
    if mode != "conditional" and backend == "hf":
        from transformers import TextStreamer
        streamer = TextStreamer(handle.tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = steer_generate(handle, [prompt], dirs, alpha, mode, max_new_tokens=max_new_tokens, detector=det,
                         threshold=threshold, streamer=streamer, on_event=on_event)
    if mode != "conditional" and streamer is None:
        typer.echo(out.texts[0], nl=False)
    edited = out.added_norm[0] > 0
    typer.echo("")
    typer.secho(f"edited {int(edited.sum())} token positions, mean added norm "
                f"{float(out.added_norm[0][edited].mean()) if edited.any() else 0.0:.3f}", fg="cyan")


@steer_app.command("eval")
def eval_(model: str = typer.Option("smollm2-135m-instruct"),
          family: str = typer.Option("capitals", help="family to fit on and evaluate (held-out entities)"),
          layers: str = typer.Option("8,12,16", help="layers whose mass-mean directions are evaluated"),
          alphas: str = typer.Option("0,1,2,4,8,16", help="alpha grid"),
          k_heads: int = typer.Option(16, help="ITI heads (0: no ITI set)"),
          seed: int = typer.Option(0), out: Path = typer.Option(Path("results/steering"))):
    """Fit directions on train entities, then steer on held-out questions over an alpha grid: accuracy, P(true),
    margin; CE and KL on neutral prose; random-direction control; ITI's table beside ours."""
    import hiddenlens as hl
    from hiddenlens.analyses.steer_eval import evaluate_steering, fit_eval_sets, write_eval_report

    handle = hl.load_model(model)
    sets, pairs, info = fit_eval_sets(handle, family, _csv_ints(layers), k_heads, seed)
    res = evaluate_steering(handle, sets, pairs, _csv_floats(alphas), seed=seed, progress=True)
    write_eval_report(res, out, info | {"model": model, "family": family, "n_pairs": len(pairs),
                                        "alphas": _csv_floats(alphas)})
    typer.echo(f"report in {out}/report.md")


@bench_app.command("steer")
def bench_steer(model: str = typer.Option("smollm2-135m-instruct"), layer: int = typer.Option(12),
                alpha: float = typer.Option(4.0), new_tokens: int = typer.Option(64),
                repeats: int = typer.Option(3), peers: bool = typer.Option(True, help="include nnsight and "
                                                                                      "TransformerLens"),
                out: Path = typer.Option(Path("results/bench_steer.json"))):
    """Steered vs plain generate tokens/s at batch 1 and 8, beside nnsight and TransformerLens steering."""
    from hiddenlens.benchmarks.steer import run_steer_benchmark

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    res = run_steer_benchmark(model, layer, alpha, new_tokens, (1, 8), repeats, peers, str(out))
    typer.echo(json.dumps({"written": str(out), "rows": len(res["rows"])}))
