"""The steering evaluation (``hiddenlens.studies.steering``, ``hiddenlens steer eval``) with known answers, on
tiny Llama: the cached scoring equals a full forward, fixes / breaks / percentiles are counted right, a planted
direction that fixes by construction beats random directions, and test labels never reach a choice."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from hiddenlens.analyses import fact_items as F
from hiddenlens.common.stats import log_probs
from hiddenlens.interventions.steer import Steering
from hiddenlens.probes.direction import Direction
from hiddenlens.studies import steering as S


@pytest.fixture(scope="module")
def items():
    """Three items per family and split (45 items), all five families."""
    return F.fact_items(seed=0).groupby(["family", "split"]).head(3).reset_index(drop=True)


def small_config(**kw) -> S.SteeringConfig:
    return S.SteeringConfig(model="tiny-llama", **{**dict(alphas=[2.0, 8.0], k_heads=[2, 4], caa_items=20,
                                                          n_random=2, n_prose=1, n_boot=50, batch_size=64), **kw})


# ---- scoring ---------------------------------------------------------------------------------------------------
def test_unsteered_margins_equal_score_items(tiny_llama, items):
    scored = F.score_items(tiny_llama, items)
    got = S.item_margins(tiny_llama, items, {"base": None}, batch_size=7)["base"]
    np.testing.assert_allclose(got, (scored.logp_correct - scored.logp_wrong).to_numpy(), atol=1e-4)


def _full_forward_margin(handle, prompt, correct, wrong, directions, alpha) -> float:
    """log P(correct) - log P(wrong) from one unpadded full forward per answer, steered in mode ``generated``."""
    out = []
    for answer in (correct, wrong):
        ids, n = F.answer_token_ids(handle.tokenizer, prompt, answer)
        with torch.no_grad(), Steering(handle, directions, alpha, "generated", prompt_length=len(ids) - n):
            lp = log_probs(handle.hf_model(input_ids=torch.tensor([ids])).logits[0].double())
        out.append(sum(float(lp[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids))))
    return out[0] - out[1]


@pytest.mark.parametrize("site,head", [("blocks.1.resid_post", None), ("blocks.2.attn.z", 1)])
def test_cached_steered_margins_equal_a_full_forward(tiny_llama, items, site, head):
    """The prompt runs once into a KV cache and every condition feeds only the last prompt token and the answers;
    that must equal steering a full forward in mode ``generated`` (multi-token answers included)."""
    width = tiny_llama.adapter.head_dim if head is not None else tiny_llama.adapter.d_model
    d = [Direction(torch.randn(width, generator=torch.Generator().manual_seed(3)), 2.0, site, head)]
    sample = items.groupby("family").head(3)
    assert any(len(c) > 1 for _, c, _ in S.tokenize_items(tiny_llama.tokenizer, sample))  # multi-token answers
    got = S.item_margins(tiny_llama, sample, {"steered": (d, 6.0), "plain": None}, batch_size=4)
    want = [_full_forward_margin(tiny_llama, r.prompt, r.correct, r.wrong, d, 6.0) for r in sample.itertuples()]
    np.testing.assert_allclose(got["steered"], want, atol=1e-4)
    assert np.abs(got["steered"] - got["plain"]).max() > 1e-3                          # the edit did something


# ---- metrics -----------------------------------------------------------------------------------------------------
def test_flip_metrics_count_fixes_and_breaks():
    base = np.array([1.0, -1.0, -2.0, 0.5, 3.0])                    # right, wrong, wrong, right, right
    steered = np.array([1.0, 0.5, -1.0, -0.5, 3.0])                  # right, fixed, wrong, broken, right
    m = S.flip_metrics(base, steered, n_boot=200)
    assert (m["n"], m["n_wrong"], m["fixes"], m["breaks"]) == (5, 2, 1, 1)
    assert m["fix_rate"] == 0.5 and m["break_rate"] == pytest.approx(1 / 3) and m["net"] == 0.0
    assert m["net_lo"] < 0 < m["net_hi"] and m["accuracy"] == 0.6
    up = S.flip_metrics(base, np.abs(base) + 1, n_boot=200)
    assert (up["fixes"], up["breaks"], up["net"], up["fix_rate"]) == (2, 0, 0.4, 1.0) and up["net_lo"] >= 0
    assert np.isnan(S.flip_metrics(base, steered, n_boot=0)["net_lo"])


def test_percentile_among_random_nets():
    r = np.arange(20) / 100                                           # 0.00 .. 0.19
    assert S.percentile_among(0.5, r)["percentile"] == 100.0
    assert S.percentile_among(-1.0, r)["percentile"] == 0.0
    p = S.percentile_among(0.10, r)                                   # 10 below, one tie
    assert p["percentile"] == pytest.approx(52.5) and p["n_random"] == 20
    assert p["random_mean"] == pytest.approx(0.095) and p["random_lo"] < p["random_hi"]


# ---- a planted direction: fixes by construction --------------------------------------------------------------------
def test_planted_direction_fixes_and_beats_random_directions(tiny_llama):
    """Every item's correct answer is " and", its wrong one " to". Adding (final-norm weight x (W_U[and] - W_U[to]))
    to the last block's output raises logit(and) - logit(to) at every position, so it can only fix: with alpha
    just large enough, every wrong item is fixed and nothing breaks (net = share wrong), far above 20 random
    directions of the same norm at the same site. A random direction fixes far fewer."""
    h, tok = tiny_llama, tiny_llama.tokenizer
    assert tok(" and", add_special_tokens=False)["input_ids"] != tok(" to", add_special_tokens=False)["input_ids"]
    a, t = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" and", " to"))
    prompts = F.fact_items(seed=0).drop_duplicates("prompt").prompt.head(40).tolist()
    items = pd.DataFrame(dict(prompt=prompts, correct=" and", wrong=" to"))
    last = h.n_layers - 1
    W, g = h.hf_model.lm_head.weight.detach(), h.hf_model.model.norm.weight.detach()
    planted = [Direction(g * (W[a] - W[t]), 1.0, f"blocks.{last}.resid_post")]
    base = S.item_margins(h, items, {"base": None})["base"]
    assert 0 < (base < 0).sum() < len(items)                         # room to fix and to break
    alpha = next(x for x in (0.004 * 2 ** k for k in range(12))                # the smallest that fixes all
                 if (S.item_margins(h, items, {"p": (planted, x)})["p"] > 0).all())
    conds = {"planted": (planted, alpha)} | {k: (S.random_like(planted, seed=k), alpha) for k in range(21)}
    m = S.item_margins(h, items, conds)
    nets = {k: S.flip_metrics(base, v, n_boot=0) for k, v in m.items()}
    p = nets["planted"]
    assert p["fixes"] == (base < 0).sum() and p["breaks"] == 0 and p["net"] == pytest.approx((base < 0).mean())
    rand = [nets[k]["net"] for k in range(1, 21)]
    assert S.percentile_among(p["net"], rand)["percentile"] == 100.0
    assert nets[0]["net"] < p["net"] / 2 and nets[0]["fixes"] < p["fixes"] / 2    # a random one does not fix


# ---- the study: choices on validation only -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def result(tiny_llama, items):
    return S.evaluate(tiny_llama, items, small_config(), progress=False)


def test_test_labels_never_reach_a_choice(tiny_llama, items, result):
    """Swap the correct and wrong answers of every test item: the fitted directions, the layer / K / alpha
    choices and every validation number stay the same; the test numbers change (so the test is not vacuous)."""
    flipped = items.copy()
    t = flipped.split == "test"
    flipped.loc[t, ["correct", "wrong"]] = flipped.loc[t, ["wrong", "correct"]].to_numpy()
    other = S.evaluate(tiny_llama, flipped, small_config(), progress=False)
    assert other.summary["choices"] == result.summary["choices"]
    assert other.summary["sigmas"] == result.summary["sigmas"]
    pd.testing.assert_frame_equal(other.tables["validation"], result.tables["validation"])
    pd.testing.assert_frame_equal(other.tables["layers"], result.tables["layers"])
    assert other.summary["test_wrong"] == result.summary["n_test"] - result.summary["test_wrong"]


def test_result_tables_choices_and_report(result, tmp_path):
    s, m = result.summary, result.tables["methods"]
    assert list(m.method) == [*S.METHODS, "prompting"] and s["n_test"] == 15 and s["n_val"] == 15
    val = result.tables["validation"]
    for method, c in s["choices"].items():
        rows = val[val.method == method]
        best = rows[rows.kl <= s["kl_budget"]].net.max()
        pick = rows[(rows.set == c["set"]) & (rows.alpha == c["alpha"])].iloc[0]
        assert pick.net == best and pick.chosen and rows.chosen.sum() == 1
    assert set(val.set[val.method == "iti"]) == {"iti@K2", "iti@K4"}
    assert m.percentile.iloc[:-1].between(0, 100).all() and np.isnan(m.percentile.iloc[-1])
    assert (m.fixes <= m.n_wrong).all() and (m.net == (m.fixes - m.breaks) / m.n).all()
    assert len(result.tables["random"]) == 2 * len(S.METHODS)
    back = S.Result.read(result.write(tmp_path / "r"))
    assert back.summary["choices"] == s["choices"] and (tmp_path / "r" / "pareto.png").is_file()
    assert "## Verdict" in back.report_text and s["verdict"] in back.report_text


def test_verdict_says_plainly_when_nothing_beats_random():
    row = dict(method="mass_mean", net=0.01, net_lo=-0.02, net_hi=0.04, percentile=60.0, fixes=3, breaks=2, kl=0.1)
    assert S.verdict(pd.DataFrame([row])).startswith("**Nothing beats the random distribution.**")
    strong = S.verdict(pd.DataFrame([row | dict(percentile=100.0, net=0.05, net_lo=0.02)]))
    assert "**mass_mean** beats the random distribution" in strong and "Nothing" not in strong


@pytest.mark.parametrize("args,match", [
    (["--alphas", "0,4"], "--alphas"), (["--alphas", "4,nan"], "--alphas"), (["--k-heads", "2.5"], "--k-heads"),
    (["--methods", "mass_mean,magic"], "--methods"), (["--families", "capitals"], "unknown fact families"),
    (["--n-random", "0"], "--n-random"), (["--kl-budget", "-1"], "--kl-budget")])
def test_cli_rejects_bad_options_before_loading(args, match, capsys, tmp_path):
    from hiddenlens.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["steer", "eval", "--model", "tiny-llama", "--out", str(tmp_path / "o"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and match in err and len(err.splitlines()) == 1


def test_cli_eval_writes_a_run_folder(tmp_path, capsys):
    from hiddenlens.cli import main

    out = tmp_path / "steer"
    with pytest.raises(SystemExit) as exc:
        main(["steer", "eval", "--model", "tiny-llama", "--families", "misconception", "--methods", "mass_mean",
              "--layers", "1-2", "--alphas", "4", "--n-random", "1", "--limit", "6", "--out", str(out)])
    assert exc.value.code == 0 and "report in" in capsys.readouterr().out
    res = S.Result.read(out)
    assert res.config.methods == ["mass_mean"] and res.summary["families"] == ["misconception"]
    assert res.config.limit == 6 and res.summary["n_fit"] == res.summary["n_val"] == res.summary["n_test"] == 6
    assert res.summary["choices"]["mass_mean"]["set"] in ("mass_mean@L1", "mass_mean@L2")


def test_conditions_scored_together_equal_each_alone(tiny_llama, items):
    """Several conditions share one forward (rows stacked, each condition's vector in its own rows, zeros at the
    sites it does not edit): each equals the condition scored alone, and the unsteered rows stay unsteered."""
    g = torch.Generator().manual_seed(5)
    resid = [Direction(torch.randn(tiny_llama.adapter.d_model, generator=g), 2.0, "blocks.1.resid_post")]
    head = [Direction(torch.randn(tiny_llama.adapter.head_dim, generator=g), 1.5, "blocks.2.attn.z", 1)]
    conds = {"plain": None, "resid": (resid, 6.0), "head": (head, 6.0), "both": (resid + head, 3.0)}
    together = S.item_margins(tiny_llama, items, conds, batch_size=16)
    for name, cond in conds.items():
        alone = S.item_margins(tiny_llama, items, {name: cond}, batch_size=16)[name]
        np.testing.assert_allclose(together[name], alone, atol=1e-4)
    assert len({round(float(np.abs(together[n] - together["plain"]).sum()), 3) for n in conds}) == 4


def test_speed_benchmark_compares_equal_outputs(tmp_path):
    """``bench steer-eval`` on the tiny model: each comparison has both contenders, the stacked margins equal the
    one-per-forward ones, batched detect-then-steer gives the same tokens, and the JSON is written."""
    from hiddenlens.benchmarks.steer_eval import run_steer_eval_benchmark

    r = run_steer_eval_benchmark("tiny-llama", items=12, conditions=3, prompts=3, new_tokens=3, reps=1,
                                 out=str(tmp_path / "b.json"))
    assert {row["contender"] for row in r["tables"]["scoring"]} == {"one_per_forward", "stacked"}
    assert {row["contender"] for row in r["tables"]["conditional"]} == {"one_prompt_at_a_time", "batched"}
    assert r["max_margin_difference"] < 1e-4 and r["same_conditional_tokens"] and r["probe_cosine"] > 0.9
    assert (tmp_path / "b.json").exists()
