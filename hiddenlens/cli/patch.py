"""``hiddenlens patch``: activation patching (with attribution patching and DLA beside it) over prompt pairs."""
from __future__ import annotations

from typing import Optional

import typer

from . import options as o
from .options import DEFAULT_MODEL, Backend, Device, Dtype, Model, Name, OptionalOut


def patch(model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "auto",
          pairs: Optional[str] = typer.Option(None, help="JSON file {'pairs': [{clean, corrupted, answer, wrong}]} "
                                                         "(default: the shipped landmark -> city pairs)"),
          limit: Optional[int] = typer.Option(None, min=1, help="use at most this many pairs"),
          sites: str = typer.Option("blocks.*.resid_post", help="sites to patch (a pattern; per-head: "
                                                                "'blocks.*.attn.z' with --per-head)"),
          direction: str = typer.Option("denoise", help="denoise (clean into corrupted) | noise (the reverse)"),
          per_head: bool = typer.Option(False, "--per-head", help="one cell per head (every position at once)"),
          metric: str = typer.Option("logit_diff", help="logit_diff (answer - wrong) | prob (the answer's probability)"),
          attribution: bool = typer.Option(True, help="also run attribution patching and correlate it"),
          dla: bool = typer.Option(True, help="also decompose the clean logit difference (direct logit attribution)"),
          out: OptionalOut = None, name: Name = None) -> None:
    """Activation patching over sites x positions (or heads) for prompt pairs, attribution patching beside it, and
    the direct logit attribution of the clean prompts; writes a run folder (tables, report, figures)."""
    from hiddenlens.studies import patching as study

    folder = o.out_folder(out, study.STUDY, name)
    handle = o.load(model, backend, device, dtype)
    config = study.PatchingConfig(model=model, backend=backend, device=device, dtype=dtype, pairs=pairs, limit=limit,
                                  sites=sites, direction=direction, per_head=per_head, metric=metric,
                                  attribution=attribution,
                                  dla=dla)
    res = study.run(config, handle)
    res.write(folder)
    best = res.tables["summary"].sort_values("normalized", ascending=False).iloc[0]
    where = f"head {int(best['head'])}" if per_head else f"position {int(best['position'])}"
    typer.echo(f"{res.summary['n_pairs']} pairs; strongest cell {best['site']} {where}: normalised "
               f"{best['normalized']:.3f} [{best['ci_low']:.3f}, {best['ci_high']:.3f}]; report in {folder}")
