"""Read a run folder of a hiddenlens study (``runs/<study>/<name>``, written by a study's ``Result.write``; see
:mod:`hiddenlens.studies`) for the Results page: the folder's ``study.json`` names its study, whose ``Result.read``
reads it; older folders without one (e.g. ``docs/results/*``) are still shown file by file.

Only safe formats are read: ``summary.json`` and other ``*.json``, tables from ``*.parquet`` (or ``*.csv`` when no
Parquet twin exists), ``*.png`` figures, ``*.md`` text and the tensor names/shapes of ``*.safetensors`` files.
Nothing is unpickled. A missing path or a folder with nothing readable raises :class:`ResultsError`; one broken
file is reported in :attr:`Results.problems` and the rest still loads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from safetensors import safe_open

MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_ROWS = 100_000
STUDY_FILE = "study.json"


class ResultsError(ValueError):
    """The path is not a readable results folder; the message says why."""


@dataclass
class Results:
    path: Path
    study: str | None = None       # the study that wrote the folder (study.json), None for older folders
    result: object = None          # that study's Result, read with its Result.read
    summary: dict | None = None
    json_files: dict[str, object] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # file -> {tensor name: shape}
    problems: dict[str, str] = field(default_factory=dict)  # file name -> what went wrong

    @property
    def empty(self) -> bool:
        return not (self.summary or self.json_files or self.tables or self.figures or self.texts or self.tensors)


def find_runs(root: str | Path, max_depth: int = 3) -> list[str]:
    """Run folders (with a ``study.json``) under ``root``, the runs root (``runs/<study>/<name>``), sorted."""
    from hiddenlens.studies import list_runs

    return [str(path) for _, path in list_runs(Path(root).expanduser(), max_depth=max_depth)]


def _read_table(f: Path) -> pd.DataFrame:
    df = pd.read_parquet(f) if f.suffix == ".parquet" else pd.read_csv(f)
    return df.head(MAX_ROWS)


def _tensor_shapes(f: Path) -> dict[str, list[int]]:
    with safe_open(str(f), framework="pt") as fh:
        return {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}


def open_results(path: str | Path) -> Results:
    """Load every readable file of the folder ``path`` (not recursive)."""
    if not str(path).strip():
        raise ResultsError("no folder given: type the path of a report folder written by a hiddenlens command")
    p = Path(str(path).strip()).expanduser()
    if not p.exists():
        raise ResultsError(f"{p} does not exist")
    if not p.is_dir():
        raise ResultsError(f"{p} is a file, not a folder; give the folder that holds summary.json")
    res = Results(path=p)
    try:
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    except OSError as exc:
        raise ResultsError(f"cannot list {p}: {exc.strerror or exc}") from exc
    stems_with_parquet = {f.stem for f in files if f.suffix == ".parquet"}
    for f in files:
        try:
            if f.stat().st_size > MAX_FILE_BYTES:
                res.problems[f.name] = f"skipped: larger than {MAX_FILE_BYTES // 2**20} MiB"
                continue
            if f.name == "summary.json":
                res.summary = json.loads(f.read_text(encoding="utf-8"))
            elif f.suffix == ".json":
                res.json_files[f.name] = json.loads(f.read_text(encoding="utf-8"))
            elif f.suffix == ".parquet" or (f.suffix == ".csv" and f.stem not in stems_with_parquet):
                res.tables[f.stem] = _read_table(f)
            elif f.suffix == ".png":
                if f.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
                    raise ValueError("not a PNG image")
                res.figures[f.stem] = f
            elif f.suffix in (".md", ".txt"):
                res.texts[f.name] = f.read_text(encoding="utf-8")
            elif f.suffix == ".safetensors":
                res.tensors[f.name] = _tensor_shapes(f)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, the others still load
            res.problems[f.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    if (p / STUDY_FILE).is_file():
        from hiddenlens.studies import read_run, study_of

        try:
            res.study = study_of(p)
            res.result = result = read_run(p)
            # what the page shows comes from the study's own reader
            res.summary, res.tables = result.summary, {k: v.head(MAX_ROWS) for k, v in result.tables.items()}
            res.figures = dict(result.figure_files)
            if result.report_text:
                res.texts["report.md"] = result.report_text
        except Exception as exc:  # noqa: BLE001 - shown on the page; the files that read are still shown
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            res.problems[STUDY_FILE] = f"cannot read as a {res.study!r} run: {why}"[:300]
    if res.empty:
        detail = "; unreadable: " + "; ".join(f"{k} ({v})" for k, v in res.problems.items()) if res.problems else ""
        raise ResultsError(f"{p} holds no results: no summary.json, tables, figures or report{detail}")
    return res
