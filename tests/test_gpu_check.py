"""``benchmarks/gpu_check.py``: the ``--cpu`` smoke run end to end (so the GPU script cannot rot between the sessions
that get a GPU), and known answers of its verdict logic."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hiddenlens.benchmarks import gpu_check as gpu

ROOT = Path(__file__).resolve().parents[1]
#: the row groups of the table, by ``check`` (the random model's check is its spec, ``random-llama-<size>``)
CHECKS = ("env", "cuda+bf16", "capture", "steering", "backends", "random-llama")


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """``python benchmarks/gpu_check.py --cpu --out gpu.json`` in a subprocess: (completed process, JSON)."""
    out = tmp_path_factory.mktemp("gpu_check") / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    data = json.loads(out.read_text()) if out.exists() else None
    return proc, data


def test_cpu_run_passes_and_prints_every_check(cpu_run):
    proc, _ = cpu_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    for check in CHECKS:
        assert any(line.startswith(f"| {check}") for line in table), f"no {check} row in:\n{proc.stdout}"
    assert "all" in proc.stdout and "parity checks passed" in proc.stdout
    assert "torch threads 1" in proc.stdout
    for check in ("cuda+bf16", "capture", "steering", "backends", "random model"):
        assert f"running {check}" in proc.stderr  # progress goes to stderr


def test_cpu_run_json_has_the_rows_and_parity_passes(cpu_run):
    _, data = cpu_run
    assert data is not None and data["passed"] is True
    rows = data["rows"]
    checks = {r["check"] for r in rows}
    for check in CHECKS:
        assert any(c.startswith(check) for c in checks), f"no {check} row in {checks}"
    gated = [r for r in rows if r["gated"]]
    assert len(gated) >= 12 and all(r["verdict"] == "pass" for r in gated), gated
    whats = " ".join(r["what"] for r in rows)
    for word in ("top-1", "KL", "output_hidden_states", "tokens/s", "transformer_lens", "nnsight"):
        assert word in whats
    timings = [r for r in rows if r["shown"].endswith("x")]
    assert len(timings) >= 7 and not any(r["gated"] for r in timings)  # timings never fail
    assert any(r["verdict"] == "skip" and "GPU" in r["what"] for r in rows)  # no fp32 GPU-vs-CPU row on CPU
    assert data["sizes"]["device"] == "cpu" and data["torch_threads"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_module_entry_without_gpu_says_use_cpu():
    proc = subprocess.run([sys.executable, "-m", "hiddenlens.benchmarks.gpu_check"], capture_output=True, text=True,
                          timeout=300, env=_env(), cwd=ROOT)
    assert proc.returncode == 2 and "--cpu" in proc.stderr


# ---- known answers of the verdict logic ---------------------------------------------------------------------------
def test_a_perturbed_tensor_fails_its_tolerance():
    ref = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    peak = float(ref.abs().max())
    assert gpu.parity_row("x", "same", gpu.rel_max_diff(ref.clone(), ref), gpu.FP32_REL).verdict == "pass"
    bumped = ref.clone()
    bumped[1, 3, 7] += 1e-3 * peak  # 10x the fp32 tolerance, relative to the largest entry
    err = gpu.rel_max_diff(bumped, ref)
    assert err == pytest.approx(1e-3, rel=1e-4)
    row = gpu.parity_row("x", "bumped", err, gpu.FP32_REL)
    assert row.verdict == "FAIL" and row.gated and gpu.failed([row]) == [row]
    assert gpu.parity_row("x", "bf16-sized", err, gpu.BF16_LOGITS).verdict == "pass"
    # one bumped entry of 160: the Frobenius error is much smaller than the max-abs one
    assert gpu.rel_fro_diff(bumped, ref) < err
    assert gpu.parity_row("x", "nan", float("nan"), gpu.FP32_REL).verdict == "FAIL"


def test_top1_agreement_and_kl_known_answers():
    logits = torch.zeros(1, 4, 3)
    logits[0, :, 0] = 5.0
    flipped = logits.clone()
    flipped[0, 2, 1] = 10.0  # one of four positions now prefers token 1
    assert gpu.top1_agreement(flipped, logits) == 0.75
    assert gpu.mean_kl(logits, logits) == pytest.approx(0.0, abs=1e-7)
    assert gpu.mean_kl(flipped, logits) > 0
    row = gpu.parity_row("x", "top-1", 0.75, gpu.BF16_TOP1, higher_is_better=True)
    assert row.verdict == "FAIL" and "0.9" in row.budget


def test_timing_rows_never_fail_and_failures_set_the_exit_status(monkeypatch, capsys, tmp_path):
    slow = gpu.timing_row("capture", "slow", 3.0, gpu.CAPTURE_BUDGET)
    assert (slow.verdict, slow.gated) == ("over", False) and gpu.failed([slow]) == []
    bad = gpu.parity_row("backends", "bad", 1.0, gpu.FP32_REL)
    monkeypatch.setattr(gpu, "run_checks", lambda sizes: [slow, bad])
    assert gpu.main(["--cpu", "--out", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "1 of 1 parity checks failed" in out and "| backends" in out
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False


def test_a_check_that_raises_becomes_a_failed_row():
    def broken():
        raise RuntimeError("CUDA out of memory\nsecond line")

    (row,) = gpu.guarded("backends", broken)
    assert row.gated and row.verdict == "FAIL" and row.shown == "RuntimeError: CUDA out of memory"
