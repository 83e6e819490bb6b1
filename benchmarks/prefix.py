"""``hiddenlens bench prefix``: few-shot generation with the shared prompt prefix's KV cache reused vs recomputed.

The intention study's path (:func:`hiddenlens.analyses.regimes.generate_with_intention`: greedy batched generation
with the intention-state capture) on ``n`` project-made problems with ``shots`` worked examples as chat turns, run
with ``reuse_prefix=False`` (every batch prefills the whole prompt) and ``reuse_prefix=True`` (the common start,
chat header plus the examples, is run once; each batch gets a copy of its KV cache). Interleaved rounds, medians
and the ratio from one run; the generated texts must be identical and the captured states equal within 1e-4.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from hiddenlens.analyses.arithmetic import few_shot_examples, make_problems
from hiddenlens.analyses.regimes import build_messages, chat_prompt_ids, default_layers, generate_with_intention
from hiddenlens.common.files import write_json
from hiddenlens.probes import load_model
from hiddenlens.probes.handle import common_prefix

from .bb import interleaved, print_rows, ratio_rows


def run_prefix_benchmark(model: str, n: int = 16, shots: int = 2, regime: str = "cot", new_tokens: int = 8,
                         batch_size: int = 8, reps: int = 3, threads: int | None = None, device: str = "auto",
                         dtype: str = "auto", out: str | None = None) -> dict:
    """Time both paths (module docstring); print the table; write JSON to ``out`` when given."""
    if threads is not None:
        torch.set_num_threads(threads)
    handle = load_model(model, device=device, dtype=dtype)
    examples = few_shot_examples(shots)
    prompts = [chat_prompt_ids(handle.tokenizer, build_messages(p, regime, examples)) for p in make_problems(n)]
    layers = default_layers(handle.n_layers)
    results = {}

    def path(reuse: bool):
        def go() -> None:
            results[reuse] = generate_with_intention(handle, prompts, layers, new_tokens, batch_size,
                                                     reuse_prefix=reuse)
        return go

    times = interleaved({"no_reuse": path(False), "reuse": path(True)}, reps)
    rows = ratio_rows(times, "no_reuse", per=n, unit="s_per_item")
    same_texts = results[True]["texts"] == results[False]["texts"]
    state_diff = float(np.abs(results[True]["states"] - results[False]["states"]).max())
    result = {"model": model, "n": n, "shots": shots, "regime": regime, "new_tokens": new_tokens,
              "batch_size": batch_size, "reps": reps, "prefix_tokens": len(common_prefix(prompts)),
              "mean_prompt_tokens": float(np.mean([len(p) for p in prompts])), "threads": torch.get_num_threads(),
              "load_average": list(os.getloadavg()), "rows": rows, "times": times, "same_texts": same_texts,
              "max_state_difference": state_diff}
    print_rows(rows, f"{model}: {n} items, {shots}-shot {regime}, {new_tokens} new tokens, prefix "
                     f"{result['prefix_tokens']} of {result['mean_prompt_tokens']:.0f} prompt tokens, "
                     f"{torch.get_num_threads()} thread(s)", "s_per_item")
    print(f"same generated texts: {same_texts}; max |state difference| {state_diff:.2e}")
    if out:
        write_json(out, result)
    return result
