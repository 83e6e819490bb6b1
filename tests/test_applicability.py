"""The applicability map on the two tiny families: every methodology x workload x backend cell is graded against a
per-prompt reference; no cell may be SILENTLY_WRONG, and every ERROR names the backend and what it lacks."""
from __future__ import annotations

import pandas as pd
import pytest

from hiddenlens import studies
from hiddenlens.studies.applicability import (BACKENDS, EDITS, METHODOLOGIES, WORKLOADS, ApplicabilityConfig, Result,
                                              counts, family_map, map_family, versions)


@pytest.fixture(scope="module")
def result(tiny_llama, tiny_gpt2):
    config = ApplicabilityConfig()
    cells = pd.concat([map_family(h, config) for h in (tiny_llama, tiny_gpt2)], ignore_index=True)
    return Result(config, {"models": config.models, "backends": config.backends, "atol": config.atol,
                           "attention": config.attention, "versions": versions()}, {"cells": cells})


def _where(rows: pd.DataFrame) -> str:
    return "\n".join(f"{r.family} / {r.methodology} / {r.workload} / {r.backend}: max diff {r.max_abs_diff:.3g}, "
                     f"top-1 {r.top1_agreement:.3g}, TV {r.tv_distance:.3g}; {r.message}" for r in rows.itertuples())


def test_every_cell_is_graded(result):
    cells = result.cells
    assert len(cells) == 2 * len(METHODOLOGIES) * len(WORKLOADS) * len(BACKENDS)
    assert set(cells["status"]) <= {"SUPPORTED", "ERROR", "SILENTLY_WRONG", "N/A"}
    applicable = cells[cells["status"] != "N/A"]
    assert len(applicable) == 2 * len(BACKENDS) * sum(1 if gen else 2 for _, gen in METHODOLOGIES.values())
    assert applicable["seconds"].notna().all()


def test_no_cell_is_silently_wrong(result):
    wrong = result.cells[result.cells["status"] == "SILENTLY_WRONG"]
    assert wrong.empty, f"{len(wrong)} SILENTLY_WRONG cells:\n{_where(wrong)}"


def test_every_error_names_the_backend_and_what_is_missing(result):
    errors = result.cells[result.cells["status"] == "ERROR"]
    named = [f"backend {b!r} cannot" in m for b, m in zip(errors["backend"], errors["message"])]
    bad = errors[(errors["error_type"] != "BackendError").to_numpy() | ~pd.Series(named, dtype=bool).to_numpy()]
    assert bad.empty, f"ERROR cells without a BackendError naming the backend and the capability:\n{_where(bad)}"


def test_edits_change_the_output(result):
    """A do-nothing edit would match its reference trivially: every edit changes the reference's logits."""
    cells = result.cells
    edits = cells[cells["methodology"].isin(EDITS) & (cells["status"] != "N/A")]
    assert (edits["edit_effect"] > 1e-3).all(), edits[["family", "methodology", "workload", "edit_effect"]]


def test_result_writes_reads_and_reports(result, tmp_path):
    folder = result.write(tmp_path / "map")
    back = studies.read_run(folder)
    assert type(back) is Result
    pd.testing.assert_frame_equal(back.cells, result.cells, check_dtype=False)
    assert "applicability" in back.figure_files
    report = back.report_text
    assert report.startswith("# Applicability map") and "## tiny-llama" in report and "## tiny-gpt2" in report
    grid = family_map(result.cells, "tiny-gpt2")
    assert list(grid.columns) == ["methodology", "workload", *BACKENDS]
    assert len(grid) == sum(1 if gen else 2 for _, gen in METHODOLOGIES.values())
    assert counts(result.cells).set_index("family").sum(axis=1).eq(len(result.cells) // 2).all()


def test_doctor_command(tmp_path):
    from typer.testing import CliRunner

    from hiddenlens.cli import app

    res = CliRunner().invoke(app, ["doctor", "--backend", "hf", "--max-new-tokens", "2", "--out",
                                   str(tmp_path / "doc")])
    assert res.exit_code == 0, res.output
    assert "tiny-llama: applicability" in res.output and "SUPPORTED" in res.output
    back = studies.read_run(tmp_path / "doc")
    assert set(back.cells["backend"]) == {"hf"} and (back.cells["status"] != "SILENTLY_WRONG").all()


def test_the_grading_catches_a_wrong_tensor():
    """The comparison itself: a perturbation above atol is SILENTLY_WRONG, padding-free equality is SUPPORTED,
    a different generated token fails even when the logits are close."""
    import torch

    from hiddenlens.studies.applicability import Out, compare

    ref = [Out({"x": torch.zeros(3, 4)}, logits=torch.tensor([[2.0, 1.0, 0.0]]), tokens=torch.tensor([5, 6]))]
    same = compare([Out({"x": torch.full((3, 4), 5e-5)}, logits=ref[0].logits.clone(), tokens=torch.tensor([5, 6]))],
                   ref, 1e-4)
    assert same["status"] == "SUPPORTED" and same["top1_agreement"] == 1.0
    off = compare([Out({"x": torch.full((3, 4), 2e-4)}, logits=ref[0].logits, tokens=torch.tensor([5, 6]))], ref, 1e-4)
    assert off["status"] == "SILENTLY_WRONG" and "prompt 0 x" in off["message"]
    tok = compare([Out({"x": torch.zeros(3, 4)}, logits=ref[0].logits, tokens=torch.tensor([5, 7]))], ref, 1e-4)
    assert tok["status"] == "SILENTLY_WRONG" and tok["top1_agreement"] == 0.5
    shape = compare([Out({"x": torch.zeros(2, 4)}, logits=ref[0].logits, tokens=torch.tensor([5, 6]))], ref, 1e-4)
    assert shape["status"] == "SILENTLY_WRONG" and "shape" in shape["message"]
    big = [Out({"x": torch.full((3, 4), 2.4e4)})]          # float32 keeps ~7 digits of an entry this large
    near = [Out({"x": torch.full((3, 4), 2.4e4 + 0.01)})]
    assert compare(near, big, 1e-4)["status"] == "SILENTLY_WRONG"        # absolute tolerance alone
    assert compare(near, big, 1e-4, 1e-4)["status"] == "SUPPORTED"       # 4e-7 of the entry
    assert compare([Out({"x": torch.full((3, 4), 2.4e4 + 10.0)})], big, 1e-4, 1e-4)["status"] == "SILENTLY_WRONG"
    flip = compare([Out({}, logits=torch.tensor([[1.0, 1.00001, 0.0]]))], [Out({}, logits=torch.tensor([[1.0, 0.99999,
                                                                                                         0.0]]))],
                   1e-4, 1e-4)
    assert flip["status"] == "SILENTLY_WRONG"                             # close logits, different top-1
