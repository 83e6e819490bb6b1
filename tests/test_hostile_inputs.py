"""Hostile inputs: site names and layer ranges, positions, prompts past the context, token ids, batch sizes,
checkpoint folders whose config lies or that ship code, tuned lenses of other models, BB configs, and the command
line's one-line errors."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hiddenlens as hl
from hiddenlens.analyses.dynamics import dynamics_summary
from hiddenlens.analyses.sinks import sink_analysis
from hiddenlens.analyses.tuned_lens import LensMismatchError, TunedLens, collect_states
from hiddenlens.common.errors import DamagedFileError
from hiddenlens.models.bb_model import BBConfig
from hiddenlens.models.loading import RemoteCodeError, is_path_spec
from hiddenlens.probes.handle import ContextLengthError, TokenIdError
from hiddenlens.probes.positions import PositionError
from hiddenlens.probes.sites import _TL_ALIASES, BLOCK_SITES, UnknownSiteError, parse_layers, resolve_sites

PROMPT = [[5, 6, 7, 8, 9]]  # five tokens
#: block kinds, canonical and as TransformerLens aliases
KINDS = BLOCK_SITES + tuple(k for k, v in _TL_ALIASES.items() if v in BLOCK_SITES)


def cli(*args: str, stdin: str = "", env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m hiddenlens ARGS`` in a subprocess (offline), its output captured."""
    full = {k: v for k, v in os.environ.items() if k != "HIDDENLENS_DEBUG"} | {"HF_HUB_OFFLINE": "1"} | (env or {})
    return subprocess.run([sys.executable, "-m", "hiddenlens", *args], input=stdin, capture_output=True, text=True,
                          env=full, cwd=cwd, timeout=240)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert "Traceback" not in res.stderr + res.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def saved_llama(tiny_llama, tmp_path_factory) -> Path:
    """tiny-llama saved as a transformers checkpoint folder (weights, config.json, tokenizer)."""
    folder = tmp_path_factory.mktemp("saved") / "tiny-llama"
    tiny_llama.hf_model.save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)
    return folder


def copy_with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(cfg | changes))
    return dst


# ---- sites and layer ranges ---------------------------------------------------------------------------------------
@pytest.mark.hostile("inputs", "reversed layer range in a site name (blocks.3-1.resid_post)", expect="error",
                     risk="wrong")
def test_reversed_site_range_is_an_error(tiny_llama):
    with pytest.raises(UnknownSiteError, match=r"'3-1'.*reversed.*'1-3'"):
        resolve_sites("blocks.3-1.resid_post", 8)
    with pytest.raises(UnknownSiteError, match="reversed"):
        hl.capture(tiny_llama, "blocks.3-1.resid_post")


@pytest.mark.hostile("inputs", "site pattern that expands to no block (a model without blocks)", expect="error",
                     risk="wrong")
def test_empty_expansion_is_an_error():
    with pytest.raises(UnknownSiteError, match="no blocks"):
        resolve_sites("blocks.*.resid_post", 0)
    with pytest.raises(ValueError, match="--layers: this model has no blocks"):
        parse_layers("*", 0, what="--layers")


def _end(draw, index: int, n: int) -> str:
    """One end of a layer spec: the block index written forward (``3``) or from the end (``-5``)."""
    return str(index if draw(st.booleans()) else index - n)


@st.composite
def layer_specs(draw):
    """``(n_layers, spec text, expected block set)``: a list of indices and ranges, ends written either way."""
    n = draw(st.integers(1, 40))
    if draw(st.integers(0, 9)) == 0:
        return n, draw(st.sampled_from(["*", " * "])), set(range(n))
    expected, parts = set(), []
    for _ in range(draw(st.integers(1, 4))):
        a = draw(st.integers(0, n - 1))
        if draw(st.booleans()):
            parts.append(_end(draw, a, n))
            expected.add(a)
        else:
            b = draw(st.integers(a, n - 1))
            parts.append(f"{_end(draw, a, n)}-{_end(draw, b, n)}")
            expected.update(range(a, b + 1))
    sep = draw(st.sampled_from([",", ", ", " ,"]))
    return n, sep.join(parts), expected


@pytest.mark.hostile("inputs", "generated layer lists and site patterns resolve to exactly the intended blocks",
                     expect="works", risk="wrong")
@settings(max_examples=300, deadline=None)
@given(layer_specs(), st.sampled_from(KINDS))
def test_generated_specs_resolve_exactly(case, kind):
    n, spec, expected = case
    assert parse_layers(spec, n) == sorted(expected)
    canonical = _TL_ALIASES.get(kind, kind)
    sites = resolve_sites(f"blocks.{spec}.{kind}", n)
    assert [(s.layer, s.kind) for s in sites] == [(i, canonical) for i in sorted(expected)]


NEAR_VALID = st.text(alphabet="0123456789-,* .x", max_size=12)


@pytest.mark.hostile("inputs", "arbitrary text as a site name or layer list: a non-empty set or a clear error",
                     expect="works", risk="raw")
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(NEAR_VALID, st.text(max_size=20)), st.integers(0, 12),
       st.sampled_from(["{}", "blocks.{}.resid_post", "blocks.{}.attn.hook_pattern", "{}.mlp.out"]))
def test_arbitrary_text_never_crashes_or_resolves_to_nothing(text, n, template):
    try:
        layers = parse_layers(text, n)
    except ValueError:
        pass
    else:
        assert layers and all(0 <= i < n for i in layers)
    try:
        sites = resolve_sites(template.format(text), n)
    except (ValueError, KeyError):
        return
    assert sites, "a pattern resolved to no site"


# ---- positions ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("positions, match", [
    pytest.param(100, r"position 100 .*5 token", marks=pytest.mark.hostile(
        "inputs", "positions=100 on a 5-token prompt", expect="error", risk="wrong")),
    pytest.param(-6, r"position -6 .*5 token", marks=pytest.mark.hostile(
        "inputs", "positions=-6 (before the start) on a 5-token prompt", expect="error", risk="wrong")),
    pytest.param([2, 100], r"position 100 .*5 token", marks=pytest.mark.hostile(
        "inputs", "positions=[2, 100] on a 5-token prompt (one index missing: a partial result)", expect="error",
        risk="wrong")),
])
def test_positions_outside_the_sequence_are_errors(tiny_llama, positions, match):
    with pytest.raises(PositionError, match=match):
        with hl.capture(tiny_llama, "blocks.0.resid_post", positions=positions, require_all=False):
            tiny_llama.run(PROMPT)
    with pytest.raises(PositionError, match=match):
        tiny_llama.run_with_cache(PROMPT, "blocks.1.attn.z", positions=positions)


@pytest.mark.hostile("inputs", "an edit at positions=[2, 100] on a 5-token prompt (only 2 edited, silently)",
                     expect="error", risk="wrong")
def test_edit_positions_outside_the_sequence_are_errors(tiny_llama):
    with pytest.raises(PositionError, match=r"position 100 .*5 token"):
        with hl.edit(tiny_llama, {"blocks.0.resid_post": hl.Zero()}, positions=[2, 100]):
            tiny_llama.run(PROMPT)
    with hl.edit(tiny_llama, {"blocks.0.resid_post": hl.Zero()}, positions=[2, 7]) as log:
        tiny_llama.generate(PROMPT, max_new_tokens=4)  # decode steps reach position 7
    assert log.changed("blocks.0.resid_post")[0].nonzero().flatten().tolist() == [2, 7]


def test_positions_reached_by_decode_steps_are_fine(tiny_llama):
    with hl.capture(tiny_llama, "blocks.0.resid_post", positions=[2, 7]) as cache:
        tiny_llama.generate(PROMPT, max_new_tokens=4)  # forwards cover positions 0..7 (the prompt, 3 decode steps)
    assert cache.positions("blocks.0.resid_post").tolist() == [2, 7]


@pytest.mark.parametrize("positions", [
    pytest.param([], marks=pytest.mark.hostile("inputs", "an empty list of positions", expect="error", risk="wrong")),
    pytest.param(torch.tensor([], dtype=torch.long), marks=pytest.mark.hostile(
        "inputs", "an empty tensor of positions", expect="error", risk="wrong")),
    pytest.param(iter([1, 2]), marks=pytest.mark.hostile(
        "inputs", "positions as a one-shot iterator (consumed by the check, then empty)", expect="error",
        risk="wrong")),
    pytest.param(torch.tensor([1.7]), marks=pytest.mark.hostile(
        "inputs", "positions as a float tensor (truncated to ints)", expect="error", risk="wrong")),
])
def test_malformed_positions_fail_at_block_entry(tiny_llama, positions):
    with pytest.raises(ValueError, match="positions"):
        hl.capture(tiny_llama, "blocks.0.resid_post", positions=positions)


# ---- prompts past the context -------------------------------------------------------------------------------------
@pytest.mark.hostile("inputs", "prompt longer than the context of a RoPE model (tiny-llama)", expect="error",
                     risk="wrong")
def test_prompt_past_rope_context_is_an_error(tiny_llama):
    limit = tiny_llama.hf_model.config.max_position_embeddings
    assert tiny_llama.max_positions == limit
    fits = [[3] * limit]
    assert tiny_llama.run(fits, logits=False).input_ids.shape[1] == limit
    too_long = [[3] * (limit + 1)]
    for call in (lambda: tiny_llama.run(too_long), lambda: tiny_llama.run_with_cache(too_long, "embed")):
        with pytest.raises(ContextLengthError, match=rf"{limit + 1} tokens.*context of {limit} positions.*shorten"):
            call()
    with pytest.raises(ContextLengthError, match=rf"{limit - 2} tokens \+ max_new_tokens=5.*{limit}.*max_new_tokens"):
        tiny_llama.generate([[3] * (limit - 2)], max_new_tokens=5)


@pytest.mark.hostile("inputs", "prompt longer than the learned position table (tiny-gpt2)", expect="error",
                     risk="raw")
def test_prompt_past_learned_positions_is_an_error(tiny_gpt2):
    limit = tiny_gpt2.hf_model.config.n_positions
    with pytest.raises(ContextLengthError, match=rf"{limit + 1} tokens.*context of {limit} positions"):
        tiny_gpt2.run([[3] * (limit + 1)])


# ---- token ids and batch sizes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, match", [
    pytest.param(lambda h: h.run([[1, 99999]]), "token id 99999 .*512", marks=pytest.mark.hostile(
        "inputs", "token id 99999 (vocabulary 512) as a list", expect="error", risk="raw")),
    pytest.param(lambda h: h.run(torch.tensor([[1, -1]])), "token id -1 .*512", marks=pytest.mark.hostile(
        "inputs", "negative token id in a tensor", expect="error", risk="raw")),
    pytest.param(lambda h: h.generate([[1, 512]], max_new_tokens=2), "token id 512 .*0..511",
                 marks=pytest.mark.hostile("inputs", "token id = vocab size given to generate", expect="error",
                                           risk="raw")),
    pytest.param(lambda h: h.run([[1.7, 2.0]]), "list of ints", marks=pytest.mark.hostile(
        "inputs", "float token ids (truncated to ints)", expect="error", risk="wrong")),
    pytest.param(lambda h: h.run(torch.tensor([[1.7, 2.0]])), "integer tensor", marks=pytest.mark.hostile(
        "inputs", "float tensor of token ids (truncated to ints)", expect="error", risk="wrong")),
])
def test_bad_token_ids_are_errors(tiny_llama, call, match):
    with pytest.raises(TokenIdError, match=match):
        call(tiny_llama)


@pytest.mark.parametrize("call", [
    pytest.param(lambda h: h.run(PROMPT * 3, batch_size=0), marks=pytest.mark.hostile(
        "inputs", "handle.run(batch_size=0)", expect="error", risk="wrong")),
    pytest.param(lambda h: h.generate(PROMPT * 3, batch_size=-1, max_new_tokens=1), marks=pytest.mark.hostile(
        "inputs", "handle.generate(batch_size=-1)", expect="error", risk="raw")),
    pytest.param(lambda h: collect_states(h, ["a b c"], ["embed"], batch_size=0, progress=False),
                 marks=pytest.mark.hostile("inputs", "tuned-lens states with batch_size=0", expect="error",
                                           risk="raw")),
    pytest.param(lambda h: dynamics_summary(h, ["a b c"], batch_size=0, progress=False),
                 marks=pytest.mark.hostile("inputs", "dynamics summary with batch_size=0", expect="error",
                                           risk="raw")),
    pytest.param(lambda h: dynamics_summary(h, ["a b c"], batch_size=-2, progress=False),
                 marks=pytest.mark.hostile("inputs", "dynamics summary with batch_size=-2 (nothing computed)",
                                           expect="error", risk="wrong")),
    pytest.param(lambda h: sink_analysis(h, ["a b c"], batch_size=0),
                 marks=pytest.mark.hostile("inputs", "sink analysis with batch_size=0", expect="error",
                                           risk="raw")),
])
def test_nonpositive_batch_size_is_an_error(tiny_llama, call):
    with pytest.raises(ValueError, match="batch_size=(0|-1|-2)"):
        call(tiny_llama)


# ---- model folders ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("delta, what", [
    pytest.param(1, "missing from the weights", marks=pytest.mark.hostile(
        "inputs", "checkpoint whose config.json has one layer more than its weights", expect="error", risk="wrong")),
    pytest.param(-1, "unexpected in the weights", marks=pytest.mark.hostile(
        "inputs", "checkpoint whose config.json has one layer fewer than its weights", expect="error",
        risk="wrong")),
])
def test_config_that_disagrees_with_the_weights_is_refused(saved_llama, tmp_path, delta, what):
    assert hl.load_model(str(saved_llama)).n_layers == 4  # the honest folder loads
    bad = copy_with_config(saved_llama, tmp_path / "bad", num_hidden_layers=4 + delta)
    first = f"model.layers.{3 + max(delta, 0)}."  # the extra block's tensors (missing) or the dropped block's
    with pytest.raises(DamagedFileError, match=rf"{bad}.*num_hidden_layers={4 + delta}.*{what}.*{re.escape(first)}"):
        hl.load_model(str(bad))


@pytest.mark.parametrize("spec", [
    pytest.param("/nonexistent/dir", marks=pytest.mark.hostile(
        "inputs", "load_model('/nonexistent/dir') (an absolute path taken for a hub id)", expect="error",
        risk="raw")),
    pytest.param("./no-such-model", marks=pytest.mark.hostile(
        "inputs", "load_model('./no-such-model') (a relative path taken for a hub id)", expect="error", risk="raw")),
    pytest.param("runs/some/checkpoint", marks=pytest.mark.hostile(
        "inputs", "load_model('runs/some/checkpoint') (a deep path taken for a hub id)", expect="error",
        risk="raw")),
])
def test_missing_model_folder_is_named(spec):
    assert is_path_spec(spec) and not is_path_spec("HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(FileNotFoundError, match=rf"model folder {spec} does not exist"):
        hl.load_model(spec)


def _folder_with_code(saved_llama: Path, folder: Path, marker: Path, config_file: str = "config.json") -> Path:
    """A copy of ``saved_llama`` whose ``config_file`` has an ``auto_map`` to a module that writes ``marker``."""
    shutil.copytree(saved_llama, folder)
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    cfg = json.loads((folder / config_file).read_text())
    if config_file == "config.json":
        cfg |= {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForCausalLM": "evil.EvilModel"}}
    else:
        cfg |= {"auto_map": {"AutoTokenizer": [None, "evil.EvilTokenizer"]}}
    (folder / config_file).write_text(json.dumps(cfg))
    return folder


@pytest.mark.hostile("inputs", "`hiddenlens info FOLDER` on a folder whose config.json ships code (auto_map), "
                     "'y' on stdin", expect="error", risk="security")
def test_info_never_runs_code_shipped_with_a_model(saved_llama, tmp_path):
    marker = tmp_path / "code-ran"
    folder = _folder_with_code(saved_llama, tmp_path / "evil", marker)
    res = cli("info", str(folder), stdin="y\n")
    assert_one_line_error(res, "auto_map", "hiddenlens never runs code shipped with a model", str(folder))
    assert not marker.exists()
    assert "[y/N]" not in res.stdout + res.stderr and "custom code" not in res.stdout


@pytest.mark.hostile("inputs", "model folder whose tokenizer_config.json ships code (auto_map)", expect="error",
                     risk="security")
def test_tokenizer_code_is_refused_too(saved_llama, tmp_path):
    marker = tmp_path / "code-ran"
    folder = _folder_with_code(saved_llama, tmp_path / "evil", marker, "tokenizer_config.json")
    with pytest.raises(RemoteCodeError, match="tokenizer_config.json has auto_map.*never runs code"):
        hl.load_model(str(folder))
    assert not marker.exists()


# ---- tuned lens of another model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("other", [
    pytest.param("tiny-gpt2", marks=pytest.mark.hostile(
        "inputs", "tuned lens of another model of the same width and depth", expect="error", risk="wrong")),
    pytest.param("seed1", marks=pytest.mark.hostile(
        "inputs", "tuned lens of other weights of the same architecture", expect="error", risk="wrong")),
])
def test_tuned_lens_of_another_model_is_refused(tiny_llama, tiny_gpt2, tmp_path, other):
    path = TunedLens.for_model(tiny_llama).save(tmp_path / "lens.safetensors")
    assert TunedLens.load(path, tiny_llama).identity["n_layers"] == "4"  # its own model loads it
    handle = tiny_gpt2 if other == "tiny-gpt2" else hl.load_model("tiny-llama", seed=1)
    sha = tiny_llama.info["weights_sha256"][:12]
    with pytest.raises(LensMismatchError, match=rf"made for tiny-llama \(.*{sha}.*this is {handle.spec} \("):
        TunedLens.load(path, handle)


# ---- Bigram-Backcopy configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, match", [
    pytest.param("steps", 0, r"steps=0 \(--steps\): must be at least 1", marks=pytest.mark.hostile(
        "inputs", "BBConfig(steps=0)", expect="error", risk="wrong")),
    pytest.param("lr", math.nan, r"lr=nan \(--lr\): must be a finite number > 0", marks=pytest.mark.hostile(
        "inputs", "BBConfig(lr=nan)", expect="error", risk="wrong")),
    pytest.param("checkpoint_every", -1, r"checkpoint_every=-1 \(--checkpoint-every\)", marks=pytest.mark.hostile(
        "inputs", "BBConfig(checkpoint_every=-1)", expect="error", risk="wrong")),
    pytest.param("k", 0, r"k=0 \(--k\)", marks=pytest.mark.hostile(
        "inputs", "BBConfig(k=0) (no trigger tokens)", expect="error", risk="wrong")),
])
def test_bb_config_validates_every_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        BBConfig(**{field: value})
    for bad in ({"d_model": 0}, {"seq_length": -3}, {"batch_size": 1.5}, {"lr": 0.0}, {"optimizer": "adam"},
                {"attention": "linear"}, {"weight_decay": -1.0}, {"n_layers": 13}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BBConfig(**bad)


# ---- the command line ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needles", [
    pytest.param(("info", "/nonexistent/dir"), ("/nonexistent/dir", "does not exist"), marks=pytest.mark.hostile(
        "inputs", "`hiddenlens info /nonexistent/dir`: one line, exit 2", expect="error", risk="raw")),
    pytest.param(("analyze", "sinks", "--checkpoints", "{tmp}", "--model", "tiny-llama"),
                 ("--model cannot be combined with --checkpoints",), marks=pytest.mark.hostile(
                     "inputs", "`analyze sinks --checkpoints DIR --model X` (--model was ignored)", expect="error",
                     risk="wrong")),
    pytest.param(("bb", "train", "--out", "{tmp}/bb", "--batch-size", "0", "--steps", "1"),
                 ("batch_size=0 (--batch-size)",), marks=pytest.mark.hostile(
                     "inputs", "`bb train --batch-size 0` (trained on empty batches)", expect="error",
                     risk="wrong")),
])
def test_cli_user_errors_are_one_line(tmp_path, args, needles):
    res = cli(*(a.format(tmp=tmp_path) for a in args), cwd=tmp_path)
    assert_one_line_error(res, *needles)
    assert not (tmp_path / "bb").exists() and not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback(tmp_path):
    res = cli("info", "/nonexistent/dir", env={"HIDDENLENS_DEBUG": "1"}, cwd=tmp_path)
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "FileNotFoundError" in res.stderr


@pytest.mark.parametrize("args, option", [
    pytest.param(["train-lens", "--out", "{tmp}/l.safetensors", "--steps", "0"], "--steps",
                 marks=pytest.mark.hostile("inputs", "CLI: an option below its minimum (`train-lens --steps 0`)",
                                           expect="error", risk="raw")),
    pytest.param(["analyze", "sinks", "--n-tokens", "1"], "--n-tokens",
                 marks=pytest.mark.hostile("inputs", "CLI: `analyze sinks --n-tokens 1`", expect="error",
                                           risk="wrong")),
    pytest.param(["analyze", "iteration", "--topk", "0"], "--topk",
                 marks=pytest.mark.hostile("inputs", "CLI: `analyze iteration --topk 0`", expect="error",
                                           risk="wrong")),
    pytest.param(["analyze", "leakage", "--samples", "0"], "--samples",
                 marks=pytest.mark.hostile("inputs", "CLI: `analyze leakage --samples 0`", expect="error",
                                           risk="wrong")),
    pytest.param(["bb", "train", "--out", "{tmp}/bb", "--stepz", "3"], "--stepz",
                 marks=pytest.mark.hostile("inputs", "CLI: a misspelt option prints one line, not a usage box",
                                           expect="error", risk="raw")),
])
def test_numeric_options_have_lower_bounds(tmp_path, capsys, args, option):
    """0 or a negative value is rejected by the option itself: one line naming the option, exit 2."""
    from hiddenlens.cli import main

    with pytest.raises(SystemExit) as exc:
        main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ") and "\n" not in err and option in err, err
