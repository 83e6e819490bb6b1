"""Hostile cases for run folders: reruns into a used folder, runs killed mid-write, concurrent writers, partial runs.

Every writer of a whole folder (a study's ``Result.write``, ``bb train``, ``save_decider``) goes through
``hiddenlens.common.folders.committed_folder``: the folder's lock, a hidden temporary folder, one rename.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pytest

from hiddenlens.common.errors import DamagedFileError, FolderExistsError, FolderLockedError
from hiddenlens.common.folders import committed_folder, locked
from hiddenlens.studies.report import StudyResult, read_folder

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Toy:
    tag: str = "a"


@dataclass
class ToyResult(StudyResult):
    STUDY: ClassVar[str] = "toy"
    CONFIG: ClassVar[type] = Toy

    def report(self) -> str:
        return f"# toy {self.config.tag}\n"


def toy(tag: str) -> ToyResult:
    return ToyResult(Toy(tag), summary={"tag": tag}, tables={"rows": pd.DataFrame({"tag": [tag] * 3})})


def folder_files(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def siblings(path: Path) -> set[str]:
    return {p.name for p in path.parent.iterdir()}


# ---- studies --------------------------------------------------------------------------------------------------------
@pytest.mark.hostile("run folders", "a study rerun into a used folder", expect="error", risk="wrong")
def test_study_rerun_into_used_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    toy("old").write(out)
    before = {f: (out / f).read_bytes() for f in folder_files(out)}
    with pytest.raises(FolderExistsError, match="already holds results.*overwrite=True"):
        toy("new").write(out)
    assert {f: (out / f).read_bytes() for f in folder_files(out)} == before


@pytest.mark.hostile("run folders", "a study rerun with overwrite replaces the whole folder", expect="works",
                     risk="wrong")
def test_study_overwrite_replaces_whole_folder(tmp_path):
    out = tmp_path / "run"
    old = toy("old")
    old.tables["extra"] = pd.DataFrame({"x": [1]})
    old.write(out)
    toy("new").write(out, overwrite=True)
    assert not (out / "extra.csv").exists() and not (out / "extra.parquet").exists()
    back = ToyResult.read(out)
    assert back.summary == {"tag": "new"} and set(back.tables) == {"rows"}
    assert siblings(out) <= {"run", ".run.lock"}


@pytest.mark.hostile("run folders", "the CLI refuses a used --out before loading the model", expect="error",
                     risk="wrong")
def test_cli_refuses_used_out_before_running(tmp_path, capsys):
    from hiddenlens.cli import main

    out = tmp_path / "used"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main(["truth", "directions", "--model", "tiny-llama", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.count("\n") == 0
    assert err.startswith(f"error: {out} already holds results") and "--out or --name" in err
    assert (out / "summary.json").read_text() == "{}" and time.perf_counter() - t0 < 10


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from dataclasses import dataclass
    from typing import ClassVar
    import pandas as pd
    from hiddenlens.studies.report import StudyResult

    @dataclass
    class Toy:
        tag: str = "a"

    @dataclass
    class Slow(StudyResult):
        STUDY: ClassVar[str] = "toy"
        CONFIG: ClassVar[type] = Toy

        def report(self):
            return "# slow"

        def write_extra(self, folder):
            (folder / "half.txt").write_text("written before the kill")
            print("writing", flush=True)
            time.sleep(60)

    Slow(Toy("new"), summary={"tag": "new"}, tables={"rows": pd.DataFrame({"tag": ["new"]})}).write(
        sys.argv[1], overwrite=True)
""")


@pytest.mark.hostile("run folders", "a study killed mid-write (as `analyze sinks`, `truth directions` were) "
                     "leaves the old folder whole", expect="works", risk="wrong")
def test_study_killed_mid_write_leaves_old_folder(tmp_path):
    out = tmp_path / "run"
    toy("old").write(out)
    before = {f: (out / f).read_bytes() for f in folder_files(out)}
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert {f: (out / f).read_bytes() for f in folder_files(out)} == before
    assert ToyResult.read(out).summary == {"tag": "old"}
    assert any(n.startswith(".run.partial-") for n in siblings(out))  # the dead run's hidden leftover ...
    toy("next").write(out, overwrite=True)                            # ... is removed by the next writer
    assert not any(n.startswith(".run.partial-") for n in siblings(out))


@pytest.mark.hostile("run folders", "two studies written into one folder at once", expect="works", risk="lost")
def test_concurrent_study_writers_never_mix(tmp_path):
    out = tmp_path / "run"
    results: dict[str, object] = {}

    def write(tag: str) -> None:
        try:
            toy(tag).write(out)
            results[tag] = "wrote"
        except (FolderExistsError, FolderLockedError) as exc:
            results[tag] = exc

    threads = [threading.Thread(target=write, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [t for t, r in results.items() if r == "wrote"]
    assert len(winners) == 1, results
    loser = next(r for r in results.values() if r != "wrote")
    assert "already holds results" in str(loser) or "another run" in str(loser)
    back = ToyResult.read(out)
    assert back.summary == {"tag": winners[0]} and set(back.tables["rows"].tag) == {winners[0]}


@pytest.mark.hostile("run folders", "a partial study run (written as it goes) read as complete", expect="error",
                     risk="wrong")
def test_partial_study_folder_is_not_read_as_complete(tmp_path):
    out = tmp_path / "run"
    toy("partial").write(out, complete=False)
    with pytest.raises(DamagedFileError, match="incomplete toy run.*allow_incomplete=True"):
        ToyResult.read(out)
    assert ToyResult.read(out, allow_incomplete=True).summary == {"tag": "partial"}
    assert read_folder(out).complete is False
    toy("done").write(out, overwrite=True)
    assert read_folder(out).complete is True and ToyResult.read(out).summary == {"tag": "done"}


@pytest.mark.hostile("run folders", "a second writer while a folder is locked", expect="error", risk="lost")
def test_locked_folder_refuses_second_writer(tmp_path):
    out = tmp_path / "run"
    with locked(out):
        with pytest.raises(FolderLockedError, match="being written by another run"):
            with committed_folder(out):
                pass
    with committed_folder(out) as tmp:  # free again once released
        (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1"


# ---- bb train ------------------------------------------------------------------------------------------------------
def _bb(steps: int, every: int, **kw):
    from hiddenlens.models.bb_model import BBConfig

    return BBConfig(d_model=16, n_layers=1, seq_length=8, k=2, batch_size=4, steps=steps, checkpoint_every=every,
                    **kw)


@pytest.mark.hostile("run folders", "`bb train` rerun into a used folder (stale checkpoints mixed in)",
                     expect="error", risk="wrong")
def test_bb_train_rerun_refused_and_overwrite_replaces(tmp_path):
    from hiddenlens.models.bb_training import train

    out = tmp_path / "bb"
    first = train(_bb(4, 2), out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["step_000000", "step_000002", "step_000004"]
    assert [p.parent for p in first.checkpoints] == [out] * 3 and all(p.is_dir() for p in first.checkpoints)
    with pytest.raises(FolderExistsError, match="already holds results"):
        train(_bb(2, 1, attention="relu", seed=7), out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["step_000000", "step_000002", "step_000004"]
    train(_bb(2, 1, attention="relu", seed=7), out_dir=out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["step_000000", "step_000001", "step_000002"]
    import json
    from hiddenlens.models.loading import MARKER
    marks = [json.loads((p / MARKER).read_text()) for p in out.iterdir()]
    assert {(m["attention"], m["config"]["seed"]) for m in marks} == {("relu", 7)}


@pytest.mark.hostile("run folders", "`bb train` killed mid-training leaves no folder that reads as a run",
                     expect="works", risk="wrong")
def test_bb_train_killed_leaves_nothing_readable(tmp_path):
    out = tmp_path / "bb"
    argv = [sys.executable, "-m", "hiddenlens", "bb", "train", "--out", str(out), "--steps", "100000",
            "--d-model", "16", "--seq-length", "8", "--k", "2", "--batch-size", "4", "--checkpoint-every", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            partial = [p for p in tmp_path.iterdir() if p.name.startswith(".bb.partial-")]
            if partial and len(list(partial[0].iterdir())) >= 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail("bb train wrote no checkpoint within 60 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not out.exists()
    from hiddenlens.models.bb_training import train

    train(_bb(1, 1), out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["step_000000", "step_000001"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bb.partial-")]


# ---- the iteration decider (two files that belong together) --------------------------------------------------------
@pytest.mark.hostile("run folders", "a decider saved into a used folder", expect="error", risk="wrong")
def test_decider_save_refuses_used_folder(tmp_path):
    from hiddenlens.interventions.decider import MLPDecider, MLPDeciderConfig, load_decider, save_decider

    cfg = MLPDeciderConfig(sites=["blocks.0.resid_post"], d_model=8, topk=4, hidden=8, n_blocks=1)
    out = save_decider(MLPDecider(cfg), tmp_path / "dec")
    with pytest.raises(FolderExistsError, match="overwrite=True"):
        save_decider(MLPDecider(cfg), out)
    cfg2 = MLPDeciderConfig(sites=["blocks.1.resid_post"], d_model=8, topk=4, hidden=8, n_blocks=1)
    save_decider(MLPDecider(cfg2), out, overwrite=True)
    assert load_decider(out).config.sites == ["blocks.1.resid_post"]
