"""One prepared GPU check: bf16 parity, capture / steering / backend overheads and a random 1B Llama, in one table.

Written for a session that is lent a GPU for a short window (an H200 for 15 minutes): one command, under five
minutes, one table. ``--cpu`` runs the same checks on CPU with tiny sizes (tiny-llama, a 2-layer random Llama) so
the script is exercised by the test suite (``tests/test_gpu_check.py``) and cannot rot between GPU sessions.

    python benchmarks/gpu_check.py --out gpu.json          # on the lent GPU
    python -m hiddenlens.benchmarks.gpu_check --cpu        # the CPU smoke run

Rows (``check``: what it measures):

1. ``cuda+bf16``: the embedded model (tiny-llama under ``--cpu``) in bf16 against fp32 on the same device: final
   logits (relative max-abs difference, top-1 agreement, mean KL of next-token distributions) and the captured
   ``blocks.*.resid_post`` (relative Frobenius error); fp32 on the GPU against fp32 on the CPU (relative max-abs
   difference; skipped under ``--cpu``).
2. ``capture``: ``hiddenlens.capture(handle, "blocks.*.resid_post")`` around ``handle.run`` (and around a bare
   ``hf_model`` call: the hooks alone) against a plain ``handle.hf_model(ids)`` forward, as a ratio of medians
   of interleaved repetitions (:mod:`hiddenlens.benchmarks.capture`'s method); the captured tensors against HF's
   own ``output_hidden_states``.
3. ``steering``: :func:`~hiddenlens.interventions.steer.steer_generate` against plain ``handle.generate``
   (tokens/s ratio), and steering with ``alpha = 0`` gives the plain tokens.
4. ``backends``: the same capture through ``handle.with_backend("transformer_lens")`` and ``("nnsight")``: max
   difference from the hf backend (fp32) and time ratio against the plain forward.
5. ``random-llama-<size>``: rows 1-2 on a randomly initialised (seeded) Llama of 1.17B parameters built in memory
   on the device (no download); under ``--cpu`` a 2-layer, d_model 64 one.

Parity rows are gated (a verdict ``FAIL`` makes the exit status 1); timing rows never fail (their verdict says
whether a guide budget was met). A check that raises becomes a ``FAIL`` row naming the error and the rest still run,
so one bug does not cost the whole lent window. Progress goes to stderr, the table to stdout, ``--out`` writes
the rows as JSON.
"""
from __future__ import annotations

import argparse
import copy
import gc
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from typing import Callable

import torch
from tabulate import tabulate

from hiddenlens.benchmarks.capture import _timed, benchmark_input, contenders
from hiddenlens.benchmarks.steer import PROMPT_POOL
from hiddenlens.common.files import write_json
from hiddenlens.common.stats import kl_divergence
from hiddenlens.interventions.steer import steer_generate
from hiddenlens.models.adapter import discover_adapter
from hiddenlens.probes import ModelHandle, capture, load_model
from hiddenlens.probes.direction import Direction

SITES = "blocks.*.resid_post"
#: bf16 against fp32: logits' relative max-abs error, top-1 agreement, mean KL (nats), the residual stream's relative
#: Frobenius error (not max-abs: bf16 rounds SmolLM2's massive activation, ~23,000 in one dimension, by up to 64)
BF16_LOGITS, BF16_TOP1, BF16_KL, BF16_RESID = 0.10, 0.90, 2e-2, 5e-2
#: fp32 against fp32 (another device, another backend): relative max-abs error of logits and residual stream
FP32_REL = 1e-4
#: captured tensors against HF's own output_hidden_states of the same call: relative max-abs error
HOOK_REL = 1e-5
#: guide budgets of the timing rows (never gated): capture at most 1.05x a plain forward (issue 2's goal)
CAPTURE_BUDGET, STEER_BUDGET = 1.05, 0.90
_STARTED = time.perf_counter()


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the ``--cpu`` smoke run.

    ``batch x tokens`` token ids of prose per forward; ``reps`` timed interleaved repetitions (after one warm-up);
    ``gen_batch`` prompts x ``new_tokens`` generated per steering run, ``gen_reps`` repetitions of those;
    ``big``: the random Llama's config fields, run on ``big_batch x big_tokens``.
    ``time_dtype``: the dtype the timing rows run in (bf16 on the GPU; fp32 on CPU, where bf16 is emulated).
    ``threads``: ``torch.set_num_threads`` (None: torch's default); the CPU run uses 1, since tiny forwards gain
    nothing from a second thread and a spinning thread pool on a shared 2-core machine made timings swing 50x.
    """

    device: str
    model: str
    batch: int
    tokens: int
    reps: int
    gen_batch: int
    new_tokens: int
    gen_reps: int
    big: dict
    big_batch: int
    big_tokens: int
    time_dtype: str
    threads: int | None


GPU = Sizes(device="cuda", model="smollm2-135m-instruct", batch=8, tokens=128, reps=20, gen_batch=8, new_tokens=64,
            gen_reps=5, big=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                 num_attention_heads=32, num_key_value_heads=8),
            big_batch=8, big_tokens=256, time_dtype="bfloat16", threads=None)
CPU = Sizes(device="cpu", model="tiny-llama", batch=2, tokens=32, reps=5, gen_batch=2, new_tokens=8, gen_reps=3,
            big=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2),
            big_batch=2, big_tokens=32, time_dtype="float32", threads=1)


@dataclass
class Row:
    """One line of the table. ``value``: the number measured (None when skipped or failed); ``shown``: as printed;
    ``budget``: the tolerance (gated rows) or guide budget (timings); ``verdict``: ``pass`` | ``FAIL`` (gated),
    ``met`` | ``over`` | ``info`` (timings), ``skip``."""

    check: str
    what: str
    value: float | None
    shown: str
    budget: str
    verdict: str
    gated: bool = field(default=False)


# ---- verdicts ---------------------------------------------------------------------------------------------------
def parity_row(check: str, what: str, value: float, limit: float, higher_is_better: bool = False) -> Row:
    """A gated row: ``value <= limit`` passes (``>= limit`` with ``higher_is_better``); NaN fails."""
    ok = value >= limit if higher_is_better else value <= limit
    return Row(check, what, value, f"{value:.3g}", f"{'>=' if higher_is_better else '<='} {limit:g}",
               "pass" if ok else "FAIL", gated=True)


def timing_row(check: str, what: str, ratio: float, budget: float | None = None, higher_is_better: bool = False
               ) -> Row:
    """A timing row (never gated): ``ratio`` against the plain run, with an optional guide budget."""
    if budget is None:
        return Row(check, what, ratio, f"{ratio:.3f}x", "-", "info")
    ok = ratio >= budget if higher_is_better else ratio <= budget
    return Row(check, what, ratio, f"{ratio:.3f}x", f"{'>=' if higher_is_better else '<='} {budget:g}x (guide)",
               "met" if ok else "over")


def info_row(check: str, what: str, shown: str, verdict: str = "info") -> Row:
    """A row that only reports (the environment, or a skipped check)."""
    return Row(check, what, None, shown, "-", verdict)


def failed(rows: list[Row]) -> list[Row]:
    """The gated rows that failed their tolerance."""
    return [r for r in rows if r.gated and r.verdict != "pass"]


# ---- metrics (all on float32 copies; ``ref`` is the reference side) ---------------------------------------------
def rel_max_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |got - ref| / max |ref|`` over every entry (dimensionless); both ``[...]`` of the same shape, any
    devices (compared on ``ref``'s)."""
    if got.shape != ref.shape:
        raise ValueError(f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    a, b = got.to(ref.device).float(), ref.float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=torch.finfo(torch.float32).tiny))


def rel_fro_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` (Frobenius norms over every entry; dimensionless), on ``ref``'s device."""
    if got.shape != ref.shape:
        raise ValueError(f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    a, b = got.to(ref.device).float(), ref.float()
    return float((a - b).norm() / b.norm().clamp(min=torch.finfo(torch.float32).tiny))


def top1_agreement(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Share of positions (``[batch, pos, vocab]`` logits) whose argmax token is the same, in [0, 1]."""
    return float((got.to(ref.device).argmax(-1) == ref.argmax(-1)).float().mean())


def mean_kl(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over positions of ``KL(softmax(ref) || softmax(got))`` of ``[batch, pos, vocab]`` logits, in nats."""
    return float(kl_divergence(ref.float(), got.to(ref.device).float()).mean())


def worst_site(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
               metric: Callable[[torch.Tensor, torch.Tensor], float] = rel_max_diff) -> tuple[float, str]:
    """The largest ``metric(got[site], ref[site])`` over the sites of ``ref`` (``{site: [batch, pos, d_model]}``)
    and its site."""
    errs = {site: metric(got[site], t) for site, t in ref.items()}
    site = max(errs, key=errs.get)
    return errs[site], site


# ---- running ------------------------------------------------------------------------------------------------------
def say(message: str) -> None:
    """Progress on stderr, with seconds since the module was imported."""
    print(f"[gpu_check {time.perf_counter() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def dtype_name(handle: ModelHandle) -> str:
    """The handle's dtype as a short name (``bfloat16``)."""
    return str(handle.dtype).replace("torch.", "")


def captured_forward(handle: ModelHandle, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``handle.run(ids)`` inside ``capture(handle, "blocks.*.resid_post")``: logits ``[batch, pos, vocab]`` and
    ``{site: [batch, pos, d_model]}``, on the model's device in its dtype."""
    with capture(handle, SITES) as cache:
        logits = handle.run(ids).logits
    return logits, {site: cache[site] for site in cache}


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int, device: torch.device) -> dict[str, float]:
    """Median wall seconds per call of each function: one untimed warm-up round, then ``reps`` rounds that call
    every function once (round-robin, so machine drift hits them alike); CUDA is synchronised around each call."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(reps + 1):
        gc.collect()
        for name, fn in fns.items():
            wall, _ = _timed(fn, device)
            if r:
                times[name].append(wall)
    return {name: statistics.median(t) for name, t in times.items()}


def plain_forward(handle: ModelHandle, ids: torch.Tensor) -> Callable[[], object]:
    """The baseline: ``handle.hf_model(ids)`` (``[batch, tokens]`` ids, no padding, no capture)."""
    return lambda: handle.hf_model(input_ids=ids, use_cache=False)


def captured_run(handle: ModelHandle, ids: torch.Tensor) -> Callable[[], object]:
    """``handle.run(ids)`` inside ``capture(handle, "blocks.*.resid_post")``, on whatever backend ``handle`` has."""
    def run():
        with capture(handle, SITES):
            handle.run(ids)
    return run


# ---- the checks ---------------------------------------------------------------------------------------------------
def environment_rows(sizes: Sizes) -> list[Row]:
    """What the run used: device (GPU name and compute capability), torch threads, versions, TF32 switches."""
    dev = torch.device(sizes.device)
    if dev.type == "cuda":
        cap = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        where = (f"{torch.cuda.get_device_name(dev)} (sm {cap}), CUDA {torch.version.cuda}, bf16 supported: "
                 f"{torch.cuda.is_bf16_supported()}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32}")
    else:
        where = f"CPU {platform.processor() or platform.machine()}"
    return [info_row("env", "device", where),
            info_row("env", "torch threads / dtypes", f"{torch.get_num_threads()} thread(s); parity fp32 vs bf16, "
                                                       f"timings in {sizes.time_dtype}"),
            info_row("env", "versions", ", ".join(f"{p} {version(p)}" for p in
                                                  ("torch", "transformers", "transformer-lens", "nnsight")))]


def dtype_rows(check: str, ref: ModelHandle, low: ModelHandle, ids: torch.Tensor, gate_top1: bool = True
               ) -> list[Row]:
    """bf16 (``low``) against fp32 (``ref``), same weights and device, on ``ids`` ``[batch, tokens]``: logits and
    ``blocks.*.resid_post``. ``gate_top1=False`` reports top-1 agreement without a verdict (random weights have
    near-tied top logits, so rounding flips their argmax without anything being wrong)."""
    ref_logits, ref_cache = captured_forward(ref, ids)
    low_logits, low_cache = captured_forward(low, ids)
    worst, site = worst_site(low_cache, ref_cache, rel_fro_diff)
    top1 = top1_agreement(low_logits, ref_logits)
    top1_row = (parity_row(check, "bf16 vs fp32: top-1 agreement (share of positions)", top1, BF16_TOP1, True)
                if gate_top1 else info_row(check, "bf16 vs fp32: top-1 agreement (random weights: not gated)",
                                           f"{top1:.3g}"))
    return [parity_row(check, "bf16 vs fp32: logits, max abs diff / max abs logit",
                       rel_max_diff(low_logits, ref_logits), BF16_LOGITS),
            top1_row,
            parity_row(check, "bf16 vs fp32: mean KL(fp32 to bf16) of next-token dists, nats",
                       mean_kl(low_logits, ref_logits), BF16_KL),
            parity_row(check, f"bf16 vs fp32: resid_post, norm of diff / norm of ref, worst ({site})", worst,
                       BF16_RESID)]


def device_rows(ref: ModelHandle, ids: torch.Tensor, sizes: Sizes) -> list[Row]:
    """fp32 on the GPU against fp32 on the CPU (the same checkpoint loaded twice): logits and resid_post."""
    what = "fp32 {} vs fp32 CPU: {}, max abs diff / max abs ref"
    if torch.device(sizes.device).type == "cpu":
        return [info_row("cuda+bf16", what.format("GPU", "logits, resid_post"), "no GPU (--cpu)", "skip")]
    cpu = load_model(sizes.model, device="cpu", dtype="float32")
    gpu_logits, gpu_cache = captured_forward(ref, ids)
    cpu_logits, cpu_cache = captured_forward(cpu, ids.cpu())
    worst, site = worst_site(gpu_cache, cpu_cache)
    rows = [parity_row("cuda+bf16", what.format(ref.device, "logits"), rel_max_diff(gpu_logits, cpu_logits),
                       FP32_REL),
            parity_row("cuda+bf16", what.format(ref.device, f"resid_post, worst layer ({site})"), worst, FP32_REL)]
    cpu.unload()
    return rows


def hook_rows(check: str, handle: ModelHandle, ids: torch.Tensor) -> list[Row]:
    """Captured ``blocks.{i}.resid_post`` against HF's ``output_hidden_states[i + 1]`` of the same call, for
    ``i < n_layers - 1`` (HF's last entry is after the final norm); worst relative max-abs difference."""
    batch = handle.tokenize(ids)
    with capture(handle, SITES) as cache, torch.inference_mode():
        hidden = handle.hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=batch.position_ids, use_cache=False, output_hidden_states=True
                                 ).hidden_states
    n = handle.n_layers
    worst, site = worst_site({f"blocks.{i}.resid_post": cache[f"blocks.{i}.resid_post"] for i in range(n - 1)},
                             {f"blocks.{i}.resid_post": hidden[i + 1] for i in range(n - 1)})
    return [parity_row(check, f"captured resid_post vs HF output_hidden_states ({dtype_name(handle)}), worst ({site})",
                       worst, HOOK_REL)]


def overhead_rows(check: str, handle: ModelHandle, ids: torch.Tensor, reps: int) -> list[Row]:
    """Capture of ``blocks.*.resid_post`` against a plain ``hf_model(ids)`` forward: around ``handle.run`` (what
    users call) and around the bare ``hf_model`` call (the hooks alone; :func:`benchmarks.capture.contenders`)."""
    hooks_only = contenders(handle, None, None, ids, None)["hiddenlens"]
    med = interleaved_medians({"plain": plain_forward(handle, ids), "run": captured_run(handle, ids),
                               "hooks": hooks_only}, reps, handle.device)
    shape = f"[{ids.shape[0]} x {ids.shape[1]}], {dtype_name(handle)}"
    return [timing_row(check, f"capture + handle.run / plain hf_model(ids), {shape}, {1000 * med['plain']:.1f} ms "
                              "plain", med["run"] / med["plain"], CAPTURE_BUDGET),
            timing_row(check, f"capture + hf_model(ids) (hooks only) / plain, {shape}", med["hooks"] / med["plain"],
                       CAPTURE_BUDGET)]


def steering_rows(handle: ModelHandle, sizes: Sizes) -> list[Row]:
    """``steer_generate`` (mode ``generated``, a seeded random unit direction at the middle layer's resid_post,
    ``alpha * sigma = 4``) against plain ``handle.generate``, greedy with the KV cache, ``new_tokens`` forced: the
    tokens/s ratio (steered / plain), and ``alpha = 0`` must reproduce the plain tokens exactly."""
    layer = handle.n_layers // 2
    g = torch.Generator().manual_seed(0)
    d = Direction(torch.randn(handle.adapter.d_model, generator=g), 1.0, f"blocks.{layer}.resid_post")
    prompts = (PROMPT_POOL * sizes.gen_batch)[:sizes.gen_batch]
    kw = dict(max_new_tokens=sizes.new_tokens, min_new_tokens=sizes.new_tokens)
    plain = handle.generate(prompts, **kw).sequences
    zero = steer_generate(handle, prompts, [d], 0.0, "generated", **kw).sequences
    med = interleaved_medians({"plain": lambda: handle.generate(prompts, **kw),
                               "steered": lambda: steer_generate(handle, prompts, [d], 4.0, "generated", **kw)},
                              sizes.gen_reps, handle.device)
    same = float((zero == plain).float().mean())
    tps = sizes.gen_batch * sizes.new_tokens / med["plain"]
    return [timing_row("steering", f"steered / plain tokens/s, {sizes.gen_batch} x {sizes.new_tokens} new tokens, "
                                   f"plain {tps:.0f} tok/s", med["plain"] / med["steered"], STEER_BUDGET, True),
            parity_row("steering", "alpha = 0 steered tokens == plain tokens (share equal)", same, 1.0, True)]


def backend_rows(ref: ModelHandle, timed: ModelHandle, ids: torch.Tensor, reps: int) -> list[Row]:
    """TransformerLens and nnsight: capture of ``blocks.*.resid_post`` through ``with_backend`` against the hf
    backend in fp32 (worst relative max-abs difference over layers, and of the logits), and the time of capture +
    run on ``timed``'s weights against the plain ``hf_model(ids)`` forward."""
    ref_logits, ref_cache = captured_forward(ref, ids)
    rows, runs = [], {"plain": plain_forward(timed, ids)}
    for name in ("transformer_lens", "nnsight"):
        peer = ref.with_backend(name)
        logits, cache = captured_forward(peer, ids)
        worst, site = worst_site(cache, ref_cache)
        rows += [parity_row("backends", f"{name} vs hf (fp32): resid_post, worst ({site})", worst, FP32_REL),
                 parity_row("backends", f"{name} vs hf (fp32): logits", rel_max_diff(logits, ref_logits), FP32_REL)]
        runs[name] = captured_run(peer if timed is ref else timed.with_backend(name), ids)
    med = interleaved_medians(runs, reps, timed.device)
    rows += [timing_row("backends", f"{name}: capture + run / plain hf_model(ids), {dtype_name(timed)}",
                        med[name] / med["plain"])
             for name in ("transformer_lens", "nnsight")]
    return rows


def random_llama(config: dict, tokenizer, device: str, seed: int = 0) -> ModelHandle:
    """A seeded random-weight ``LlamaForCausalLM`` (fp32) built directly on ``device``, wrapped in a hf handle
    (``ModelHandle(hf_model, tokenizer, adapter, spec)``: no file, no download); vocabulary = ``len(tokenizer)``."""
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy dependency: imported on use

    cfg = LlamaConfig(**config, vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2g}M"
    return ModelHandle(model, tokenizer, discover_adapter(model), f"random-llama-{size}")


def big_rows(sizes: Sizes, tokenizer, ids: torch.Tensor) -> list[Row]:
    """Rows 1-2 (bf16 parity, hook parity, capture overhead) on the random Llama of ``sizes.big``, on ``ids``
    ``[big_batch, big_tokens]`` (token ids of ``tokenizer``)."""
    ref = random_llama(sizes.big, tokenizer, sizes.device)
    low = ModelHandle(copy.deepcopy(ref.hf_model).to(torch.bfloat16), tokenizer, ref.adapter, ref.spec)
    say(f"random model: {ref!r}")
    ids = ids.to(ref.device)
    check = ref.spec
    rows = dtype_rows(check, ref, low, ids, gate_top1=False) + hook_rows(check, ref, ids)
    rows += overhead_rows(check, low if sizes.time_dtype == "bfloat16" else ref, ids, sizes.reps)
    ref.unload()
    low.unload()
    return rows


def guarded(check: str, fn: Callable[[], list[Row]]) -> list[Row]:
    """Run one check; an exception becomes a failed gated row naming it (so the other checks still run)."""
    say(f"running {check}")
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 (reported as a FAIL row and in the exit status)
        say(f"{check} raised {type(exc).__name__}: {exc}")
        return [Row(check, "raised an error", None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}",
                    "no error", "FAIL", gated=True)]


def run_checks(sizes: Sizes) -> list[Row]:
    """Every check in order; returns the rows."""
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the parity tolerances assume it)
    torch.backends.cudnn.allow_tf32 = False
    if sizes.threads is not None:
        torch.set_num_threads(sizes.threads)
    rows = environment_rows(sizes)
    say(f"loading {sizes.model} in float32 and bfloat16 on {sizes.device}")
    ref = load_model(sizes.model, device=sizes.device, dtype="float32")
    low = load_model(sizes.model, device=sizes.device, dtype="bfloat16")
    timed = low if sizes.time_dtype == "bfloat16" else ref
    prose = benchmark_input(ref, max(sizes.batch, sizes.big_batch), max(sizes.tokens, sizes.big_tokens))
    ids = prose[:sizes.batch, :sizes.tokens]
    rows += guarded("cuda+bf16", lambda: dtype_rows("cuda+bf16", ref, low, ids) + device_rows(ref, ids, sizes))
    rows += guarded("capture", lambda: hook_rows("capture", ref, ids) + overhead_rows("capture", timed, ids,
                                                                                       sizes.reps))
    rows += guarded("steering", lambda: steering_rows(timed, sizes))
    rows += guarded("backends", lambda: backend_rows(ref, timed, ids, sizes.reps))
    tokenizer = ref.tokenizer
    ref.unload()
    low.unload()
    rows += guarded("random model", lambda: big_rows(sizes, tokenizer, prose[:sizes.big_batch, :sizes.big_tokens]))
    return rows


def table(rows: list[Row]) -> str:
    """The rows as one GitHub-flavoured Markdown table (check, what, value, tolerance / budget, verdict)."""
    return tabulate([(r.check, r.what, r.shown, r.budget, r.verdict) for r in rows],
                    headers=("check", "what", "value", "tolerance / budget", "verdict"), tablefmt="github",
                    disable_numparse=True)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (1 when a parity row failed, 2 when no GPU and no ``--cpu``)."""
    p = argparse.ArgumentParser(prog="python -m hiddenlens.benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="the small CPU smoke run (tiny models) instead of the GPU run")
    p.add_argument("--out", help="write the rows as JSON to this file")
    args = p.parse_args(argv)
    sizes = CPU if args.cpu else GPU
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --cpu for the small CPU smoke run", file=sys.stderr)
        return 2
    started = time.perf_counter()
    rows = run_checks(sizes)
    bad = failed(rows)
    print(f"gpu_check ({'--cpu smoke run' if args.cpu else 'GPU run'}): device {sizes.device}, torch threads "
          f"{torch.get_num_threads()}, parity fp32 vs bfloat16, timings in {sizes.time_dtype}, "
          f"{time.perf_counter() - started:.0f} s\n")
    print(table(rows))
    print(f"\n{len(bad)} of {sum(r.gated for r in rows)} parity checks failed" if bad
          else f"\nall {sum(r.gated for r in rows)} parity checks passed")
    if args.out:
        write_json(args.out, {"sizes": asdict(sizes), "torch_threads": torch.get_num_threads(),
                              "seconds": time.perf_counter() - started, "passed": not bad,
                              "rows": [asdict(r) for r in rows]})
        say(f"wrote {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
