"""Project-made true/false statements with ground truth, split by entity (``hiddenlens.analyses.truth_data``).

Every item is a *contrast pair*: one prompt with a correct and a wrong completion. The true statement is
``prompt + correct + "."`` (label 1), the false one ``prompt + wrong + "."`` (label 0). Families:

``capitals``     "The capital of France is" -> " Paris" / " Madrid" (wrong capital drawn from the same split)
``negations``    "The capital of France is not" -> " Madrid" (true) / " Paris" (false)
``arithmetic``   "3 + 4 =" -> " 7" / " 8" (single-digit operands, wrong sum off by 1 or 2)
``comparisons``  "Which is larger, 23 or 58? The larger is" -> " 58" / " 23"

Splits are by *entity* (the country; the unordered operand pair), seeded, so no country or number pair appears
in two splits and a probe cannot pass by memorising entities. ``capitals`` and ``negations`` share the country
split, so transfer between them never sees a test country in training. The country table ships as
``analyses/data/capitals.csv`` (113 countries).
"""
from __future__ import annotations

import csv
import hashlib
import random
from importlib import resources

import pandas as pd

FAMILIES = ("capitals", "negations", "arithmetic", "comparisons")
SPLITS = ("train", "val", "test")
COLUMNS = ["text", "label", "family", "entity", "pair_id", "split", "prompt", "correct", "wrong"]


def load_capitals() -> list[tuple[str, str]]:
    """The shipped ``(country, capital)`` table, in file order."""
    text = resources.files("hiddenlens.analyses").joinpath("data/capitals.csv").read_text(encoding="utf-8")
    return [(r["country"], r["capital"]) for r in csv.DictReader(text.splitlines())]


def split_entities(entities, fractions=(0.6, 0.2, 0.2), seed: int = 0) -> dict[str, str]:
    """Assign each distinct entity to ``train`` / ``val`` / ``test`` (seeded shuffle, sizes by ``fractions``)."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"fractions={fractions}: give three non-negative numbers summing to 1")
    uniq = sorted(set(entities))
    if len(uniq) < 3:
        raise ValueError(f"need at least 3 distinct entities to split, got {len(uniq)}")
    random.Random(seed).shuffle(uniq)
    n_train = max(1, round(fractions[0] * len(uniq)))
    n_val = max(1, round(fractions[1] * len(uniq))) if fractions[1] > 0 else 0
    out = {e: "train" for e in uniq[:n_train]}
    out.update({e: "val" for e in uniq[n_train:n_train + n_val]})
    out.update({e: "test" for e in uniq[n_train + n_val:]})
    return out


def _capital_pairs(split_of: dict[str, str], seed: int, negated: bool) -> list[dict]:
    table = load_capitals()
    rng = random.Random(seed + (1 if negated else 0))
    by_split: dict[str, list[str]] = {}
    for country, capital in table:
        by_split.setdefault(split_of[country], []).append(capital)
    rows = []
    for country, capital in table:
        others = [c for c in by_split[split_of[country]] if c != capital]
        wrong = rng.choice(others)
        if negated:
            rows.append(dict(entity=country, prompt=f"The capital of {country} is not", correct=f" {wrong}",
                             wrong=f" {capital}"))
        else:
            rows.append(dict(entity=country, prompt=f"The capital of {country} is", correct=f" {capital}",
                             wrong=f" {wrong}"))
    return rows


def _arithmetic_pairs(seed: int) -> list[dict]:
    rng = random.Random(seed + 2)
    rows = []
    for a in range(1, 10):
        for b in range(1, 10):
            s = a + b
            wrong = s + rng.choice([-2, -1, 1, 2])
            rows.append(dict(entity=f"{min(a, b)}+{max(a, b)}", prompt=f"{a} + {b} =", correct=f" {s}",
                             wrong=f" {wrong}"))
    return rows


def _comparison_pairs(seed: int, n: int = 120) -> list[dict]:
    rng = random.Random(seed + 3)
    seen, rows = set(), []
    while len(rows) < n:
        a, b = rng.sample(range(1, 100), 2)
        key = (min(a, b), max(a, b))
        if key in seen:
            continue
        seen.add(key)
        rows.append(dict(entity=f"{key[0]}<{key[1]}", prompt=f"Which is larger, {a} or {b}? The larger is",
                         correct=f" {max(a, b)}", wrong=f" {min(a, b)}"))
    return rows


def make_statements(families=FAMILIES, seed: int = 0, fractions=(0.6, 0.2, 0.2)) -> pd.DataFrame:
    """All statements of ``families`` as a DataFrame with columns :data:`COLUMNS`.

    Two rows per contrast pair (``label`` 1 then 0, same ``pair_id``). ``split`` is by entity. Deterministic for
    a given ``seed``.
    """
    families = [families] if isinstance(families, str) else list(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"unknown statement families {unknown or families}; choose from {FAMILIES}")
    countries = split_entities([c for c, _ in load_capitals()], fractions, seed)
    records, pair_id = [], 0
    for fam in families:
        if fam in ("capitals", "negations"):
            pairs, split_of = _capital_pairs(countries, seed, fam == "negations"), countries
        else:
            pairs = _arithmetic_pairs(seed) if fam == "arithmetic" else _comparison_pairs(seed)
            split_of = split_entities([p["entity"] for p in pairs], fractions, seed)
        for p in pairs:
            for label, ans in ((1, p["correct"]), (0, p["wrong"])):
                records.append(dict(text=f"{p['prompt']}{ans}.", label=label, family=fam, entity=p["entity"],
                                    pair_id=pair_id, split=split_of[p["entity"]], prompt=p["prompt"],
                                    correct=p["correct"], wrong=p["wrong"]))
            pair_id += 1
    return pd.DataFrame.from_records(records, columns=COLUMNS)


def data_hash(df: pd.DataFrame) -> str:
    """A short sha256 of the texts and labels of ``df`` (recorded in direction metadata)."""
    h = hashlib.sha256()
    for text, label in zip(df["text"], df["label"]):
        h.update(f"{int(label)}\t{text}\n".encode())
    return h.hexdigest()[:16]
