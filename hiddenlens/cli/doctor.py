"""``hiddenlens doctor``: the applicability map (methodology x workload x backend, per model family), graded
SUPPORTED / ERROR / SILENTLY_WRONG against per-prompt references (:mod:`hiddenlens.studies.applicability`)."""
from __future__ import annotations

from typing import List, Optional

import typer
from rich.table import Table

from .options import Device, Name, OptionalOut, console, out_folder

STYLE = {"SUPPORTED": "green", "ERROR": "yellow", "SILENTLY_WRONG": "bold red", "N/A": "dim"}


def doctor(model: Optional[List[str]] = typer.Option(
               None, "--model", help="add a model family to the two tiny ones (repeatable), e.g. "
                                     "smollm2-135m-instruct"),
           only: bool = typer.Option(False, "--only", help="map only the --model families (not the tiny ones)"),
           backend: Optional[List[str]] = typer.Option(None, "--backend", help="backends (repeatable; default all: "
                                                                               "hf, transformer_lens, nnsight)"),
           device: Device = "cpu", out: OptionalOut = None, name: Name = None,
           max_new_tokens: int = typer.Option(4, min=1, help="tokens of the generation workload")) -> None:
    """Which methodology runs correctly on which backend and workload: print the applicability map, write the run
    folder (cells table, report.md, heatmap)."""
    from hiddenlens.studies.applicability import BACKENDS, ApplicabilityConfig, run

    from .options import csv_list

    extra = csv_list(model)
    models = extra if only and extra else list(dict.fromkeys(["tiny-llama", "tiny-gpt2"] + extra))
    config = ApplicabilityConfig(model=models[0], device=device, models=models,
                                 backends=csv_list(backend) or list(BACKENDS), max_new_tokens=max_new_tokens)
    folder = out_folder(out, "applicability", name)
    with console.status(f"mapping {', '.join(models)}"):
        result = run(config, progress=False)
    print_map(result)
    result.write(folder)
    console.print(f"wrote {folder}")


def print_map(result) -> None:
    """One rich table per family (rows methodology x workload, columns backends), the ERROR and SILENTLY_WRONG
    cells with their messages, then the counts."""
    from hiddenlens.studies.applicability import counts, family_map

    cells = result.cells
    for fam in dict.fromkeys(cells["family"]):
        grid = family_map(cells, fam)
        table = Table(title=f"{fam}: applicability")
        for col in grid.columns:
            table.add_column(col)
        for _, row in grid.iterrows():
            table.add_row(*[_styled(str(v)) if i >= 2 else str(v) for i, v in enumerate(row)])
        console.print(table)
    bad = cells[cells["status"].isin(["ERROR", "SILENTLY_WRONG"])]
    for _, r in bad.iterrows():
        console.print(f"[{STYLE[r['status']]}]{r['status']}[/] {r['family']} / {r['methodology']} / {r['workload']} / "
                      f"{r['backend']}: {r['message']}")
    c = counts(cells)
    console.print("cells per status: " + "; ".join(
        f"{r['family']}: " + ", ".join(f"{k} {r[k]}" for k in c.columns[1:]) for _, r in c.iterrows()))


def _styled(text: str) -> str:
    style = STYLE.get(text.split(" ")[0])
    return f"[{style}]{text}[/]" if style else text
