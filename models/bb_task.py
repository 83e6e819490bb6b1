"""Bigram-Backcopy (BB) task: the synthetic data of Guo et al. (arXiv 2410.13835) where attention sinks emerge.

Generator ("Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs" (arXiv 2410.13835), the official ``BBM/data.py`` class ``bbm``), with statistics from ``pydoc_data.topics``
(tiny-Shakespeare is not available offline)::

    vocabulary   the characters of the text (ids 0..V-1, sorted), then <s> = BOS (id V) and <d> = delimiter (V+1)
    marginal     unigram frequencies; cond[i] = bigram row i, normalised
    triggers     the k most frequent characters under the marginal
    x0 = BOS;  x1 ~ marginal with the triggers zeroed and renormalised
    t >= 2:  x_t = x_{t-2} if x_{t-1} is a trigger (backcopy), else x_t ~ cond[x_{t-1}] (bigram)

INFERRED (not in the official code, which uses tiny-Shakespeare where it cannot happen): a character that only
ever ends the text has an empty bigram row; its row is the marginal. The delimiter is in the vocabulary but never
sampled (``delimiter_p = 0``, as in the scripts).

The model is in :mod:`hiddenlens.models.bb_model`, training in :mod:`hiddenlens.models.bb_training`, the sink
metrics (captures) in :mod:`hiddenlens.analyses.bb_metrics`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BOS_TOKEN, DELIM_TOKEN = "<s>", "<d>"


@dataclass
class BBStatistics:
    """Character statistics: ``chars`` (V), ``marginal`` [V] and ``cond`` [V, V] (rows sum to 1), float64."""

    chars: list[str]
    marginal: np.ndarray
    cond: np.ndarray

    @property
    def n_chars(self) -> int:
        return len(self.chars)


def text_statistics(text: str | None = None) -> BBStatistics:
    """Unigram and bigram statistics of ``text`` (default: all of ``pydoc_data.topics``)."""
    if text is None:
        from .tiny import offline_prose
        text = offline_prose()
    if len(text) < 2:
        raise ValueError("BB statistics need a text of at least 2 characters")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))
    v = len(chars)
    marginal = np.bincount(ids, minlength=v).astype(np.float64)
    marginal /= marginal.sum()
    counts = np.bincount(ids[:-1] * v + ids[1:], minlength=v * v).reshape(v, v).astype(np.float64)
    rows = counts.sum(1, keepdims=True)
    cond = np.where(rows > 0, counts / np.maximum(rows, 1), marginal[None, :])
    return BBStatistics(chars, marginal, cond)


class BBGenerator:
    """Samples BB sequences ``[batch, seq_length + 1]`` (``x[:, :-1]`` inputs, ``x[:, 1:]`` targets).

    ``triggers``: the ``k`` most frequent characters (ties broken by id). ``vocab_size`` = V + 2.
    """

    def __init__(self, stats: BBStatistics | None = None, k: int = 3, seq_length: int = 256):
        self.stats = stats if stats is not None else text_statistics()
        v = self.stats.n_chars
        if not 1 <= k < v:
            raise ValueError(f"k={k}: the number of triggers must be between 1 and {v - 1}")
        if seq_length < 2:
            raise ValueError(f"seq_length={seq_length}: use at least 2")
        self.k, self.seq_length = k, seq_length
        order = np.lexsort((np.arange(v), -self.stats.marginal))
        self.triggers = sorted(int(i) for i in order[:k])
        self.bos_id, self.delim_id, self.vocab_size = v, v + 1, v + 2
        first = self.stats.marginal.copy()
        first[self.triggers] = 0.0
        self._first = torch.tensor(first / first.sum())
        self._cond = torch.tensor(self.stats.cond)
        self._cdf = self._cond.cumsum(1).contiguous()
        self._is_trigger = torch.zeros(self.vocab_size, dtype=torch.bool)
        self._is_trigger[self.triggers] = True

    def is_trigger(self, ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of trigger tokens, same shape as ``ids``."""
        return self._is_trigger.to(ids.device)[ids]

    def sample(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``batch`` sequences of length ``seq_length + 1`` (long), BOS first.

        Bigram draws are inverse-CDF samples (``searchsorted`` of one uniform per token, right side, so
        zero-probability characters are never drawn).
        """
        n = self.seq_length + 1
        u = torch.rand(n, batch, 1, generator=generator, dtype=torch.float64)
        x = torch.empty(batch, n, dtype=torch.long)
        x[:, 0] = self.bos_id
        x[:, 1] = torch.multinomial(self._first.expand(batch, -1), 1, generator=generator)[:, 0]
        last = self.stats.n_chars - 1
        for t in range(2, n):
            prev = x[:, t - 1]
            bigram = torch.searchsorted(self._cdf[prev], u[t], right=True)[:, 0].clamp_max(last)
            x[:, t] = torch.where(self._is_trigger[prev], x[:, t - 2], bigram)
        return x

    def bigram_entropy(self) -> torch.Tensor:
        """Entropy (nats) of each bigram row: the optimal loss at a non-trigger query holding that token.

        ``[vocab_size]``; NaN for BOS and the delimiter (never non-trigger queries)."""
        c = self._cond
        h = -(c * torch.where(c > 0, c.log(), torch.zeros_like(c))).sum(1)
        return torch.cat([h, torch.full((2,), float("nan"), dtype=h.dtype)])

    def describe(self) -> dict:
        return {"n_chars": self.stats.n_chars, "vocab_size": self.vocab_size, "k": self.k,
                "seq_length": self.seq_length, "triggers": self.triggers,
                "trigger_chars": [self.stats.chars[i] for i in self.triggers]}


def build_tokenizer(chars: list[str]):
    """Character-level fast tokenizer: ids 0..V-1 the characters, ``<s>`` (BOS, prepended by default), ``<d>``."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(chars)}
    vocab[BOS_TOKEN], vocab[DELIM_TOKEN] = len(chars), len(chars) + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A",
                                                       special_tokens=[(BOS_TOKEN, len(chars))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, pad_token=BOS_TOKEN,
                                   additional_special_tokens=[DELIM_TOKEN])


def task_losses(logits: torch.Tensor, inputs: torch.Tensor, gen: BBGenerator) -> dict:
    """Next-token losses of ``logits`` ``[n, pos, vocab]`` on BB ``inputs`` ``[n, pos + 1]`` (BOS first).

    Queries are input positions p >= 1; a trigger query holds a trigger token (its target is x_{p-1}). Returns
    ``loss``, ``trigger_loss``, ``nontrigger_loss``, ``bigram_optimum`` (the mean entropy of ``cond[x_p]`` over the
    non-trigger queries: the best achievable non-trigger loss) and the query counts."""
    inp, tgt = inputs[:, :-1].cpu(), inputs[:, 1:].cpu()
    ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2).cpu(), tgt, reduction="none")
    trig, nontrig = query_masks(inp, gen)
    h_opt = gen.bigram_entropy()[inp]
    return {"loss": float(ce.mean()), "trigger_loss": float(ce[trig].mean()) if trig.any() else float("nan"),
            "nontrigger_loss": float(ce[nontrig].mean()), "bigram_optimum": float(h_opt[nontrig].mean()),
            "n_trigger_queries": int(trig.sum()), "n_nontrigger_queries": int(nontrig.sum())}


def query_masks(inp: torch.Tensor, gen: BBGenerator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(trigger queries, non-trigger queries)``: boolean masks over input positions (position 0, BOS, is
    neither)."""
    trig = gen.is_trigger(inp)
    query = torch.ones_like(trig)
    query[:, 0] = False
    return trig, query & ~trig
