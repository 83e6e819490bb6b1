"""`hiddenlens reproduce`: verdict logic on known answers, claims read from synthetic results, and the whole run
(structure, write / read, CLI) on tiny-llama."""
import json

import numpy as np
import pandas as pd
import pytest

from hiddenlens.studies import reproduce as rp
from hiddenlens.studies.bigram_backcopy import BBReproductionConfig
from hiddenlens.studies.bigram_backcopy import Result as BBResult


@pytest.mark.parametrize("est, null, direction, paper, want", [
    (rp.Estimate(0.8, 0.7, 0.9), 0.5, +1, None, "reproduced"),
    (rp.Estimate(0.8, 0.4, 0.9), 0.5, +1, None, "direction only"),       # interval reaches the null
    (rp.Estimate(0.3, 0.2, 0.4), 0.5, +1, None, "not reproduced"),
    (rp.Estimate(0.5, 0.4, 0.6), 0.5, +1, None, "not reproduced"),       # on the null
    (rp.Estimate(0.3, 0.2, 0.4), 0.5, -1, None, "reproduced"),           # the paper says below
    (rp.Estimate(-0.2, -0.3, -0.1), 0.0, -1, -1.0, "direction only"),    # under half the paper's effect
    (rp.Estimate(-0.6, -0.9, -0.3), 0.0, -1, -1.0, "reproduced"),
    (rp.Estimate.missing(), 0.0, +1, None, "not comparable"),
])
def test_verdict_known_answers(est, null, direction, paper, want):
    assert rp.verdict(est, null, direction, paper) == want


def test_verdict_rejects_a_bad_direction():
    with pytest.raises(ValueError, match="direction"):
        rp.verdict(rp.Estimate(1, 0, 2), 0.0, 0)


def test_estimates():
    e = rp.Estimate.of_range([0.2, 0.6], "seeds")
    assert (e.value, e.low, e.high, e.interval) == (pytest.approx(0.4), 0.2, 0.6, "range over seeds")
    m = rp.Estimate.of_mean(np.r_[np.ones(50), np.zeros(50)])
    assert m.value == pytest.approx(0.5) and m.low < 0.5 < m.high
    assert np.isnan(rp.Estimate.of_mean([1.0]).value)


def _bb_result(nontrigger: list[float]) -> BBResult:
    rows = [{"variant": v, "seed": s, "bos_attn_nontrigger": x, "bos_attn_trigger": 0.01, "value_norm_ratio": 0.3,
             "bos_share": 0.05 if v.startswith("relu") else x, "resid_ratio_mean": 1.5}
            for v in ("softmax/adamw/L1", "relu/adamw/L1", "softmax/adamw/L3") for s, x in enumerate(nontrigger)]
    return BBResult(BBReproductionConfig(), {}, {"final": pd.DataFrame(rows)})


def test_claims_read_the_declared_variant_over_seeds():
    claims = rp.evaluate_claims({"bigram_backcopy": _bb_result([0.7, 0.9])}, {"bigram_backcopy": 1.0})
    assert len(claims) == sum(c.study == "bigram_backcopy" for c in rp.CLAIMS)
    dormant = claims.iloc[0]
    assert (dormant["value"], dormant["low"], dormant["high"]) == (pytest.approx(0.8), 0.7, 0.9)
    assert set(claims["verdict"]) == {"reproduced"}
    split = rp.evaluate_claims({"bigram_backcopy": _bb_result([0.3, 0.9])}, {"bigram_backcopy": 1.0})
    assert split.iloc[0]["verdict"] == "direction only"   # one seed below 0.5
    none = rp.evaluate_claims({"bigram_backcopy": _bb_result([0.1, 0.2])}, {"bigram_backcopy": 1.0})
    assert none.iloc[0]["verdict"] == "not reproduced"


def test_config_rejects_unknown_studies():
    with pytest.raises(ValueError, match="unknown studies"):
        rp.ReproduceConfig(studies=["sinks", "astrology"])
    with pytest.raises(ValueError, match="unknown studies"):
        rp.ReproduceConfig(overrides={"astrology": {}})


def test_quick_run_on_tiny_llama_writes_one_report_with_every_study(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("HIDDENLENS_CACHE", str(tmp_path / "cache"))   # the tuned lens trains on first use
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps({"pairs": [{"clean": "The capital of France is", "answer": " a", "wrong": " b",
                                            "corrupted": "The capital of Italy is"}]}))
    studies = [s for s in rp.PLANS if s != "bigram_backcopy"]   # BB's claims: test above (its worker processes
    config = rp.ReproduceConfig(model="tiny-llama", quick=True, studies=studies, overrides={  # take a minute)
        "intention": {"n": 8, "shots": 0, "max_new_tokens": {"direct": 4, "cot": 8, "babble": 8}},
        "sinks": {"n_prompts": 4, "n_tokens": 32, "eval_seqs": 16}, "leakage": {"limit": 3},
        "iteration": {"chunks": 2, "seq_len": 32}, "patching": {"pairs": str(pairs)},
        "truthprint": {"families": ["continent"], "limit": 4, "layers": [0, 1], "max_new_tokens": 2},
        "tuned_lens": {"n_prompts": 4, "chars": 120, "n_boot": 50},
        "steering": {"methods": ["mass_mean", "caa"], "layers": [1], "n_random": 2, "n_boot": 50, "caa_items": 4}})
    res = rp.run(config, tiny_llama, progress=False)
    claims = res.tables["claims"]
    assert set(claims["study"]) == set(studies)
    assert len(claims) == sum(c.study in studies for c in rp.CLAIMS)
    assert set(claims["verdict"]) <= set(rp.VERDICTS)
    assert list(res.tables["timings"]["study"]) == studies and (res.tables["timings"]["seconds"] >= 0).all()
    ok = list(res.tables["timings"].query("status == 'ok'")["study"])
    for name in set(studies) - set(ok):   # a study this random model cannot feed (e.g. one-class answers)
        assert claims[claims.study == name]["verdict"].eq("not comparable").all()
        assert claims[claims.study == name]["ours"].str.startswith("study failed: ").all()
    folder = res.write(tmp_path / "rep")
    back = rp.Result.read(folder)
    assert sorted(back.parts) == sorted(ok)
    for study in ok:
        assert (folder / study / "report.md").is_file()
    report = (folder / "report.md").read_text()
    assert "paper_figure" in report and "Time per study" in report and "verdict" in report
    pd.testing.assert_frame_equal(back.tables["claims"], claims, check_dtype=False)


def test_cli_reproduce_quick_subset_and_refuses_a_used_folder(tmp_path, capsys):
    from hiddenlens.cli import main

    out = tmp_path / "rep"
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--quick", "--model", "tiny-llama", "--studies", "truth,iteration", "--out", str(out)])
    assert exc.value.code == 0
    assert set(rp.Result.read(out).tables["claims"]["study"]) == {"truth", "iteration"}
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--quick", "--model", "tiny-llama", "--studies", "truth", "--out", str(out)])
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


def test_a_failed_study_is_reported_not_hidden(tiny_llama, monkeypatch):
    from hiddenlens.studies import truth

    def boom(*args, **kwargs):
        raise ValueError("statements hold one class")

    monkeypatch.setattr(truth, "run", boom)
    res = rp.run(rp.ReproduceConfig(model="tiny-llama", quick=True, studies=["truth"]), tiny_llama, progress=False)
    row = res.tables["claims"].iloc[0]
    assert row["verdict"] == "not comparable" and row["ours"] == "study failed: statements hold one class"
    assert res.tables["timings"]["status"].tolist() == ["failed: statements hold one class"]
    assert res.summary["failed"] == {"truth": "statements hold one class"}
