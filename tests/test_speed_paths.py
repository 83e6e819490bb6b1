"""The fast paths of issue 15 item 8 give the numbers of the slow ones: BB batches drawn ahead, the few-shot prompt
prefix's KV cache reused, sink head interventions stacked in one forward; and the babble condition of item 6."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hiddenlens as hl
from hiddenlens.analyses import sinks
from hiddenlens.analyses.arithmetic import few_shot_examples, make_problems
from hiddenlens.analyses.regimes import (BABBLE_REPLIES, build_messages, chat_prompt_ids, generate_with_intention,
                                         regime_messages, run_regimes)
from hiddenlens.models.bb_task import BBGenerator
from hiddenlens.models.bb_training import sample_batches
from hiddenlens.probes.handle import common_prefix


# ---- Bigram-Backcopy data ---------------------------------------------------------------------------------------
def test_batches_drawn_ahead_are_the_per_step_samples():
    gen = BBGenerator(k=3, seq_length=16)
    ahead = sample_batches(gen, 8, 5, torch.Generator().manual_seed(3))
    rng = torch.Generator().manual_seed(3)
    one_by_one = [gen.sample(8, rng) for _ in range(5)]
    assert len(ahead) == 5 and all(torch.equal(a, b) for a, b in zip(ahead, one_by_one))
    assert not torch.equal(ahead[0], ahead[1])                                    # fresh samples every step


# ---- prefix KV-cache reuse --------------------------------------------------------------------------------------
def test_common_prefix_keeps_one_token_after_it():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == [1, 2]
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == [1, 2]                        # identical rows keep their last
    assert common_prefix([[7, 1], [8, 1]]) == []


@pytest.fixture(scope="module")
def few_shot_prompts(tiny_llama):
    examples = few_shot_examples(1)
    return [chat_prompt_ids(tiny_llama.tokenizer, build_messages(p, "direct", examples)) for p in make_problems(4)]


def test_generate_with_a_cached_prefix_equals_the_plain_path(tiny_llama, few_shot_prompts):
    prefix = tiny_llama.prefix_cache(common_prefix(few_shot_prompts))
    assert len(prefix.ids) > 100                                                   # chat header and the example
    n_cached = prefix.past.get_seq_length()
    plain = tiny_llama.generate(few_shot_prompts, max_new_tokens=3, output_scores=True)
    reused = tiny_llama.generate(few_shot_prompts, max_new_tokens=3, output_scores=True, prefix=prefix)
    assert torch.equal(plain.sequences, reused.sequences) and plain.prompt_length == reused.prompt_length
    assert plain.texts == reused.texts
    for a, b in zip(plain.scores, reused.scores):                                 # every step's logits
        assert (a - b).abs().max() < 1e-4
    assert prefix.past.get_seq_length() == n_cached                                # the shared cache is not mutated
    again = tiny_llama.generate(few_shot_prompts, max_new_tokens=3, batch_size=2, prefix=prefix)
    assert torch.equal(again.sequences, plain.sequences)


def test_a_cached_prefix_refuses_what_it_cannot_do(tiny_llama, few_shot_prompts):
    prefix = tiny_llama.prefix_cache(few_shot_prompts[0][:50])
    with pytest.raises(ValueError, match="does not start with the prefix"):
        tiny_llama.generate([few_shot_prompts[0], [5, 6, 7]], max_new_tokens=2, prefix=prefix)
    with pytest.raises(ValueError, match="inside hl.edit"):
        with hl.edit(tiny_llama, {"blocks.1.resid_post": hl.Zero()}):
            tiny_llama.generate(few_shot_prompts[:1], max_new_tokens=2, prefix=prefix)
    with pytest.raises(ValueError, match="before entering"):
        with hl.capture(tiny_llama, "blocks.1.resid_post"):
            tiny_llama.prefix_cache([1, 2, 3])


def test_intention_generation_reusing_the_prefix_equals_recomputing_it(tiny_llama, few_shot_prompts):
    kw = dict(max_new_tokens=3, batch_size=2, post_collapse=True)
    plain = generate_with_intention(tiny_llama, few_shot_prompts, [1, 3], reuse_prefix=False, **kw)
    reused = generate_with_intention(tiny_llama, few_shot_prompts, [1, 3], reuse_prefix=True, **kw)
    assert reused["texts"] == plain["texts"] and (reused["n_new"] == plain["n_new"]).all()
    for key in ("states", "post_states", "h_int", "h_int_full"):
        assert np.abs(reused[key] - plain[key]).max() < 1e-4, key


# ---- stacked head interventions ---------------------------------------------------------------------------------
def test_stacked_head_interventions_equal_one_at_a_time(tiny_llama):
    prompts = ["The quick brown fox jumps over the lazy dog.", "Attention sinks appear", "one two three four five"]
    heads = [(0, 1), (2, 0), (2, 3)]
    ref = sinks.head_ablation(tiny_llama, prompts, heads, batch_size=2, stack_rows=0)
    got = sinks.head_ablation(tiny_llama, prompts, heads, batch_size=2, stack_rows=5)  # 2-3 forwards per batch
    assert got[["layer", "head", "mode", "n_tokens", "changed_positions"]].equals(
        ref[["layer", "head", "mode", "n_tokens", "changed_positions"]])
    assert (got.ce - ref.ce).abs().max() < 1e-4
    assert ref.delta_ce.abs().max() > 1e-3                                         # the interventions do something
    with pytest.raises(ValueError, match="stack_rows"):
        sinks.head_ablation(tiny_llama, prompts, heads, stack_rows=-1)


# ---- babble that does not copy ----------------------------------------------------------------------------------
def test_babble_examples_vary_across_items_or_are_left_out():
    problems, examples = make_problems(6), few_shot_examples(2)
    varied = regime_messages(problems, "babble", examples, "varied")
    replies = [tuple(m["content"] for m in msgs if m["role"] == "assistant") for msgs in varied]
    assert all(len(r) == 2 and len(set(r)) == 2 and set(r) <= set(BABBLE_REPLIES) for r in replies)
    assert len(set(replies)) > 3                                                   # items see different examples
    assert regime_messages(problems, "babble", examples, "varied") == varied       # seeded
    none = regime_messages(problems, "babble", examples, "none")
    assert [[m["role"] for m in msgs] for msgs in none] == [["user"]] * 6          # zero-shot babble
    direct = regime_messages(problems, "direct", examples, "none")
    assert all(len(msgs) == 5 for msgs in direct)                                  # the others keep their shots
    with pytest.raises(ValueError, match="example replies"):
        build_messages(problems[0], "babble", examples)


def test_regime_run_records_the_babble_setting(tiny_llama):
    res = run_regimes(tiny_llama, make_problems(4), regimes=("babble",), shots=1, batch_size=4, n_boot=50,
                      progress=False, max_new_tokens={"babble": 2}, babble_shots="varied")
    assert res.config["babble_shots"] == "varied" and res.config["reuse_prefix"] is True
    assert res.items["prompt_tokens"].nunique() > 1
    with pytest.raises(ValueError, match="babble_shots"):
        run_regimes(tiny_llama, make_problems(2), shots=1, babble_shots="fixed", progress=False)
