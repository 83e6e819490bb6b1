"""Capture on Ray (``probes/ray_capture.py``, ``hiddenlens capture --ray``): the store equals a single-process one
(``torch.equal``, every site and every row's prompt, position and token), also after a worker is killed with SIGKILL
mid-run and after the driver died and the run was resumed; a plain capture never imports Ray; the reader refuses
shard paths that leave the store folder.

The Ray tests share one local cluster of 2 CPUs (module fixture); each run starts its own 2 workers (tiny-llama)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import hiddenlens as hl
from hiddenlens.cli import main
from hiddenlens.common.errors import FolderExistsError
from hiddenlens.probes import store as store_mod
from hiddenlens.probes.ray_capture import RayCaptureError, write_activations_ray
from hiddenlens.probes.store import ActivationStore, DamagedStoreError, StoreError, write_activations

SITES = ["blocks.1.resid_post", "blocks.0.attn.z"]
PROMPTS = [f"Prompt {i}: the {w} sat on the mat." for i, w in enumerate(["cat", "dog", "bird", "fish", "cow"] * 4)]
#: 5 parts of 4 prompts, 2 batches of 2 per part, one shard per batch (about 35 rows each)
SETTINGS = {"batch_size": 2, "shard_rows": 15, "progress": False}


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory) -> ActivationStore:
    """The single-process store every Ray store must equal."""
    return write_activations(tiny_llama, PROMPTS, SITES, tmp_path_factory.mktemp("ref") / "store", **SETTINGS)


def _assert_same(store: ActivationStore, ref: ActivationStore) -> None:
    """Bit-identical rows: every site and every row's prompt index, position and token id."""
    assert store.complete and len(store) == len(ref) and store.sites == ref.sites
    for site in ref.sites:
        assert torch.equal(store.read(site), ref.read(site)), site
    for key, value in ref.meta().items():
        assert torch.equal(store.meta()[key], value), key


def test_plain_capture_never_imports_ray(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import hiddenlens as hl
        from typer.testing import CliRunner
        from hiddenlens.cli import app
        from hiddenlens.probes.store import write_activations
        write_activations(hl.load_model("tiny-llama"), ["a b c", "d e"], "blocks.0.resid_post", {str(tmp_path / 'a')!r},
                          progress=False)
        (p := __import__("pathlib").Path({str(tmp_path / 'p.txt')!r})).write_text("one\\ntwo\\n")
        r = CliRunner().invoke(app, ["capture", "--prompts", str(p), "--sites", "blocks.0.resid_post", "--model",
                                     "tiny-llama", "--out", {str(tmp_path / 'b')!r}])
        assert r.exit_code == 0, r.output
        print("ray" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_ray_options_need_ray(tiny_llama, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"\['workers'\] only apply to a capture on Ray"):
        write_activations(tiny_llama, PROMPTS, SITES, tmp_path / "s", workers=2, progress=False)
    with pytest.raises(ValueError, match="multiple of batch_size=2"):
        write_activations_ray(tiny_llama, PROMPTS, SITES, tmp_path / "s", part_prompts=3, batch_size=2)
    with pytest.raises(ValueError, match="workers=0"):
        write_activations_ray(tiny_llama, PROMPTS, SITES, tmp_path / "s", workers=0)
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    with pytest.raises(SystemExit) as exit_:
        main(["capture", "--prompts", str(tmp_path / "p.txt"), "--sites", SITES[0], "--model", "tiny-llama",
              "--out", str(tmp_path / "c"), "--workers", "2"])
    assert exit_.value.code == 2 and "error: --workers only apply with --ray" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "c").exists()


def _rewrite_entry(folder, index: int, **fields) -> None:
    """Edit shard entry ``index`` and re-seal every checksum (what a forger could do)."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    entry = {k: v for k, v in manifest["shards"][index].items() if k != "entry_sha256"}
    entry.update(fields)
    manifest["shards"][index] = dict(entry, entry_sha256=store_mod._entry_digest(index, entry))
    store_mod._write_manifest(path, {k: v for k, v in manifest.items() if k != "manifest_sha256"})


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "parts/../../x.safetensors", "a\\b", "",
                                  "link/shard-00000.safetensors"])
def test_reader_refuses_paths_out_of_the_store(tiny_llama, tmp_path, name):
    folder = tmp_path / "s"
    write_activations(tiny_llama, PROMPTS[:4], SITES[0], folder, progress=False)
    (tmp_path / "elsewhere").mkdir()
    (folder / "link").symlink_to(tmp_path / "elsewhere")
    _rewrite_entry(folder, 0, file=name)
    with pytest.raises(DamagedStoreError, match="not a path inside the store|leads out of the store"):
        ActivationStore(folder).read(SITES[0])


def test_worker_killed_mid_run_loses_nothing(ray_cluster, tiny_llama, reference, tmp_path):
    """SIGKILL one worker once the first part is in: Ray restarts it and retries its part, which keeps the part's
    verified shards; the committed store equals the single-process one (no missing, no duplicated row)."""
    seen, killed = [], []

    def kill_once(summary: dict) -> None:
        seen.append(summary)
        if not killed:
            killed.append(summary["pid"])
            os.kill(summary["pid"], signal.SIGKILL)

    store = write_activations_ray(tiny_llama, PROMPTS, SITES, tmp_path / "s", ray="local", workers=2, part_prompts=4,
                                  on_part=kill_once, **SETTINGS)
    assert sorted(s["part"] for s in seen) == [0, 1, 2, 3, 4]
    assert any(s["restarted"] for s in seen), "the killed worker never came back for its part"
    _assert_same(store, reference)
    assert all(e["file"].startswith("parts/part-") for e in store.shards)
    _assert_same(ActivationStore(tmp_path / "s"), reference)


class _DriverDied(Exception):
    """Stands in for the driver being killed after the first part."""


def test_resume_after_the_driver_died(ray_cluster, tiny_llama, reference, tmp_path):
    """The driver dies after one part (other parts half-written, no top manifest); a shard of the finished part is
    then deleted. ``hiddenlens capture --ray local --resume`` completes the store, equal to the single-process one."""
    out = tmp_path / "s"

    def die(summary: dict) -> None:
        raise _DriverDied

    with pytest.raises(_DriverDied):
        write_activations_ray(tiny_llama, PROMPTS, SITES, out, workers=2, part_prompts=4, on_part=die, **SETTINGS)
    assert not (out / "manifest.json").exists()
    with pytest.raises(StoreError, match="interrupted capture on Ray"):
        ActivationStore(out)
    with pytest.raises(FolderExistsError, match="interrupted capture on Ray"):
        write_activations_ray(tiny_llama, PROMPTS, SITES, out, part_prompts=4, **SETTINGS)
    with pytest.raises(StoreError, match="interrupted capture on Ray"):
        write_activations(tiny_llama, PROMPTS, SITES, out, resume=True, **SETTINGS)
    done = [p for p in sorted((out / "parts").glob("part-*/manifest.json"))
            if json.loads(p.read_text()).get("complete")]
    assert done and len(done) < 5
    (done[0].parent / "shard-00001.safetensors").unlink()

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    with pytest.raises(SystemExit) as done:
        main(["capture", "--prompts", str(tmp_path / "p.txt"), "--sites", ",".join(SITES), "--model", "tiny-llama",
              "--out", str(out), "--batch-size", "2", "--shard-rows", "15", "--resume", "--ray", "local",
              "--workers", "2"])
    assert done.value.code == 0
    _assert_same(ActivationStore(out), reference)


def test_a_handle_edited_in_memory_is_refused(ray_cluster, tmp_path):
    """Workers rebuild the model from its spec; a handle whose weights differ from that is refused before any part
    (and the folder holds no plan, so the same folder can be used again)."""
    handle = hl.load_model("tiny-llama")
    with torch.no_grad():
        next(handle.hf_model.parameters()).add_(1.0)
    with pytest.raises(RayCaptureError, match="other weights than the model handle"):
        write_activations_ray(handle, PROMPTS, SITES, tmp_path / "s", part_prompts=4, **SETTINGS)
    assert not (tmp_path / "s" / "parts" / "plan.json").exists()
