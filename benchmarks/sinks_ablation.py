"""``hiddenlens bench sinks-ablation``: the sinks study's head interventions stacked in one forward vs one at a time.

:func:`hiddenlens.analyses.sinks.head_ablation` over ``heads`` heads (spread over the layers) x both modes
(``zero``, ``bos``) on ``prompts`` prose prompts of ``tokens`` tokens: ``one_at_a_time`` (``stack_rows=0``: one
forward per intervention and batch) vs ``stacked`` (copies of the batch, one intervention per copy, ``stack_rows``
rows per forward). Interleaved rounds, medians and the ratio from one run; the two tables must agree within 1e-4.
"""
from __future__ import annotations

import os

import torch

from hiddenlens.analyses.sinks import default_domains, head_ablation
from hiddenlens.common.files import write_json
from hiddenlens.probes import load_model

from .bb import interleaved, print_rows, ratio_rows


def run_sinks_ablation_benchmark(model: str, prompts: int = 8, tokens: int = 64, heads: int = 8,
                                 stack_rows: int = 32, reps: int = 3, threads: int | None = None,
                                 device: str = "auto", dtype: str = "auto", out: str | None = None) -> dict:
    """Time both paths (module docstring); print the table; write JSON to ``out`` when given."""
    if threads is not None:
        torch.set_num_threads(threads)
    handle = load_model(model, device=device, dtype=dtype)
    prose = default_domains(handle, prompts, tokens)["prose"]
    a = handle.adapter
    chosen = [(int(i * a.n_layers / heads), (i * 5) % a.n_heads) for i in range(heads)]
    tables = {}

    def path(rows: int):
        def go() -> None:
            tables[rows] = head_ablation(handle, prose, chosen, max_tokens=tokens, batch_size=prompts,
                                         stack_rows=rows)
        return go

    times = interleaved({"one_at_a_time": path(0), "stacked": path(stack_rows)}, reps)
    n_interventions = 2 * len(chosen)
    rows = ratio_rows(times, "one_at_a_time", per=n_interventions, unit="s_per_intervention")
    diff = float((tables[0].ce - tables[stack_rows].ce).abs().max())
    result = {"model": model, "prompts": prompts, "tokens": tokens, "heads": chosen, "stack_rows": stack_rows,
              "reps": reps, "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()), "rows": rows,
              "times": times, "max_ce_difference": diff}
    print_rows(rows, f"{model}: {n_interventions} head interventions on {prompts} x {tokens} tokens, "
                     f"{torch.get_num_threads()} thread(s)", "s_per_intervention")
    print(f"max |CE difference| between the paths: {diff:.2e} nats")
    if out:
        write_json(out, result)
    return result
