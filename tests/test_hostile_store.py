"""Hostile cases for the activation store and its prompt files: concurrent writers, kill -9, edited manifests,
damaged or deleted shards, stale temp files, bad arguments, and prompt files that are not clean UTF-8 JSONL/text.

A store is written under its folder's lock; each manifest carries checksums of itself and of each shard entry; a
resume checks every recorded shard and re-captures from the first bad one (``probes/store.py``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hiddenlens.common.errors import DamagedFileError, UserError
from hiddenlens.probes import store as store_mod
from hiddenlens.probes.store import ActivationStore, PromptFileError, StoreError, read_prompts, write_activations

SITE = "blocks.1.resid_post"
PROMPTS = [f"Prompt {i}: the {w} sat on the mat." for i, w in enumerate(["cat", "dog", "bird", "fish", "cow"] * 4)]
#: prompts of the subprocess tests (several shards of 16 rows; long enough to stop or kill a run midway)
CLI_PROMPTS = [f"Line {i} of a long prompt set about item {i % 17}." for i in range(64)]
CLI_ARGS = ["--sites", SITE, "--model", "tiny-llama", "--batch-size", "4", "--shard-rows", "16"]


def _write(h, out: Path, **kw) -> ActivationStore:
    return write_activations(h, PROMPTS, SITE, out, batch_size=3, shard_rows=20, progress=False, **kw)


def _assert_same(store: ActivationStore, ref: ActivationStore) -> None:
    """Same rows (prompt, position, token of each) and the same activations."""
    assert store.complete and len(store) == len(ref)
    for key, value in ref.meta().items():
        assert torch.equal(store.meta()[key], value), key
    assert torch.allclose(store.read(SITE), ref.read(SITE), atol=1e-6)


def _stale_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory) -> ActivationStore:
    """A clean, uninterrupted store of PROMPTS (what every repaired store must equal)."""
    return _write(tiny_llama, tmp_path_factory.mktemp("ref") / "store")


@pytest.fixture(scope="module")
def cli_reference(tiny_llama, tmp_path_factory) -> ActivationStore:
    """A clean store of CLI_PROMPTS with the settings of CLI_ARGS."""
    return write_activations(tiny_llama, CLI_PROMPTS, SITE, tmp_path_factory.mktemp("cliref") / "store",
                             batch_size=4, shard_rows=16, progress=False)


class _Killed(Exception):
    """Stands in for a crash in the middle of a capture."""


def _interrupted(h, out: Path, monkeypatch, batches: int = 3) -> None:
    """Write a store of PROMPTS whose run dies after ``batches`` forward passes (a few shards recorded)."""
    real, calls = h.run, []

    def run(*args, **kwargs):
        calls.append(1)
        if len(calls) > batches:
            raise _Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(h, "run", run)
    with pytest.raises(_Killed):
        _write(h, out)
    monkeypatch.undo()


def _cli(out: Path, prompts: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "hiddenlens", "capture", "--prompts", str(prompts), "--out", str(out), *CLI_ARGS,
           *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))


def _wait_for_shards(proc: subprocess.Popen, manifest: Path, n: int = 1) -> dict:
    """Poll until the running capture has recorded ``n`` shards; the manifest then."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists():
            man = json.loads(manifest.read_text())
            if len(man["shards"]) >= n:
                return man
        time.sleep(0.005)
    raise AssertionError(f"the capture ended (rc {proc.poll()}) before recording {n} shards: "
                         f"{proc.stderr.read() if proc.poll() is not None else ''}")


# ---- concurrent writers, kill -9 -------------------------------------------------------------------------------------
@pytest.mark.hostile("store", "two captures into one --out at the same time", expect="error", risk="lost")
def test_second_concurrent_capture_fails_at_once(cli_reference, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(CLI_PROMPTS) + "\n")
    out = tmp_path / "acts"
    first = _cli(out, prompts)
    try:
        _wait_for_shards(first, out / "manifest.json")
        first.send_signal(signal.SIGSTOP)  # the first run holds the lock mid-capture while the second starts
        second = _cli(out, prompts)
        _, err = second.communicate(timeout=300)
        first.send_signal(signal.SIGCONT)
        first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0
    assert second.returncode == 2 and err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "being written by another run" in err and str(out) in err
    _assert_same(ActivationStore(out), cli_reference)


@pytest.mark.hostile("store", "capture killed with SIGKILL mid-run, then --resume", expect="works", risk="lost")
def test_kill_9_then_resume_equals_uninterrupted_run(cli_reference, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(CLI_PROMPTS) + "\n")
    out = tmp_path / "acts"
    proc = _cli(out, prompts)
    try:
        _wait_for_shards(proc, out / "manifest.json")
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    killed = json.loads((out / "manifest.json").read_text())
    assert not killed.get("complete"), "the run finished before it could be killed; raise len(CLI_PROMPTS)"
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(out)
    resumed = _cli(out, prompts, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    _assert_same(ActivationStore(out), cli_reference)
    assert _stale_files(out) == []


# ---- prompts and arguments of write_activations --------------------------------------------------------------------
@pytest.mark.parametrize("prompts, match", [
    pytest.param("prompts.csv", "list of strings or a path to a .txt/.jsonl file",
                 marks=pytest.mark.hostile("store", "prompts given as a path string that is not .txt/.jsonl "
                                                    "(was read as one prompt per character)",
                                           expect="error", risk="wrong")),
    pytest.param(["fine", None], r"prompts\[1\] is a NoneType",
                 marks=pytest.mark.hostile("store", "a prompt list holding a non-string", expect="error",
                                           risk="raw")),
    pytest.param(["fine", "  "], r"prompts\[1\] is empty",
                 marks=pytest.mark.hostile("store", "a prompt list holding an empty string", expect="error",
                                           risk="raw")),
])
def test_bad_prompt_argument_is_refused(tiny_llama, tmp_path, prompts, match):
    with pytest.raises(PromptFileError, match=match):
        write_activations(tiny_llama, prompts, SITE, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("kwargs, match", [
    pytest.param({"batch_size": -1}, r"batch_size=-1: must be an integer >= 1",
                 marks=pytest.mark.hostile("store", "batch size -1 (wrote 0 rows, store marked complete)",
                                           expect="error", risk="wrong")),
    pytest.param({"batch_size": 0}, r"batch_size=0: must be an integer >= 1",
                 marks=pytest.mark.hostile("store", "batch size 0", expect="error", risk="raw")),
    pytest.param({"shard_rows": 0}, r"shard_rows=0: must be an integer >= 1 \(rows per shard, --shard-rows\)",
                 marks=pytest.mark.hostile("store", "shard rows 0", expect="error", risk="wrong")),
    pytest.param({"dtype": torch.int8}, r"dtype=torch.int8: .*use float32, bfloat16 or float16",
                 marks=pytest.mark.hostile("store", "an integer store dtype (truncated activations to integers)",
                                           expect="error", risk="wrong")),
])
def test_bad_capture_argument_is_refused(tiny_llama, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_activations(tiny_llama, PROMPTS, SITE, tmp_path / "s", progress=False, **kwargs)
    assert not (tmp_path / "s").exists()


# ---- edited manifests, incomplete stores ---------------------------------------------------------------------------
def _rows_minus_10(man: dict) -> None:
    man["shards"][0]["rows"] -= 10


def _drop_last_shard(man: dict) -> None:
    man["shards"].pop()


def _swap_shards(man: dict) -> None:
    man["shards"][0], man["shards"][1] = man["shards"][1], man["shards"][0]


@pytest.mark.parametrize("edit, match", [
    pytest.param(_rows_minus_10, "manifest.json was edited or damaged .*re-capture the store",
                 marks=pytest.mark.hostile("store", "manifest edited: a shard's row count lowered by 10",
                                           expect="error", risk="wrong")),
    pytest.param(_drop_last_shard, "manifest.json was edited or damaged .*re-capture the store",
                 marks=pytest.mark.hostile("store", "manifest edited: the last shard entry removed", expect="error",
                                           risk="wrong")),
    pytest.param(_swap_shards, "manifest.json was edited or damaged .*re-capture the store",
                 marks=pytest.mark.hostile("store", "manifest edited: two shard entries swapped", expect="error",
                                           risk="wrong")),
])
def test_edited_manifest_is_refused(reference, tmp_path, edit, match):
    out = tmp_path / "s"
    out.mkdir()
    for p in reference.path.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    man = json.loads((out / "manifest.json").read_text())
    edit(man)
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DamagedFileError, match=match):
        ActivationStore(out)


@pytest.mark.hostile("store", "manifest re-signed after a shard entry was dropped (a gap in the prompt ranges)",
                     expect="error", risk="wrong")
def test_gap_in_prompt_ranges_is_refused(reference, tmp_path):
    man = json.loads((reference.path / "manifest.json").read_text())
    del man["shards"][1]
    man["shards"] = [dict(e, entry_sha256=store_mod._entry_digest(i, e)) for i, e in enumerate(man["shards"])]
    store_mod._write_manifest(tmp_path / "manifest.json", man)
    with pytest.raises(StoreError, match=r"shard entry 1 covers prompts \d+\.\.\d+ .*expected to start at prompt"):
        ActivationStore(tmp_path)


@pytest.mark.hostile("store", "a store written in the old format without checksums", expect="error", risk="wrong")
def test_old_format_store_is_refused(reference, tmp_path):
    man = json.loads((reference.path / "manifest.json").read_text())
    man["format"] = "hiddenlens-store/1"
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError, match="older hiddenlens .*re-capture it"):
        ActivationStore(tmp_path)


@pytest.mark.hostile("store", "an interrupted (incomplete) store opened for reading", expect="error", risk="wrong")
def test_incomplete_store_does_not_read_as_complete(tiny_llama, reference, tmp_path, monkeypatch):
    out = tmp_path / "s"
    _interrupted(tiny_llama, out, monkeypatch)
    with pytest.raises(StoreError, match=r"incomplete store \(\d+ of 20 prompts captured.*resume it"):
        ActivationStore(out)
    part = ActivationStore(out, allow_incomplete=True)
    assert not part.complete and 0 < len(part) < len(reference)
    assert torch.allclose(part.read(SITE), reference.read(SITE, slice(0, len(part))), atol=1e-6)


# ---- resume repairs --------------------------------------------------------------------------------------------------
def _delete(path: Path) -> None:
    path.unlink()


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, problem", [
    pytest.param(_delete, "is missing",
                 marks=pytest.mark.hostile("store", "--resume over a deleted shard (reported success)",
                                           expect="works", risk="wrong")),
    pytest.param(_corrupt, "is damaged",
                 marks=pytest.mark.hostile("store", "--resume over a corrupted shard (reported success)",
                                           expect="works", risk="wrong")),
])
def test_resume_recaptures_bad_shards(tiny_llama, reference, tmp_path, damage, problem):
    out = tmp_path / "s"
    store = _write(tiny_llama, out)
    damage(out / store.shards[2]["file"])
    with pytest.warns(UserWarning, match=f"shard-00002.safetensors {problem}.*; re-capturing shard 2 and every later"):
        repaired = _write(tiny_llama, out, resume=True)
    _assert_same(repaired, reference)
    assert sorted(p.name for p in out.glob("shard-*")) == [s["file"] for s in repaired.shards]


@pytest.mark.parametrize("resume", [
    pytest.param(True, marks=pytest.mark.hostile("store", "stale temp files of a crashed run, then --resume",
                                                 expect="works", risk="wrong")),
    pytest.param(False, marks=pytest.mark.hostile("store", "stale temp files of a run that crashed before its "
                                                           "manifest, then a fresh capture", expect="works",
                                                  risk="wrong")),
])
def test_stale_temp_files_are_removed(tiny_llama, reference, tmp_path, monkeypatch, resume):
    out = tmp_path / "s"
    if resume:
        _interrupted(tiny_llama, out, monkeypatch)
    else:
        out.mkdir()
    for name in (".shard-00003.safetensors.k2j4hx.tmp", ".manifest.json.a81bq_.tmp", "shard-00009.safetensors"):
        (out / name).write_bytes(b"left by a killed run")
    repaired = _write(tiny_llama, out, resume=resume)
    _assert_same(repaired, reference)
    assert _stale_files(out) == [] and not (out / "shard-00009.safetensors").exists()


# ---- prompt files --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, content, match", [
    pytest.param("p.txt", "first\ncaf\u00e9\n".encode("latin-1"), r"p\.txt:2: not valid UTF-8 .*save the file as UTF-8",
                 marks=pytest.mark.hostile("inputs", "a latin-1 prompt file", expect="error", risk="raw")),
    pytest.param("p.jsonl", b'{"text": "ok"}\n{"text": null}\n', r"p\.jsonl:2: 'text' is null",
                 marks=pytest.mark.hostile("inputs", "a JSONL prompt whose text is null", expect="error",
                                           risk="raw")),
    pytest.param("p.jsonl", b'{"text": 5}\n', r"p\.jsonl:1: 'text' is 5 \(int\); it must be a non-empty string",
                 marks=pytest.mark.hostile("inputs", "a JSONL prompt whose text is a number", expect="error",
                                           risk="raw")),
    pytest.param("p.jsonl", b'\n{"text": [5, 6, 7]}\n', r"p\.jsonl:2: 'text' is \[5, 6, 7\] \(list\)",
                 marks=pytest.mark.hostile("inputs", "a JSONL prompt whose text is a list (captured as token ids)",
                                           expect="error", risk="wrong")),
    pytest.param("p.jsonl", b'{"text": "ok"}\n{"id": "b", "text": ""}\n', r"p\.jsonl:2: 'text' is empty",
                 marks=pytest.mark.hostile("inputs", "a JSONL prompt with empty text", expect="error", risk="raw")),
    pytest.param("p.jsonl", b'"some text"\n', r"p\.jsonl:1: a JSON str, not an object",
                 marks=pytest.mark.hostile("inputs", "a JSONL line that is not an object", expect="error",
                                           risk="raw")),
    pytest.param("p.jsonl", b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n',
                 r"p\.jsonl:2: id 'a' repeats line 1; ids must be unique",
                 marks=pytest.mark.hostile("inputs", "a JSONL prompt file with a repeated id", expect="error",
                                           risk="wrong")),
])
def test_bad_prompt_file_names_file_and_line(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(PromptFileError, match=match):
        read_prompts(tmp_path / name)


@pytest.mark.hostile("inputs", "a prompt file starting with a UTF-8 BOM (the BOM became 3 tokens)", expect="works",
                     risk="wrong")
def test_bom_is_dropped(tiny_llama, tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfHello there\nsecond\n")
    prompts = read_prompts(tmp_path / "bom.txt")
    assert [p.text for p in prompts] == ["Hello there", "second"]
    with_bom = tiny_llama.tokenizer(prompts[0].text)["input_ids"]
    assert with_bom == tiny_llama.tokenizer("Hello there")["input_ids"]


_LINE_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n"), min_size=1)
_ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1).filter(lambda s: s.strip())
_FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.hostile("inputs", "random .txt prompt lists round-trip through read_prompts", expect="works",
                     risk="wrong")
@_FAST
@given(st.lists(_LINE_TEXT.filter(lambda s: s.strip()), min_size=1, max_size=8)
       .filter(lambda ps: not ps[0].startswith("\ufeff")))  # a leading U+FEFF is read as a BOM, by design
def test_txt_round_trip(prompts):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.txt"
        path.write_bytes("\n".join(prompts).encode("utf-8"))
        assert [(p.id, p.text) for p in read_prompts(path)] == [(str(i), t) for i, t in enumerate(prompts)]


@pytest.mark.hostile("inputs", "random .jsonl prompts (any text, newlines, ids) round-trip through read_prompts",
                     expect="works", risk="wrong")
@_FAST
@given(st.lists(st.tuples(st.text(max_size=8), _ANY_TEXT), min_size=1, max_size=8, unique_by=lambda t: t[0]),
       st.booleans())
def test_jsonl_round_trip(items, ascii_only):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.jsonl"
        lines = [json.dumps({"id": i, "text": t}, ensure_ascii=ascii_only) for i, t in items]
        path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
        assert [(p.id, p.text) for p in read_prompts(path)] == items


@pytest.mark.hostile("inputs", "random bytes as a prompt file parse or raise a clear error", expect="works",
                     risk="wrong")
@_FAST
@given(st.binary(max_size=300), st.sampled_from([".txt", ".jsonl"]))
def test_garbage_prompt_file_raises_only_user_errors(data, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"p{suffix}"
        path.write_bytes(data)
        try:
            prompts = read_prompts(path)
        except (ValueError, UserError) as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
        else:
            assert prompts and all(isinstance(p.text, str) and p.text.strip() for p in prompts)

