"""``hiddenlens steer "PROMPT" ...`` (= ``hiddenlens steer run "PROMPT" ...``) and ``hiddenlens steer eval``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from . import options as o
from .options import DEFAULT_MODEL, Backend, Device, Dtype, Model, Name, OptionalOut, Threads


class DefaultCommandGroup(TyperGroup):
    """A group whose first argument, when it is not a command name or an option, goes to the ``run`` command, so
    ``hiddenlens steer "prompt" --direction F`` means ``hiddenlens steer run "prompt" --direction F``. ``run`` and
    ``eval`` are both listed in ``hiddenlens steer --help``."""

    default_command = "run"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=DefaultCommandGroup, no_args_is_help=True,
                  help='Steer generation with a direction: `hiddenlens steer "PROMPT" --direction FILE` (the `run` '
                       "command, the default) or evaluate steering with `hiddenlens steer eval`.")


@app.command("run")
def run(prompt: str = typer.Argument(..., help="the prompt to continue"),
        direction: Path = typer.Option(..., "--direction", help="a direction file (.json/.safetensors)"),
        alpha: float = typer.Option(4.0, help="edit = alpha * sigma * unit direction (finite)"),
        mode: str = typer.Option("generated", help="all | prompt | generated | conditional"),
        max_new_tokens: int = typer.Option(48),
        threshold: Optional[float] = typer.Option(None, help="--mode conditional only: flag a token when p_true < "
                                                             "this, in [0, 1] (default 0.5)"),
        detector: Optional[Path] = typer.Option(None, help="--mode conditional only: detector direction file "
                                                           "(default: the first direction)"),
        model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "auto",
        chat: bool = typer.Option(False, help="wrap the prompt in the model's chat template"),
        compare: bool = typer.Option(True, help="also print the unsteered continuation")):
    """Generate with steering, streaming tokens as they come (the default command: `hiddenlens steer "PROMPT"`).
    Every input is checked before anything is printed; an option the mode does not use is an error."""
    from hiddenlens.interventions.steer import MODES, check_request, steer_generate
    from hiddenlens.probes.direction import load_directions

    _check_options(mode, MODES, alpha, max_new_tokens, threshold, detector)
    dirs = load_directions(direction)
    det = load_directions(detector)[0] if detector else None
    handle = o.load(model, backend, device, dtype)
    check_request(handle, dirs, alpha, mode, max_new_tokens, det, threshold)
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

    conditional = mode == "conditional"
    streamer = None
    if not conditional and backend == "hf":
        from transformers import TextStreamer
        streamer = TextStreamer(handle.tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = steer_generate(handle, [prompt], dirs, alpha, mode, max_new_tokens=max_new_tokens, detector=det,
                         threshold=threshold, streamer=streamer, on_event=on_event if conditional else None)
    if not conditional and streamer is None:
        typer.echo(out.texts[0], nl=False)
    edited = out.added_norm[0] > 0
    typer.echo("")
    typer.secho(f"edited {int(edited.sum())} token positions, mean added norm "
                f"{float(out.added_norm[0][edited].mean()) if edited.any() else 0.0:.3f}", fg="cyan")


def _check_options(mode: str, modes: tuple[str, ...], alpha: float, max_new_tokens: int, threshold: float | None,
                   detector: Path | None) -> None:
    """The checks that need no model, by option name, before the model loads."""
    if mode not in modes:
        raise ValueError(f"--mode {mode!r} is not a steering mode; choose one of {', '.join(modes)}")
    if mode != "conditional":
        for name, value in (("--detector", detector), ("--threshold", threshold)):
            if value is not None:
                raise ValueError(f"{name} only applies to --mode conditional (got --mode {mode}); drop it or use "
                                 "--mode conditional")
    if not math.isfinite(alpha):
        raise ValueError(f"--alpha {alpha} is not finite; give a finite number")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: generate at least one token")
    if threshold is not None and not 0.0 <= threshold <= 1.0:  # NaN fails too
        raise ValueError(f"--threshold {threshold}: the detector flags a token when p_true < threshold, so it must "
                         "be a probability in [0, 1]")


@app.command("eval")
def eval_(model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "auto",
          families: str = typer.Option("capital,continent,currency,language,misconception",
                                       help="fact families to evaluate on (split by entity)"),
          limit: int = typer.Option(0, min=0, help="items per split and family at most (0: all)"),
          methods: str = typer.Option("mass_mean,probe,repe,caa,iti", help="steering methods to compare"),
          layers: str = typer.Option("*", help="candidate blocks for the resid methods (one is chosen per method on "
                                     "validation): " + o.LAYERS_HELP),
          alphas: str = typer.Option("4,8,16", help="alpha grid (positive; edit = alpha * sigma * u)"),
          k_heads: str = typer.Option("16,48", help="candidate numbers of ITI heads"),
          n_random: int = typer.Option(20, help="random same-norm directions per method (the percentile's "
                                                "distribution)"),
          kl_budget: float = typer.Option(0.65, help="largest validation KL on prose (nats/token) an alpha may cost "
                                                     "to be chosen"),
          seed: int = typer.Option(0), threads: Threads = None, out: OptionalOut = None, name: Name = None):
    """Fit truthful directions on fit entities, choose each method's layer, K and alpha on validation, then report
    on test: fixes, breaks, net change (bootstrap CI), KL/CE on prose, percentile among random directions, and a
    prompting baseline."""
    from hiddenlens.studies import steering as study

    grid = o.csv_floats(alphas, "--alphas")
    if not grid or not all(math.isfinite(a) and a > 0 for a in grid):
        raise ValueError(f"--alphas {alphas!r}: give a comma-separated list of positive finite numbers")
    ks = o.csv_floats(k_heads, "--k-heads")
    if not ks or not all(k >= 1 and k == int(k) for k in ks):
        raise ValueError(f"--k-heads {k_heads!r}: give a comma-separated list of whole numbers >= 1")
    meths = o.csv_list([methods])
    if not meths or not set(meths) <= set(study.METHODS):
        raise ValueError(f"--methods {methods!r}: choose from {', '.join(study.METHODS)}")
    fams = o.csv_list([families])
    if n_random < 1:
        raise ValueError(f"--n-random {n_random}: at least 1 (20 or more for a meaningful percentile)")
    if not (math.isfinite(kl_budget) and kl_budget > 0):
        raise ValueError(f"--kl-budget {kl_budget}: a positive number of nats/token")
    from hiddenlens.analyses.fact_items import fact_items

    fact_items(fams, seed)                                        # unknown families fail before the model loads
    folder = o.out_folder(out, study.STUDY, name)
    o.set_threads(threads)
    handle = o.load(model, backend, device, dtype)
    config = study.SteeringConfig(model=model, backend=backend, device=device, dtype=dtype, families=fams,
                                  limit=limit or None, methods=meths, layers=o.layers(layers, handle.n_layers),
                                  alphas=grid, k_heads=[int(k) for k in ks], n_random=n_random,
                                  kl_budget=kl_budget, seed=seed)
    study.run(config, handle).write(folder)
    typer.echo(f"report in {folder}/report.md")
