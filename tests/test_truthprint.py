"""TruthPrInt's claims: answer labelling, per-token detection plumbing and net-change bookkeeping on known
answers (tiny-llama), and the whole study once on the embedded model (small)."""
import numpy as np
import pandas as pd
import pytest
import torch

from hiddenlens.probes.direction import Direction
from hiddenlens.studies import truthprint as tp


@pytest.mark.parametrize("generated, want", [
    (" Paris, the city of light", "correct"), ("paris", "correct"), (" Madrid.", "wrong"), (" a big city", "other"),
])
def test_answer_kind(generated, want):
    assert tp.answer_kind(generated, " Paris", " Madrid") == want


def test_net_counts_fixes_and_breaks():
    plain = pd.DataFrame({"item_id": list("abcd"), "hallucinated": [True, True, False, False]})
    steered = pd.DataFrame({"item_id": list("abcd"), "hallucinated": [False, True, True, False],
                            "rollback": [3, None, None, None]})
    out = tp._net(plain, steered)
    assert (out["fixes"], out["breaks"], out["net"], out["rollbacks"]) == (1, 1, 0.0, 1)
    assert out["fix_rate"] == 0.5 and out["break_rate"] == 0.5


def test_detection_reads_the_first_answer_token(tiny_llama):
    """Labels planted from the first answer token's own state along a direction: AUROC must be 1 at that layer."""
    prompts = [f"The number {i} is" for i in range(16)]
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(16)], "split": ["val", "test"] * 8,
                          "prompt": prompts, "correct": [" a"] * 16, "wrong": [" b"] * 16})
    answers = tp.generate_answers(tiny_llama, items, 3, 8)
    states = tp.answer_states(tiny_llama, prompts, list(answers.ids), list(answers.prompt_length), [1], 8)[:, 0]
    u = torch.randn(states.shape[1])
    u = u / u.norm()
    proj = (states @ u).numpy()
    answers["hallucinated"] = proj < np.median(proj)                 # low projection = "hallucinated"
    d = Direction(u, 1.0, "blocks.1.resid_post", None, "mass_mean", tiny_llama.spec, "", (5.0, 0.0))
    table = tp.detection_table(tiny_llama, items, answers, {1: d}, 8)
    assert set(table.split) == {"val", "test"}
    assert (table.auroc == 1.0).all()
    flipped = Direction(-u, 1.0, "blocks.1.resid_post", None, "mass_mean", tiny_llama.spec, "", (5.0, 0.0))
    assert (tp.detection_table(tiny_llama, items, answers, {1: flipped}, 8).auroc == 0.0).all()


def test_config_checks():
    with pytest.raises(ValueError, match="families"):
        tp.TruthPrIntConfig(families=["horoscopes"])
    with pytest.raises(ValueError, match="alpha"):
        tp.TruthPrIntConfig(alphas=[])


@pytest.mark.embedded
def test_study_on_the_embedded_model(smollm, tmp_path):
    config = tp.TruthPrIntConfig(families=["continent"], layers=[8, 16], limit=5, alphas=[4.0],
                                 thresholds=[0.5], max_new_tokens=2)
    res = tp.run(config, smollm, progress=False)
    assert set(res.tables["detection"].layer) == {8, 16} and res.summary["layer"] in (8, 16)
    assert list(res.tables["steering"]["mode"]) == ["generated", "conditional"]
    assert (res.tables["steering"]["n"] == res.summary["n_test"]).all()
    back = tp.Result.read(res.write(tmp_path / "tp"))
    assert (tmp_path / "tp" / "detection.png").is_file() and back.summary["layer"] == res.summary["layer"]
