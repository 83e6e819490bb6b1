"""A seeded arithmetic word-problem set with exact answers and difficulty levels, plus answer parsing.

GSM8K is not available offline, so the regime experiment uses these project-made problems (GSM8K can be loaded
with :func:`gsm8k_problems` when the ``datasets`` hub is reachable). Levels:

* 1: one addition or subtraction, numbers 5-20 ("Tom has 12 apples and buys 7 more ...")
* 2: two steps of addition/subtraction, numbers 5-30
* 3: a multiplication (2-9 by 3-12) followed by an addition or subtraction

Every answer is a non-negative integer, computed exactly from the generated numbers.
"""
from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

NAMES = ("Tom", "Anna", "Ravi", "Mia", "Omar", "Lena", "Kenji", "Sara", "Diego", "Noor", "Ivan", "Zoe")
ITEMS = ("apples", "stickers", "marbles", "books", "pencils", "cookies", "stamps", "shells", "cards", "coins")
LEVELS = (1, 2, 3)


@dataclass(frozen=True)
class Problem:
    """One word problem: ``question`` text, exact integer ``answer``, ``level`` (1-3) and a worked ``solution``
    (step-by-step, ending in ``#### answer``)."""

    id: int
    question: str
    answer: int
    level: int
    solution: str

    def as_dict(self) -> dict:
        return asdict(self)


def _level1(rng: random.Random) -> tuple[str, int, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(5, 20), rng.randint(5, 20)
    if rng.random() < 0.5:
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        return q, a + b, f"{name} starts with {a} {item} and gets {b} more, so {a} + {b} = {a + b}.\n#### {a + b}"
    a, b = max(a, b), min(a, b)
    q = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?"
    return q, a - b, f"{name} starts with {a} {item} and gives away {b}, so {a} - {b} = {a - b}.\n#### {a - b}"


def _level2(rng: random.Random) -> tuple[str, int, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(10, 30), rng.randint(5, 30)
    mid = a + b
    c = rng.randint(5, min(30, mid))
    q = (f"{name} has {a} {item}. A friend gives {name} {b} more, and then {name} uses {c} of them. "
         f"How many {item} does {name} have now?")
    sol = (f"After the gift {name} has {a} + {b} = {mid} {item}. After using {c}, {name} has "
           f"{mid} - {c} = {mid - c}.\n#### {mid - c}")
    return q, mid - c, sol


def _level3(rng: random.Random) -> tuple[str, int, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    boxes, per = rng.randint(2, 9), rng.randint(3, 12)
    total = boxes * per
    extra = rng.randint(2, 20)
    if rng.random() < 0.5:
        q = (f"{name} buys {boxes} boxes with {per} {item} in each box and also finds {extra} loose {item}. "
             f"How many {item} does {name} have in total?")
        return q, total + extra, (f"The boxes hold {boxes} x {per} = {total} {item}. Adding {extra} gives "
                                  f"{total} + {extra} = {total + extra}.\n#### {total + extra}")
    extra = min(extra, total)
    q = (f"{name} buys {boxes} boxes with {per} {item} in each box and gives {extra} {item} to a friend. "
         f"How many {item} does {name} keep?")
    return q, total - extra, (f"The boxes hold {boxes} x {per} = {total} {item}. Giving away {extra} leaves "
                              f"{total} - {extra} = {total - extra}.\n#### {total - extra}")


_MAKERS = {1: _level1, 2: _level2, 3: _level3}


def make_problems(n: int, seed: int = 0, levels=LEVELS) -> list[Problem]:
    """``n`` problems drawn with ``random.Random(seed)``, levels cycling through ``levels`` (same seed, same set).

    Questions are unique within the set.
    """
    if n < 1:
        raise ValueError(f"n={n}: ask for at least one problem")
    levels = tuple(levels)
    bad = [lv for lv in levels if lv not in _MAKERS]
    if not levels or bad:
        raise ValueError(f"levels={levels}: choose from {LEVELS}")
    rng = random.Random(seed)
    out: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n:
            raise ValueError(f"could not draw {n} distinct problems at levels {levels}; ask for fewer")
        level = levels[len(out) % len(levels)]
        q, a, sol = _MAKERS[level](rng)
        if q in seen:
            continue
        seen.add(q)
        out.append(Problem(len(out), q, a, level, sol))
    return out


def few_shot_examples(k: int, seed: int = 10_007, levels=LEVELS) -> list[Problem]:
    """``k`` worked examples from a different seed than the test set (none of them equals a test question)."""
    return make_problems(k, seed=seed, levels=levels) if k > 0 else []


_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace("$", "").replace(",", ""))
    except ValueError:
        return None


def parse_answer(text: str, mode: str = "last") -> float | None:
    """The numeric answer in a model's output, or None.

    Order: the first number after the last ``####``; else the number after "answer is" / "answer:"; else the
    first number (``mode="first"``, for direct answers) or the last number (``mode="last"``, for worked
    solutions) in the text.
    """
    if mode not in ("first", "last"):
        raise ValueError(f"mode={mode!r}: use 'first' or 'last'")
    if "####" in text:
        m = re.search(_NUMBER, text.rsplit("####", 1)[1])
        if m:
            return _to_number(m.group())
    m = re.search(r"answer\s*(?:is|:|=)\s*[^\d\-$]{0,20}(" + _NUMBER + ")", text, flags=re.IGNORECASE)
    if m:
        return _to_number(m.group(1))
    nums = re.findall(_NUMBER, text)
    if not nums:
        return None
    return _to_number(nums[0] if mode == "first" else nums[-1])


def is_correct(text: str, answer: int, mode: str = "last") -> bool:
    """Whether the parsed answer equals ``answer`` exactly."""
    got = parse_answer(text, mode)
    return got is not None and abs(got - answer) < 1e-9


def gsm8k_problems(n: int, seed: int = 42, split: str = "test") -> list[Problem]:
    """The first ``n`` items of a seeded shuffle of GSM8K (needs the ``datasets`` package and the hub)."""
    try:
        from datasets import load_dataset  # heavy optional dependency: imported on use
    except ModuleNotFoundError as exc:
        raise RuntimeError("GSM8K needs the `datasets` package (pip install datasets) and hub access; "
                           "use the offline arithmetic set (make_problems) instead") from exc
    ds = load_dataset("openai/gsm8k", "main", split=split).shuffle(seed=seed).select(range(n))
    out = []
    for i, row in enumerate(ds):
        answer = _to_number(row["answer"].rsplit("####", 1)[1].strip())
        out.append(Problem(i, row["question"], int(answer), 0, row["answer"]))
    return out
