"""Token replacement (docs/leakage.md): the testable facts on tiny models, plus the embedded model."""
from __future__ import annotations

import pytest
import torch

import hiddenlens as hl
from hiddenlens.interventions.replace import (MODES, compare_replacement, generate_replaced, isolated_inputs,
                                              isolated_states, locate_span, replacement, replacement_sites,
                                              run_replaced)

PROMPT = "The quick brown fox jumps over the lazy dog"


def _iso_logits(handle, span, mode="isolated"):
    ids, pos = isolated_inputs(handle, span, mode)
    return handle.run([ids], add_bos=None, position_ids=torch.tensor([pos], device=handle.device)).logits[0]


@pytest.mark.parametrize("mode", MODES)
def test_layer0_patch_is_a_noop_rope(tiny_llama, mode):
    res = run_replaced(tiny_llama, PROMPT, "brown fox", "embed", mode=mode)
    assert torch.equal(res.logits_after, res.logits_before)
    assert res.log.n_patched == 1 and res.log.by_site() == {"embed": 0.0}


def test_layer0_noop_needs_original_positions_with_absolute_position_embeddings(tiny_gpt2):
    # GPT-2 adds a position embedding to the token embedding: only the original positions give the same state 0.
    same = run_replaced(tiny_gpt2, PROMPT, "brown fox", "embed", mode="original")
    assert torch.equal(same.logits_after, same.logits_before)
    moved = run_replaced(tiny_gpt2, PROMPT, "brown fox", "embed", mode="isolated")
    assert (moved.logits_after - moved.logits_before).abs().max() > 1e-3


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_first_token_after_bos_is_already_uncontextualized(request, fixture):
    handle = request.getfixturevalue(fixture)
    span = locate_span(handle, PROMPT, "The")
    assert span.token_start == 1
    res = run_replaced(handle, PROMPT, span, f"embed,0-{handle.n_layers - 1}")
    assert (res.logits_after - res.logits_before).abs().max() < 1e-5
    assert max(res.log.by_site().values()) < 1e-5


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_final_layer_patch_at_last_position_gives_isolated_next_token_distribution(request, fixture):
    handle = request.getfixturevalue(fixture)
    span = locate_span(handle, PROMPT, "lazy dog")
    res = run_replaced(handle, PROMPT, span, -1, tokens="last")
    iso = _iso_logits(handle, span)[-1]
    assert (res.logits_after[-1] - iso).abs().max() < 1e-5
    assert (res.logits_before[-1] - iso).abs().max() > 1e-2  # the context did matter before the patch
    # earlier positions are untouched by a last-layer, last-token patch
    assert torch.equal(res.logits_after[:-1], res.logits_before[:-1])


def test_original_mode_positions_and_states(tiny_gpt2):
    span = locate_span(tiny_gpt2, PROMPT, "lazy dog")
    ids, pos = isolated_inputs(tiny_gpt2, span, "original")
    assert ids[0] == tiny_gpt2.tokenizer.bos_token_id and pos == [0] + span.positions
    iso = isolated_states(tiny_gpt2, span, ["embed", 1], "isolated")
    orig = isolated_states(tiny_gpt2, span, ["embed", 1], "original")
    assert iso.shape == (2, span.n_tokens, 64)
    assert (iso - orig).abs().max() > 1e-3  # absolute position embeddings differ


def test_span_mapping_char_ranges_substrings_and_errors(tiny_llama):
    span = locate_span(tiny_llama, PROMPT, "brown fox")
    by_range = locate_span(tiny_llama, PROMPT, (10, 19))
    assert span == by_range
    assert tiny_llama.tokenizer.decode(span.span_ids).strip() == "brown fox"
    assert span.n_tokens > 2  # a multi-token span in the tiny tokenizer
    first = locate_span(tiny_llama, PROMPT, "The", add_bos=False)
    assert first.token_start == 0
    second = locate_span(tiny_llama, "the cat and the dog", "the", occurrence=1)
    assert second.char_start == 12
    with pytest.raises(ValueError, match="not in the prompt"):
        locate_span(tiny_llama, PROMPT, "zebra")
    with pytest.raises(ValueError, match="cuts through token"):
        locate_span(tiny_llama, "The quick brown", "uic")
    with pytest.raises(ValueError, match="empty span"):
        locate_span(tiny_llama, PROMPT, "")
    with pytest.raises(ValueError, match="position >= 1"):
        isolated_inputs(tiny_llama, first, "original")


def test_layer_parsing_and_bad_input(tiny_llama):
    assert replacement_sites((1, 3), 4) == [f"blocks.{l}.resid_post" for l in (1, 2, 3)]
    assert replacement_sites("embed,2-3", 4) == ["embed", "blocks.2.resid_post", "blocks.3.resid_post"]
    assert replacement_sites(["embed"], 4) == ["embed"] and replacement_sites(-1, 4) == ["blocks.3.resid_post"]
    with pytest.raises(ValueError, match="out of range"):
        replacement_sites(4, 4)
    with pytest.raises(ValueError, match="reversed"):
        replacement_sites((3, 1), 4)
    span = locate_span(tiny_llama, PROMPT, "fox")
    with pytest.raises(ValueError, match="tokens="):
        with replacement(tiny_llama, span, 1, tokens="first"):
            pass
    with pytest.raises(ValueError, match="no padding"):
        with replacement(tiny_llama, span, 1):
            tiny_llama.run(["a different prompt"], add_bos=True)


def test_replacement_during_generate_patches_prompt_pass_only(tiny_llama):
    span = locate_span(tiny_llama, PROMPT, "lazy dog")
    before, _ = generate_replaced(tiny_llama, span, (0, 3), max_new_tokens=4, replace=False)
    after, log = generate_replaced(tiny_llama, span, (0, 3), max_new_tokens=4)
    assert log.n_patched == 4 and {e["offset"] for e in log.events} == {0}  # the prompt pass, 4 states
    # the first generated token is the argmax of the patched prompt pass
    res = run_replaced(tiny_llama, PROMPT, span, (0, 3))
    assert int(after.new_tokens[0, 0]) == int(res.logits_after[-1].argmax())
    assert int(before.new_tokens[0, 0]) == int(res.logits_before[-1].argmax())
    # hooks are gone afterwards
    again, _ = generate_replaced(tiny_llama, span, (0, 3), max_new_tokens=4, replace=False)
    assert torch.equal(again.sequences, before.sequences)


def test_capture_inside_replacement_sees_replaced_states(tiny_llama):
    span = locate_span(tiny_llama, PROMPT, "brown fox")
    iso = isolated_states(tiny_llama, span, [1])
    with replacement(tiny_llama, span, 1):
        with hl.capture(tiny_llama, "blocks.1.resid_post") as cache:
            tiny_llama.run([list(span.input_ids)], add_bos=None, logits=False)
    assert torch.allclose(cache["blocks.1.resid_post"][0, span.token_start:span.token_end], iso[0])


@pytest.mark.embedded
def test_embedded_replacement_facts_and_comparison(smollm):
    prompt = "He likes yellow. His father works as a"
    span = locate_span(smollm, prompt, "yellow")
    assert smollm.tokenizer.decode(span.span_ids) == " yellow"
    with pytest.raises(ValueError, match="cuts through token"):
        locate_span(smollm, prompt, "ellow")
    noop = run_replaced(smollm, prompt, span, "embed")
    assert torch.equal(noop.logits_after, noop.logits_before)
    first = run_replaced(smollm, prompt, "He", f"embed,0-{smollm.n_layers - 1}")
    assert (first.logits_after - first.logits_before).abs().max() < 1e-3
    target = locate_span(smollm, prompt, "His father works as a")
    last = run_replaced(smollm, prompt, target, -1, tokens="last")
    assert (last.logits_after[-1] - _iso_logits(smollm, target)[-1]).abs().max() < 1e-3
    cmp = compare_replacement(smollm, prompt, target, (0, smollm.n_layers - 1), max_new_tokens=3, top_k=5)
    assert cmp.kl_after_before > 0 and len(cmp.table) >= 5
    assert cmp.continuation_before and cmp.continuation_after


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_replacement_is_the_same_edit_on_every_backend(tiny_llama, backend):
    other = tiny_llama.with_backend(backend)
    ref = run_replaced(tiny_llama, PROMPT, "lazy dog", (1, 3))
    got = run_replaced(other, PROMPT, "lazy dog", (1, 3))
    assert (ref.logits_after - got.logits_after).abs().max() < 1e-4
    assert (ref.logits_after - ref.logits_before).abs().max() > 1e-3
