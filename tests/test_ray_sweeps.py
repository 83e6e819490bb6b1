"""Checkpoint sweeps on Ray (``--ray``): one Ray task per checkpoint gives the very tables of the serial run.

The tables are compared exactly (``assert_frame_equal`` with ``check_exact=True``): a worker loads the same files
and runs the same float32 code on the same inputs; at these tiny sizes torch does not split a reduction across
threads, so the worker's single torch thread (Ray sets ``OMP_NUM_THREADS=1`` for a 1-CPU task) cannot reorder a
sum. (On a large model, where the driver's several threads do split reductions, expect differences at float32
rounding, about 1e-7 relative.) Ray runs on a 2-CPU local cluster started here once for the module.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial

import pytest
from pandas.testing import assert_frame_equal

import hiddenlens as hl
from hiddenlens.analyses.checkpoints import RayWithoutCheckpointsError, over_checkpoints
from hiddenlens.analyses.dynamics import dynamics_summary
from hiddenlens.cli import main
from hiddenlens.models import bb_model, bb_training
from hiddenlens.studies import dynamics, intention, sinks

PROMPTS = ["The value of x", "Return a list of all the items in order"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def bb_folder(tmp_path_factory):
    """Three tiny Bigram-Backcopy checkpoints (steps 0, 1, 2)."""
    folder = tmp_path_factory.mktemp("bb") / "ck"
    bb_training.train(bb_model.BBConfig(steps=2, checkpoint_every=1, seq_length=16, d_model=32), out_dir=folder,
                      evaluate=bb_training.loss_evaluator(8))
    return folder


@pytest.fixture(scope="module")
def second_tiny(tmp_path_factory):
    """A second tiny checkpoint: the tiny Llama drawn with seed 1, saved as a transformers folder."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-seed1"
    handle = hl.load_model("tiny-llama", seed=1)
    handle.hf_model.save_pretrained(folder)
    handle.tokenizer.save_pretrained(folder)
    handle.unload()
    return str(folder)


def _assert_tables_equal(serial: dict, on_ray: dict) -> None:
    assert list(serial) == list(on_ray)
    for name in serial:
        assert_frame_equal(serial[name], on_ray[name], check_exact=True, obj=name)


def test_sinks_sweep_on_ray_equals_the_serial_run(ray_cluster, bb_folder):
    config = sinks.SinksConfig(checkpoints=str(bb_folder), eval_seqs=32)
    serial = sinks.run(config, progress=False)
    on_ray = sinks.run(config, progress=False, ray="local")
    assert serial.tables["checkpoints"].step.tolist() == [0, 1, 2]
    _assert_tables_equal(serial.tables, on_ray.tables)
    assert serial.summary == on_ray.summary


def test_dynamics_sweep_on_ray_equals_the_serial_run(ray_cluster, second_tiny):
    config = dynamics.DynamicsConfig(model="tiny-llama", checkpoints=[second_tiny], n_prompts=4, chars=80,
                                     batch_size=4, target="next")
    serial = dynamics.run(config, progress=False)
    on_ray = dynamics.run(config, progress=False, ray="local")
    table = serial.tables["dynamics"]
    assert list(table.checkpoint.unique()) == ["tiny-llama", "tiny-seed1"]
    first, second = (table[table.checkpoint == c].entropy.to_numpy() for c in ("tiny-llama", "tiny-seed1"))
    assert (first != second).any()  # two different models: a sweep that ran one model twice would fail here
    _assert_tables_equal(serial.tables, on_ray.tables)
    with pytest.raises(ValueError, match="without handle="):
        dynamics.run(config, handle=object(), ray="local")


def test_intention_sweep_on_ray_matches_the_serial_run(ray_cluster, second_tiny):
    """Within rtol 1e-7, not bitwise: H_int sums over the 49,152-token vocabulary, which torch splits across the
    driver's threads but not across a worker's one (measured: 2e-10 relative), while the two random checkpoints'
    H_int differ by 6e-6 relative (checked: > 1e-6), so a mixed-up row fails."""
    config = intention.IntentionConfig(model="tiny-llama", checkpoints=[second_tiny], n=4, regimes=["direct"],
                                       max_new_tokens={"direct": 2}, n_boot=20)
    serial_calls, ray_calls = [], []
    serial = intention.run(config, progress=False, on_regime=lambda r: serial_calls.append(len(r.tables["regimes"])))
    on_ray = intention.run(config, progress=False, ray="local",
                           on_regime=lambda r: ray_calls.append(len(r.tables["regimes"])))
    assert serial_calls == [1, 2] and ray_calls == [1, 2]  # after each regime / after each finished checkpoint
    h_int = serial.tables["regimes"].h_int_bits.to_numpy()
    assert abs(h_int[0] - h_int[1]) > 1e-6 * abs(h_int[0])
    assert list(serial.tables) == list(on_ray.tables)
    for name in serial.tables:
        assert_frame_equal(serial.tables[name], on_ray.tables[name], check_exact=False, rtol=1e-7, atol=0, obj=name)


def test_over_checkpoints_on_ray(ray_cluster, second_tiny):
    analysis = partial(dynamics_summary, prompts=PROMPTS, progress=False)
    specs = ["tiny-llama", second_tiny]
    assert_frame_equal(over_checkpoints(specs, analysis, progress=False),
                       over_checkpoints(specs, analysis, progress=False, ray="local"), check_exact=True)


def test_a_failing_checkpoint_raises_its_own_error(ray_cluster, tmp_path):
    config = dynamics.DynamicsConfig(model="tiny-llama", checkpoints=[str(tmp_path / "missing")], n_prompts=2,
                                     chars=40, belief=False, target="next")
    with pytest.raises(FileNotFoundError, match="missing does not exist") as serial:
        dynamics.run(config, progress=False)
    with pytest.raises(FileNotFoundError) as on_ray:  # the worker's error itself, not Ray's wrapper around it
        dynamics.run(config, progress=False, ray="local")
    assert str(on_ray.value) == str(serial.value)


def test_cli_sinks_with_ray_writes_the_serial_table(ray_cluster, bb_folder, tmp_path):
    with pytest.raises(SystemExit) as done:
        main(["analyze", "sinks", "--checkpoints", str(bb_folder), "--ray", "local", "--out", str(tmp_path / "run")])
    assert done.value.code == 0
    got = sinks.Result.read(tmp_path / "run").tables["checkpoints"]
    want = sinks.run(sinks.SinksConfig(checkpoints=str(bb_folder)), progress=False).tables["checkpoints"]
    assert_frame_equal(want, got, check_exact=True)


@pytest.mark.parametrize("command", [["analyze", "sinks"], ["analyze", "dynamics", "--model", "tiny-llama"],
                                     ["analyze", "intention", "--model", "tiny-llama"]])
def test_ray_without_checkpoints_is_a_one_line_error(command, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(command + ["--ray", "local", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --ray local") and "--checkpoints" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_ray_without_checkpoints_is_refused_by_the_studies():
    with pytest.raises(RayWithoutCheckpointsError):
        dynamics.run(dynamics.DynamicsConfig(model="tiny-llama"), ray="auto")
    with pytest.raises(RayWithoutCheckpointsError):
        sinks.run(sinks.SinksConfig(model="tiny-llama"), ray="auto")


def test_a_serial_sweep_does_not_import_ray(bb_folder, tmp_path):
    code = ("import sys\nfrom hiddenlens.cli import main\n"
            "try:\n"
            f"    main(['analyze', 'sinks', '--checkpoints', {str(bb_folder)!r}, '--out', {str(tmp_path / 'run')!r}])\n"
            "except SystemExit as done:\n"
            "    assert done.code == 0, done.code\n"
            "print('ray' in sys.modules)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["n_checkpoints"] == 3
