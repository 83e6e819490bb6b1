"""The dashboard's view model of a lens run: per (layer, position) top token, probability, entropy, KL to the
final layer, top-k and residual norm, all numpy. :func:`lens_view` computes it with
``hiddenlens.analyses.dynamics.lens_logits`` (logit or tuned lens); :func:`from_logits` builds it from any
per-layer logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hiddenlens.analyses.dynamics import lens_logits
from hiddenlens.common.stats import entropy, kl_divergence, log_probs
from hiddenlens.probes.sites import block_of


@dataclass(frozen=True)
class LensView:
    """``[n_layers, n_pos]`` arrays; ``layers`` and ``tokens`` label the rows and columns."""

    lens: str
    tokens: list[str]
    layers: list[str]
    top_token: np.ndarray  # str
    top_prob: np.ndarray
    entropy: np.ndarray  # nats
    kl_final: np.ndarray  # KL(final || layer), nats
    topk: np.ndarray  # str: "tok 0.31<br>tok 0.12 ..." for hover
    norm: np.ndarray  # L2 norm of the residual stream read by the lens

    def curve(self, stat: str) -> np.ndarray:
        """Mean over positions of ``stat`` per layer."""
        return getattr(self, stat).mean(axis=1)


def token_strings_from_text(texts: list[str]) -> list[str]:
    """Decoded tokens made visible: spaces as a middle dot, newlines as a return arrow, empty as a placeholder."""
    return [t.replace(" ", "\u00b7").replace("\n", "\u21b5") or "\u2205" for t in texts]


def token_strings(tokenizer, ids) -> list[str]:
    """Readable strings of token ids (see :func:`token_strings_from_text`)."""
    return token_strings_from_text([tokenizer.decode([int(i)]) for i in ids])


def from_logits(lens: str, logits: torch.Tensor, norms: torch.Tensor, tokens: list[str], layers: list[str],
                tokenizer, top_k: int = 5) -> LensView:
    """``logits`` ``[n_layers, pos, vocab]`` (last row = the model's output) -> :class:`LensView`."""
    logp = log_probs(logits)
    h = entropy(logp, from_log_probs=True)
    kl = kl_divergence(logp[-1:], logp, from_log_probs=True)
    probs, ids = logp.exp().topk(top_k, dim=-1)
    n_layers, n_pos = logits.shape[:2]
    vocab = {int(i): token_strings(tokenizer, [int(i)])[0] for i in ids.unique().tolist()}
    top_token = np.empty((n_layers, n_pos), dtype=object)
    topk = np.empty((n_layers, n_pos), dtype=object)
    for layer in range(n_layers):
        for pos in range(n_pos):
            row = [(vocab[int(t)], float(q)) for t, q in zip(ids[layer, pos], probs[layer, pos])]
            top_token[layer, pos] = row[0][0]
            topk[layer, pos] = "<br>".join(f"{t} {q:.3f}" for t, q in row)
    return LensView(lens=lens, tokens=tokens, layers=layers, top_token=top_token,
                    top_prob=probs[..., 0].numpy(), entropy=h.numpy(), kl_final=kl.numpy(), topk=topk,
                    norm=norms.float().numpy())


def lens_view(handle, prompt: str, tuned=None, max_positions: int = 48, top_k: int = 5,
              add_bos: bool | None = None) -> LensView:
    """Logit lens (or the tuned lens ``tuned``) of ``prompt`` through ``hiddenlens.analyses.dynamics``; rows are
    ``embed`` then every block's resid_post, columns the last ``max_positions`` tokens (BOS prepended when
    ``add_bos``, as ``handle.run``)."""
    logits, traj = lens_logits(handle, prompt, lens=tuned, include_embed=True, add_bos=add_bos)
    n = min(max_positions, logits.shape[1])
    ids = traj.input_ids[0][-n:]
    labels = [site if block_of(site) is None else f"L{block_of(site)}" for site in traj.sites]
    return from_logits("tuned" if tuned is not None else "logit", logits[:, -n:],
                       traj.hidden[:, 0, -n:].norm(dim=-1), token_strings(handle.tokenizer, ids), labels,
                       handle.tokenizer, top_k)
