"""``hiddenlens bench steer-eval``: the three speed-ups that bring the steering and TruthPrInt studies within the full
reproduction's budget, each timed beside the path it replaced in one run.

``scoring``      :func:`hiddenlens.studies.steering.item_margins` of ``conditions`` conditions (the unsteered model
                 and random directions at ``blocks.12.resid_post``, as the study's random controls) on ``items``
                 held-out fact items: ``one_per_forward`` (``tokens_per_forward=1``: one condition per forward,
                 the old path) vs ``stacked`` (several conditions' rows in one forward, the default). The margins
                 must agree within 1e-4.
``conditional``  TruthPrInt's detect-then-steer decoding (:func:`~hiddenlens.interventions.steer.steer_generate`,
                 mode ``conditional``, threshold 1: every answer rolls back once) of ``prompts`` prompts:
                 ``one_prompt_at_a_time`` (the old path) vs ``batched`` (one batch, per-row rollbacks). The tokens
                 must be identical.
``probe``        the ``probe`` direction on the fit split's statements at one layer: ITI's
                 ``LogisticRegression(max_iter=1000)`` (lbfgs, which stops at max_iter on residual streams) vs
                 :func:`~hiddenlens.analyses.truth.probe_direction` (the same objective solved by Newton's method);
                 the cosine between the two coefficients is reported.

Interleaved rounds after a warm-up, medians and ratios of medians (wall and process CPU time).
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from hiddenlens.analyses.fact_items import FAMILIES, fact_items
from hiddenlens.analyses.truth import extract_last_token, probe_direction
from hiddenlens.common.files import write_json
from hiddenlens.interventions.steer import steer_generate
from hiddenlens.probes import load_model
from hiddenlens.probes.direction import Direction
from hiddenlens.studies.steering import item_margins, random_like, statements

from .bb import interleaved, print_rows, ratio_rows


def run_steer_eval_benchmark(model: str, items: int = 64, conditions: int = 21, prompts: int = 32,
                             new_tokens: int = 6, layer: int | None = None, reps: int = 2,
                             threads: int | None = None, device: str = "auto", dtype: str = "auto",
                             out: str | None = None) -> dict:
    """Time the three comparisons (module docstring); print their tables; write JSON to ``out`` when given."""
    if threads is not None:
        torch.set_num_threads(threads)
    handle = load_model(model, device=device, dtype=dtype)
    layer = handle.n_layers // 2 if layer is None else layer
    data = fact_items(list(FAMILIES), seed=0)
    test = data[data.split == "test"].sample(min(items, int((data.split == "test").sum())), random_state=0)
    seed_dir = Direction(torch.nn.functional.normalize(torch.randn(handle.adapter.d_model,
                                                                   generator=torch.Generator().manual_seed(0)),
                                                       dim=0), 1.0, f"blocks.{layer}.resid_post")
    conds = {"base": None} | {k: (random_like([seed_dir], seed=k), 4.0) for k in range(conditions - 1)}
    results: dict = {}

    def scoring(tokens: int):
        def go() -> None:
            results[("scoring", tokens)] = item_margins(handle, test, conds, tokens_per_forward=tokens)
        return go

    def decoding(batched: bool):
        texts = list(test.prompt[:prompts])

        def go() -> None:
            kw = dict(max_new_tokens=new_tokens, threshold=1.0)
            if batched:
                seqs = [s for s in steer_generate(handle, texts, [seed_dir], 4.0, "conditional", **kw).new_tokens]
            else:
                seqs = [steer_generate(handle, [t], [seed_dir], 4.0, "conditional", **kw).new_tokens[0]
                        for t in texts]
            results[("conditional", batched)] = [[int(x) for x in s if x != handle.tokenizer.pad_token_id]
                                                 for s in seqs]
        return go

    fit = data[data.split == "train"]
    texts, y, _ = statements(fit)
    X = extract_last_token(handle, texts, [layer])["resid"][:, 0].double().numpy()

    def probe(newton: bool):
        def go() -> None:
            if newton:
                results[("probe", True)] = probe_direction(X, y)
            else:
                from sklearn.linear_model import LogisticRegression
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # lbfgs reports that it stopped at max_iter
                    results[("probe", False)] = LogisticRegression(max_iter=1000, random_state=0).fit(X, y).coef_[0]
        return go

    tables = {
        "scoring": ratio_rows(interleaved({"one_per_forward": scoring(1), "stacked": scoring(1024)}, reps),
                              "one_per_forward", per=conditions, unit="s_per_condition"),
        "conditional": ratio_rows(interleaved({"one_prompt_at_a_time": decoding(False), "batched": decoding(True)},
                                              reps), "one_prompt_at_a_time", per=prompts, unit="s_per_prompt"),
        "probe": ratio_rows(interleaved({"lbfgs_max_iter_1000": probe(False), "newton": probe(True)}, reps),
                            "lbfgs_max_iter_1000", per=1, unit="s_per_fit"),
    }
    margin_diff = max(float(np.abs(results[("scoring", 1)][k] - results[("scoring", 1024)][k]).max()) for k in conds)
    same_tokens = results[("conditional", False)] == results[("conditional", True)]
    a, b = results[("probe", False)], results[("probe", True)]
    cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    result = {"model": model, "items": len(test), "conditions": conditions, "prompts": prompts,
              "new_tokens": new_tokens, "layer": layer, "fit_statements": len(texts), "reps": reps,
              "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()), "tables": tables,
              "max_margin_difference": margin_diff, "same_conditional_tokens": same_tokens,
              "probe_cosine": cosine}
    n = torch.get_num_threads()
    print_rows(tables["scoring"], f"{model}: {conditions} conditions x {len(test)} items, {n} thread(s)",
               "s_per_condition")
    print_rows(tables["conditional"], f"{model}: conditional decoding of {prompts} prompts x {new_tokens} tokens",
               "s_per_prompt")
    print_rows(tables["probe"], f"{model}: probe on {len(texts)} statements at blocks.{layer}.resid_post",
               "s_per_fit")
    print(f"max |margin difference| {margin_diff:.2e} nats; conditional tokens identical: {same_tokens}; "
          f"probe cosine (lbfgs at max_iter vs Newton) {cosine:.4f}")
    if out:
        write_json(out, result)
    return result
