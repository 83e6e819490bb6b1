"""The interface the dashboard pages call. Pages never touch hooks or tensors: they pass a :class:`ModelKey`, the
prompt and parameters, and get back plain views (numpy arrays, strings, DataFrames).

Every heavy function is cached per (model key, input, parameters) with ``st.cache_resource`` (bounded; results are
returned by reference, never pickled) so unrelated reruns never recompute, and shows a spinner while it runs.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import streamlit as st
import torch

from hiddenlens.analyses import sinks
from hiddenlens.analyses.intention import intention_entropy
from hiddenlens.analyses.iteration import summarize, token_table
from hiddenlens.analyses.truth import token_scores
from hiddenlens.analyses.tuned_lens import TunedLens, cached_lens_path, cached_tuned_lens
from hiddenlens.common.errors import DamagedFileError
from hiddenlens.interventions.decider import EntropyDecider, cached_decider, cached_decider_dir, load_decider
from hiddenlens.interventions.iterate import iterate_teacher_forced
from hiddenlens.interventions.replace import (compare_replacement, continue_span_prompt, every_site, isolated_states,
                                              locate_span, select_states)
from hiddenlens.interventions.steer import continuation_states, continue_prefilled, prefill, steer_prefilled
from hiddenlens.probes.sites import SITE_AXES
from hiddenlens.studies import intention as intention_study
from hiddenlens.studies import sinks as sinks_study
from hiddenlens.studies import truth as truth_study
from hiddenlens.studies.report import PREPEND_BOS

from . import attention, lens, results, truthview
from .modelstore import ModelKey, get_model, runs_dir

MAX_PROMPT_CHARS = 2000


def model_card(key: ModelKey) -> dict:
    """Spec, source, backend, device, dtype, parameter count and the adapter's architecture description."""
    handle = get_model(key)
    n_params = sum(p.numel() for p in handle.hf_model.parameters())
    return {"spec": handle.spec, "source": handle.info.get("source", ""), "backend": handle.backend.name,
            "device": str(handle.device), "dtype": str(handle.dtype).replace("torch.", ""),
            "parameters": n_params, "architecture": handle.adapter.describe()}


def site_table(key: ModelKey) -> pd.DataFrame:
    """Every capturable site: name, layer (blank for global sites), kind, ``axes`` (e.g. ``[batch, n_heads, q, k]``)
    and ``shape`` (the same with the model's sizes filled in, e.g. ``[batch, 9, q, k]``; ``batch``, ``pos``,
    ``q`` (query positions) and ``k`` (key positions) depend on the input)."""
    arch = get_model(key).adapter.describe()
    rows = []
    for name in get_model(key).site_names():
        parts = name.split(".")
        is_block = parts[0] == "blocks"
        kind = ".".join(parts[2:]) if is_block else name
        axes = SITE_AXES[kind]
        rows.append({"site": name, "layer": int(parts[1]) if is_block else None, "kind": kind,
                     "axes": f"[{', '.join(axes)}]",
                     "shape": f"[{', '.join(str(arch[a]) if a in arch else a for a in axes)}]"})
    return pd.DataFrame(rows)


def prompt_tokens(key: ModelKey, prompt: str, add_bos: bool = PREPEND_BOS) -> list[str]:
    """The tokens of ``prompt`` as every page feeds it to the model (BOS first when ``add_bos``), as text."""
    handle = get_model(key)
    ids = handle.tokenize([prompt], add_bos=add_bos).input_ids[0].tolist()
    return lens.token_strings_from_text([handle.tokenizer.decode([i]) for i in ids])


#: ``tuned_path`` / ``decider`` value meaning "the one trained for this model" (cached; trained on first use)
CACHED = ":cached:"


@st.cache_resource(max_entries=2, show_spinner="Loading the tuned lens...")
def _tuned_lens(key: ModelKey, path: str, mtime_ns: int):
    return TunedLens.load(path, get_model(key)).to(get_model(key).device)


def trained_here(key: ModelKey, what: str) -> bool:
    """Whether this model's cached tuned lens (``what="lens"``) or MLP decider (``"decider"``) is already trained
    (else the first use trains it: minutes on the embedded model)."""
    handle = get_model(key)
    if what == "lens":
        return cached_lens_path(handle).is_file()
    return (cached_decider_dir(handle) / "decider.json").is_file()


@st.cache_resource(max_entries=16, show_spinner="Running the lens over every layer...")
def _lens_view(key: ModelKey, prompt: str, tuned_path: str, mtime_ns: int, max_positions: int, top_k: int,
               add_bos: bool) -> lens.LensView:
    tuned = _tuned_lens(key, tuned_path, mtime_ns) if tuned_path else None
    return lens.lens_view(get_model(key), prompt, tuned=tuned, max_positions=max_positions, top_k=top_k,
                          add_bos=add_bos)


def lens_view(key: ModelKey, prompt: str, tuned_path: str = "", max_positions: int = 48, top_k: int = 5,
              add_bos: bool = PREPEND_BOS, progress: Progress | None = None) -> lens.LensView:
    """Logit-lens view of ``prompt`` on the model ``key`` (BOS first when ``add_bos``); with ``tuned_path`` the
    tuned lens instead: a ``.safetensors`` lens written by ``TunedLens.save``, or :data:`CACHED` for this model's
    cached lens (``hiddenlens.analyses.tuned_lens.cached_tuned_lens``), trained here on first use with
    ``progress(fraction, what)`` reporting (a damaged cached file is trained again). Views are cached per input."""
    if tuned_path == CACHED:
        handle = get_model(key)
        path = cached_lens_path(handle)
        if not path.is_file():
            cached_tuned_lens(handle, progress=progress or False)
        try:
            return _lens_view(key, prompt, str(path), path.stat().st_mtime_ns, max_positions, top_k, add_bos)
        except DamagedFileError:
            cached_tuned_lens(handle, progress=progress or False)
            return _lens_view(key, prompt, str(path), path.stat().st_mtime_ns, max_positions, top_k, add_bos)
    p = Path(tuned_path).expanduser() if tuned_path else None
    return _lens_view(key, prompt, str(p) if p else "", p.stat().st_mtime_ns if p and p.is_file() else 0,
                      max_positions, top_k, add_bos)


SINK_METRICS = {"dormancy": "dormancy (mean attention on the first token)", "sink_first": "sink mass of key 0",
                "value_ratio": "value norm ratio (first / rest)", "logit_gap": "logit gap to key 0",
                "row_entropy": "row entropy (normalised)"}


@st.cache_resource(max_entries=16, show_spinner="Measuring attention sinks at every layer and head...")
def sink_analysis(key: ModelKey, prompt: str, max_tokens: int = 96, add_bos: bool = PREPEND_BOS):
    """``hiddenlens.analyses.sinks.sink_analysis`` of one prompt (the BOS prepended when ``add_bos``, the sidebar's
    "Prepend BOS"): ``.heads``, ``.layers``."""
    return sinks.sink_analysis(get_model(key), [prompt], add_bos=add_bos, max_tokens=max_tokens)


@st.cache_resource(max_entries=32, show_spinner="Capturing the head's attention pattern...")
def head_pattern(key: ModelKey, prompt: str, layer: int, head: int, max_tokens: int = 96, max_size: int = 64,
                 add_bos: bool = PREPEND_BOS) -> tuple[list[str], np.ndarray, int]:
    """``(tokens, pattern, pooling factor)`` of one head; patterns longer than ``max_size`` are average-pooled."""
    tokens, pattern = sinks.head_pattern(get_model(key), prompt, layer, head, add_bos=add_bos, max_tokens=max_tokens)
    pooled, factor = attention.pool(pattern, max_size)
    return lens.token_strings_from_text(tokens), pooled, factor


#: The "Prose vs code" comparison of the sinks page: passages per domain and tokens per passage (BOS included).
DOMAIN_PROMPTS, DOMAIN_TOKENS = 4, 64


@st.cache_resource(max_entries=4, show_spinner="Running the sink metrics on prose and on code...")
def domain_sinks(key: ModelKey, n_prompts: int = DOMAIN_PROMPTS, n_tokens: int = DOMAIN_TOKENS,
                 add_bos: bool = PREPEND_BOS) -> tuple[dict, pd.DataFrame]:
    """Sink analyses of offline prose and Python code (``sinks.default_domains``; without ``add_bos`` their BOS
    is taken off) and their per-head contrast."""
    handle = get_model(key)
    by_domain = {name: sinks.sink_analysis(handle, rows, add_bos=add_bos) for name, rows in
                 sinks.default_domains(handle, n_prompts=n_prompts, n_tokens=n_tokens).items()}
    return by_domain, sinks.domain_contrast(by_domain)


def sinks_run(key: ModelKey, add_bos: bool = PREPEND_BOS, n_prompts: int = DOMAIN_PROMPTS,
              n_tokens: int = DOMAIN_TOKENS) -> sinks_study.Result:
    """The sinks study (:mod:`hiddenlens.studies.sinks`: prose vs code, causal confirmation, leaving tokens) at the
    settings of the page's prose vs code comparison (its ``heads_*`` and ``contrast`` tables are the ones shown),
    for "Save as run"; not cached (it runs once per click)."""
    config = sinks_study.SinksConfig(model=key.spec, backend=key.backend, device=key.device, dtype=key.dtype,
                                     n_prompts=n_prompts, n_tokens=n_tokens, causal_heads=2,
                                     causal_prompts=n_prompts, add_bos=add_bos)
    return sinks_study.run(config, get_model(key), progress=False)


@st.cache_resource(max_entries=16, show_spinner="Reading the next-token distribution...")
def prompt_intention(key: ModelKey, prompt: str, add_bos: bool = PREPEND_BOS) -> dict:
    """H_int of ``prompt`` (entropy in bits of the next-token distribution: top-100 renormalised and full)."""
    logits = get_model(key).run([prompt], add_bos=add_bos).logits[0, -1]
    return {"h_int_bits": float(intention_entropy(logits)), "h_int_full_bits": float(intention_entropy(logits, None))}


def default_shots() -> int:
    """The few-shot default of the intention study, the one ``hiddenlens analyze intention --shots`` uses."""
    import dataclasses
    return int(next(f.default for f in dataclasses.fields(intention_study.IntentionConfig) if f.name == "shots"))


@st.cache_resource(max_entries=4, show_spinner="Running the regimes (generation + probes)...")
def live_intention(key: ModelKey, n_problems: int, regimes: tuple[str, ...], max_new_tokens: int, seed: int = 0,
                   shots: int | None = None) -> intention_study.Result:
    """The intention study (:mod:`hiddenlens.studies.intention`) on ``n_problems`` generated arithmetic problems,
    its whole ``Result`` (what "Save as run" writes)."""
    config = intention_study.IntentionConfig(model=key.spec, backend=key.backend, device=key.device, dtype=key.dtype,
                                             n=n_problems, seed=seed, regimes=list(regimes),
                                             max_new_tokens={r: max_new_tokens for r in regimes}, n_boot=200,
                                             boot_seed=seed,
                                             **({} if shots is None else {"shots": int(shots)}))
    return intention_study.run(config, get_model(key), progress=False)


def live_regimes(key: ModelKey, n_problems: int, regimes: tuple[str, ...], max_new_tokens: int, seed: int = 0,
                 shots: int | None = None) -> dict[str, pd.DataFrame]:
    """The ``regimes`` / ``dims`` / ``items`` tables of :func:`live_intention`, as its run folder holds them."""
    res = live_intention(key, n_problems, tuple(regimes), max_new_tokens, seed, shots)
    return {name: res.tables[name] for name in ("regimes", "dims", "items")}


REGIME_TABLES = {"regimes": ("regime", "h_int_bits", "accuracy"), "dims": ("regime", "layer", "participation_ratio")}


def regime_tables(path: str) -> dict[str, pd.DataFrame]:
    """The ``regimes`` and ``dims`` (and ``items`` when present) tables of an intention run folder, read with
    :meth:`hiddenlens.studies.intention.Result.read`; raises :class:`results.ResultsError` when it is not one."""
    res = read_study_run(path, intention_study.Result)
    missing = [f"{name}.parquet (columns {', '.join(cols)})" for name, cols in REGIME_TABLES.items()
               if name not in res.tables or not set(cols) <= set(res.tables[name].columns)]
    if missing:
        raise results.ResultsError(f"{res.folder} is not an intention run folder: missing {'; '.join(missing)}")
    return {name: res.tables[name] for name in ("regimes", "dims", "items") if name in res.tables}


def read_study_run(path: str, result_type):
    """``result_type.read(path)`` (a study's ``Result``) of a run folder under the runs root that holds no
    symbolic link (:func:`results.safe_run_folder`, :func:`results.check_no_links`), its errors as
    :class:`results.ResultsError`."""
    folder = results.safe_run_folder(runs_dir(), path)
    results.check_no_links(folder)
    try:
        return result_type.read(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise results.ResultsError(ui_text(exc)) from exc


def ui_text(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


@st.cache_resource(max_entries=2, show_spinner="Fitting truthful directions (activations of every statement)...")
def truth_fit(key: ModelKey, family: str = "capitals", k_heads: int = 8) -> truthview.TruthView:
    """The truth study (:mod:`hiddenlens.studies.truth`) on the model, live (no transfer families)."""
    config = truth_study.TruthConfig(model=key.spec, backend=key.backend, device=key.device, dtype=key.dtype,
                                     family=family, transfer=[], k_heads=k_heads)
    return truthview.from_result(truth_study.run(config, get_model(key), progress=False))


def truth_run(path: str) -> truthview.TruthView:
    """The tables and directions of a truth run folder (``hiddenlens truth directions``)."""
    return truthview.from_result(read_study_run(path, truth_study.Result))


def truth_source(key: ModelKey, source: tuple) -> truthview.TruthView:
    """``("fit", family, k_heads)`` or ``("run", path)`` -> the cached :class:`truthview.TruthView`."""
    return truth_fit(key, *source[1:]) if source[0] == "fit" else truth_run(source[1])


# ---- steering and leakage: what no change touches is kept; generation streams to the page ----------------------
#: ``progress(fraction done in [0, 1], the stage running now)``: a page's progress bar.
Progress = Callable[[float, str], None]
#: ``stream(which continuation, its text so far)``: a page's placeholders, filled as tokens come.
Stream = Callable[[str, str], None]
_kept_lock = threading.Lock()


@st.cache_resource(max_entries=64, show_spinner=False)
def _memo(kind: str, key: ModelKey, args: tuple) -> dict:
    """An empty dict per ``(kind, model, args)``, dropped with Streamlit's caches: where the steering and leakage
    views keep results that stream to the page while they run (a cached function would replay the page elements
    it wrote on every later hit)."""
    return {}


def _kept(store: dict, name, compute: Callable, limit: int = 16):
    """``store[name]``, computed on first use (past ``limit`` entries the oldest is dropped)."""
    with _kept_lock:
        if name in store:
            return store[name]
    value = compute()
    with _kept_lock:
        store[name] = value
        while len(store) > limit:
            store.pop(next(iter(store)))
    return value


def _follow(handle, which: str, stage: str, n: int, progress: Progress | None, stream: Stream | None):
    """``on_token`` of a greedy loop: the stage (``k/n`` tokens) on the progress bar, the text on the stream."""
    def on_token(new: list[int]) -> None:
        if progress is not None:
            progress(len(new) / n, f"{stage}: {len(new)}/{n} new tokens")
        if stream is not None:
            stream(which, handle.tokenizer.decode(new, skip_special_tokens=True))
    return on_token


def _say(progress: Progress | None, fraction: float, stage: str) -> None:
    if progress is not None:
        progress(fraction, stage)


def statement_ends(tokens: list[str]) -> list[bool]:
    """Where the truth detector means something: tokens that end with ".", the position it was fitted on (the
    final "." of each statement, :mod:`hiddenlens.analyses.truth`)."""
    return [t.strip().endswith(".") for t in tokens]


def tokenizer_adds_bos(key: ModelKey) -> bool:
    """Whether the model's tokenizer puts BOS first by itself: the tokenization the truth directions were fitted
    with (:func:`hiddenlens.analyses.truth.extract_last_token` runs statements as the tokenizer gives them)."""
    handle = get_model(key)
    bos = handle.tokenizer.bos_token_id
    return bos is not None and handle.tokenize(["a"]).input_ids[0, 0].item() == bos


def _scored(handle, direction, ids: list[int], h: torch.Tensor, first: int, n_prompt: int) -> pd.DataFrame:
    """Rows ``first..`` of ``ids`` scored from their states ``h [len(ids) - first, width]`` (as
    :func:`hiddenlens.analyses.truth.token_scores`); positions ``>= n_prompt`` are generated."""
    toks = [handle.tokenizer.decode([t]) for t in ids[first:]]
    return pd.DataFrame(dict(position=range(first, len(ids)), token=toks,
                             generated=[p >= n_prompt for p in range(first, len(ids))],
                             projection=direction.project(h).numpy(), p_true=direction.p_true(h).numpy(),
                             statement_end=statement_ends(toks)))


def steer_compare(key: ModelKey, prompt: str, source: tuple, method: str, alpha: float, mode: str,
                  max_new_tokens: int, add_bos: bool = PREPEND_BOS, progress: Progress | None = None,
                  stream: Stream | None = None) -> dict[str, pd.DataFrame]:
    """Plain and steered greedy continuations of ``prompt`` (BOS prepended when ``add_bos``), each scored per token
    by the direction's detector on an unsteered pass: ``{"plain": df, "steered": df}`` with ``position``,
    ``token``, ``generated``, ``projection`` (units of h), ``p_true`` and ``statement_end`` (:func:`statement_ends`:
    where the detector means something).

    Kept per (model, prompt, BOS, new tokens), since no alpha changes them: the prompt's KV cache of positions
    ``0..P-2`` (:func:`~hiddenlens.interventions.steer.prefill`; mode ``generated`` decodes from it), the plain
    continuation and, per direction, its scores; steered results are kept per (direction, mode, alpha). A new alpha
    costs the steered tokens and one unsteered pass over them. ``progress`` names each stage, ``stream("plain" |
    "steered", text)`` follows the continuations token by token."""
    handle = get_model(key)
    n = int(max_new_tokens)
    base = _memo("steer", key, (prompt, bool(add_bos), n))

    def direction():  # read only when something is computed (a loaded run is read from its folder)
        return truth_source(key, source).direction(method)


    def prefilled():
        _say(progress, 0.0, "Prefilling the prompt (one forward)")
        return prefill(handle, prompt, add_bos)

    pre = _kept(base, "prefill", prefilled)
    P = len(pre.ids)
    plain_ids = _kept(base, "plain", lambda: pre.ids + continue_prefilled(
        handle, pre, n, _follow(handle, "plain", "Plain continuation", n, progress, stream)))

    def plain_scores() -> pd.DataFrame:
        _say(progress, 1.0, "Scoring the plain tokens (one forward)")
        df = token_scores(handle, direction(), plain_ids, 0)
        return df.assign(generated=df["position"] >= P, statement_end=statement_ends(df["token"].tolist()))

    plain = _kept(base, ("scores", source, method), plain_scores)

    def steered() -> pd.DataFrame:
        d = direction()
        out = steer_prefilled(handle, pre, [d], alpha, mode, n,
                              _follow(handle, "steered", f"Steered continuation (alpha {alpha:g})", n, progress,
                                      stream))
        _say(progress, 1.0, "Scoring the steered tokens (one unsteered pass over the new ones)")
        ids = out.sequences[0].tolist()
        h = continuation_states(handle, pre, ids, d.site, d.head)
        return pd.concat([plain[plain["position"] < P - 1], _scored(handle, d, ids, h, P - 1, P)],
                         ignore_index=True)

    runs = _memo("steer-runs", key, (prompt, bool(add_bos), n, source, method, mode))
    return {"plain": plain, "steered": _kept(runs, float(alpha), steered)}


def replacement(key: ModelKey, prompt: str, span: str, first: int, last: int, mode: str = "isolated",
                tokens: str = "all", top_k: int = 10, max_new_tokens: int = 20, add_bos: bool = PREPEND_BOS,
                progress: Progress | None = None, stream: Stream | None = None):
    """``hiddenlens.interventions.replace.compare_replacement`` of ``span`` over the outputs of blocks
    ``first..last`` (inclusive block indices; BOS prepended when ``add_bos``): next-token table, KL,
    continuations, log.

    Kept across changes: the "before" run (per model, prompt, BOS and new tokens: no span or layer changes it), the
    span's lone-run states at every site (per span and mode: one run serves every layer range) and each
    comparison. A span or layer-range change costs the "after" continuation only. ``progress`` names each stage,
    ``stream("before" | "after", text)`` follows the continuations token by token."""
    handle = get_model(key)
    n = int(max_new_tokens)
    args = (prompt, bool(add_bos), n)
    sp = locate_span(handle, prompt, span, add_bos)
    before = _kept(_memo("leak", key, args), "before", lambda: continue_span_prompt(
        handle, sp, max_new_tokens=n, on_token=_follow(handle, "before", "Plain continuation", n, progress,
                                                          stream))[0])

    def lone_run() -> torch.Tensor:
        _say(progress, 0.0, f"Running the span {sp.text!r} alone (every layer at once)")
        return isolated_states(handle, sp, every_site(handle.n_layers), mode)

    lone = _kept(_memo("leak-lone", key, args), (span, mode), lone_run)
    return _kept(_memo("leak-runs", key, args), (span, first, last, mode, tokens, top_k), lambda: compare_replacement(
        handle, prompt, sp, (first, last), mode, tokens, add_bos, top_k, n, before,
        select_states(lone, (first, last), handle.n_layers),
        _follow(handle, "after", f"Continuation with {sp.text!r} replaced at blocks {first}-{last}", n, progress,
                stream)))


def _decider(decider: str, threshold: float):
    if decider == "entropy":
        return EntropyDecider(threshold)
    return load_decider(Path(decider).expanduser(), threshold)


@st.cache_resource(max_entries=16, show_spinner="Iterating the hard tokens...")
def _iteration(key: ModelKey, prompt: str, decider: str, signature: tuple, threshold: float, max_iter: int,
               add_bos: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    handle = get_model(key)
    ids = handle.tokenize([prompt], add_bos=add_bos).input_ids[0].tolist()
    res = iterate_teacher_forced(handle, ids, _decider(decider, threshold), max_iter=max_iter)
    table = token_table(handle, res, "entropy" if decider == "entropy" else "mlp")
    for col in ("token", "target", "pred_first", "pred_final"):  # tokenizer pieces (e.g. "Ġthe") -> text
        table[col] = [handle.tokenizer.convert_tokens_to_string([t]) for t in table[col]]
    return table, summarize(table)


def iteration(key: ModelKey, prompt: str, decider: str = "entropy", threshold: float = 2.5, max_iter: int = 2,
              add_bos: bool = PREPEND_BOS, progress: Progress | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Think-at-Hard selective iteration over ``prompt`` (teacher forced; BOS first when ``add_bos``): per-token
    table (token, target, predictions before / after, depth, decider score, fixed, broken) and its one-row summary.
    ``decider`` is ``"entropy"``, the folder of a trained MLP decider (``decider.safetensors`` + ``decider.json``)
    or :data:`CACHED` for this model's cached MLP decider
    (``hiddenlens.interventions.decider.cached_decider``), trained here on first use with
    ``progress(fraction, what)`` reporting. Results are cached per input (and per decider files)."""
    if decider == CACHED:
        handle = get_model(key)
        folder = cached_decider_dir(handle)
        try:
            load_decider(folder)
        except (FileNotFoundError, DamagedFileError):
            cached_decider(handle, progress=progress or False)
        decider = str(folder)
    elif decider != "entropy":
        decider = str(Path(decider).expanduser())
    signature = () if decider == "entropy" else _folder_signature(Path(decider))
    return _iteration(key, prompt, decider, signature, float(threshold), int(max_iter), bool(add_bos))


def _folder_signature(path: Path) -> tuple:
    """(name, mtime, size) of every entry, links not followed."""
    try:
        return tuple(sorted((f.name, s.st_mtime_ns, s.st_size) for f in path.iterdir() for s in [f.lstat()]))
    except OSError:
        return ()


@st.cache_resource(max_entries=8, show_spinner="Reading the results folder...")
def _open_results(root: str, folder: str, signature: tuple) -> results.Results:
    return results.open_results(root, folder)


def open_results(path: str, root: str | None = None) -> results.Results:
    """The run folder at ``path``, which must lie under the runs ``root`` (default: the dashboard's,
    ``--runs`` / ``$HIDDENLENS_RUNS_DIR``; see :func:`results.safe_run_folder`), re-read when a file in it
    changes; raises :class:`results.ResultsError`."""
    root = runs_dir() if root is None else root
    folder = results.safe_run_folder(root, path)
    return _open_results(root, str(folder), _folder_signature(folder))


find_runs = results.find_runs
ResultsError = results.ResultsError


# ---- compare and patch ----------------------------------------------------------------------------------------
#: Patching sites of the "Compare and patch" page: name -> (site pattern, per head, axis of the map's columns).
PATCH_SITES = {"resid_post": ("blocks.*.resid_post", False, "position"), "attn.z": ("blocks.*.attn.z", True, "head")}


def _patch_pair(clean: str, corrupted: str, answer: str, wrong: str):
    from hiddenlens.interventions.patching import PromptPair

    return PromptPair(clean, corrupted, answer, wrong)


@st.cache_resource(max_entries=16, show_spinner="Activation patching: one forward per layer over every cell...")
def _activation_result(key: ModelKey, clean: str, corrupted: str, answer: str, wrong: str, site: str,
                       direction: str):
    from hiddenlens.interventions.patching import activation_patching

    pattern, per_head, _ = PATCH_SITES[site]
    return activation_patching(get_model(key), [_patch_pair(clean, corrupted, answer, wrong)], pattern,
                               direction=direction, per_head=per_head, progress=False)


@st.cache_resource(max_entries=16, show_spinner=False)
def activation_patch(key: ModelKey, clean: str, corrupted: str, answer: str, wrong: str, site: str = "resid_post",
                     direction: str = "denoise") -> dict:
    """``hiddenlens.interventions.patching.activation_patching`` of one pair over every layer of ``site``
    (``PATCH_SITES``): ``{"z": [layers, positions | heads] normalised metric, "columns": positions or heads,
    "column": "position" | "head", "y": row labels, "table": one row per cell, "metric_clean",
    "metric_corrupted", "tokens": the clean prompt's tokens, "direction"}``.
    Raises ``ValueError`` for pairs of different token length and multi-token answers."""
    res = _activation_result(key, clean, corrupted, answer, wrong, site, direction)
    return _patch_view(get_model(key), res, clean, PATCH_SITES[site][2])


def _patch_view(handle, res, clean: str, column: str) -> dict:
    cells = res.cells.copy()
    cells[column] = cells[column].astype(int)
    grid = cells.pivot_table(index="layer", columns=column, values="normalized", aggfunc="mean",
                             dropna=False).sort_index().sort_index(axis=1)
    ids = handle.tokenize(clean).input_ids[0].tolist()  # as the patching tokenizes it (BOS when the model uses one)
    tokens = [handle.tokenizer.decode([int(i)]) for i in ids]
    table = cells[["site", "layer", column, "metric", "normalized"]]
    if column == "position":
        table = table.assign(token=[tokens[int(p)] for p in table["position"]])
    pair = res.pairs.iloc[0]
    return {"z": grid.to_numpy(dtype=float), "columns": [int(c) for c in grid.columns],
            "y": [f"L{int(layer)}" for layer in grid.index],
            "table": table.reset_index(drop=True), "metric_clean": float(pair["metric_clean"]),
            "metric_corrupted": float(pair["metric_corrupted"]), "tokens": tokens, "column": column,
            "direction": res.direction}


@st.cache_resource(max_entries=16, show_spinner="Attribution patching (one forward and one backward) and comparing "
                                                 "it with activation patching...")
def attribution_compare(key: ModelKey, clean: str, corrupted: str, answer: str, wrong: str, site: str = "resid_post"
                        ) -> pd.DataFrame:
    """``hiddenlens.interventions.patching.compare`` of denoising activation patching and attribution patching of
    one pair over ``site``: one row per cell (``activation``, ``attribution``), Pearson r in ``.attrs["pearson_r"]``."""
    from hiddenlens.interventions.patching import attribution_patching, compare

    pattern, per_head, _ = PATCH_SITES[site]
    att = attribution_patching(get_model(key), [_patch_pair(clean, corrupted, answer, wrong)], pattern,
                               per_head=per_head, progress=False)
    both = compare(_activation_result(key, clean, corrupted, answer, wrong, site, "denoise"), att)
    both = both.drop(columns=[c for c in ("head", "position") if c in both and both[c].isna().all()])
    r = both.attrs.get("pearson_r", np.nan)
    both = both.reset_index(drop=True)
    both.attrs["pearson_r"] = r
    return both


@st.cache_resource(max_entries=16, show_spinner="Direct logit attribution of the clean prompt...")
def logit_attribution(key: ModelKey, prompt: str, answer: str, wrong: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``hiddenlens.analyses.dla.direct_logit_attribution`` of ``logit(answer) - logit(wrong)`` at the last
    position of ``prompt``: ``(components, heads)``. ``components``: ``embed``, each layer's ``attn`` (heads and
    output bias summed) and ``mlp``, then the norm / unembedding biases when the model has them, with columns
    ``component``, ``layer``, ``answer``, ``wrong``, ``diff``; ``heads``: every head's ``diff``, largest first."""
    from hiddenlens.analyses.dla import direct_logit_attribution

    df = direct_logit_attribution(get_model(key), prompt, [answer, wrong], per_head=True)
    a, w = df.columns[3], df.columns[4]
    df = df.assign(diff=df[a] - df[w])
    kind = df["component"].replace({"attn_head": "attn", "attn_bias": "attn"})
    label = [f"L{int(layer)} {k}" if pd.notna(layer) else k for k, layer in zip(kind, df["layer"])]
    components = (df.assign(label=label, kind=kind)
                  .groupby("label", sort=False)
                  .agg(component=("kind", "first"), layer=("layer", "first"), answer=(a, "sum"), wrong=(w, "sum"),
                       diff=("diff", "sum"))
                  .reset_index().rename(columns={"label": "name"}))
    heads = df[df["component"] == "attn_head"][["layer", "head", a, w, "diff"]].rename(
        columns={a: "answer", w: "wrong"})
    heads = heads.astype({"layer": int, "head": int})
    heads = heads.reindex(heads["diff"].abs().sort_values(ascending=False).index).reset_index(drop=True)
    components.attrs["logit_diff"] = float(df.attrs["logits"][a] - df.attrs["logits"][w])
    return components, heads
