"""Reads and edits belong to the thread that opened them: concurrent users of one handle each get their own result.

Known answers: every job is first run alone (sequentially) as its reference; then 3 threads run 100 jobs each, mixed
(captures, edits, an attention-pattern read that switches one layer to eager attention, edited generation), on the
same handle at the same time. Every result must equal its reference exactly, and no hook may be left behind.
"""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import hiddenlens as hl
from hiddenlens.probes import context

PROMPTS = ["The capital of France is", "In the beginning the", "A", "def fibonacci(n):", "Once upon a time, in a"]


def _vec(d, seed):
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def job(handle, kind: str, i: int):
    """One unit of work; returns the tensors it produced (CPU)."""
    prompts = [PROMPTS[i % len(PROMPTS)], PROMPTS[(i + 2) % len(PROMPTS)]][: 1 + i % 2]
    d = handle.adapter.d_model
    if kind == "capture":
        with hl.capture(handle, ["blocks.*.resid_post", "logits"], positions="last") as cache:
            handle.run(prompts)
        return [cache["blocks.1.resid_post"], cache["logits"]]
    if kind == "edit":
        with hl.edit(handle, {"blocks.1.resid_post": hl.Add(_vec(d, i))}), \
                hl.capture(handle, ["blocks.1.resid_post", "blocks.3.resid_post"]) as cache:
            logits = handle.run(prompts).logits
        return [logits, cache["blocks.1.resid_post"], cache["blocks.3.resid_post"]]
    if kind == "pattern":
        with hl.capture(handle, ["blocks.2.attn.pattern", "blocks.0.attn.z"]) as cache:
            logits = handle.run(prompts).logits
        return [logits, cache["blocks.2.attn.pattern"], cache["blocks.0.attn.z"]]
    if kind == "ablate":
        with hl.edit(handle, {"blocks.2.attn.z": hl.Zero()}, heads=[i % handle.adapter.n_heads]):
            return [handle.run(prompts, logits=True).logits]
    if kind == "generate":
        with hl.edit(handle, {"blocks.0.resid_post": hl.Add(_vec(d, i) * 3)}, positions=slice(2, None)), \
                hl.capture(handle, ["blocks.2.resid_post"], positions="last") as cache:
            gen = handle.generate(prompts, max_new_tokens=3)
        return [gen.sequences, cache["blocks.2.resid_post"]]
    raise ValueError(kind)


KINDS = ("capture", "edit", "pattern", "ablate", "generate")


@pytest.mark.parametrize("n_threads", [3])
def test_concurrent_captures_and_edits_equal_their_sequential_reference(tiny_llama, n_threads):
    h = tiny_llama
    plan = [(KINDS[(7 * j + t) % len(KINDS)], j) for t in range(n_threads) for j in range(100)]
    random.Random(0).shuffle(plan)
    unique = sorted(set(plan))
    chunks = [plan[t::n_threads] for t in range(n_threads)]

    def worker(items):
        return [(key, job(h, *key)) for key in items]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # three Python threads on two cores; the reference with the same kernels
    try:
        reference = {key: job(h, *key) for key in unique}
        with ThreadPoolExecutor(n_threads) as pool:
            results = [r for rs in pool.map(worker, chunks) for r in rs]
    finally:
        torch.set_num_threads(threads)
    assert len(results) == len(plan)
    wrong = [key for key, got in results
             if len(got) != len(reference[key]) or not all(torch.equal(a, b) for a, b in zip(got, reference[key]))]
    worst = max((float((a.float() - b.float()).abs().max()) for key, got in results if key in wrong
                 for a, b in zip(got, reference[key]) if a.shape == b.shape), default=0.0)
    assert not wrong, (f"{len(wrong)} of {len(results)} concurrent results differ from their reference "
                       f"(largest difference {worst:.3g}): {wrong[:5]}")
    assert h.backend.hooks.installed == 0
    assert h.hf_model.config._attn_implementation != "hiddenlens_sdpa"
    assert not context.open_blocks(h)


def test_blocks_of_another_thread_are_invisible(tiny_llama):
    """A capture open in thread A sees none of thread B's forwards, and B's forward is not edited by A's edit."""
    import threading

    h = tiny_llama
    plain = h.run(["hello world"]).logits
    opened, done = threading.Event(), threading.Event()
    seen = {}

    def holder():
        try:
            with hl.capture(h, "blocks.0.resid_post", require_all=False) as cache, \
                    hl.edit(h, {"blocks.0.resid_post": hl.Zero()}):
                opened.set()
                done.wait(30)
        except hl.EditNotAppliedError as exc:  # the edit never ran in its own thread: said loudly
            seen["error"] = str(exc)
        seen["fired"] = cache.fire_counts["blocks.0.resid_post"]

    t = threading.Thread(target=holder)
    t.start()
    opened.wait(30)
    other = h.run(["hello world"]).logits  # runs while thread A's blocks are open
    done.set()
    t.join()
    assert torch.equal(other, plain)
    assert seen["fired"] == 0 and "never ran" in seen["error"]
