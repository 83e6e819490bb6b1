"""The arithmetic set, answer parsing and the regime experiment (tiny model end to end, embedded model once)."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from hiddenlens.analyses.arithmetic import few_shot_examples, is_correct, make_problems, parse_answer
from hiddenlens.analyses.regimes import (build_messages, chat_prompt_ids, generate_with_intention, intention_pass,
                                         paired_differences, run_regimes)
from hiddenlens.studies.intention import IntentionConfig, Result, result_of


def _evaluate(solution: str) -> int:
    """Recompute the answer from the worked solution's arithmetic (independent of the generator's variables)."""
    value = None
    for a, op, b, res in re.findall(r"(\d+) ([+\-x]) (\d+) = (\d+)", solution):
        a, b, res = int(a), int(b), int(res)
        assert {"+": a + b, "-": a - b, "x": a * b}[op] == res
        value = res
    return value


def test_problem_set_is_seeded_exact_and_levelled():
    a, b = make_problems(60, seed=3), make_problems(60, seed=3)
    assert a == b and make_problems(60, seed=4) != a
    assert len({p.question for p in a}) == 60
    assert {p.level for p in a} == {1, 2, 3}
    for p in a:
        assert _evaluate(p.solution) == p.answer >= 0
        assert p.solution.endswith(f"#### {p.answer}")
    shots = {p.question for p in few_shot_examples(5)}
    assert not shots & {p.question for p in make_problems(200)}


def test_problem_set_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        make_problems(0)
    with pytest.raises(ValueError, match="levels"):
        make_problems(3, levels=(4,))


@pytest.mark.parametrize("text, mode, expected", [
    ("Step 1: 3 + 4 = 7.\n#### 7", "last", 7),
    ("12 + 7 = 19 so the answer is 19.", "last", 19),
    ("The answer: $1,250", "last", 1250),
    ("19", "first", 19),
    (" 42 apples, from 40 + 2", "first", 42),
    ("first 3 then 5 then 8", "last", 8),
    ("no number here", "last", None),
    ("#### -3", "last", -3),
])
def test_parse_answer(text, mode, expected):
    assert parse_answer(text, mode) == expected


def test_is_correct_needs_exact_value():
    assert is_correct("#### 19", 19) and not is_correct("#### 18", 19) and not is_correct("none", 19)


def test_messages_put_shots_before_the_question(tiny_llama):
    probs, shots = make_problems(1), few_shot_examples(2)
    msgs = build_messages(probs[0], "cot", shots)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[1]["content"].endswith(f"#### {shots[0].answer}") and probs[0].question in msgs[-1]["content"]
    assert build_messages(probs[0], "direct", shots)[1]["content"] == str(shots[0].answer)
    ids = chat_prompt_ids(tiny_llama.tokenizer, msgs)
    assert tiny_llama.tokenizer.decode(ids).endswith("assistant\n")
    with pytest.raises(ValueError, match="unknown regime"):
        build_messages(probs[0], "sing")


def test_generation_prefill_state_equals_a_separate_forward_pass(tiny_llama):
    probs = make_problems(5)
    prompts = [chat_prompt_ids(tiny_llama.tokenizer, build_messages(p, "direct")) for p in probs]
    gen = generate_with_intention(tiny_llama, prompts, [1, 3], max_new_tokens=3, batch_size=2, post_collapse=True)
    ref = intention_pass(tiny_llama, prompts, [1, 3], batch_size=5)
    assert np.allclose(gen["states"], ref["states"], atol=1e-4)
    assert np.allclose(gen["h_int"], ref["h_int"], atol=1e-4)
    assert np.allclose(gen["h_int_full"], ref["h_int_full"], atol=1e-4)
    assert (gen["n_new"] >= 1).all() and (gen["n_new"] <= 3).all()
    assert gen["post_states"].shape == (5, 2, 64) and not np.allclose(gen["post_states"], gen["states"])


def test_regime_run_writes_a_complete_report(tiny_llama, tmp_path):
    seen = []
    res = run_regimes(tiny_llama, make_problems(12), shots=1, batch_size=6, n_boot=100, progress=False,
                      max_new_tokens={"direct": 2, "cot": 3, "babble": 2}, post_collapse=True,
                      on_regime=lambda r: seen.append(len(r.regimes)))
    assert seen == [1, 2, 3]
    assert len(res.items) == 36 and set(res.items["regime"]) == {"direct", "cot", "babble"}
    assert res.states["cot"].shape == (12, 4, 64)
    assert ((res.items["h_int_bits"] >= 0) & (res.items["h_int_bits"] <= math.log2(100) + 1e-9)).all()
    assert len(res.dims) == 3 * 4 * 2  # regimes x layers x (pre, post)
    folder = result_of(IntentionConfig(model="tiny-llama", n=12, shots=1), res).write(tmp_path / "rep")
    names = {p.name for p in folder.iterdir()}
    assert {"items.parquet", "items.csv", "regimes.parquet", "dims.csv", "summary.json", "report.md",
            "regimes.png", "dim_eff_by_layer.png", "h_int_hist.png", "study.json"} <= names
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["config"]["shots"] == 1 and len(summary["regimes"]) == 3
    assert "paper v1" in (folder / "report.md").read_text()
    back = Result.read(folder)
    items = back.tables["items"]
    assert items[["regime", "item", "correct"]].equals(res.items[["regime", "item", "correct"]])
    assert back.summary["config"]["layers"] == [0, 1, 2, 3] and back.config.shots == 1


def test_paired_differences_have_the_known_mean():
    import pandas as pd

    items = pd.DataFrame({"regime": ["direct"] * 4 + ["cot"] * 4, "item": [0, 1, 2, 3] * 2,
                          "correct": [1, 0, 0, 0, 1, 1, 1, 0], "h_int_bits": [3.0, 3.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0]})
    diff = paired_differences(items, n_boot=200).iloc[0]
    assert diff["regime"] == "cot" and diff["d_accuracy"] == pytest.approx(0.5)
    assert diff["d_h_int_bits"] == pytest.approx(-1.5)
    assert diff["d_accuracy_ci_low"] <= 0.5 <= diff["d_accuracy_ci_high"]
    assert paired_differences(items[items.regime == "cot"]).empty


def test_regime_run_rejects_bad_layers(tiny_llama):
    with pytest.raises(ValueError, match="out of range"):
        run_regimes(tiny_llama, make_problems(2), layers=[7], progress=False)


@pytest.mark.embedded
def test_embedded_batched_generation_matches_one_at_a_time(smollm):
    probs = make_problems(3)
    prompts = [chat_prompt_ids(smollm.tokenizer, build_messages(p, "direct", few_shot_examples(1))) for p in probs]
    batched = generate_with_intention(smollm, prompts, [29], max_new_tokens=5, batch_size=3)
    for i, ids in enumerate(prompts):
        single = smollm.generate([ids], max_new_tokens=5)
        assert batched["texts"][i] == single.texts[0][: len(batched["texts"][i])]
    assert (batched["h_int"] < math.log2(100)).all()  # a trained model is far from uniform over its top 100
