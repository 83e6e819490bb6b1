"""Steered vs plain ``generate`` tokens/s, and the same steering done with nnsight and with TransformerLens hooks.

All variants run greedy decoding with the KV cache, 64 new tokens (``min_new_tokens`` forces the full length),
at batch 1 and 8, and add the same vector (``alpha * sigma * u`` at one layer's residual output) at the positions
that choose new tokens (our mode ``generated``: the last prompt position, then each new token):

``plain``        ``handle.generate`` (hf backend), no steering
``hiddenlens``   :func:`hiddenlens.interventions.steer.steer_generate` (PyTorch hooks on the HF modules)
``nnsight``      nnsight's own API: ``lm.generate`` with ``for step in tracer.iter[...]:`` editing
                 ``lm.model.layers[l].output[:, -1]``
``transformer_lens``  a TransformerBridge over the same weights, ``bridge.hooks(fwd_hooks=[...])`` editing
                 ``blocks.{l}.hook_resid_post[:, -1]``, generating through the bridged model

Variants are interleaved round-robin (``repeats`` rounds) so shared-CPU noise hits them alike; the median time
is reported, with every ratio measured in this one run. Token equality of the steered variants is checked too.
"""
from __future__ import annotations

import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from hiddenlens.studies.steering import random_like
from hiddenlens.benchmarks.capture import one_layer
from hiddenlens.common.files import write_json
from hiddenlens.interventions.steer import steer_generate
from hiddenlens.probes import ModelHandle, load_model
from hiddenlens.probes.direction import Direction

PROMPT_POOL = ["The capital of France is", "Explain why the sky is blue.", "Write a haiku about rivers.",
               "List three prime numbers:", "In 1969, the first person to walk on the Moon",
               "def fibonacci(n):", "The opposite of hot is", "Once upon a time, in a small village,"]


def _peers(handle):
    """nnsight and TransformerLens handles over the same weights (no reload)."""
    nn = ModelHandle(handle.hf_model, handle.tokenizer, handle.adapter, handle.spec, "nnsight")
    tl = ModelHandle(handle.hf_model, handle.tokenizer, handle.adapter, handle.spec, "transformer_lens")
    return nn, tl


def run_steer_benchmark(model: str = "smollm2-135m-instruct", layer: int | str = 12, alpha: float = 4.0,
                        new_tokens: int = 64, batch_sizes=(1, 8), repeats: int = 3, peers: bool = True,
                        out: str | None = None, device: str = "auto", dtype: str = "auto") -> dict:
    """Measure and print the table; write JSON to ``out`` when given. Returns the result dict."""
    handle = load_model(model, device=device, dtype=dtype)
    layer = one_layer(layer, handle.n_layers, "--layer")
    d = random_like([Direction(torch.ones(handle.adapter.d_model), 3.5, f"blocks.{layer}.resid_post")], seed=0)[0]
    vec = (alpha * d.sigma * d.vector).to(handle.device, handle.dtype)
    gen_kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    nn, tl = _peers(handle) if peers else (None, None)

    def plain(prompts):
        return handle.generate(prompts, **gen_kw).sequences

    def ours(prompts):
        return steer_generate(handle, prompts, [d], alpha, "generated", **gen_kw).sequences

    def nnsight(prompts):
        b = nn.tokenize(prompts)
        lm = nn.model
        with torch.no_grad(), lm.generate({"input_ids": b.input_ids, "attention_mask": b.attention_mask},
                                          do_sample=False, pad_token_id=handle.tokenizer.pad_token_id,
                                          **gen_kw) as tracer:
            for _ in tracer.iter[0:new_tokens]:
                lm.model.layers[layer].output[:, -1] += vec
            result = tracer.result.save()
        return result

    def transformer_lens(prompts):
        def add(t, hook):
            t[:, -1] += vec
            return t
        with tl.model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_post", add)]):
            return tl.generate(prompts, **gen_kw).sequences

    variants = {"plain": plain, "hiddenlens": ours}
    if peers:
        variants |= {"nnsight": nnsight, "transformer_lens": transformer_lens}
    rows = []
    for bs in batch_sizes:
        prompts = (PROMPT_POOL * ((bs + len(PROMPT_POOL) - 1) // len(PROMPT_POOL)))[:bs]
        times = {k: [] for k in variants}
        seqs = {}
        for k, fn in variants.items():  # warm-up (also the token-equality check)
            seqs[k] = fn(prompts).cpu()
        for _ in range(repeats):
            for k, fn in variants.items():
                t = time.perf_counter()
                fn(prompts)
                times[k].append(time.perf_counter() - t)
        base = statistics.median(times["plain"])
        for k in variants:
            med = statistics.median(times[k])
            rows.append(dict(batch=bs, variant=k, seconds=med, tokens_per_s=bs * new_tokens / med,
                             vs_plain=base / med,
                             same_tokens_as_hiddenlens=bool(torch.equal(seqs[k][:, -new_tokens:],
                                                                       seqs["hiddenlens"][:, -new_tokens:]))))
    result = {"model": model, "device": str(handle.device), "dtype": str(handle.dtype), "layer": layer,
              "alpha": alpha, "new_tokens": new_tokens, "repeats": repeats, "threads": torch.get_num_threads(),
              "rows": rows}
    _print(rows)
    if out:
        write_json(out, result)
    return result


def _print(rows) -> None:
    t = Table(title="steered generate, tokens/s (median of interleaved rounds, one run)")
    for c in ("batch", "variant", "tokens/s", "x plain", "same tokens as hiddenlens"):
        t.add_column(c)
    for r in rows:
        t.add_row(str(r["batch"]), r["variant"], f"{r['tokens_per_s']:.1f}", f"{r['vs_plain']:.3f}",
                  "-" if r["variant"] == "plain" else str(r["same_tokens_as_hiddenlens"]))
    Console().print(t)
