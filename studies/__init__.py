"""Paper studies (``hiddenlens.studies``): one module per study, each with a config dataclass,
``run(config, handle=None, progress=True) -> Result``, ``Result.write(folder)`` and ``Result.read(folder)``.
The CLI and the dashboard use only these; ``analyses`` and ``interventions`` hold the reusable computations.

Every run folder is ``runs/<study>/<name>`` by default (:func:`default_out`) and carries a ``study.json`` naming
its study, so :func:`read_run` picks the right reader (see :mod:`hiddenlens.studies.report`).
"""
from __future__ import annotations

import importlib
from pathlib import Path

from .report import STUDY_FILE, default_out, read_folder, runs_root, study_of

#: study name -> module
STUDIES = {
    "intention": "hiddenlens.studies.intention",
    "dynamics": "hiddenlens.studies.dynamics",
    "sinks": "hiddenlens.studies.sinks",
    "bigram_backcopy": "hiddenlens.studies.bigram_backcopy",
    "truth": "hiddenlens.studies.truth",
    "steering": "hiddenlens.studies.steering",
    "leakage": "hiddenlens.studies.leakage",
    "iteration": "hiddenlens.studies.iteration",
    "applicability": "hiddenlens.studies.applicability",
    "patching": "hiddenlens.studies.patching",
    "truthprint": "hiddenlens.studies.truthprint",
    "tuned_lens": "hiddenlens.studies.tuned_lens",
    "reproduce": "hiddenlens.studies.reproduce",
    "view": "hiddenlens.studies.view",
}


def study_module(study: str):
    """The module of ``study`` (its ``Config``, ``run`` and ``Result``)."""
    if study not in STUDIES:
        raise KeyError(f"unknown study {study!r}; the studies are {', '.join(STUDIES)}")
    return importlib.import_module(STUDIES[study])


def read_run(folder: str | Path, study: str | None = None):
    """Read a run folder with its study's ``Result.read`` (the study from ``study.json``, or ``study``)."""
    name = study_of(folder) or study
    if name is None:
        raise FileNotFoundError(f"{folder} has no {STUDY_FILE}: pass the study that wrote it "
                                f"({', '.join(STUDIES)})")
    return study_module(name).Result.read(folder)


def list_runs(root: str | Path | None = None, max_depth: int = 3) -> list[tuple[str, Path]]:
    """``(study, folder)`` of every run folder (one with a ``study.json``) under ``root`` (default: the runs
    root), sorted by path."""
    root = Path(root) if root is not None else runs_root()
    if not root.is_dir():
        return []
    out = []
    for depth in range(max_depth + 1):
        for marker in sorted(root.glob("/".join(["*"] * depth + [STUDY_FILE]))):
            name = study_of(marker.parent)
            if name in STUDIES:
                out.append((name, marker.parent))
    return sorted(out, key=lambda r: str(r[1]))


__all__ = ["STUDIES", "default_out", "list_runs", "read_folder", "read_run", "runs_root", "study_module"]
