"""Hostile cases for steering inputs: degenerate, non-finite or mistyped directions, alphas that overflow the
model's dtype, options a mode would ignore, and direction files that are damaged or whose halves do not match.

A :class:`Direction` is a finite non-zero floating vector (normalised to unit norm), sigma > 0 and a finite
detector; ``steer_generate`` checks everything against the model before generating and checks every step's
logits while it generates; a direction file's ``.json`` records the sha256 of its ``.safetensors``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hiddenlens as hl
from hiddenlens.cli import main
from hiddenlens.common.errors import DamagedFileError, NonFiniteError
from hiddenlens.interventions.steer import Steering, steer_generate
from hiddenlens.probes.direction import Direction, DirectionError, load_directions, save_directions

ROOT = Path(__file__).resolve().parents[1]
SITE = "blocks.2.resid_post"
PROMPTS = ["The capital of France is", "A"]


def steering(case: str, expect: str = "error", risk: str = "wrong"):
    """The hostile mark of a steering case."""
    return pytest.mark.hostile("steering", case, expect=expect, risk=risk)


def unit(width: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(width, generator=torch.Generator().manual_seed(seed)), dim=0)


@pytest.fixture(scope="module")
def direction() -> Direction:
    return Direction(unit(), 2.0, SITE)


@pytest.fixture
def saved(tmp_path, direction) -> Path:
    """A direction file pair written by ``Direction.save``; returns the stem."""
    return direction.save(tmp_path / "dir")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``hiddenlens ARGS`` in-process; returns (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err.strip()


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


# ---- the Direction object --------------------------------------------------------------------------------------
@pytest.mark.parametrize("vector, sigma, match", [
    pytest.param(torch.zeros(64), 2.0, "all zeros", marks=steering("zero direction vector")),
    pytest.param(unit(), 0.0, "sigma 0 would edit nothing", marks=steering("direction with sigma 0")),
    pytest.param(unit(), -2.0, "negative sigma would flip", marks=steering("negative sigma (flips the direction)")),
])
def test_degenerate_direction_is_refused(vector, sigma, match):
    with pytest.raises(DirectionError, match=match):
        Direction(vector, sigma, SITE)


@pytest.mark.parametrize("vector, sigma, match", [
    pytest.param(unit(), float("nan"), r"sigma=nan is not finite", marks=steering("NaN sigma")),
    pytest.param(unit(), float("inf"), r"sigma=inf is not finite", marks=steering("Inf sigma")),
    pytest.param(torch.where(torch.arange(64) == 3, float("nan"), unit()), 2.0, "NaN/Inf in 1 of 64",
                 marks=steering("NaN entry in the direction vector")),
    pytest.param(torch.where(torch.arange(64) == 3, float("-inf"), unit()), 2.0, "NaN/Inf in 1 of 64",
                 marks=steering("Inf entry in the direction vector")),
])
def test_non_finite_direction_is_refused(vector, sigma, match):
    with pytest.raises(NonFiniteError, match=match):
        Direction(vector, sigma, SITE)


@pytest.mark.parametrize("vector", [
    pytest.param(torch.arange(64), marks=steering("int64 direction vector")),
    pytest.param(torch.arange(64) % 2 == 0, marks=steering("bool direction vector")),
])
def test_non_floating_vector_names_its_dtype(vector):
    with pytest.raises(DirectionError, match=rf"dtype {vector.dtype} is not floating point"):
        Direction(vector, 1.0, SITE)


@pytest.mark.parametrize("index", [
    pytest.param(0, marks=steering("NaN detector weight (conditional mode)")),
    pytest.param(1, marks=steering("NaN detector bias (conditional mode)")),
])
def test_nan_detector_coefficients_are_refused(index):
    detector = [1.5, -0.2]
    detector[index] = float("nan")
    with pytest.raises(NonFiniteError, match=f"detector {'ab'[index]}=nan is not finite"):
        Direction(unit(), 1.0, SITE, detector=tuple(detector))


@steering("direction vector of norm 1000 (adds alpha x sigma, not x 1000)", expect="works")
def test_non_unit_vector_is_normalised_and_adds_alpha_sigma(tiny_llama):
    """The added vector has norm alpha * sigma whatever the norm of the vector given (measured on a run)."""
    d = Direction(1000.0 * unit(seed=3), 2.0, SITE)
    assert torch.allclose(d.vector.norm(), torch.tensor(1.0), atol=1e-6)
    with hl.capture(tiny_llama, [SITE]) as before:
        tiny_llama.run(PROMPTS)
    with Steering(tiny_llama, [d], 4.0, "all"), hl.capture(tiny_llama, [SITE]) as after:
        tiny_llama.run(PROMPTS)
    real = before.attention_masks[0].bool()
    added = (after[SITE] - before[SITE])[real].norm(dim=-1)
    assert torch.allclose(added, torch.full_like(added, 8.0), atol=1e-3), added


@steering("direction vector changed in place after construction")
def test_direction_edited_after_construction_is_refused(tiny_llama):
    d = Direction(unit(), 1.0, SITE)
    d.vector.mul_(1000.0)
    with pytest.raises(DirectionError, match="no longer has unit norm"):
        Steering(tiny_llama, [d], 1.0)


# ---- against the model -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("d, match", [
    pytest.param(Direction(unit(32), 1.0, SITE), r"needs \[64\].*another model",
                 marks=steering("direction width differs from the model's d_model", risk="raw")),
    pytest.param(Direction(unit(), 1.0, "blocks.9.resid_post"), r"blocks\.9.*another model",
                 marks=steering("direction site does not exist in the model", risk="raw")),
])
def test_direction_that_does_not_fit_the_model_fails_before_generating(tiny_llama, d, match):
    with pytest.raises(ValueError, match=match):
        steer_generate(tiny_llama, PROMPTS, [d], 4.0, max_new_tokens=2)


@steering("CLI: direction of another model's width: one-line error before any output", risk="raw")
def test_cli_wrong_width_fails_before_printing(tmp_path, capsys):
    Direction(unit(32), 1.0, SITE).save(tmp_path / "narrow")
    code, out, err = cli(capsys, "steer", "Hello", "--direction", str(tmp_path / "narrow.json"), "--model",
                         "tiny-llama", "--max-new-tokens", "2")
    assert_one_line_error(code, err, "needs [64]", "another model")
    assert "plain" not in out and "steered" not in out


# ---- alpha -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha, match", [
    pytest.param(1e30, r"norm 2e\+30.*lower \|alpha\| below", marks=steering("alpha 1e30 (overflows the model)")),
    pytest.param(float("nan"), "alpha=nan is not finite", marks=steering("NaN alpha")),
    pytest.param(float("inf"), "alpha=inf is not finite", marks=steering("Inf alpha")),
])
def test_alpha_that_cannot_be_added_is_refused_before_generating(tiny_llama, direction, alpha, match):
    with pytest.raises(NonFiniteError, match=match):
        steer_generate(tiny_llama, PROMPTS, [direction], alpha, max_new_tokens=2)


@pytest.fixture(scope="module")
def tiny_fp16():
    return hl.load_model("tiny-llama", dtype="float16")


@pytest.mark.parametrize("mode", [
    pytest.param("all", marks=steering("steered generation overflows float16 mid-model (NaN logits)")),
    pytest.param("conditional", marks=steering("conditional steering overflows float16 mid-model (NaN logits)")),
])
def test_non_finite_logits_raise_instead_of_returning_text(tiny_fp16, mode):
    """Each added vector fits float16 (norm 30000 < 65504), but three of them on one coordinate overflow the
    residual stream: before, generation returned an empty text."""
    e0 = torch.zeros(64)
    e0[0] = 1.0
    dirs = [Direction(e0, 1.0, f"blocks.{i}.resid_post") for i in range(3)]
    kw = {"threshold": 1.0} if mode == "conditional" else {}
    with pytest.raises(NonFiniteError, match=r"NaN/Inf logits at new token 0 .*lower alpha"):
        steer_generate(tiny_fp16, PROMPTS[:1], dirs, 30000.0, mode, max_new_tokens=3, **kw)


@steering("CLI: --alpha 1e30 exits 2 with one line (was exit 0 and empty text)")
def test_cli_huge_alpha(saved, capsys):
    code, out, err = cli(capsys, "steer", "Hello", "--direction", str(saved) + ".json", "--model", "tiny-llama",
                         "--alpha", "1e30", "--max-new-tokens", "2")
    assert_one_line_error(code, err, "alpha=1e+30", "lower |alpha|")
    assert "steered" not in out


# ---- options a mode does not use ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    pytest.param({"detector": "first"}, "detector= only applies to mode='conditional'",
                 marks=steering("API: detector= given with mode 'all'")),
    pytest.param({"threshold": 0.3}, "threshold= only applies to mode='conditional'",
                 marks=steering("API: threshold= given with mode 'all'")),
    pytest.param({"on_event": print}, "on_event= only applies to mode='conditional'",
                 marks=steering("API: on_event= given with mode 'all'")),
])
def test_conditional_only_arguments_are_errors_in_other_modes(tiny_llama, direction, kwargs, match):
    kwargs = {k: direction if v == "first" else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        steer_generate(tiny_llama, PROMPTS, [direction], 4.0, "all", max_new_tokens=2, **kwargs)


@steering("API: generate kwargs (e.g. do_sample) given with mode 'conditional'")
def test_generate_kwargs_are_errors_in_conditional_mode(tiny_llama, direction):
    with pytest.raises(ValueError, match="do_sample= do.* not apply to mode='conditional'"):
        steer_generate(tiny_llama, PROMPTS, [direction], 4.0, "conditional", max_new_tokens=2, do_sample=True)


@steering("API: prompt_length= given with mode 'all'")
def test_prompt_length_is_an_error_where_unused(tiny_llama, direction):
    with pytest.raises(ValueError, match="prompt_length= only applies to modes 'prompt' and 'generated'"):
        Steering(tiny_llama, [direction], 4.0, "all", prompt_length=3)


@pytest.mark.parametrize("option", [
    pytest.param("--detector", marks=steering("CLI: --detector given with --mode all (was ignored)")),
    pytest.param("--threshold", marks=steering("CLI: --threshold given with --mode all (was ignored)")),
])
def test_cli_conditional_only_options(saved, capsys, option):
    value = str(saved) + ".json" if option == "--detector" else "0.3"
    code, out, err = cli(capsys, "steer", "Hello", "--direction", str(saved) + ".json", "--model", "tiny-llama",
                         "--mode", "all", option, value)
    assert_one_line_error(code, err, f"{option} only applies to --mode conditional")
    assert out == ""


@pytest.mark.parametrize("threshold", [
    pytest.param(5.0, marks=steering("conditional threshold 5 (outside [0, 1])")),
    pytest.param(float("nan"), marks=steering("conditional threshold NaN")),
])
def test_conditional_threshold_must_be_a_probability(tiny_llama, direction, threshold):
    with pytest.raises(ValueError, match=r"threshold=(5\.0|nan).*probability in \[0, 1\]"):
        steer_generate(tiny_llama, PROMPTS, [direction], 4.0, "conditional", max_new_tokens=2, threshold=threshold)


@steering("CLI: --threshold 5 with --mode conditional")
def test_cli_threshold_out_of_range(saved, capsys):
    code, out, err = cli(capsys, "steer", "Hello", "--direction", str(saved) + ".json", "--model", "tiny-llama",
                         "--mode", "conditional", "--threshold", "5")
    assert_one_line_error(code, err, "--threshold 5.0", "[0, 1]")


@steering("max_new_tokens 0 in conditional mode (returned an empty text)")
def test_conditional_needs_at_least_one_new_token(tiny_llama, direction):
    with pytest.raises(ValueError, match="max_new_tokens=0: generate at least one token"):
        steer_generate(tiny_llama, PROMPTS, [direction], 4.0, "conditional", max_new_tokens=0)


# ---- direction files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [
    pytest.param(b'{"not": "a safetensors file"}', marks=steering("direction .safetensors that is not "
                                                                      "safetensors", risk="raw")),
    pytest.param(None, marks=steering("truncated direction .safetensors", risk="raw")),
])
def test_damaged_safetensors_names_the_file(saved, content):
    tensors, meta = Path(f"{saved}.safetensors"), Path(f"{saved}.json")
    data = tensors.read_bytes()
    tensors.write_bytes(content if content is not None else data[: len(data) // 2])
    record = json.loads(meta.read_text())
    record.pop("safetensors_sha256")  # as an older file: the damage itself must be detected
    meta.write_text(json.dumps(record))
    with pytest.raises(DamagedFileError, match=rf"{tensors.name} is not a hiddenlens direction file or is damaged"):
        load_directions(saved)


@pytest.mark.parametrize("field", [
    pytest.param("sigma", marks=steering("direction .json lacking the field sigma", risk="raw")),
    pytest.param("detector", marks=steering("direction .json lacking the field detector", risk="raw")),
])
def test_missing_json_field_names_file_and_field(saved, field):
    meta = Path(f"{saved}.json")
    record = json.loads(meta.read_text())
    del record["directions"][0][field]
    meta.write_text(json.dumps(record))
    with pytest.raises(DamagedFileError, match=rf"dir\.json: direction 0 lacks the field '{field}'"):
        load_directions(saved)


@steering("direction .json that is not JSON", risk="raw")
def test_invalid_json_names_file_and_line(saved):
    meta = Path(f"{saved}.json")
    meta.write_text('{\n  "format": 2,\n  "directions": [\n')
    with pytest.raises(DamagedFileError, match=r"dir\.json is not a hiddenlens direction file .*line 4"):
        load_directions(saved)


@steering("direction file whose .json and .safetensors hold different numbers of vectors", risk="raw")
def test_vector_count_mismatch(tmp_path, direction):
    stem = save_directions([direction, Direction(unit(seed=1), 1.0, SITE)], tmp_path / "two")
    record = json.loads(Path(f"{stem}.json").read_text())
    record["directions"].pop()
    record.pop("safetensors_sha256")
    Path(f"{stem}.json").write_text(json.dumps(record))
    with pytest.raises(DamagedFileError,
                       match=r"two\.safetensors holds the vectors vector\.0, vector\.1 but .*two\.json describes "
                             r"vector\.0:"):
        load_directions(stem)


@steering("interrupted save: new .safetensors beside the old .json")
def test_mismatched_pair_is_refused(saved):
    meta = Path(f"{saved}.json")
    old = meta.read_text()
    Direction(unit(seed=7), 3.0, SITE).save(saved)  # a later save ...
    meta.write_text(old)  # ... killed before its .json was written
    with pytest.raises(DamagedFileError, match=r"dir\.safetensors does not belong to .*dir\.json.*sha256"):
        load_directions(saved)


@steering("direction file saved before checksums (format 1 and 2) still loads", expect="works", risk="lost")
def test_files_without_checksum_still_load(saved, direction):
    shipped = load_directions(ROOT / "docs" / "results" / "truth" / "direction_mass_mean")  # format 1
    assert shipped[0].site == "blocks.12.resid_post" and shipped[0].sigma == pytest.approx(4.0205294602276505)
    assert torch.allclose(shipped[0].vector.norm(), torch.tensor(1.0), atol=1e-5)
    meta = Path(f"{saved}.json")
    record = json.loads(meta.read_text())
    assert len(record.pop("safetensors_sha256")) == 64  # new saves carry it
    meta.write_text(json.dumps(record))
    back = load_directions(saved)[0]
    assert torch.equal(back.vector, direction.vector) and back.sigma == direction.sigma


@steering("zero vector inside a direction file")
def test_zero_vector_in_a_file_names_the_file(saved):
    from safetensors.torch import save_file

    save_file({"vector.0": torch.zeros(64)}, f"{saved}.safetensors")
    record = json.loads(Path(f"{saved}.json").read_text())
    record.pop("safetensors_sha256")
    Path(f"{saved}.json").write_text(json.dumps(record))
    with pytest.raises(DirectionError, match=r"dir\.json: direction 0: .*all zeros"):
        load_directions(saved)


@steering("direction file whose name has a dot (v1.2) read another file (v1.json)", expect="works")
def test_dotted_stem_reads_its_own_files(tmp_path, direction):
    Direction(unit(seed=5), 1.0, SITE).save(tmp_path / "v1")
    direction.save(tmp_path / "v1.2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1.2.json", "v1.2.safetensors", "v1.json",
                                                           "v1.safetensors"]
    assert torch.equal(load_directions(tmp_path / "v1.2")[0].vector, direction.vector)
