"""Latent iteration ("Think-at-Hard: Selective Latent Iterations to Improve Reasoning Language Models" (arXiv 2511.08577)): duo-causal mask, soft embedding, Coconut off-by-one, exact TaH
iteration against a full-slot reference forward, deciders and the evaluation metrics."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from hiddenlens.analyses.iteration import summarize
from hiddenlens.studies.iteration import IterationConfig, Result, evaluate_iteration, result_of
from hiddenlens.common.stats import auroc, entropy
from hiddenlens.common.errors import DamagedFileError
from hiddenlens.interventions import decider as decider_module
from hiddenlens.interventions.decider import (DEFAULT_SITES, EntropyDecider, MaskDecider, MLPDeciderConfig,
                                              cached_decider, cached_decider_dir, decider_dataset, default_sites,
                                              load_decider, prose_chunks, save_decider, train_mlp_decider)
from hiddenlens.interventions.iterate import (DeciderInput, additive_mask, coconut_loop, continuous_thoughts,
                                              duo_causal_allowed, first_pass, hidden_state_site, iterate_from,
                                              iterate_teacher_forced, mean_embedding_norm, soft_embedding)

TEXT = "The quick brown fox jumps over the lazy dog and runs into the forest"


def _slots(T, n_iter):
    pos = torch.arange(T).repeat(n_iter)
    it = torch.arange(n_iter).repeat_interleave(T)
    return pos, it


def test_duo_causal_mask_cases():
    k_pos, k_iter = _slots(4, 3)  # positions 0..3, iterations 0..2
    allowed = duo_causal_allowed(torch.tensor([2]), torch.tensor([1]), k_pos, k_iter)[0]
    ok = {(int(p), int(i)) for p, i, a in zip(k_pos, k_iter, allowed) if a}
    assert (0, 0) in ok and (2, 1) in ok and (2, 0) in ok and (1, 1) in ok
    assert not any(p == 3 for p, _ in ok)  # no future position, at any iteration
    assert not any(i == 2 for _, i in ok)  # no deeper iteration
    assert ok == {(p, i) for p in range(3) for i in range(2)}
    # depth 0 reduces to the standard causal mask
    q = torch.arange(5)
    causal = duo_causal_allowed(q, torch.zeros(5, dtype=torch.long), q, torch.zeros(5, dtype=torch.long))
    assert torch.equal(causal, torch.ones(5, 5, dtype=torch.bool).tril())
    # invalid slots are never attended
    valid = torch.tensor([1, 0, 1, 1, 1])
    assert not duo_causal_allowed(q, torch.zeros(5, dtype=torch.long), q, torch.zeros(5, dtype=torch.long),
                                  valid)[:, 1].any()
    m = additive_mask(causal, torch.float32)
    assert m.shape == (1, 1, 5, 5) and m[0, 0, 0, 1] == torch.finfo(torch.float32).min and m[0, 0, 1, 0] == 0


def test_soft_embedding_dominant_logit_and_k1():
    torch.manual_seed(0)
    E = torch.randn(500, 32)
    logits = torch.randn(3, 500)
    logits[torch.arange(3), torch.tensor([7, 99, 411])] += 100.0
    out = soft_embedding(logits, E, k=100)
    assert (out - E[[7, 99, 411]]).norm(dim=-1).max() < 1e-4
    plain = torch.randn(2, 500)
    assert torch.equal(soft_embedding(plain, E, k=1), E[plain.argmax(-1)])
    # k = vocab is softmax(z) @ E
    full = soft_embedding(plain, E, k=500)
    assert torch.allclose(full, torch.softmax(plain, -1) @ E, atol=1e-5)
    with pytest.raises(ValueError, match="k="):
        soft_embedding(plain, E, k=0)
    with pytest.raises(ValueError, match="classes"):
        soft_embedding(plain, E[:10], k=5)


def test_coconut_identity_stub_repeats_last_prompt_embedding():
    prompt = torch.randn(1, 5, 8)

    def step(embeds):  # last hidden state == its last input embedding
        return embeds[0, -1], torch.zeros(11)

    thoughts, _ = coconut_loop(step, prompt, n_latent=3)
    assert len(thoughts) == 3 and all(torch.equal(t, prompt[0, -1]) for t in thoughts)
    scaled, _ = coconut_loop(step, prompt, n_latent=2, rescale_to=2.0)
    assert all(abs(float(t.norm()) - 2.0) < 1e-5 for t in scaled)


def test_coconut_off_by_one_on_a_real_model(tiny_llama):
    m = tiny_llama.hf_model
    res = continuous_thoughts(tiny_llama, "The quick brown", n_latent=3, max_new_tokens=3)
    ids = tiny_llama.tokenize(["The quick brown"], add_bos=True).input_ids
    E = m.get_input_embeddings()
    with torch.no_grad():
        for k in range(3):  # thought k = hidden_states[-1] at the last slot of [prompt, thoughts[:k]]
            emb = torch.cat([E(ids)[0], res.thoughts[:k]])
            hs = m(inputs_embeds=emb[None], output_hidden_states=True).hidden_states[-1][0, -1]
            assert (hs - res.thoughts[k]).abs().max() < 1e-5
        first = m(inputs_embeds=torch.cat([E(ids)[0], res.thoughts])[None]).logits[0, -1].argmax()
    assert res.new_tokens[0] == int(first) and len(res.thought_tokens) == 3
    rescaled = continuous_thoughts(tiny_llama, "The quick brown", n_latent=2, rescale=True, max_new_tokens=1)
    assert torch.allclose(rescaled.thoughts.norm(dim=-1), torch.tensor(mean_embedding_norm(tiny_llama)), rtol=1e-4)


class _Always:
    threshold, sites = 0.5, ()

    def score(self, inp):
        return torch.ones(len(inp.positions))


def test_tah_iteration_matches_a_full_slot_reference_forward(tiny_llama):
    m = tiny_llama.hf_model
    ids = tiny_llama.tokenize([TEXT], add_bos=True).input_ids[0]
    T = len(ids)
    with torch.inference_mode():
        res = iterate_teacher_forced(tiny_llama, ids, _Always(), max_iter=3, k=10)
        E = m.get_input_embeddings().weight
        z0 = m(input_ids=ids[None]).logits[0]
        embs, cum = [E[ids]], z0.clone()
        for depth in (1, 2):  # every slot in one non-cached forward under the duo-causal mask
            embs.append(soft_embedding(cum, E, 10))
            pos, it = _slots(T, depth + 1)
            mask = additive_mask(duo_causal_allowed(pos, it, pos, it), torch.float32)
            z = m(inputs_embeds=torch.cat(embs)[None], position_ids=pos[None], attention_mask=mask).logits[0]
            cum = cum + z[depth * T:]
    assert (res.logits - cum).abs().max() < 1e-4
    assert torch.equal(res.pred0, z0.argmax(-1))
    assert (res.depth == 2).all() and len(res.iterated) == 2


def test_selective_iteration_touches_only_chosen_positions(tiny_llama):
    ids = tiny_llama.tokenize([TEXT], add_bos=True).input_ids[0]
    chosen = torch.zeros(len(ids), dtype=torch.bool)
    chosen[[3, 7]] = True
    with torch.inference_mode():
        fp = first_pass(tiny_llama, ids)
        res = iterate_from(tiny_llama, fp, MaskDecider(chosen), max_iter=4)
        never = iterate_from(tiny_llama, fp, MaskDecider(torch.zeros_like(chosen)), max_iter=4)
    assert torch.equal(res.depth > 0, chosen) and res.depth.max() == 1  # MaskDecider stops after depth 1
    assert torch.equal(res.logits[~chosen], fp.logits[~chosen])
    assert not torch.allclose(res.logits[chosen], fp.logits[chosen])
    assert torch.equal(never.logits, fp.logits) and fp.cache.get_seq_length() == len(ids)
    with pytest.raises(ValueError, match="max_iter"):
        iterate_from(tiny_llama, fp, MaskDecider(chosen), max_iter=0)


def test_entropy_decider_and_sites():
    uniform = torch.zeros(2, 1000)
    assert torch.allclose(entropy(uniform), torch.full((2,), math.log(1000)))
    dec = EntropyDecider(threshold=1.0)
    peaked = torch.tensor([[50.0] + [0.0] * 999])
    inp = DeciderInput(torch.arange(3), 0, torch.cat([uniform, peaked]), {})
    assert (dec.score(inp) > dec.threshold).tolist() == [True, True, False]
    assert hidden_state_site(0, 30) == "embed" and hidden_state_site(30, 30) == "final_norm"
    assert hidden_state_site(5, 30) == "blocks.4.resid_post"
    with pytest.raises(ValueError, match="out of range"):
        hidden_state_site(31, 30)
    with pytest.raises(ValueError, match="finite"):
        EntropyDecider(float("nan"))


def test_mlp_decider_learns_a_known_rule_and_round_trips(tmp_path):
    torch.manual_seed(0)
    n, d, k = 800, 8, 5
    feats = torch.randn(n, 2 * d + k)
    labels = (feats[:, 3] + 0.5 * feats[:, d + 1] > 0.8).float()  # depends on two hidden-state features
    cfg = MLPDeciderConfig(sites=["blocks.0.resid_post", "blocks.1.resid_post"], d_model=d, topk=k, hidden=16,
                           n_blocks=1)
    dec = train_mlp_decider(feats, labels, cfg, epochs=12, lr=3e-3, progress=False)
    assert dec.config.metrics["val_auroc"] > 0.95
    save_decider(dec, tmp_path)
    again = load_decider(tmp_path, threshold=0.7)
    assert again.threshold == 0.7 and again.sites == ["blocks.0.resid_post", "blocks.1.resid_post"]
    with torch.no_grad():
        assert torch.equal(again(feats[:10]), dec(feats[:10]))
    with pytest.raises(ValueError, match="trained for this model"):
        again(feats[:, :-1])
    with pytest.raises(FileNotFoundError, match="train-decider"):
        load_decider(tmp_path / "missing")
    with pytest.raises(ValueError, match="single class"):
        train_mlp_decider(feats, torch.zeros(n), cfg, epochs=1, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        train_mlp_decider(feats * float("nan"), labels, cfg, epochs=1, progress=False)


def test_default_sites_scale_tah_depths_to_the_model():
    assert default_sites(30) == list(DEFAULT_SITES)  # TaH's hidden_states 2, 10, 18, 26 of 30 blocks
    assert default_sites(4) == ["blocks.0.resid_post", "blocks.1.resid_post", "blocks.2.resid_post"]
    assert default_sites(1) == ["blocks.0.resid_post"]
    with pytest.raises(ValueError, match="n_layers"):
        default_sites(0)


@pytest.fixture
def decider_cache(monkeypatch, tmp_path):
    """A private user cache and a small recipe for the cached decider."""
    monkeypatch.setenv("HIDDENLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(decider_module, "CACHE_RECIPE",
                        dict(decider_module.CACHE_RECIPE, chunks=8, seq_len=64, epochs=2))
    return tmp_path / "cache"


def test_cached_decider_trains_once_per_weights_and_never_loads_a_damaged_one(tiny_llama, decider_cache,
                                                                              monkeypatch):
    seen = []
    dec = cached_decider(tiny_llama, progress=lambda f, what: seen.append(f))
    folder = cached_decider_dir(tiny_llama)
    assert folder == decider_cache / "deciders" / tiny_llama.info["weights_sha256"]
    assert dec.sites == default_sites(4) and dec.config.model == "tiny-llama"
    assert dec.config.metrics["n_train"] + dec.config.metrics["n_val"] == 8 * 63  # every position with a next token
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) > 5
    train = decider_module.train_decider_for

    def no_training(*a, **k):
        raise AssertionError("the cached decider was trained again")

    monkeypatch.setattr(decider_module, "train_decider_for", no_training)
    again = cached_decider(tiny_llama, threshold=0.9, progress=False)
    assert again.threshold == 0.9
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), dec.state_dict().values()))
    weights = folder / "decider.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:100])
    with pytest.raises(DamagedFileError, match="damaged or truncated"):
        load_decider(folder)
    with pytest.raises(AssertionError, match="trained again"), pytest.warns(UserWarning, match="training it again"):
        cached_decider(tiny_llama, progress=False)
    monkeypatch.setattr(decider_module, "train_decider_for", train)
    with pytest.warns(UserWarning, match="training it again"):
        cached_decider(tiny_llama, progress=False)
    assert weights.stat().st_size == len(good) and load_decider(folder).sites == dec.sites


def test_train_decider_cli_writes_the_cache_by_default(tiny_llama, decider_cache):
    from hiddenlens.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train-decider", "--model", "tiny-llama", "--chunks", "8", "--seq-len", "48", "--epochs", "1"])
    assert exit_info.value.code == 0
    metrics = load_decider(cached_decider_dir(tiny_llama)).config.metrics
    assert metrics["n_train"] + metrics["n_val"] == 8 * 47 and metrics["epochs"] == 1


def test_summary_metrics_on_a_known_token_table():
    # 10 tokens: 4 wrong at first (2 fixed), 6 right at first (1 broken); 5 iterated
    t = pd.DataFrame({"decider": "x", "first_correct": [False] * 4 + [True] * 6,
                      "final_correct": [True, True, False, False, False, True, True, True, True, True],
                      "depth": [1, 1, 1, 0, 1, 1, 0, 0, 0, 0], "score": [.9, .8, .7, .1, .6, .5, .2, .2, .1, .1]})
    t["fixed"] = ~t.first_correct & t.final_correct
    t["broken"] = t.first_correct & ~t.final_correct
    s = summarize(t).iloc[0]
    assert s.share_iterated == 0.5 and s.fix_rate == 0.5 and abs(s.break_rate - 1 / 6) < 1e-12
    assert s.acc_first == 0.6 and s.acc_final == 0.7 and abs(s.fix_rate_iterated - 2 / 3) < 1e-12
    assert s.recall_mispredicted == 0.75 and s.auroc == pytest.approx(auroc(~t.first_correct, t.score))


def test_evaluation_report_on_tiny(tiny_llama, tmp_path):
    chunks = prose_chunks(tiny_llama, "eval", 2, 24)
    assert len(chunks) == 2 and all(len(c) == 24 for c in chunks)
    assert prose_chunks(tiny_llama, "train", 1, 24)[0] != chunks[0]
    ev = evaluate_iteration(tiny_llama, chunks, {"entropy": EntropyDecider(5.0)}, progress=False)
    s = ev.summary.set_index("decider")
    assert list(s.index) == ["always", "entropy", "oracle"]
    assert s.loc["always", "share_iterated"] == 1.0
    oracle = ev.tokens[ev.tokens.decider == "oracle"]
    assert not oracle.broken.any()  # the oracle iterates only mispredicted tokens, so it cannot break one
    assert ((oracle.depth > 0) == ~oracle.first_correct).all()
    result_of(IterationConfig(model="tiny-llama", chunks=2, seq_len=24), ev).write(tmp_path)
    assert {"summary.json", "iteration.png", "report.md", "tokens.parquet", "study.json"} <= {
        p.name for p in tmp_path.iterdir()}
    back = Result.read(tmp_path)
    assert back.config.chunks == 2 and list(back.tables["summary"].decider) == ["always", "entropy", "oracle"]


@pytest.mark.embedded
def test_embedded_iteration_and_decider_data(smollm):
    ids = prose_chunks(smollm, "eval", 1, 48)[0]
    with torch.inference_mode():
        fp = first_pass(smollm, ids, ["blocks.1.resid_post", "blocks.9.resid_post"])
        plain = smollm.hf_model(input_ids=torch.tensor([ids])).logits[0].float()
        assert (fp.logits - plain).abs().max() < 1e-3
        res = iterate_from(smollm, fp, EntropyDecider(2.0), max_iter=2)
    share = float((res.depth > 0).float().mean())
    assert 0.0 < share < 1.0
    assert torch.equal(res.logits[res.depth == 0], fp.logits[res.depth == 0])
    feats, labels, ents = decider_dataset(smollm, [ids], ["blocks.1.resid_post", "blocks.9.resid_post"], k=100,
                                          progress=False)
    assert feats.shape == (47, 2 * 576 + 100) and 0 < labels.mean() < 1
    assert auroc(labels.numpy(), ents.numpy()) > 0.5  # entropy ranks mispredictions above chance
    th = continuous_thoughts(smollm, "2 + 2 =", n_latent=2, rescale=True, max_new_tokens=3)
    assert th.thoughts.shape == (2, 576) and len(th.new_tokens) >= 1
