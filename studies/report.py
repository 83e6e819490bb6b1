"""How every study keeps its result: one folder, written atomically, read back by the study that wrote it.

A run folder (by default ``runs/<study>/<name>``, see :func:`default_out`) holds

    <table>.parquet + <table>.csv     each table of the result (Parquet is read back; CSV is for people)
    <figure>.png                      figures drawn from the tables
    summary.json                      the headline numbers
    report.md                         the Markdown report (tables, figures, the paper beside ours)
    study.json                        {"study": name, "config": {...}, "tables": [...], "figures": [...]}, last

The whole folder is written into a hidden temporary folder beside it and renamed into place at the end
(:func:`hiddenlens.common.folders.committed_folder`, under the folder's lock): a killed run leaves no folder, and a
rerun into a used folder is refused unless ``overwrite=True``, which replaces the whole folder (files are never
mixed across runs). ``study.json`` says whether the run is ``complete``: a study that writes partial results as
it goes (intention, after each regime) writes them with ``complete=False``, and :meth:`StudyResult.read` refuses
such a folder unless asked (``allow_incomplete=True``). Each study's ``Result`` subclasses
:class:`StudyResult`: it names its tables and composes its report and figures; writing and reading are here, once.
Folders written before ``study.json`` existed (e.g. ``docs/results/*``) still read: the study's own ``Result.read``
takes them, with a default config.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from hiddenlens.common.errors import DamagedFileError
from hiddenlens.common.files import atomic_path, write_json, write_text
from hiddenlens.common.folders import committed_folder

STUDY_FILE = "study.json"
#: the runs root (``hiddenlens dashboard --runs`` sets it for the dashboard)
RUNS_ENV = "HIDDENLENS_RUNS_DIR"
DEFAULT_RUNS_ROOT = "runs"
#: The one BOS convention of the CLI's analyses and the dashboard: prepend the tokenizer's BOS so that position 0
#: is a fixed token (the embedded SmolLM2's tokenizer adds none by itself). ``--no-bos`` / the dashboard's
#: "Prepend BOS" toggle turn it off.
PREPEND_BOS = True


def runs_root() -> Path:
    """Where runs go: ``$HIDDENLENS_RUNS_DIR``, else ``runs`` (relative to the working directory)."""
    return Path(os.environ.get(RUNS_ENV) or DEFAULT_RUNS_ROOT)


def default_out(study: str, name: str | None = None) -> Path:
    """The one default output folder: ``<runs root>/<study>/<name>`` (``name``: a timestamp when not given)."""
    if not study or "/" in study or study.startswith("."):
        raise ValueError(f"study name {study!r}: use a plain name such as 'truth'")
    name = name or time.strftime("%Y%m%d-%H%M%S")
    if "/" in name or name.startswith("."):
        raise ValueError(f"run name {name!r}: use a plain folder name (no '/', not starting with '.')")
    return runs_root() / study / name


def study_of(folder: str | Path) -> str | None:
    """The study that wrote ``folder`` (from its ``study.json``), or None for a folder without one."""
    f = Path(folder) / STUDY_FILE
    if not f.is_file():
        return None
    return json.loads(f.read_text(encoding="utf-8")).get("study")


# ---- writing and reading one folder ----------------------------------------------------------------------------
def write_table(folder: Path, name: str, df: pd.DataFrame) -> None:
    with atomic_path(folder / f"{name}.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_path(folder / f"{name}.csv") as tmp:
        df.to_csv(tmp, index=False)


def write_figure(folder: Path, name: str, fig, dpi: int = 120) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(folder / f"{name}.png") as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)


@dataclass
class RunFolder:
    """What a run folder holds, read back: tables (Parquet, else CSV), ``summary.json``, ``report.md``, the PNG
    figures (paths) and ``study.json`` (``study``, ``config`` and ``complete``; None / {} / True for older
    folders)."""

    path: Path
    study: str | None = None
    config: dict = field(default_factory=dict)
    complete: bool = True
    summary: dict = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    report: str = ""


def read_folder(folder: str | Path, study: str | None = None) -> RunFolder:
    """Read a run folder; with ``study``, refuse a folder whose ``study.json`` names another study."""
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is not a folder" if p.exists() else f"{p} does not exist")
    meta = json.loads((p / STUDY_FILE).read_text(encoding="utf-8")) if (p / STUDY_FILE).is_file() else {}
    if study is not None and meta.get("study") not in (None, study):
        raise ValueError(f"{p} holds a {meta['study']!r} run, not a {study!r} run")
    run = RunFolder(p, meta.get("study"), dict(meta.get("config") or {}), bool(meta.get("complete", True)))
    if (p / "summary.json").is_file():
        run.summary = json.loads((p / "summary.json").read_text(encoding="utf-8"))
    if (p / "report.md").is_file():
        run.report = (p / "report.md").read_text(encoding="utf-8")
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    parquet = {f.stem for f in files if f.suffix == ".parquet"}
    for f in files:
        if f.suffix == ".parquet":
            run.tables[f.stem] = pd.read_parquet(f)
        elif f.suffix == ".csv" and f.stem not in parquet:
            run.tables[f.stem] = pd.read_csv(f)
        elif f.suffix == ".png":
            run.figures[f.stem] = f
    if not (meta or run.summary or run.report or run.tables):
        raise FileNotFoundError(f"{p} holds no results (no {STUDY_FILE}, summary.json, report.md or tables)")
    return run


# ---- the model a study runs on -----------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """The model fields every study config starts with (what ``hiddenlens.load_model`` takes)."""

    model: str = "smollm2-135m-instruct"
    backend: str = "hf"
    device: str = "auto"
    dtype: str = "auto"

    def load(self, spec: str | None = None, revision: str | None = None):
        """Load ``spec`` (default: ``self.model``) with this backend, device and dtype."""
        from hiddenlens.probes.handle import load_model

        extra = {"revision": revision} if revision else {}
        return load_model(spec or self.model, backend=self.backend, device=self.device, dtype=self.dtype, **extra)

    @contextlib.contextmanager
    def opened(self, spec: str, given: dict | None = None):
        """The handle of checkpoint ``spec`` for a block: ``given[spec]`` when already loaded (left loaded), else
        loaded here (``name@revision`` loads that revision) and unloaded when the block ends."""
        handle = (given or {}).get(spec)
        if handle is not None:
            yield handle
            return
        from hiddenlens.analyses.checkpoints import parse_checkpoint

        name, rev = parse_checkpoint(spec)
        handle = self.load(name, revision=rev)
        try:
            yield handle
        finally:
            handle.unload()


# ---- the base of every study's Result ------------------------------------------------------------------------------
def jsonable_config(config) -> dict:
    """A config dataclass as JSON-friendly values (paths as strings, tuples as lists)."""
    def conv(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        return v

    return {f.name: conv(getattr(config, f.name)) for f in dataclasses.fields(config)}


def config_from(config_type: type, data: dict):
    """Rebuild a config dataclass from ``study.json`` (unknown keys are dropped, missing ones keep defaults)."""
    names = {f.name for f in dataclasses.fields(config_type)}
    return config_type(**{k: v for k, v in (data or {}).items() if k in names})


@dataclass
class StudyResult:
    """The base of each study's ``Result``: ``config`` (the study's config dataclass), ``summary`` (JSON-able
    headline numbers) and ``tables`` (name -> DataFrame). A study sets :attr:`STUDY` and :attr:`CONFIG` and writes
    :meth:`report` (and :meth:`figures`, :meth:`write_extra` / :meth:`read_extra` when it keeps more files, e.g.
    the truth study's directions). After :meth:`read`, ``folder``, ``figure_files`` and ``report_text`` hold what
    is on disk."""

    STUDY: ClassVar[str] = ""
    CONFIG: ClassVar[type] = dict

    config: Any
    summary: dict = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    folder: Path | None = field(default=None, compare=False, repr=False)
    figure_files: dict[str, Path] = field(default_factory=dict, compare=False, repr=False)
    report_text: str = field(default="", compare=False, repr=False)

    # ---- what a study composes
    def report(self) -> str:
        """The Markdown report (figures referenced as ``![name](name.png)``)."""
        raise NotImplementedError

    def figures(self) -> dict[str, Any]:
        """Matplotlib figures drawn from the tables, by file stem."""
        return {}

    def write_extra(self, folder: Path) -> None:
        """Files beyond tables, figures, summary and report."""

    @classmethod
    def read_extra(cls, run: RunFolder) -> dict:
        """Constructor arguments beyond config, summary and tables, read from ``run``."""
        return {}

    def table(self, name: str) -> pd.DataFrame | None:
        return self.tables.get(name)

    # ---- the one way to write and read
    def write(self, folder: str | Path, overwrite: bool = False, complete: bool = True) -> Path:
        """Write the run folder as one commit (see the module docstring); returns it.

        Args:
            overwrite: replace a folder that already holds results (default: refuse it).
            complete: False for a partial result written while the study still runs.
        """
        folder = Path(folder)
        with committed_folder(folder, overwrite, fix="pass overwrite=True to replace it") as tmp:
            for name, df in self.tables.items():
                write_table(tmp, name, df)
            figures = self.figures()
            for name, fig in figures.items():
                write_figure(tmp, name, fig)
            self.write_extra(tmp)
            write_json(tmp / "summary.json", self.summary)
            write_text(tmp / "report.md", self.report())
            write_json(tmp / STUDY_FILE, {"study": self.STUDY, "complete": complete,
                                          "config": jsonable_config(self.config), "tables": sorted(self.tables),
                                          "figures": sorted(figures)})
        return folder

    @classmethod
    def read(cls, folder: str | Path, allow_incomplete: bool = False):
        """Read a folder this study wrote (or an older one of the same study without ``study.json``); a partial
        run (``complete: false``) only with ``allow_incomplete=True``."""
        run = read_folder(folder, cls.STUDY)
        if not run.complete and not allow_incomplete:
            raise DamagedFileError(f"{run.path} holds an incomplete {cls.STUDY} run (it stopped before the end); "
                                   "rerun it, or read it with allow_incomplete=True")
        older = run.summary.get("config") if isinstance(run.summary.get("config"), dict) else run.summary
        config = config_from(cls.CONFIG, run.config or older)
        obj = cls(config=config, summary=run.summary, tables=run.tables, **cls.read_extra(run))
        obj.folder, obj.figure_files, obj.report_text = run.path, dict(run.figures), run.report
        return obj
