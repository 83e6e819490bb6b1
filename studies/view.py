"""A dashboard view saved as a run (the Results page and ``hiddenlens.studies.read_run`` open it).

Pages whose computation is not one of the paper studies (steering one prompt, replacing one span, the lens of one
prompt, iterating one text, patching one pair) save what they show through this study's writer: the page, the
model, the prompt, the parameters, and the tables the page displayed, unchanged (every row, not a screenshot).
Reading the folder back gives the same tables (``Result.read``). Nothing is recomputed when saving, and the module
has no ``run``: unlike the paper studies, a view is computed by the dashboard page that saved it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hiddenlens.common.stats import markdown_table

from .report import ModelSpec, StudyResult

STUDY = "view"
#: rows of each table shown in report.md (the parquet / csv files hold every row)
REPORT_ROWS = 40


@dataclass
class ViewConfig(ModelSpec):
    """``page`` that computed the view, its ``prompt`` and ``params`` (JSON-able widget values)."""

    page: str = ""
    prompt: str = ""
    params: dict = field(default_factory=dict)


@dataclass
class Result(StudyResult):
    """``tables``: what the page showed; ``summary``: its headline numbers (JSON-able)."""

    STUDY: ClassVar[str] = STUDY
    CONFIG: ClassVar[type] = ViewConfig

    def report(self) -> str:
        c = self.config
        lines = [f"# {c.page} (saved from the dashboard)", "", f"Model `{c.model}` (backend {c.backend}, device "
                 f"{c.device}, {c.dtype}).", "", "Prompt:", "", "```", c.prompt, "```", "",
                 "Parameters: " + (", ".join(f"{k} = {v!r}" for k, v in c.params.items()) or "none") + "."]
        if self.summary:
            lines += ["", "Summary: " + ", ".join(f"{k} = {v}" for k, v in self.summary.items()) + "."]
        for name, df in self.tables.items():
            more = f" (first {REPORT_ROWS} of {len(df)} rows; every row in {name}.csv)" if len(df) > REPORT_ROWS else ""
            lines += ["", f"## {name}{more}", "", markdown_table(df.head(REPORT_ROWS))]
        return "\n".join(lines) + "\n"


def view_result(key, page: str, prompt: str, params: dict, tables: dict, summary: dict | None = None) -> Result:
    """The :class:`Result` of a page's view; ``key`` carries ``spec``, ``backend``, ``device``, ``dtype`` (the
    dashboard's model key)."""
    if not tables:
        raise ValueError("a saved view needs at least one table")
    config = ViewConfig(model=key.spec, backend=key.backend, device=key.device, dtype=key.dtype, page=page,
                        prompt=prompt, params=dict(params))
    return Result(config, dict(summary or {}), {name: df.reset_index(drop=True) for name, df in tables.items()})
