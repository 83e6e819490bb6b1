"""The tuned lens trained out of the box: closed-form translators, the per-model cache, the study and its CLI
(Belrose et al., "Eliciting Latent Predictions from Transformers with the Tuned Lens", arXiv 2303.08112)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import hiddenlens as hl
from hiddenlens.analyses import tuned_lens as tl
from hiddenlens.analyses.dynamics import lens_logits
from hiddenlens.analyses.tuned_lens import (TunedLens, cached_lens_path, cached_tuned_lens, collect_states,
                                            fit_translators, lens_kl, train_tuned_lens)
from hiddenlens.common.errors import DamagedFileError, UserError
from hiddenlens.common.stats import kl_divergence


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A private user cache for the test."""
    monkeypatch.setenv("HIDDENLENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def small_recipe(monkeypatch):
    """A smaller training recipe for the cached lens (tiny models learn nothing more from the full one)."""
    monkeypatch.setattr(tl, "CACHE_RECIPE", dict(tl.CACHE_RECIPE, n_prompts=16, max_tokens=1024, steps=2))


def test_closed_form_recovers_a_known_map_on_synthetic_states():
    """Targets made by a scaled rotation of the states: the fit is that rotation (the final norm reads a direction,
    so the scale is free), at every site, with no bias, and the ridge shrinks towards the identity."""
    g = torch.Generator().manual_seed(0)
    d, n = 8, 3000
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    h = torch.randn(n, 2, d, generator=g) * torch.exp(torch.randn(n, 2, 1, generator=g))  # norms spread widely
    last = 7.0 * h[:, 0].double() @ q.T
    lens = fit_translators(TunedLens(d, ["embed", "blocks.0.resid_post"]), h[:, :1].expand(n, 2, d).contiguous(),
                           last.float(), ridge=0.0)
    for t in lens.translators:
        assert torch.allclose(t.weight.double() + torch.eye(d, dtype=torch.float64), q, atol=1e-4)
        assert t.bias.abs().max() < 1e-4
    shrunk = fit_translators(TunedLens(d, ["embed"]), h[:, :1], last.float(), ridge=1e6)
    assert shrunk.translators[0].weight.abs().max() < 1e-3, "a huge ridge leaves the logit lens"
    with pytest.raises(ValueError, match="last"):
        fit_translators(TunedLens(d, ["embed"]), h[:, :1], last[:5].float())


def test_lens_of_a_model_whose_last_blocks_are_identity_is_the_logit_lens():
    """Zeroing the output projections of blocks 2 and 3 makes them identity maps: blocks 1 and 2's residuals are the
    last one, so the closed form gives zero translators there, and the KL steps keep them (KL is 0, its minimum)."""
    handle = hl.load_model("tiny-llama")
    with torch.no_grad():
        for layer in handle.hf_model.model.layers[2:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    handle.info.pop("weights_sha256", None)
    prompts = tl.training_prompts(12, 300)
    closed, history = train_tuned_lens(handle, prompts, steps=0, max_tokens=1500, progress=False)
    assert history.empty
    for site in ("blocks.1.resid_post", "blocks.2.resid_post"):
        t = closed.translators[closed.sites.index(site)]
        assert t.weight.abs().max() < 1e-4 and t.bias.abs().max() == 0, site
    plain, _ = lens_logits(handle, "Return the value of x", add_bos=True)
    assert torch.allclose(plain[2:], plain[-1:].expand_as(plain[2:]), atol=1e-4), "blocks 1..3 read out the same"
    for steps in (0, 2):  # the KL steps start at KL 0 there, its minimum: they keep the readout
        lens, history = train_tuned_lens(handle, prompts, steps=steps, max_tokens=1500, progress=False)
        assert len(history) == steps
        tuned, _ = lens_logits(handle, "Return the value of x", lens=lens, add_bos=True)
        kl = kl_divergence(plain[-1:], tuned[2:4]).max()
        assert kl < 1e-3, (steps, kl)


def test_closed_form_lowers_held_out_kl_at_every_depth(tiny_llama):
    train = tl.training_prompts(40, 300)
    held = tl.training_prompts(10, 300, tl.HELD_OUT_SKIP)
    lens, history = train_tuned_lens(tiny_llama, train, steps=0, max_tokens=4000, add_bos=True, progress=False)
    assert history.empty and list(history.columns) == ["step", "kl"]
    states, finals = collect_states(tiny_llama, held, lens.sites, max_tokens=1500, progress=False, add_bos=True)
    before = lens_kl(tiny_llama, TunedLens.for_model(tiny_llama), states, finals)
    after = lens_kl(tiny_llama, lens, states, finals)
    assert (after < before).all(), (before, after)
    with pytest.raises(ValueError, match="init"):
        train_tuned_lens(tiny_llama, train, init="random", progress=False)
    with pytest.raises(ValueError, match="steps"):
        train_tuned_lens(tiny_llama, train, steps=-1, progress=False)


def test_cached_lens_is_trained_once_keyed_by_weights_and_reported(tiny_llama, tiny_gpt2, cache, small_recipe,
                                                                   monkeypatch):
    seen = []
    lens = cached_tuned_lens(tiny_llama, progress=lambda f, what: seen.append((f, what)))
    path = cached_lens_path(tiny_llama)
    assert path.is_file() and path.parent == cache / "lenses"
    assert path.stem == tiny_llama.info["weights_sha256"] and len(path.stem) == 64
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(seen) > 3
    assert not list(path.parent.glob("*.tmp*")) and not list(path.parent.glob(".*.safetensors"))

    def no_training(*a, **k):
        raise AssertionError("the cached lens was trained again")

    monkeypatch.setattr(tl, "train_tuned_lens", no_training)
    again = cached_tuned_lens(tiny_llama, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), lens.state_dict().values()))
    assert cached_lens_path(tiny_gpt2) != path  # other weights, another file
    with pytest.raises(AssertionError, match="trained again"):
        cached_tuned_lens(tiny_gpt2, progress=False)


def test_truncated_cached_lens_is_never_loaded(tiny_llama, cache, small_recipe):
    cached_tuned_lens(tiny_llama, progress=False)
    path = cached_lens_path(tiny_llama)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DamagedFileError, match="damaged or truncated"):
        TunedLens.load(path, tiny_llama)
    assert issubclass(DamagedFileError, UserError)
    with pytest.warns(UserWarning, match="training it again"):
        lens = cached_tuned_lens(tiny_llama, progress=False)
    assert path.stat().st_size == len(good)
    assert TunedLens.load(path, tiny_llama).sites == lens.sites


# ---- the study and its command -------------------------------------------------------------------------------
def test_verdict_logic_on_known_tables():
    from hiddenlens.studies.tuned_lens import _verdict

    def table(gain, lo):
        return pd.DataFrame({"site": [f"blocks.{i}.resid_post" for i in range(len(gain))], "gain": gain,
                             "gain_lo": lo})

    assert _verdict(table([3.0, 2.0, 1.0], [1.0, 0.5, 0.1]))[0] == "reproduced"
    assert _verdict(table([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]))[0] == "direction only"  # gains grow with depth
    assert _verdict(table([3.0, 2.0, 1.0], [1.0, -0.5, -0.1]))[0] == "not reproduced"
    verdict, text, numbers = _verdict(table([3.0, 2.0, 1.0], [1.0, 0.5, -0.1]))
    assert verdict == "direction only" and numbers["n_depths_lower"] == 2 and "2 of 3 depths" in text
    assert numbers["largest_gain_site"] == "blocks.0.resid_post"


def test_study_runs_writes_and_reads_back(tiny_llama, cache, small_recipe, tmp_path):
    from hiddenlens.studies import tuned_lens as study

    config = study.TunedLensConfig(model="tiny-llama", n_prompts=6, chars=300, n_boot=200)
    res = study.run(config, tiny_llama, progress=False)
    t = res.tables["kl_by_layer"]
    assert list(t["site"]) == ["embed", "blocks.0.resid_post", "blocks.1.resid_post", "blocks.2.resid_post"]
    assert np.allclose(t["gain"], t["kl_logit"] - t["kl_tuned"])
    assert ((t["kl_logit_lo"] <= t["kl_logit"]) & (t["kl_logit"] <= t["kl_logit_hi"])).all()
    pp = res.tables["per_prompt"]
    assert len(pp) == 6 * 4 and np.allclose(pp.groupby("site", sort=False)["kl_tuned"].mean().to_numpy(),
                                            t["kl_tuned"].to_numpy())
    tokens = tiny_llama.tokenize(tl.training_prompts(6, 300, tl.HELD_OUT_SKIP), add_bos=True).attention_mask.sum()
    assert res.summary["n_tokens"] == int(tokens)
    assert res.summary["verdict"] in ("reproduced", "direction only", "not reproduced")
    folder = res.write(tmp_path / "run")
    assert (folder / "kl_by_layer.png").stat().st_size > 5000
    assert "Verdict" in (folder / "report.md").read_text() and "2303.08112" in (folder / "report.md").read_text()
    back = study.Result.read(folder)
    assert back.config.n_prompts == 6 and back.summary == res.summary
    pd.testing.assert_frame_equal(back.tables["kl_by_layer"], t)
    with pytest.raises(ValueError, match="skip"):  # evaluating on the cached lens's training text is refused
        study.run(study.TunedLensConfig(model="tiny-llama", skip=0), tiny_llama, progress=False)


def test_cli_tuned_lens_command(tiny_llama, cache, small_recipe, tmp_path, capsys):
    from hiddenlens.cli import main

    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "tuned-lens", "--model", "tiny-llama", "--out", str(out), "--n-prompts", "4", "--chars",
              "200", "--n-boot", "100"])
    assert exc.value.code == 0
    assert "verdict:" in capsys.readouterr().out and (out / "kl_by_layer.csv").is_file()
    assert cached_lens_path(tiny_llama).is_file()
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "tuned-lens", "--model", "tiny-llama", "--out", str(out)])
    assert exc.value.code == 2 and "already holds results" in capsys.readouterr().err
