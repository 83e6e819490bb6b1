"""The steering evaluation set (``hiddenlens.analyses.fact_items``): shipped data, entity splits, wrong-answer
draws and continuation scoring with known answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hiddenlens.analyses import fact_items as F
from hiddenlens.common.stats import log_probs


@pytest.fixture(scope="module")
def items():
    return F.fact_items(seed=0)


# ---- data ---------------------------------------------------------------------------------------------------
def test_every_country_once_with_all_fields():
    table = F.load_country_facts()
    assert table.country.is_unique and 190 <= len(table) <= 200
    for col in ("country", *F.FIELDS):
        assert (table[col].str.strip() != "").all(), f"empty {col}"
        assert table[col].map(str.isascii).all(), f"non-ASCII {col}"
    assert set(table.continent) == {"Africa", "Asia", "Europe", "North America", "South America", "Oceania"}
    assert set(table.article) <= {"", "the"}
    row = table.set_index("country").loc["France"]
    assert (row.capital, row.continent, row.currency, row.language) == ("Paris", "Europe", "euro", "French")
    for also in table.also:
        assert all(pair.split("=", 1)[0] in F.FIELDS for pair in filter(None, also.split(";"))), also


def test_misconceptions_are_complete_and_short():
    table = F.load_misconceptions()
    assert len(table) >= 100 and table.id.is_unique and table.question.is_unique
    for col in ("id", "question", "true_answer", "false_answer", "category", "source_note"):
        assert (table[col].str.strip() != "").all(), f"empty {col}"
    for col in ("true_answer", "false_answer"):
        assert table[col].str.split().str.len().between(1, 5).all(), col
    assert (table.true_answer != table.false_answer).all()
    row = table[table.question == "What color is a polar bear's skin?"].iloc[0]
    assert (row.true_answer, row.false_answer) == ("black", "white")


# ---- items and splits ----------------------------------------------------------------------------------------
def test_items_have_every_family_and_no_empty_field(items):
    assert list(items.columns) == F.COLUMNS
    assert set(items.family) == set(F.FAMILIES) and items.item_id.is_unique
    assert (items[F.COLUMNS].map(lambda v: isinstance(v, str) and v.strip() != "")).all().all()
    assert items.correct.str.startswith(" ").all() and items.wrong.str.startswith(" ").all()
    fr = items[items.entity == "France"].set_index("family")
    assert fr.loc["capital", "prompt"] == "The capital of France is" and fr.loc["capital", "correct"] == " Paris"
    us = items[items.entity == "United States"].set_index("family")
    assert us.loc["capital", "prompt"] == "The capital of the United States is"
    assert us.loc["continent", "prompt"] == "The United States is a country in"
    mc = items[items.entity == "mc001"].iloc[0]
    assert (mc.prompt, mc.correct, mc.wrong) == ("Q: What color is a polar bear's skin?\nA:", " black", " white")


def test_splits_are_disjoint_by_entity_and_sized(items):
    assert (items.groupby("entity").split.nunique() == 1).all(), "an entity appears in two splits"
    for fam, g in items.groupby("family"):
        share = g.split.value_counts(normalize=True)
        assert abs(share["train"] - 0.5) < 0.02 and abs(share["val"] - 0.25) < 0.02, fam


def test_items_are_deterministic_and_seeded(items):
    assert F.fact_items(seed=0).equals(items)
    other = F.fact_items(seed=1)
    assert not other.split.equals(items.split) and not other.wrong.equals(items.wrong)
    assert F.fact_items("currency", seed=0).reset_index(drop=True).equals(
        items[items.family == "currency"].reset_index(drop=True))


def test_wrong_answers_are_false_and_from_the_same_split(items):
    assert (items.wrong != items.correct).all()
    table = F.load_country_facts().set_index("country")
    countries = items[items.family != "misconception"]
    for fam, g in countries.groupby("family"):
        answers = {s: set(" " + table.loc[h.entity, fam]) for s, h in g.groupby("split")}
        for r in g.itertuples():
            assert r.wrong in answers[r.split], f"{r.item_id}: {r.wrong!r} is not an answer of its split"
            also = F._also(table.loc[r.entity]).get(fam, set())
            assert r.wrong.strip() not in also, f"{r.item_id}: {r.wrong!r} is also true"
    canada = countries[(countries.entity == "Canada") & (countries.family == "language")].iloc[0]
    assert canada.wrong != " French"


def test_generic_forms_are_never_wrong_answers():
    assert not F._may_be_wrong("dollar", "US dollar", set())
    assert not F._may_be_wrong("franc", "CFA franc", set())
    assert not F._may_be_wrong("French", "English", {"French"})
    assert F._may_be_wrong("US dollar", "dollar", set())


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="unknown fact families"):
        F.fact_items(["capitals"])


# ---- scoring -----------------------------------------------------------------------------------------------
def test_answer_tokens_merge_with_the_prompt(tiny_llama):
    tok = tiny_llama.tokenizer
    ids, n = F.answer_token_ids(tok, "The capital of France is", " Paris")
    assert ids == tok("The capital of France is Paris")["input_ids"]
    assert n == len(ids) - len(tok("The capital of France is")["input_ids"]) and n >= 1
    with pytest.raises(ValueError, match="does not tokenise as a continuation"):
        F.answer_token_ids(tok, "The capital of France is", "")


def test_continuation_logprob_equals_a_hand_computed_sum(tiny_llama):
    prompts = ["The capital of France is", "Q: What color is a polar bear's skin?\nA:", "2 + 2 ="]
    answers = [" Paris", " black", " four"]
    got = F.continuation_logprobs(tiny_llama, prompts, answers, batch_size=2)
    model = tiny_llama.hf_model
    for p, a, value in zip(prompts, answers, got):
        ids, n = F.answer_token_ids(tiny_llama.tokenizer, p, a)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()           # [pos, vocab], unpadded
        lp = log_probs(logits)
        want = sum(float(lp[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids)))
        assert value == pytest.approx(want, abs=1e-4)


def test_score_items_is_finite_and_compares(tiny_llama, items):
    sample = items.groupby("family").head(4)
    scored = F.score_items(tiny_llama, sample, batch_size=8)
    assert np.isfinite(scored[["logp_correct", "logp_wrong"]].to_numpy()).all()
    assert (scored[["logp_correct", "logp_wrong"]] < 0).all().all()
    assert (scored.model_right == (scored.logp_correct > scored.logp_wrong)).all()
    table = F.accuracy_table(scored)
    overall = table[table.split == "all"].set_index("family")
    assert (overall.n == 4).all() and ((overall.accuracy * 4).round() == 4 - overall.n_wrong).all()


@pytest.mark.embedded
def test_embedded_model_gets_some_items_right_and_some_wrong(smollm, items):
    sample = items.sample(20, random_state=0)
    scored = F.score_items(smollm, sample)
    assert np.isfinite(scored[["logp_correct", "logp_wrong"]].to_numpy()).all()
    assert scored.model_right.any() and not scored.model_right.all()


def test_limit_keeps_the_first_items_of_each_family_and_split(items):
    few = F.fact_items(["capital", "misconception"], seed=0, limit=3)
    assert few.groupby(["family", "split"]).size().eq(3).all() and len(few) == 2 * 3 * 3
    full = items[items.family.isin(["capital", "misconception"])]
    expected = full.groupby(["split", "family"], sort=False).head(3)
    assert set(few.item_id) == set(expected.item_id)  # the first in the shipped order, splits unchanged
    with pytest.raises(ValueError, match="limit=0"):
        F.fact_items(limit=0)
