"""Sink metrics on the embedded SmolLM2-135M-Instruct: the measured facts of issue 4, with margins."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hiddenlens as hl
from hiddenlens.analyses import sinks

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def prose(smollm):
    return sinks.default_domains(smollm, n_prompts=4, n_tokens=128)["prose"]


@pytest.fixture(scope="module")
def analysis(smollm, prose):
    return sinks.sink_analysis(smollm, prose, batch_size=4)


def test_sinks_appear_after_layer_11(analysis):
    h, lay = analysis.heads, analysis.layers
    assert len(h) == 30 * 9
    early = h[h.layer <= 10]
    late = h[h.layer >= 12]
    assert early.dormancy.max() < 0.6                                      # measured: no head above 0.46
    assert 0.35 < (late.dormancy > 0.5).mean() < 0.85                     # measured: 59-62% of the heads
    assert h[(h.layer == 18) & (h["head"] == 8)].dormancy.item() > 0.9    # measured: about 1.0
    # residual-state peak: position 0 dwarfs every other position from block 11 to 22, not before
    peak = lay.set_index("layer").resid_ratio_max
    assert peak.loc[11:22].min() > 30                                     # measured: 100-134x
    assert peak.loc[0:9].max() < 10
    # value-state drain: position 0's value after W_O is small in the sink layers
    assert np.median(lay[lay.layer >= 12].value_ratio_median) < 0.6       # measured: 0.1-0.36x


def test_reductions_equal_a_full_capture(smollm, prose, analysis):
    rows = sinks.prepare_prompts(smollm, prose[:2])
    with hl.capture(smollm, "blocks.18.attn.pattern") as cache:
        smollm.run(rows, add_bos=None, logits=False)
    a = cache["blocks.18.attn.pattern"][:, :, 1:, 0]                       # same length: no padding
    two = sinks.sink_analysis(smollm, prose[:2], layers=[18])
    assert torch.allclose(torch.tensor(two.heads.dormancy.values, dtype=torch.float32), a.mean((0, 2)), atol=1e-5)


def test_zeroing_the_deepest_sink_head(smollm, prose):
    df = sinks.head_ablation(smollm, prose[:2], [(18, 8)], modes=("zero",))
    a = smollm.adapter
    w = a.sub(smollm.hf_model, 18, a.o_path).weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w[:, 8 * a.head_dim:9 * a.head_dim] = 0
        rows = sinks.prepare_prompts(smollm, prose[:2])
        s, n = sinks._ce_sums(smollm, rows, [0, 1])
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert df.ce.item() == pytest.approx(s / n, rel=1e-5)
    assert abs(df.delta_ce.item()) < 0.05                                 # a dormant head: removing it changes little
