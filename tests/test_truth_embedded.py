"""Truthful directions and steering on the embedded SmolLM2-135M (held-out capitals, split by country)."""
from __future__ import annotations

import pytest
import torch

from hiddenlens.analyses.truth import extract_last_token, fit_direction, layer_sweep
from hiddenlens.analyses.truth_data import make_statements
from hiddenlens.interventions.steer import steer_generate
from hiddenlens.probes.direction import Direction
from hiddenlens.studies.steering import answer_logprobs, random_like

pytestmark = pytest.mark.embedded
LAYERS = [2, 12, 16]


@pytest.fixture(scope="module")
def capitals(smollm):
    df = make_statements(["capitals"], seed=0, fractions=(0.5, 0.15, 0.35))
    acts = extract_last_token(smollm, df.text.tolist(), LAYERS)["resid"]
    return df, acts, torch.tensor(df.label.to_numpy())


def test_held_out_probe_well_above_chance(capitals):
    df, acts, y = capitals
    tr = torch.tensor((df.split != "test").to_numpy())
    te = ~tr
    table, _ = layer_sweep(acts[tr], y[tr], acts[te], y[te], LAYERS, methods=("mass_mean", "probe"))
    mid = table[table.layer.isin([12, 16])]
    assert mid.auroc.max() > 0.8, table
    early = table[table.layer == 2].auroc.max()
    assert mid.auroc.max() > early + 0.1, table


def test_steering_toward_true_raises_correct_capital(smollm, capitals):
    """Mass-mean direction at layer 12 (fitted on train+val countries) raises log P(correct) - log P(wrong) on
    held-out countries, more than random directions of the same size do on average (3 seeds; a single random
    direction varies a lot, see docs/steering.md)."""
    df, acts, y = capitals
    tr = torch.tensor((df.split != "test").to_numpy())
    u, sigma, det = fit_direction(acts[tr][:, LAYERS.index(12)], y[tr], "mass_mean")
    d = Direction(torch.from_numpy(u).float(), sigma, "blocks.12.resid_post", detector=det)
    pairs = df[(df.split == "test") & (df.label == 1)].head(24)
    prompts = pairs.prompt.tolist()

    def margin(ds, alpha):
        return float((answer_logprobs(smollm, prompts, pairs.correct.tolist(), ds, alpha)
                      - answer_logprobs(smollm, prompts, pairs.wrong.tolist(), ds, alpha)).mean())

    base = margin([d], 0.0)
    steered = margin([d], 4.0)
    rand = sum(margin(random_like([d], seed=s), 4.0) for s in (1, 2, 3)) / 3
    assert steered - base > 0.3, (base, steered, rand)
    assert steered - base > rand - base, (base, steered, rand)


def test_alpha_zero_generate_is_plain_on_embedded(smollm):
    d = Direction(torch.nn.functional.normalize(torch.randn(576, generator=torch.Generator().manual_seed(0)),
                                                dim=0), 3.5, "blocks.12.resid_post")
    prompts = ["The capital of Japan is", "Two plus two equals"]
    plain = smollm.generate(prompts, max_new_tokens=8)
    out = steer_generate(smollm, prompts, [d], 0.0, "generated", max_new_tokens=8)
    assert torch.equal(out.sequences, plain.sequences)
    steered = steer_generate(smollm, prompts, [d], 8.0, "generated", max_new_tokens=8)
    assert torch.allclose(steered.added_norm[:, plain.prompt_length - 1:-1], torch.tensor(8.0 * 3.5))
