"""The steering evaluation set: project-written facts and misconceptions with ground truth
(``hiddenlens.analyses.fact_items``).

Every item is a *contrast item*: one prompt, a correct and a wrong continuation. A model "gets an item right"
when the correct continuation is the more likely one (:func:`score_items`). Families:

``capital``        "The capital of France is" -> " Paris" / " Madrid"
``continent``      "France is a country in" -> " Europe" / " Asia"
``currency``       "The currency of Japan is the" -> " yen" / " peso"
``language``       "The official language of Brazil is" -> " Portuguese" / " Spanish"
``misconception``  "Q: What color is a polar bear's skin?\\nA:" -> " black" / " white"

The four country families come from ``analyses/data/country_facts.csv`` (195 states: UN members and the two
observers), misconceptions from ``analyses/data/misconceptions.jsonl``. A country's wrong answer is drawn (seeded)
from the answers of *other countries of the same split*, never one of the country's own acceptable answers (its
``also`` column, e.g. Canada's French) nor a generic form of its answer ("dollar" for the US dollar). Splits are by
entity (the country, shared by the four country families; the misconception id), so no entity is in two splits.
"""
from __future__ import annotations

import json
import random
from importlib import resources
from io import StringIO

import numpy as np
import pandas as pd
import torch

from hiddenlens.common.batching import batch_starts
from hiddenlens.common.stats import log_probs

from .truth_data import split_entities

FIELDS = ("capital", "continent", "currency", "language")
FAMILIES = FIELDS + ("misconception",)
COLUMNS = ["item_id", "family", "entity", "prompt", "correct", "wrong", "split"]
FRACTIONS = (0.5, 0.25, 0.25)
TEMPLATES = {"capital": "The capital of {name} is", "continent": "{Name} is a country in",
             "currency": "The currency of {name} is the", "language": "The official language of {name} is"}
QUESTION = "Q: {question}\nA:"


def _data_text(name: str) -> str:
    return resources.files("hiddenlens.analyses").joinpath(f"data/{name}").read_text(encoding="utf-8")


def load_country_facts() -> pd.DataFrame:
    """The shipped country table: one row per state, columns ``country, article, capital, continent, currency,
    language, note, also`` (strings; empty where not given), in file order."""
    return pd.read_csv(StringIO(_data_text("country_facts.csv")), dtype=str, keep_default_na=False)


def load_misconceptions() -> pd.DataFrame:
    """The shipped misconceptions: columns ``id, question, true_answer, false_answer, category, source_note``."""
    return pd.DataFrame.from_records([json.loads(line) for line in _data_text("misconceptions.jsonl").splitlines()
                                      if line.strip()])


def _also(row) -> dict[str, set[str]]:
    """The ``also`` column (``field=answer;field=answer``) as ``{field: {answers}}``."""
    out: dict[str, set[str]] = {}
    for pair in filter(None, row["also"].split(";")):
        field, answer = pair.split("=", 1)
        out.setdefault(field, set()).add(answer)
    return out


def _may_be_wrong(candidate: str, correct: str, also: set[str]) -> bool:
    """True if ``candidate`` is false for a country whose answer is ``correct``: not the answer, not another
    acceptable one, not a generic form of it ("dollar" for "US dollar", "franc" for "CFA franc")."""
    return candidate != correct and candidate not in also and not correct.endswith(" " + candidate)


def _name(row, capital_first: bool = False) -> str:
    name = f"{row['article']} {row['country']}" if row["article"] else row["country"]
    return name[0].upper() + name[1:] if capital_first else name


def _country_items(field: str, countries: pd.DataFrame, split_of: dict[str, str], seed: int) -> list[dict]:
    """Items of one country family; the wrong answer is a seeded draw from the distinct answers of the split."""
    rng = random.Random(f"{seed}-{field}")
    split = countries.country.map(split_of)
    answers = {s: sorted(set(countries.loc[split == s, field])) for s in set(split)}
    rows = []
    for _, row in countries.iterrows():
        correct, also = row[field], _also(row).get(field, set())
        wrong = rng.choice([a for a in answers[split_of[row.country]] if _may_be_wrong(a, correct, also)])
        prompt = TEMPLATES[field].format(name=_name(row), Name=_name(row, capital_first=True))
        rows.append(dict(entity=row.country, prompt=prompt, correct=f" {correct}", wrong=f" {wrong}"))
    return rows


def _misconception_items(table: pd.DataFrame) -> list[dict]:
    return [dict(entity=r.id, prompt=QUESTION.format(question=r.question), correct=f" {r.true_answer}",
                 wrong=f" {r.false_answer}") for r in table.itertuples()]


def fact_items(families=None, seed: int = 0, limit: int | None = None) -> pd.DataFrame:
    """Contrast items of ``families`` (all of :data:`FAMILIES` by default) as a DataFrame with :data:`COLUMNS`.

    One row per item; ``item_id`` is ``"{family}:{entity}"``. ``split`` is by entity (fractions 0.5 / 0.25 / 0.25,
    seeded); answers start with a space (they continue the prompt). ``limit``: at most this many items per family
    and split (the first in the shipped order; None: all). Deterministic for a given ``seed``.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit}: give at least 1 item per family and split, or None for all")
    families = list(FAMILIES if families is None else [families] if isinstance(families, str) else families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"unknown fact families {unknown or families}; choose from {FAMILIES}")
    countries = load_country_facts()
    country_split = split_entities(countries.country, FRACTIONS, seed)
    records = []
    for fam in families:
        if fam == "misconception":
            table = load_misconceptions()
            items, split_of = _misconception_items(table), split_entities(table.id, FRACTIONS, seed)
        else:
            items, split_of = _country_items(fam, countries, country_split, seed), country_split
        records += [dict(item_id=f"{fam}:{it['entity']}", family=fam, split=split_of[it["entity"]], **it)
                    for it in items]
    table = pd.DataFrame.from_records(records, columns=COLUMNS)
    if limit is not None:
        table = table.groupby(["split", "family"], group_keys=False, sort=False).head(limit).reset_index(drop=True)
    return table


# ---- scoring -----------------------------------------------------------------------------------------------
def answer_token_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """``(ids of prompt + answer, number of answer tokens)``, tokenised together so the answer's first token
    merges as it would in running text. Raises ``ValueError`` unless the prompt's own tokens are a prefix."""
    full = tokenizer(prompt + answer, add_special_tokens=True)["input_ids"]
    head = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if full[:len(head)] != head or len(full) <= len(head):
        raise ValueError(f"answer {answer!r} does not tokenise as a continuation of prompt {prompt!r}: the prompt's "
                         f"tokens {head} are not a proper prefix of {full}; end the prompt before a word boundary")
    return full, len(full) - len(head)


def continuation_logprobs(handle, prompts, answers, batch_size: int = 16) -> np.ndarray:
    """``log P(answer | prompt)`` summed over the answer's tokens, ``[n]`` (float64, nats).

    Each prompt + answer is one sequence (see :func:`answer_token_ids`); sequences are batched by length and
    left-padded by ``handle.run``, so every row's answer tokens are its last tokens.
    """
    if len(prompts) != len(answers) or len(prompts) == 0:
        raise ValueError(f"need as many answers as prompts (got {len(prompts)} and {len(answers)}), at least one")
    seqs = [answer_token_ids(handle.tokenizer, p, a) for p, a in zip(prompts, answers)]
    order = sorted(range(len(seqs)), key=lambda j: len(seqs[j][0]))
    out = np.zeros(len(seqs))
    for s in batch_starts(len(order), batch_size):
        rows = order[s:s + batch_size]
        run = handle.run([seqs[j][0] for j in rows], add_bos=None)
        ids = run.input_ids.to("cpu")
        lp = log_probs(run.logits[:, :-1].to("cpu").double()).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [b, W-1]
        n_answer = torch.tensor([seqs[j][1] for j in rows])
        in_answer = torch.arange(lp.shape[1]) >= lp.shape[1] - n_answer[:, None]                       # [b, W-1]
        out[rows] = (lp * in_answer).sum(1).numpy()
    return out


def score_items(handle, items: pd.DataFrame, batch_size: int = 16) -> pd.DataFrame:
    """``items`` plus ``logp_correct``, ``logp_wrong`` (sums of answer-token log-probabilities, nats) and
    ``model_right`` (``logp_correct > logp_wrong``)."""
    n = len(items)
    logp = continuation_logprobs(handle, list(items.prompt) * 2, list(items.correct) + list(items.wrong), batch_size)
    out = items.copy()
    out["logp_correct"], out["logp_wrong"] = logp[:n], logp[n:]
    out["model_right"] = out.logp_correct > out.logp_wrong
    return out


def accuracy_table(scored: pd.DataFrame) -> pd.DataFrame:
    """Per family and split (``all`` for the family overall): ``n`` items, ``accuracy`` (share with
    ``model_right``) and ``n_wrong``."""
    both = pd.concat([scored, scored.assign(split="all")])
    table = both.groupby(["family", "split"]).model_right.agg(n="size", accuracy="mean", n_right="sum")
    table["n_wrong"] = table.n - table.n_right
    return table.drop(columns="n_right").reset_index()
