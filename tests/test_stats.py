"""hiddenlens.common.stats: known answers for every shared statistic."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from hiddenlens.common.stats import (auroc, bootstrap_ci, entropy, js_divergence, kl_divergence, log_probs,
                                     markdown_table, wilson_ci)


# ---- distributions ------------------------------------------------------------------------------------------------
def test_log_probs_are_normalised_float32_and_keep_float64():
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    lp = log_probs(x)
    assert lp.dtype == torch.float32 and lp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    assert log_probs(torch.zeros(4, dtype=torch.float64)).dtype == torch.float64


def test_kl_of_two_small_distributions_by_hand():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    # KL(P||Q) = 0.5 ln(0.5 / 0.25) + 0.5 ln(0.5 / 0.75) = 0.5 ln(4 / 3)
    expected = 0.5 * math.log(4 / 3)
    assert kl_divergence(p.log(), q.log()).item() == pytest.approx(expected, abs=1e-6)  # logits = log p + c
    assert kl_divergence(p.log() + 7.0, q.log() - 2.0).item() == pytest.approx(expected, abs=1e-6)
    assert kl_divergence(p.log(), q.log(), from_log_probs=True).item() == pytest.approx(expected, abs=1e-6)
    # KL(Q||P) = 0.25 ln(0.5) + 0.75 ln(1.5), not symmetric
    assert kl_divergence(q.log(), p.log()).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5),
                                                                    abs=1e-6)


def test_kl_zero_probabilities_and_broadcasting():
    p = torch.log(torch.tensor([1.0, 0.0]))  # -inf where p = 0: that term is 0, not NaN
    q = torch.log(torch.tensor([0.5, 0.5]))
    assert kl_divergence(p, q, from_log_probs=True).item() == pytest.approx(math.log(2), abs=1e-6)
    assert kl_divergence(q, p, from_log_probs=True).item() == math.inf
    many = torch.randn(3, 4, 10)
    assert kl_divergence(many[-1:], many).shape == (3, 4)
    assert torch.allclose(kl_divergence(many, many), torch.zeros(3, 4), atol=1e-6)


def test_js_bounds_and_symmetry():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    m = (p + q) / 2
    expected = 0.5 * float((p * (p / m).log()).sum() + (q * (q / m).log()).sum())
    assert js_divergence(p.log(), q.log()).item() == pytest.approx(expected, abs=1e-6)
    assert js_divergence(q.log(), p.log()).item() == pytest.approx(expected, abs=1e-6)
    disjoint = torch.log(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert js_divergence(disjoint[0], disjoint[1], from_log_probs=True).item() == pytest.approx(math.log(2), abs=1e-6)


def test_entropy_in_nats_and_bits():
    assert entropy(torch.zeros(8)).item() == pytest.approx(math.log(8), abs=1e-6)
    assert entropy(torch.zeros(8), base=2).item() == pytest.approx(3.0, abs=1e-6)
    p = torch.tensor([0.5, 0.25, 0.25, 0.0])  # 1.5 bits, the zero contributes nothing
    assert entropy(p.log(), base=2, from_log_probs=True).item() == pytest.approx(1.5, abs=1e-6)
    peaked = torch.tensor([100.0, 0.0, 0.0])
    assert 0.0 <= entropy(peaked).item() < 1e-6


# ---- AUROC --------------------------------------------------------------------------------------------------------
def test_auroc_perfect_reversed_and_tied():
    y = np.array([0, 0, 1, 1])
    assert auroc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auroc(y, np.ones(4)) == 0.5
    # hand count over the 2 x 2 (positive, negative) pairs: (0.5 vs 0.5) tie = 1/2, (0.5 vs 0.1) win,
    # (0.3 vs 0.5) loss, (0.3 vs 0.1) win -> 2.5 / 4
    assert auroc([1, 0, 1, 0], [0.5, 0.5, 0.3, 0.1]) == pytest.approx(2.5 / 4)
    assert auroc(torch.tensor([True, False]), torch.tensor([2.0, 1.0])) == 1.0


def test_auroc_single_class_raises_or_gives_nan():
    with pytest.raises(ValueError, match="both classes"):
        auroc(np.ones(5), np.arange(5))
    assert math.isnan(auroc(np.zeros(5), np.arange(5), single_class="nan"))
    with pytest.raises(ValueError, match="same length"):
        auroc([0, 1], [0.1, 0.2, 0.3])


# ---- intervals ----------------------------------------------------------------------------------------------------
def test_wilson_interval_matches_known_values():
    lo, hi = wilson_ci(8, 40)  # hand-computed: centre 0.2263, half-width 0.1213
    assert lo == pytest.approx(0.1050, abs=1e-3) and hi == pytest.approx(0.3476, abs=1e-3)
    # k = 0 and k = n: one side is exact, the other is z^2 / (n + z^2) (0.01884 for n = 200)
    assert wilson_ci(0, 200)[0] == 0.0 and wilson_ci(0, 200)[1] == pytest.approx(0.01884, abs=1e-4)
    assert wilson_ci(200, 200)[1] == pytest.approx(1.0) and wilson_ci(200, 200)[0] == pytest.approx(1 - 0.01884,
                                                                                                     abs=1e-4)
    z = 1.959963984540054
    n = 10
    assert wilson_ci(0, n)[1] == pytest.approx(z * z / (n + z * z), abs=1e-9)
    assert all(math.isnan(v) for v in wilson_ci(0, 0))
    lo90, hi90 = wilson_ci(8, 40, level=0.90)
    assert lo < lo90 < hi90 < hi


def test_bootstrap_ci_contains_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 50), rng.normal(1.0, 1.0, 2000)
    lo_s, hi_s = bootstrap_ci(small, np.mean, seed=1)
    lo_l, hi_l = bootstrap_ci(large, np.mean, seed=1)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3  # width ~ 1 / sqrt(n): 40x the data, ~6x narrower
    assert bootstrap_ci(small, np.mean, seed=1) == (lo_s, hi_s)  # seeded: reproducible
    assert all(math.isnan(v) for v in bootstrap_ci([1.0], np.mean))


def test_bootstrap_ci_of_paired_auroc():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(100), np.ones(100)].astype(int)
    s = rng.normal(size=200) + y
    lo, hi = bootstrap_ci((y, s), "auroc", n_resamples=300, seed=0)
    assert lo < auroc(y, s) < hi and 0.5 < lo
    # resamples that draw one class only are undefined and dropped, not fatal
    lo, hi = bootstrap_ci((np.r_[1, np.zeros(4, int)], np.arange(5.0)), "auroc", n_resamples=200, seed=0)
    assert 0.0 <= lo <= hi <= 1.0
    with pytest.raises(ValueError, match="same length"):
        bootstrap_ci((y, s[:10]), "auroc")


def test_bootstrap_auroc_by_ranks_equals_scikit_learn_per_resample():
    """The vectorized rank statistic gives sklearn's AUROC on every resample (ties, string labels, resamples that
    lose a class): the same interval as scoring each resample with :func:`auroc`."""
    rng = np.random.default_rng(3)
    y = np.where(rng.random(30) < 0.2, "wrong", "right")  # "wrong" > "right": the positive class
    s = rng.integers(0, 4, 30).astype(float)  # many ties
    one_by_one = bootstrap_ci((y, s), lambda a, b: auroc(a, b, single_class="nan"), n_resamples=400, seed=5)
    assert bootstrap_ci((y, s), "auroc", n_resamples=400, seed=5) == pytest.approx(one_by_one, abs=1e-12)
    with pytest.raises(ValueError, match="binary labels"):
        bootstrap_ci((np.arange(6) % 3, np.arange(6.0)), "auroc")


# ---- markdown -----------------------------------------------------------------------------------------------------
def test_markdown_table_escapes_pipes_and_newlines():
    df = pd.DataFrame({"name": ["a | b", "two\nlines"], "value": [0.12345, 2.0], "n": [1, 2]})
    text = markdown_table(df)
    lines = text.splitlines()
    assert len(lines) == 4  # header, rule, one line per row
    assert "a \\| b" in lines[2] and "two<br>lines" in lines[3]
    assert "0.123" in lines[2] and "2.000" in lines[3] and "0.12345" not in text
    assert all(line.count("|") - line.count("\\|") == 4 for line in lines)  # 3 columns -> 4 unescaped pipes
    assert "1.23e-01" in markdown_table(df, ".2e")
