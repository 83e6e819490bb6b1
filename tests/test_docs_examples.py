"""Every docs/examples/*.py runs as a user would run it (a fresh Python, ``HIDDENLENS_OUT`` set) and writes only
into that folder: its working directory stays empty and the committed figures and results are untouched."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"
#: example -> files it must write into HIDDENLENS_OUT
WRITES = {
    "backends.py": ["backends.png"],
    "dynamics_lens.py": ["dynamics_paris.png"],
    "edit.py": ["edit.png"],
    "intention_metrics.py": ["intention_metrics.png"],
    "patching.py": ["patching/patching.png", "patching/report.md", "patching/dla.png"],
    "performance.py": ["performance.png"],
    "quickstart.py": ["quickstart.png"],
    "reliability.py": ["reliability.png"],
    "scale.py": ["scale.png"],
    "replace.py": ["replace.png"],
    "reproduce.py": ["reproduce/report.md", "reproduce/claims.png", "reproduce/patching/report.md"],
    "steering.py": ["steering.png"],
    "truth.py": ["truth.png", "truth/report.md", "truth/direction_mass_mean.json"],
}
#: examples that read another example's output (run first, into the same folder)
NEEDS = {"steering.py": "truth.py"}
#: examples that run without the embedded model
NOT_EMBEDDED = {"performance.py", "reliability.py", "scale.py"}


def test_every_example_is_listed():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(WRITES)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """One output folder for the module, so an example can read what another wrote (steering reads truth)."""
    return tmp_path_factory.mktemp("examples_out")


def _env(out: Path) -> dict[str, str]:
    return dict(os.environ, HIDDENLENS_OUT=str(out), HF_HUB_OFFLINE="1", MPLBACKEND="Agg",
                TOKENIZERS_PARALLELISM="false")


def _snapshot() -> dict[str, float]:
    """The committed figures and results (what an example used to overwrite)."""
    return {str(p): p.stat().st_mtime for d in ("figures", "results") for p in (ROOT / "docs" / d).rglob("*")
            if p.is_file()}


def run_example(name: str, out: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    before = _snapshot()
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=_env(out),
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert list(cwd.iterdir()) == [], f"{name} wrote into its working directory: {list(cwd.iterdir())}"
    assert _snapshot() == before, f"{name} changed files under docs/figures or docs/results"
    for rel in WRITES[name]:
        assert (out / rel).is_file(), f"{name} did not write {rel} into HIDDENLENS_OUT"
    return proc


def _params():
    for name in sorted(WRITES):
        marks = [pytest.mark.timeout(1800)] + ([] if name in NOT_EMBEDDED else [pytest.mark.embedded])
        yield pytest.param(name, marks=marks, id=name.removesuffix(".py"))


@pytest.mark.parametrize("name", _params())
def test_example_runs_and_writes_only_to_its_folder(name, out, tmp_path):
    args: list[str] = []
    if name == "performance.py":  # plots a benchmark result: make a small one on the tiny model
        bench = out / "capture.json"
        proc = subprocess.run([sys.executable, "-m", "hiddenlens", "bench", "capture", "--model", "tiny-llama",
                               "--batch", "2", "--tokens", "8", "--reps", "1", "--threads", "1", "--out", str(bench)],
                              cwd=tmp_path, env=_env(out), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        args = [str(bench)]
    need = NEEDS.get(name)
    if need and not all((out / rel).is_file() for rel in WRITES[need]):
        run_example(need, out, tmp_path / "needs")
    run_example(name, out, tmp_path / "cwd", *args)
