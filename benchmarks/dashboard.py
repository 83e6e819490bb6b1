"""``hiddenlens bench dashboard``: the dashboard's interactions driven headless and timed against their budgets.

The real app (``hiddenlens/dashboard/app.py``) runs under Streamlit's ``AppTest``, so a timing covers the whole
interaction as the page runs it (every widget, backend call, figure and table of the rerun), not only the model
work. Each interaction sets a widget to a value not seen before (a cached result would time nothing) and is timed
beside the plain model work underneath, ``handle.generate`` of as many new tokens as the page generated (forced
to that length), run twice right after it on a second handle of the same model (the mean; repetitions interleaved,
so shared-CPU noise hits both alike; medians and ratios from one run). Budgets (issue 13, on the embedded SmolLM2-135M):

``truth_alpha``     Truthful directions, a new steering alpha: both continuations with their per-token scores
                    <= 1.5 x plain generation of the steered continuation's new tokens (counted on the page).
``leakage_span``    Semantic leakage, a new span: <= 3 s (the ratio against generating the "after"
                    continuation's new tokens, counted on the page, is shown too).
``leakage_layers``  Semantic leakage, a new block range: <= 3 s.

Setup is not timed against a budget but reported: the app's first run (model load), opening the truth directions
(the committed ``docs/results/truth`` run, copied under a temporary runs root, when it was fitted on this model;
otherwise fitted live, which takes minutes on the embedded model) with the first plain and steered continuations,
and opening the leakage page (its "before" run and first span).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from hiddenlens.common.files import write_json
from hiddenlens.probes import load_model

#: interaction -> (budget kind, limit): "ratio" to plain generation, or "seconds"
BUDGETS = {"truth_alpha": ("ratio", 1.5), "leakage_span": ("seconds", 3.0), "leakage_layers": ("seconds", 3.0)}
#: env names the dashboard reads (hiddenlens.dashboard.modelstore; not imported: benchmarks sit below it)
MODEL_ENV, RUNS_ENV = "HIDDENLENS_DASHBOARD_MODEL", "HIDDENLENS_RUNS_DIR"
COMMITTED_TRUTH = Path(__file__).resolve().parent.parent / "docs" / "results" / "truth"
ALPHAS = (2.0, -3.0, 6.0, -6.0, 9.0, 3.5, -1.5, 12.0)


def app_path() -> str:
    """The dashboard's ``app.py`` (found, not imported)."""
    spec = importlib.util.find_spec("hiddenlens.dashboard")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("hiddenlens.dashboard is not installed; reinstall hiddenlens")
    return str(Path(list(spec.submodule_search_locations)[0]) / "app.py")


def _check(at) -> None:
    errors = [e.value for e in at.error] + [str(e.value) for e in at.exception]
    if errors:
        raise RuntimeError(f"the page shows an error: {errors[0]}")


def _timed(step) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of ``step()``."""
    t, c = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - t, time.process_time() - c


def _steered_new_tokens(at) -> int:
    """New tokens of the steered continuation on the truth page: its underlined spans (one per generated token)."""
    return at.get("html")[1].proto.body.count("text-decoration:underline")


def _after_new_tokens(at) -> int:
    """New tokens of the "after" continuation on the leakage page (its caption)."""
    counts = [int(m.group(1)) for c in at.caption for m in [re.fullmatch(r"(\d+) new tokens \(greedy\)", c.value)]
              if m]
    if len(counts) != 2:
        raise RuntimeError("the leakage page shows no count of new tokens")
    return counts[1]


def new_ranges(n_layers: int, shown: tuple[int, int], n: int) -> list[tuple[int, int]]:
    """``n`` distinct block ranges ``(first, last)``, none of them ``shown``, spread over every possible one."""
    ranges = [(lo, hi) for lo in range(n_layers) for hi in range(lo, n_layers) if (lo, hi) != tuple(shown)]
    if len(ranges) < n:
        raise ValueError(f"a {n_layers}-block model has {len(ranges)} other block ranges; ask for fewer repeats")
    return [ranges[(2 * i + 1) * len(ranges) // (2 * n)] for i in range(n)]


def _truth_source(at, model: str, runs: Path, truth_run: Path | None) -> str:
    """Open truthful directions on the page: ``truth_run``, else the committed run when fitted on ``model``, else
    fit live. A folder is copied under the runs root (the page opens only folders there)."""
    summary = COMMITTED_TRUTH / "summary.json"
    if truth_run is None and summary.is_file() and json.loads(summary.read_text()).get("model") == model:
        truth_run = COMMITTED_TRUTH
    if truth_run is not None:
        shutil.copytree(truth_run, runs / "truth")
        at.text_input(key="truth_path").input(str(runs / "truth")).run()
        return f"run folder {truth_run}"
    at.radio(key="truth_source").set_value("Fit live").run()
    at.number_input(key="truth_heads").set_value(0).run()
    at.toggle(key="truth_fit_now").set_value(True).run()
    return "fitted live (capitals, no ITI heads)"


def run_dashboard_benchmark(model: str = "smollm2-135m-instruct", repeats: int = 3, new_tokens: int = 16,
                            threads: int | None = None, out: str | Path | None = None,
                            console: Console | None = None, truth_run: str | Path | None = None) -> dict:
    """Drive the app, time every interaction ``repeats`` times beside its baseline, print the table and write
    JSON to ``out`` when given. ``truth_run``: a ``hiddenlens truth directions`` run folder fitted on ``model``
    (default: the committed one for the embedded model, else the page fits them live). Returns ``{"model",
    "threads", "rows": [...], "setup": {...}, ...}``; each row:
    ``interaction``, ``seconds`` and ``baseline_seconds`` (medians), ``ratio`` (median of the per-repetition
    ratios), ``budget``, ``within_budget``, the same on the process CPU clock (``cpu_seconds``,
    ``baseline_cpu_seconds``, ``cpu_ratio``, ``within_budget_cpu``: the steadier clock on a shared machine, the
    wall clock's equal on an idle one with ``threads=1``), ``threads``, ``samples``."""
    from streamlit.testing.v1 import AppTest

    if repeats < 1 or repeats > len(ALPHAS) or new_tokens < 4:
        raise ValueError(f"repeats must be 1..{len(ALPHAS)} and new_tokens >= 4")
    if threads:
        torch.set_num_threads(threads)
    handle = load_model(model)
    prompt_ids: dict[bool, list[int]] = {}

    def baseline(add_bos: bool, n: int) -> float:
        """Plain ``handle.generate`` of exactly ``n`` new tokens after the page's prompt: the mean of two runs, right
        after the interaction it is compared with."""
        ids = prompt_ids.setdefault(add_bos, handle.tokenize([prompt], add_bos=add_bos).input_ids[0].tolist())
        runs = [_timed(lambda: handle.generate([ids], max_new_tokens=n, min_new_tokens=n)) for _ in range(2)]
        return {"baseline_seconds": statistics.mean(r[0] for r in runs),
                "baseline_cpu_seconds": statistics.mean(r[1] for r in runs)}

    def sample(value, timing: tuple[float, float], n: int) -> dict:
        return {"value": value, "seconds": timing[0], "cpu_seconds": timing[1], "new_tokens": n,
                **baseline(add_bos, n)}

    tmp = Path(tempfile.mkdtemp(prefix="hiddenlens-bench-dashboard-"))
    saved = {k: os.environ.get(k) for k in (MODEL_ENV, RUNS_ENV)}
    os.environ[MODEL_ENV], os.environ[RUNS_ENV] = model, str(tmp / "runs")
    (tmp / "runs").mkdir()
    setup, samples = {}, {k: [] for k in BUDGETS}
    try:
        at = AppTest.from_file(app_path(), default_timeout=3600)
        setup["first_run_s"] = _timed(at.run)[0]
        _check(at)
        prompt = at.session_state["hl_prompt"]
        add_bos = bool(at.session_state["hl_add_bos"])
        at.switch_page("views/truth.py").run()
        t = time.perf_counter()
        setup["truth_directions"] = _truth_source(at, handle.spec, tmp / "runs",
                                                  None if truth_run is None else Path(truth_run))
        _check(at)
        at.slider(key="truth_tokens").set_value(new_tokens).run()
        setup["truth_open_and_first_steer_s"] = time.perf_counter() - t
        _check(at)
        for alpha in ALPHAS[:repeats]:
            s = _timed(at.slider(key="truth_alpha").set_value(alpha).run)
            _check(at)
            n = _steered_new_tokens(at)
            samples["truth_alpha"].append(sample(alpha, s, n))
        t = time.perf_counter()
        at.switch_page("views/leakage.py").run()
        at.slider(key="leak_new").set_value(new_tokens).run()
        setup["leakage_open_s"] = time.perf_counter() - t
        _check(at)
        shown = at.selectbox(key="leak_span").value  # computed when the page opened (setup)
        words = [w for w in dict.fromkeys(re.findall(r"[A-Za-z][\w'-]*", prompt)) if w != shown]
        if len(words) < repeats:
            raise ValueError(f"the prompt has {len(words) + 1} words; the span benchmark needs {repeats + 1}")
        for word in words[:repeats]:
            s = _timed(at.selectbox(key="leak_span").set_value(word).run)
            _check(at)
            samples["leakage_span"].append(sample(word, s, _after_new_tokens(at)))
        for lo, hi in new_ranges(handle.n_layers, tuple(at.slider(key="leak_layers").value), repeats):
            s = _timed(at.slider(key="leak_layers").set_value((lo, hi)).run)
            _check(at)
            samples["leakage_layers"].append(sample([lo, hi], s, _after_new_tokens(at)))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)
    n_threads = torch.get_num_threads()
    rows = []
    for name, (kind, limit) in BUDGETS.items():
        got = samples[name]
        row = {"interaction": name}
        for clock in ("", "cpu_"):
            row[f"{clock}seconds"] = statistics.median(x[f"{clock}seconds"] for x in got)
            row[f"baseline_{clock}seconds"] = statistics.median(x[f"baseline_{clock}seconds"] for x in got)
            row[f"{clock}ratio"] = statistics.median(x[f"{clock}seconds"] / x[f"baseline_{clock}seconds"] for x in got)
            value = row[f"{clock}ratio"] if kind == "ratio" else row[f"{clock}seconds"]
            row[f"within_budget{'_cpu' if clock else ''}"] = bool(value <= limit)
        rows.append({**row, "budget": f"<= {limit:g}x generate" if kind == "ratio" else f"<= {limit:g} s",
                     "threads": n_threads, "samples": got})
    result = {"model": handle.spec, "device": str(handle.device), "dtype": str(handle.dtype),
              "new_tokens": new_tokens, "repeats": repeats, "threads": n_threads, "prepend_bos": add_bos,
              "setup": setup, "rows": rows}
    print_table(result, console or Console())
    if out:
        write_json(out, result)
    return result


def print_table(result: dict, console: Console) -> None:
    t = Table(title=f"dashboard interactions on {result['model']} ({result['device']}, {result['threads']} threads; "
                    f"medians of {result['repeats']}, one run; wall / process CPU seconds)")
    for c in ("interaction", "seconds", "baseline seconds", "ratio", "budget", "within budget", "threads"):
        t.add_column(c, no_wrap=c == "interaction")
    yes = {True: "yes", False: "NO"}
    for r in result["rows"]:
        t.add_row(r["interaction"], f"{r['seconds']:.2f} / {r['cpu_seconds']:.2f}",
                  f"{r['baseline_seconds']:.2f} / {r['baseline_cpu_seconds']:.2f}",
                  f"{r['ratio']:.2f} / {r['cpu_ratio']:.2f}", r["budget"],
                  f"{yes[r['within_budget']]} / {yes[r['within_budget_cpu']]}", str(r["threads"]))
    console.print(t, width=max(console.width, 132))
    console.print("setup (not budgeted): " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k}: {v}"
                                                       for k, v in result["setup"].items()))
