"""Report folders: tidy tables (Parquet + CSV), a JSON summary, PNG figures and a Markdown report, all atomic.

Every CLI analysis writes one folder through :class:`ReportFolder`, so the dashboard's Results page can open any
of them (``summary.json``, ``*.parquet``/``*.csv``, ``*.png``, ``report.md``).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from hiddenlens.probes.atomic import atomic_path, write_json, write_text


class ReportFolder:
    """A folder of results. ``table(name, df)`` writes ``name.parquet`` and ``name.csv``; ``figure(name, fig)``
    writes ``name.png`` (matplotlib); ``summary(dict)`` writes ``summary.json``; ``markdown(text)`` writes
    ``report.md``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def table(self, name: str, df: pd.DataFrame) -> Path:
        with atomic_path(self.path / f"{name}.parquet") as tmp:
            df.to_parquet(tmp, index=False)
        with atomic_path(self.path / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False)
        return self.path / f"{name}.parquet"

    def figure(self, name: str, fig, dpi: int = 120) -> Path:
        import matplotlib.pyplot as plt

        with atomic_path(self.path / f"{name}.png") as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
        plt.close(fig)
        return self.path / f"{name}.png"

    def summary(self, data: dict) -> Path:
        return write_json(self.path / "summary.json", data)

    def markdown(self, text: str, name: str = "report.md") -> Path:
        return write_text(self.path / name, text)


def markdown_table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A GitHub-flavoured Markdown table of ``df`` (no extra dependency)."""
    cols = list(df.columns)

    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)
