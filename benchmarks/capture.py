"""Capture overhead: hiddenlens vs a plain forward, HF ``output_hidden_states``, TransformerLens and nnsight.

One model load; the TransformerBridge and the nnsight model wrap the same weights. Every contender does the same
work on the same ``[batch, tokens]`` token ids (no padding): one forward that keeps the residual stream after each
of the model's blocks (``blocks.*.resid_post``), then the same plus one layer's attention pattern. Repetitions are
interleaved (rep 1 of every contender, then rep 2, ...) after one warm-up round, so drift in machine load hits all
of them alike; we report medians, and ratios of medians measured in this one run.

Contenders (``name``: what runs):

* ``plain``: ``hf_model(ids)`` with the model's own attention (SDPA by default): the baseline.
* ``hiddenlens``: the same call inside ``hiddenlens.capture(handle, sites)`` (PyTorch hooks on the 30 blocks;
  with a pattern, only that layer switches to eager attention).
* ``hf_hidden_states``: ``hf_model(ids, output_hidden_states=True)`` (plus ``output_attentions=True`` with the
  model switched to eager attention for the pattern row: HF cannot return one layer's weights).
* ``transformer_lens``: ``bridge.run_with_cache(ids, names_filter=[...the same hook points...])``; the bridge runs
  eager attention in every layer (TransformerLens forces it). ``bridge_plain`` (the bridge's forward without a
  cache) separates that cost from the caching cost.
* ``nnsight``: ``lm.trace(ids)`` with ``.save()`` of every block output (and the attention module's second output
  for the pattern row, with the model switched to eager attention, which nnsight needs for weights).
"""
from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch
from rich.table import Table
from tqdm.auto import tqdm

from hiddenlens.common.files import write_json
from hiddenlens.models.tiny import offline_prose
from hiddenlens.probes import capture, load_model
from hiddenlens.probes.backends.nnsight import wrap_nnsight
from hiddenlens.probes.backends.transformer_lens import wrap_transformer_lens
from hiddenlens.probes.sites import parse_layers

#: contenders per scenario, in the order they run inside each repetition
SCENARIOS = {
    "resid_post": ("plain", "hiddenlens", "hf_hidden_states", "transformer_lens", "bridge_plain", "nnsight"),
    "resid_post+pattern": ("plain", "hiddenlens", "hf_hidden_states", "transformer_lens", "nnsight"),
    "one_layer": ("plain", "hiddenlens", "hiddenlens_full"),
}
#: the ``one_layer`` scenario reads the output of this share of the blocks (layer 12 of 30)
STOP_SHARE = 0.4


def benchmark_input(handle, batch: int, tokens: int) -> torch.Tensor:
    """``[batch, tokens]`` token ids of offline English prose (CPython's help topics), no padding."""
    ids = handle.tokenizer(offline_prose(400_000), add_special_tokens=False)["input_ids"]
    need = batch * tokens
    if len(ids) < need:
        raise ValueError(f"batch {batch} x {tokens} tokens needs {need} tokens of prose; only {len(ids)} exist")
    return torch.tensor(ids[:need]).view(batch, tokens).to(handle.device)


@contextmanager
def _attention(model, impl: str | None):
    """Switch the whole model to attention ``impl`` for the block (None: leave it)."""
    old = model.config._attn_implementation
    if impl is not None:
        model.config._attn_implementation = impl
    try:
        yield
    finally:
        model.config._attn_implementation = old


def contenders(handle, bridge, lm, ids: torch.Tensor, pattern_layer: int | None) -> dict[str, Callable[[], None]]:
    """The zero-argument callables timed for one scenario (``pattern_layer`` None: resid_post only)."""
    m, n = handle.hf_model, handle.n_layers
    mask = torch.ones_like(ids)
    sites = [f"blocks.{i}.resid_post" for i in range(n)]
    tl_names = [f"blocks.{i}.hook_resid_post" for i in range(n)]
    want = pattern_layer is not None
    if want:
        sites.append(f"blocks.{pattern_layer}.attn.pattern")
        tl_names.append(f"blocks.{pattern_layer}.attn.hook_pattern")

    def plain():
        m(input_ids=ids, attention_mask=mask, use_cache=False)

    def hiddenlens():
        with capture(handle, sites):
            m(input_ids=ids, attention_mask=mask, use_cache=False)

    def hf_hidden_states():
        with _attention(m, "eager" if want else None):
            out = m(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True,
                    output_attentions=want)
        assert len(out.hidden_states) == n + 1 and (not want or out.attentions[pattern_layer] is not None)

    def transformer_lens():
        _, cache = bridge.run_with_cache(ids, attention_mask=mask, names_filter=tl_names)
        assert all(name in cache for name in tl_names)

    def bridge_plain():
        bridge(ids, attention_mask=mask)

    def nnsight():
        layers, saved = lm.model.layers, []  # names bound inside a trace do not leave it: fill a list
        with _attention(m, "eager" if want else None):
            with lm.trace({"input_ids": ids, "attention_mask": mask}):
                for i in range(n):  # in execution order, as nnsight requires
                    if want and i == pattern_layer:
                        saved.append(layers[i].self_attn.output[1].save())
                    saved.append(layers[i].output.save())
        assert len(saved) == len(tl_names)

    return {"plain": plain, "hiddenlens": hiddenlens, "hf_hidden_states": hf_hidden_states,
            "transformer_lens": transformer_lens, "bridge_plain": bridge_plain, "nnsight": nnsight}


def stop_contenders(handle, ids: torch.Tensor, layer: int) -> dict[str, Callable[[], None]]:
    """Reading one layer: ``run(logits=False)`` stops after that block; ``hiddenlens_full`` runs every block and
    the LM head (what every capture cost before it could stop)."""
    m, mask, site = handle.hf_model, torch.ones_like(ids), f"blocks.{layer}.resid_post"

    def plain():
        m(input_ids=ids, attention_mask=mask, use_cache=False)

    def hiddenlens():
        with capture(handle, site):
            handle.run(ids, logits=False)

    def hiddenlens_full():
        with capture(handle, site):
            handle.run(ids)

    return {"plain": plain, "hiddenlens": hiddenlens, "hiddenlens_full": hiddenlens_full}


def _timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of this process, all threads)`` of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def _summary(times: dict[str, dict[str, list[float]]]) -> tuple[dict, dict, dict]:
    """Medians, ratios to ``plain`` and the goal checks of one metric."""
    med = {s: {c: statistics.median(v) for c, v in per.items()} for s, per in times.items()}
    ratio = {s: {c: m[c] / m["plain"] for c in m} for s, m in med.items()}
    resid, one = ratio["resid_post"], ratio["one_layer"]
    goal = {"resid_capture_within_1.05x_plain": resid["hiddenlens"] <= 1.05,
            "faster_than_transformer_lens": resid["hiddenlens"] < resid["transformer_lens"],
            "faster_than_nnsight": resid["hiddenlens"] < resid["nnsight"],
            "one_layer_stops_early (<= 0.55x plain)": one["hiddenlens"] <= 0.55}
    return med, ratio, goal


def one_layer(spec: int | str, n_layers: int, what: str) -> int:
    """One block index through :func:`hiddenlens.probes.sites.parse_layers` (``12``, ``"-1"``)."""
    got = parse_layers(spec, n_layers, what=what)
    if len(got) != 1:
        raise ValueError(f"{what}: {spec!r} names {len(got)} layers; give exactly one")
    return got[0]


def run_capture_benchmark(model: str = "smollm2-135m-instruct", batch: int = 8, tokens: int = 128, reps: int = 5,
                          device: str = "auto", dtype: str = "auto", pattern_layer: int | str | None = None,
                          threads: int | None = None, progress: bool = True) -> dict:
    """Run both scenarios; returns the result dict (seconds per forward, medians and ratios).

    Two clocks: wall time (what you wait for) and the process's CPU time over all its threads (what the work
    costs; on a shared machine it is the steadier of the two, since time spent descheduled is not counted).
    ``threads`` sets ``torch.set_num_threads`` first (1 keeps thread-pool spinning out of the CPU time).
    """
    if reps < 1:
        raise ValueError(f"reps={reps}: need at least one timed repetition")
    if threads is not None:
        torch.set_num_threads(threads)
    handle = load_model(model, device=device, dtype=dtype)
    n = handle.n_layers
    layer = n // 2 if pattern_layer is None else one_layer(pattern_layer, n, "--pattern-layer")
    bridge, lm = wrap_transformer_lens(handle), wrap_nnsight(handle)  # over the same weights
    ids = benchmark_input(handle, batch, tokens)
    stop_layer = max(0, int(round(STOP_SHARE * n)) - 1) if n > 1 else 0
    plan = {name: contenders(handle, bridge, lm, ids, layer if "pattern" in name else None)
            for name in SCENARIOS if name != "one_layer"}
    plan["one_layer"] = stop_contenders(handle, ids, stop_layer)
    times: dict[str, dict[str, list[float]]] = {s: {c: [] for c in cs} for s, cs in SCENARIOS.items()}
    cpu_times: dict[str, dict[str, list[float]]] = {s: {c: [] for c in cs} for s, cs in SCENARIOS.items()}
    rounds = range(reps + 1)
    if progress:
        rounds = tqdm(rounds, desc="repetitions (first is warm-up)", unit="rep")
    for r in rounds:
        gc.collect()  # once per round, untimed: no contender pays for another's garbage
        for scenario, names in SCENARIOS.items():
            for name in names:
                wall, cpu = _timed(plan[scenario][name], handle.device)
                if r:
                    times[scenario][name].append(wall)
                    cpu_times[scenario][name].append(cpu)
    result = {
        "model": handle.spec, "device": str(handle.device), "dtype": str(handle.dtype).replace("torch.", ""),
        "attn_implementation": handle.hf_model.config._attn_implementation, "batch": batch, "tokens": tokens,
        "reps": reps, "pattern_layer": layer, "stop_layer": stop_layer, "n_layers": n,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "versions": _versions(), "seconds": times, "cpu_seconds": cpu_times,
    }
    result["median_s"], result["ratio_to_plain"], result["goal"] = _summary(times)
    result["cpu_median_s"], result["cpu_ratio_to_plain"], result["goal_cpu"] = _summary(cpu_times)
    return result


def _versions() -> dict:
    return {name: version(name) for name in ("torch", "transformers", "transformer-lens", "nnsight")}


def print_table(result: dict, console) -> None:
    """A rich table: median seconds per forward, ratio to the plain forward, and hiddenlens' speed-up."""
    for scenario, med in result["median_s"].items():
        title = (f"{scenario}: {result['model']} {result['device']} {result['dtype']}, batch {result['batch']} x "
                 f"{result['tokens']} tokens, median of {result['reps']} interleaved reps")
        table = Table(title=title)
        for col in ("contender", "wall ms (median)", "wall min-max ms", "x plain (wall)", "x hiddenlens (wall)",
                    "CPU ms (median)", "x plain (CPU)"):
            table.add_column(col, justify="left" if col == "contender" else "right")
        cpu = result["cpu_median_s"][scenario]
        for name, m in med.items():
            runs = result["seconds"][scenario][name]
            table.add_row(name, f"{1000 * m:.0f}", f"{1000 * min(runs):.0f}-{1000 * max(runs):.0f}",
                          f"{result['ratio_to_plain'][scenario][name]:.3f}", f"{m / med['hiddenlens']:.2f}",
                          f"{1000 * cpu[name]:.0f}", f"{result['cpu_ratio_to_plain'][scenario][name]:.3f}")
        console.print(table)
    for key in ("goal", "goal_cpu"):
        console.print(f"{key}: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in result[key].items()))


def write_result(result: dict, out: Path) -> Path:
    """Write the result as JSON (atomically); returns the path."""
    out = Path(out)
    if out.suffix != ".json":
        out = out / "capture.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    return out

