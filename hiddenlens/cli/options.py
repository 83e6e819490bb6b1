"""The options every command shares, defined once, and the helpers behind them.

Commands that load a model take :data:`Model`, :data:`Backend`, :data:`Device` and :data:`Dtype` (plus
:data:`BatchSize` where they batch prompts) and load it with :func:`load`. Every option that names layers is
read by :func:`layers` (``hiddenlens.probes.sites.parse_layers``: block indices, ``"3"``, ``"3,5-7"``, ``"-1"``,
``"*"``). Heavy imports (torch, transformers) happen inside the helpers, so ``hiddenlens --help`` stays fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console()

DEFAULT_MODEL = "smollm2-135m-instruct"
LAYERS_HELP = ("block indices: '3', '3,5-7', '-1' (the last block), '2--1' or '*' (every block); "
               "block l's output is blocks.l.resid_post")

Model = Annotated[str, typer.Option("--model", help="model spec: smollm2-135m-instruct (alias embedded), tiny-llama, "
                                                    "tiny-gpt2, a checkpoint folder or a hub id")]
Backend = Annotated[str, typer.Option("--backend", help="hf | transformer_lens | nnsight")]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA, then MPS, then CPU) | cpu | cuda | mps")]
Dtype = Annotated[str, typer.Option("--dtype", help="model dtype: auto (bf16 on CUDA, float32 elsewhere) | float32 | "
                                                    "bfloat16 | float16")]
BatchSize = Annotated[int, typer.Option("--batch-size", "--batch", min=1, help="prompts per forward pass")]
Out = Annotated[Path, typer.Option("--out", help="output folder")]
OptionalOut = Annotated[Optional[Path], typer.Option("--out", help="run folder (default: runs/<study>/<name>)")]
Name = Annotated[Optional[str], typer.Option("--name", help="run name under runs/<study>/ when --out is not given "
                                                           "(default: a timestamp)")]
Layers = Annotated[Optional[str], typer.Option("--layers", help=LAYERS_HELP)]
Threads = Annotated[Optional[int], typer.Option("--threads", min=1, help="torch CPU threads (default: torch's own)")]


def load(model: str = DEFAULT_MODEL, backend: str = "hf", device: str = "auto", dtype: str = "auto",
         revision: str | None = None):
    """The one way commands load a model: :func:`hiddenlens.load_model` behind a status line."""
    from hiddenlens.probes.handle import load_model

    extra = {"revision": revision} if revision else {}
    with console.status(f"loading {model} ({backend})"):
        return load_model(model, backend=backend, device=device, dtype=dtype, **extra)


def layers(spec: str | None, n_layers: int, what: str = "--layers") -> list[int] | None:
    """A layer option -> sorted block indices (None when the option was not given)."""
    if spec is None or not str(spec).strip():
        return None
    from hiddenlens.probes.sites import parse_layers

    return parse_layers(spec, n_layers, what=what)


def layer_ranges(spec: str | None, n_layers: int, what: str = "--ranges") -> list[list[int]] | None:
    """``"0-29,15-29,29"``: comma-separated layer ranges (block indices), each parsed by ``parse_layers``."""
    if spec is None or not spec.strip():
        return None
    parts = [p.strip() for p in spec.split(",")]
    if any(not p for p in parts):
        raise ValueError(f"{what}: empty range in {spec!r}; write ranges like '0-29,15-29'")
    return [layers(p, n_layers, f"{what} ({p})") for p in parts]


def csv_floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ValueError(f"{what}: {text!r} is not a comma-separated list of numbers") from exc


def csv_list(items: list[str] | None) -> list[str]:
    """A repeatable option whose values may also be comma-separated -> one flat list."""
    return [c.strip() for item in (items or []) for c in item.split(",") if c.strip()]


def out_folder(out: Path | None, study: str, name: str | None = None) -> Path:
    """``--out`` when given, else the one default: ``runs/<study>/<name>`` (``hiddenlens.studies.default_out``).

    A folder that already holds results is refused here, before the run starts (runs never mix files; the
    commit at the end refuses it again should another run have finished there meanwhile)."""
    from hiddenlens.common.folders import check_free

    if out is None:
        from hiddenlens.studies import default_out

        out = default_out(study, name)
    return check_free(out, fix="choose another --out or --name (or delete the folder first)")


def set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)
