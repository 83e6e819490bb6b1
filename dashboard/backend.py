"""The interface the dashboard pages call. Pages never touch hooks or tensors: they pass a :class:`ModelKey`, the
prompt and parameters, and get back plain views (numpy arrays, strings, DataFrames).

Every heavy function is cached per (model key, input, parameters) with ``st.cache_resource`` (bounded; results are
returned by reference, never pickled) so unrelated reruns never recompute, and shows a spinner while it runs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from hiddenlens.analyses import sinks
from hiddenlens.analyses.intention import intention_entropy
from hiddenlens.analyses.iteration import summarize, token_table
from hiddenlens.analyses.truth import token_scores
from hiddenlens.analyses.tuned_lens import TunedLens
from hiddenlens.interventions.decider import EntropyDecider, load_decider
from hiddenlens.interventions.iterate import iterate_teacher_forced
from hiddenlens.interventions.replace import compare_replacement
from hiddenlens.interventions.steer import steer_generate
from hiddenlens.studies import intention as intention_study
from hiddenlens.studies import truth as truth_study

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
    """Every capturable site: name, layer (blank for global sites) and kind."""
    rows = []
    for name in get_model(key).site_names():
        parts = name.split(".")
        is_block = parts[0] == "blocks"
        rows.append({"site": name, "layer": int(parts[1]) if is_block else None,
                     "kind": ".".join(parts[2:]) if is_block else name})
    return pd.DataFrame(rows)


@st.cache_resource(max_entries=2, show_spinner="Loading the tuned lens...")
def _tuned_lens(key: ModelKey, path: str, mtime_ns: int):
    return TunedLens.load(path, get_model(key)).to(get_model(key).device)


@st.cache_resource(max_entries=16, show_spinner="Running the lens over every layer...")
def lens_view(key: ModelKey, prompt: str, tuned_path: str = "", max_positions: int = 48, top_k: int = 5
              ) -> lens.LensView:
    """Logit-lens view of ``prompt`` on the model ``key``; with ``tuned_path`` (a ``.safetensors`` lens written by
    ``TunedLens.save``) the tuned lens instead."""
    tuned = None
    if tuned_path:
        p = Path(tuned_path).expanduser()
        tuned = _tuned_lens(key, str(p), p.stat().st_mtime_ns if p.is_file() else 0)
    return lens.lens_view(get_model(key), prompt, tuned=tuned, max_positions=max_positions, top_k=top_k)


SINK_METRICS = {"dormancy": "dormancy (mean attention on the first token)", "sink_first": "sink mass of key 0",
                "value_ratio": "value norm ratio (first / rest)", "logit_gap": "logit gap to key 0",
                "row_entropy": "row entropy (normalised)"}


@st.cache_resource(max_entries=16, show_spinner="Measuring attention sinks at every layer and head...")
def sink_analysis(key: ModelKey, prompt: str, max_tokens: int = 96):
    """``hiddenlens.analyses.sinks.sink_analysis`` of one prompt (BOS prepended): ``.heads``, ``.layers``."""
    return sinks.sink_analysis(get_model(key), [prompt], add_bos=True, max_tokens=max_tokens)


@st.cache_resource(max_entries=32, show_spinner="Capturing the head's attention pattern...")
def head_pattern(key: ModelKey, prompt: str, layer: int, head: int, max_tokens: int = 96, max_size: int = 64
                 ) -> tuple[list[str], np.ndarray, int]:
    """``(tokens, pattern, pooling factor)`` of one head; patterns longer than ``max_size`` are average-pooled."""
    tokens, pattern = sinks.head_pattern(get_model(key), prompt, layer, head, add_bos=True, max_tokens=max_tokens)
    pooled, factor = attention.pool(pattern, max_size)
    return lens.token_strings_from_text(tokens), pooled, factor


@st.cache_resource(max_entries=4, show_spinner="Running the sink metrics on prose and on code...")
def domain_sinks(key: ModelKey, n_prompts: int = 4, n_tokens: int = 64) -> tuple[dict, pd.DataFrame]:
    """Sink analyses of offline prose and Python code (``sinks.default_domains``) and their per-head contrast."""
    handle = get_model(key)
    by_domain = {name: sinks.sink_analysis(handle, rows) for name, rows in
                 sinks.default_domains(handle, n_prompts=n_prompts, n_tokens=n_tokens).items()}
    return by_domain, sinks.domain_contrast(by_domain)


@st.cache_resource(max_entries=16, show_spinner="Reading the next-token distribution...")
def prompt_intention(key: ModelKey, prompt: str) -> dict:
    """H_int of ``prompt`` (entropy in bits of the next-token distribution: top-100 renormalised and full)."""
    logits = get_model(key).run([prompt]).logits[0, -1]
    return {"h_int_bits": float(intention_entropy(logits)), "h_int_full_bits": float(intention_entropy(logits, None))}


@st.cache_resource(max_entries=4, show_spinner="Running the regimes (generation + probes)...")
def default_shots() -> int:
    """The few-shot default of the intention study, the one ``hiddenlens analyze intention --shots`` uses."""
    import dataclasses
    return int(next(f.default for f in dataclasses.fields(intention_study.IntentionConfig) if f.name == "shots"))


def live_regimes(key: ModelKey, n_problems: int, regimes: tuple[str, ...], max_new_tokens: int, seed: int = 0,
                 shots: int | None = None) -> dict[str, pd.DataFrame]:
    """The intention study (:mod:`hiddenlens.studies.intention`) on ``n_problems`` generated arithmetic problems;
    the ``regimes`` / ``dims`` / ``items`` tables, as its run folder holds them."""
    config = intention_study.IntentionConfig(model=key.spec, backend=key.backend, device=key.device, dtype=key.dtype,
                                             n=n_problems, seed=seed, regimes=list(regimes),
                                             max_new_tokens={r: max_new_tokens for r in regimes}, n_boot=200,
                                             boot_seed=seed,
                                             **({} if shots is None else {"shots": int(shots)}))
    res = intention_study.run(config, get_model(key), progress=False)
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


@st.cache_resource(max_entries=16, show_spinner="Generating with and without steering...")
def steer_compare(key: ModelKey, prompt: str, source: tuple, method: str, alpha: float, mode: str,
                  max_new_tokens: int) -> dict[str, pd.DataFrame]:
    """Plain and steered greedy continuations of ``prompt``, each scored per token by the direction's detector
    (``truth.token_scores``, read on an unsteered pass over each sequence): ``{"plain": df, "steered": df}`` with
    ``token``, ``generated``, ``projection``, ``p_true``."""
    handle = get_model(key)
    direction = truth_source(key, source).direction(method)
    plain = token_scores(handle, direction, prompt, max_new_tokens=max_new_tokens)
    steered = steer_generate(handle, [prompt], [direction], alpha, mode=mode, max_new_tokens=max_new_tokens)
    scored = token_scores(handle, direction, steered.sequences[0].tolist(), 0)
    scored["generated"] = scored["position"] >= steered.prompt_length
    return {"plain": plain, "steered": scored}


@st.cache_resource(max_entries=16, show_spinner="Replacing the span and generating before / after...")
def replacement(key: ModelKey, prompt: str, span: str, first: int, last: int, mode: str = "isolated",
                tokens: str = "all", top_k: int = 10, max_new_tokens: int = 20):
    """``hiddenlens.interventions.replace.compare_replacement`` of ``span`` over the outputs of blocks
    ``first..last`` (inclusive block indices): next-token table, KL, continuations, log."""
    return compare_replacement(get_model(key), prompt, span, (first, last), mode, tokens, top_k=top_k,
                               max_new_tokens=max_new_tokens)


def _decider(decider: str, threshold: float):
    if decider == "entropy":
        return EntropyDecider(threshold)
    return load_decider(Path(decider).expanduser(), threshold)


@st.cache_resource(max_entries=16, show_spinner="Iterating the hard tokens...")
def iteration(key: ModelKey, prompt: str, decider: str = "entropy", threshold: float = 2.5, max_iter: int = 2
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Think-at-Hard selective iteration over ``prompt`` (teacher forced): per-token table (token, target,
    predictions before / after, depth, decider score, fixed, broken) and its one-row summary. ``decider`` is
    ``"entropy"`` or the folder of a trained MLP decider (``decider.safetensors`` + ``decider.json``)."""
    handle = get_model(key)
    ids = handle.tokenize([prompt]).input_ids[0].tolist()
    res = iterate_teacher_forced(handle, ids, _decider(decider, threshold), max_iter=max_iter)
    table = token_table(handle, res, "entropy" if decider == "entropy" else "mlp")
    for col in ("token", "target", "pred_first", "pred_final"):  # tokenizer pieces (e.g. "Ġthe") -> text
        table[col] = [handle.tokenizer.convert_tokens_to_string([t]) for t in table[col]]
    return table, summarize(table)


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
