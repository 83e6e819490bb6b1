"""Latent-state dynamics over depth (the logit lens and "Eliciting Latent Predictions from Transformers with the Tuned Lens" (arXiv 2303.08112)): logit / tuned lens, trajectory statistics, geometry,
token convergence / divergence and belief-state predictability.

Depth axis: the residual stream in forward order, addressed by site name (the one convention of hiddenlens):
``embed`` (the embedding output), then ``blocks.{l}.resid_post`` (the last one pre final norm). Tables carry the
``site`` and its block index ``layer`` (empty for ``embed``, which is no layer). The lens reads every one of them through the model's *own* final norm and
unembedding (native modules, no weight folding), so at the last layer it reproduces the model's logits exactly.

Entry points (pure functions; the dashboard calls these):

* :func:`residual_trajectory` -- capture the residual stream of prompts: ``hidden [depth, batch, pos, d]``.
* :func:`lens_logits` -- logit-lens (or tuned-lens) logits ``[depth, pos, vocab]`` of one prompt.
* :func:`logit_lens` -- one tidy DataFrame per (layer, position) of one prompt: entropy, KL / JS to the final
  distribution, top-1 token and probability, rank of a target token, rank of the final top-1, norm, growth
  ratio, cosine to the next and to the last layer.
* :func:`dynamics_summary` -- the same statistics averaged per layer over many prompts, streamed batch by batch
  (memory flat in the number of prompts).
* :func:`token_dynamics` -- per-token log-norm slope over depth, convergent vs divergent, and the shares.
* :func:`belief_state_r2` / :func:`belief_state_predictability` -- held-out R^2 of predicting ``h_{t+1}`` from
  ``[h_t; e(x_{t+1})]`` per layer (INFERRED metric after NextLat, "Next-Latent Prediction Transformers Learn Compact World Models" (arXiv 2511.05963)).

Units: entropy, KL and JS in nats; norms in the residual stream's own units.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from hiddenlens.common.batching import batch_starts
from hiddenlens.common.stats import entropy, js_divergence, kl_divergence, log_probs
from hiddenlens.probes.capture import capture
from hiddenlens.probes.sites import block_of, parse_layers, residual_sites


# ---------------------------------------------------------------------------------------------------------------
# Capturing the trajectory and reading it through the lens
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Trajectory:
    """Residual stream of a batch of prompts over depth.

    ``hidden`` ``[depth, batch, pos, d_model]`` (float32, CPU, left-padded), ``sites`` the depth labels
    (``embed``, ``blocks.{l}.resid_post``), ``input_ids`` / ``attention_mask`` ``[batch, pos]``,
    ``logits`` the model's own output ``[batch, pos, vocab]`` (None when not requested).
    """

    hidden: torch.Tensor
    sites: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    logits: torch.Tensor | None


def _layer_column(sites: Sequence[str]) -> np.ndarray:
    """Block index of each site, NaN for ``embed`` (a float column)."""
    return np.array([np.nan if block_of(s) is None else block_of(s) for s in sites], dtype=float)


def residual_trajectory(handle, prompts, include_embed: bool = True, add_bos: bool | None = None,
                        logits: bool = True, batch_size: int | None = None) -> Trajectory:
    """Run ``prompts`` once and capture ``embed`` and every ``resid_post`` at all positions."""
    sites = residual_sites(handle.n_layers, include_embed)
    with capture(handle, sites, to="cpu") as cache:
        out = handle.run(prompts, add_bos=add_bos, logits=logits, batch_size=batch_size)
    hidden = torch.stack([cache[s].float() for s in sites])
    return Trajectory(hidden, sites, out.input_ids.cpu(), out.attention_mask.cpu(),
                      None if out.logits is None else out.logits.float().cpu())


def _unembed(handle, normed: torch.Tensor) -> torch.Tensor:
    return handle.adapter.unembedding(handle.hf_model)(normed)


def lens_readout(handle, hidden: torch.Tensor, site: str, lens=None) -> torch.Tensor:
    """Logits ``[..., vocab]`` of residual states ``hidden [..., d_model]`` at ``site``.

    Logit lens: ``W_U FinalNorm(h)``. With a :class:`~hiddenlens.analyses.tuned_lens.TunedLens`:
    ``W_U FinalNorm(h + A_l h + b_l)``. Runs the model's own modules on the model's device and dtype.
    """
    m = handle.hf_model
    h = hidden.to(device=handle.device, dtype=handle.dtype)
    with torch.inference_mode():
        if lens is not None:
            h = lens.translate(h, site)
        return _unembed(handle, handle.adapter.final_norm(m)(h)).float().cpu()


def lens_logits(handle, prompt: str | Sequence[int], lens=None, include_embed: bool = True,
                add_bos: bool | None = None) -> tuple[torch.Tensor, Trajectory]:
    """Lens logits of ONE prompt: ``([depth, pos, vocab], trajectory)``; the last row is the model's output."""
    if not isinstance(prompt, str) and len(prompt) and not isinstance(prompt[0], int):
        raise ValueError("lens_logits takes one prompt (a string or one list of token ids)")
    traj = residual_trajectory(handle, [prompt], include_embed, add_bos)
    logits = torch.stack([lens_readout(handle, traj.hidden[j, 0], site, lens)
                          for j, site in enumerate(traj.sites)])
    return logits, traj


# ---------------------------------------------------------------------------------------------------------------
# Distribution statistics (entropy, KL and JS: hiddenlens.common.stats)
# ---------------------------------------------------------------------------------------------------------------
def token_rank(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1-based rank of ``target`` ids ``[...]`` under ``logits`` ``[..., vocab]`` (1 = top; ties favour the
    target). Invariant to adding a constant to the logits."""
    chosen = logits.gather(-1, target.long().unsqueeze(-1))
    return (logits > chosen).sum(-1) + 1


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last axis."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).float()


def geometry(hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """Norm, growth ratio ``|h_{l+1}| / |h_l|``, ``cos(h_l, h_{l+1})`` and ``cos(h_l, h_L)`` of ``[depth, ..., d]``.

    Every output is ``[depth, ...]``; the last layer's growth and cos_next are NaN (no next layer).
    """
    norm = hidden.double().norm(dim=-1).float()
    nan = torch.full_like(norm[:1], float("nan"))
    growth = torch.cat([norm[1:] / norm[:-1].clamp_min(1e-12), nan])
    cos_next = torch.cat([cosine(hidden[:-1], hidden[1:]), nan])
    cos_last = cosine(hidden, hidden[-1:].expand_as(hidden))
    return {"norm": norm, "growth": growth, "cos_next": cos_next, "cos_last": cos_last}


def _target_ids(handle, target, ids: torch.Tensor) -> torch.Tensor | None:
    """Target token per position ``[pos]``: None, ``"next"`` (the following input token; last = -1), a token
    string (must be one token) or an id."""
    if target is None:
        return None
    if isinstance(target, str) and target == "next":
        return torch.cat([ids[1:], torch.tensor([-1])])
    if isinstance(target, str):
        toks = handle.tokenizer(target, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise ValueError(f"target {target!r} is {len(toks)} tokens ({toks}); pass a single-token string "
                             "(mind the leading space, e.g. ' Paris') or a token id")
        return torch.full_like(ids, toks[0])
    return torch.full_like(ids, int(target))


def logit_lens(handle, prompt: str | Sequence[int], target=None, lens=None, include_embed: bool = True,
               add_bos: bool | None = None) -> pd.DataFrame:
    """Per (layer, position) statistics of one prompt under the logit lens (or ``lens``).

    Args:
        target: ``None``, ``"next"`` (the actual next token), a single-token string like ``" Paris"`` or an id;
            gives ``target_rank`` (1 = top) and ``target_prob``.
        lens: a trained :class:`~hiddenlens.analyses.tuned_lens.TunedLens` (None = logit lens).

    Returns a DataFrame with ``site``, ``layer`` (block index; NaN for ``embed``), ``position``, ``token``, ``entropy``, ``kl_to_final``,
    ``js_to_final`` (nats), ``top1_id``, ``top1_token``, ``top1_prob``, ``final_top1_rank``, ``target_rank``,
    ``target_prob``, ``norm``, ``growth``, ``cos_next``, ``cos_last``.
    """
    logits, traj = lens_logits(handle, prompt, lens, include_embed, add_bos)
    ids = traj.input_ids[0]
    final = log_probs(traj.logits[0])
    logp = log_probs(logits)
    geo = geometry(traj.hidden[:, 0])
    top_p, top_id = logp.max(-1)
    final_rank = token_rank(logits, final.argmax(-1).expand(logits.shape[:-1]))
    tgt = _target_ids(handle, target, ids)
    depth, pos = logits.shape[:2]
    frame = {
        "site": np.repeat(traj.sites, pos), "layer": np.repeat(_layer_column(traj.sites), pos),
        "position": np.tile(np.arange(pos), depth),
        "token": [handle.tokenizer.decode([int(t)]) for t in ids] * depth,
        "entropy": entropy(logp, from_log_probs=True).flatten().numpy(),
        "kl_to_final": kl_divergence(final.expand_as(logp), logp, from_log_probs=True).flatten().numpy(),
        "js_to_final": js_divergence(final.expand_as(logp), logp, from_log_probs=True).flatten().numpy(),
        "top1_id": top_id.flatten().numpy(), "top1_prob": top_p.exp().flatten().numpy(),
        "final_top1_rank": final_rank.flatten().numpy(),
    }
    frame["top1_token"] = [handle.tokenizer.decode([int(t)]) for t in frame["top1_id"]]
    if tgt is not None:
        valid = tgt >= 0
        safe = tgt.clamp_min(0).expand(depth, pos)
        rank = token_rank(logits, safe).float()
        prob = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1).exp()
        frame["target_rank"] = torch.where(valid, rank, torch.nan).flatten().numpy()
        frame["target_prob"] = torch.where(valid, prob, torch.nan).flatten().numpy()
    for k, v in geo.items():
        frame[k] = v.flatten().numpy()
    return pd.DataFrame(frame)


# ---------------------------------------------------------------------------------------------------------------
# Streaming summary over many prompts
# ---------------------------------------------------------------------------------------------------------------
SUMMARY_STATS = ("entropy", "kl_to_final", "js_to_final", "next_token_ce", "next_token_top1", "final_top1_agree",
                 "norm", "growth", "cos_next", "cos_last")


def dynamics_summary(handle, prompts: Sequence[str], batch_size: int = 8, lens=None, include_embed: bool = True,
                     add_bos: bool | None = None, progress: bool = True) -> pd.DataFrame:
    """Per-layer means over every real token of ``prompts`` (one row per layer), streamed batch by batch.

    Columns: ``site``, ``layer`` (block index; NaN for ``embed``), ``n_tokens`` and the means of :data:`SUMMARY_STATS`: entropy, KL and JS to the final
    distribution (nats), ``next_token_ce`` (cross-entropy of the actual next token, nats) and
    ``next_token_top1`` (share where the lens's top-1 is the next token), ``final_top1_agree`` (share where it is
    the model's own top-1), and the geometry (norm, growth, cos_next, cos_last). Only running sums are kept.
    """
    if not prompts:
        raise ValueError("no prompts given")
    prompts = list(prompts)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    sites: list[str] = []
    starts = batch_starts(len(prompts), batch_size)
    for start in tqdm(starts, desc="dynamics", unit="batch", disable=not progress):
        traj = residual_trajectory(handle, prompts[start:start + batch_size], include_embed, add_bos)
        sites = traj.sites
        mask = traj.attention_mask.bool()
        nxt = torch.cat([traj.input_ids[:, 1:], torch.zeros_like(traj.input_ids[:, :1])], 1)
        has_next = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1) & mask
        final = log_probs(traj.logits)
        final_top = final.argmax(-1)
        geo = geometry(traj.hidden)
        for j, site in enumerate(sites):
            logits = lens_readout(handle, traj.hidden[j], site, lens)
            logp = log_probs(logits)
            ce = -logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
            stats = {"entropy": (entropy(logp, from_log_probs=True), mask),
                     "kl_to_final": (kl_divergence(final, logp, from_log_probs=True), mask),
                     "js_to_final": (js_divergence(final, logp, from_log_probs=True), mask),
                     "next_token_ce": (ce, has_next),
                     "next_token_top1": ((logp.argmax(-1) == nxt).float(), has_next),
                     "final_top1_agree": ((logp.argmax(-1) == final_top).float(), mask)}
            stats |= {k: (v[j], mask & torch.isfinite(v[j])) for k, v in geo.items()}
            for k, (v, m) in stats.items():
                sums.setdefault(k, np.zeros(len(sites)))[j] += float(v[m].double().sum())
                counts.setdefault(k, np.zeros(len(sites)))[j] += int(m.sum())
    table = {"site": sites, "layer": _layer_column(sites), "n_tokens": counts["entropy"].astype(int)}
    for k in SUMMARY_STATS:
        with np.errstate(invalid="ignore", divide="ignore"):
            table[k] = np.where(counts[k] > 0, sums[k] / np.maximum(counts[k], 1), np.nan)
    return pd.DataFrame(table)


# ---------------------------------------------------------------------------------------------------------------
# Token dynamics (convergent vs divergent norm trajectories)
# ---------------------------------------------------------------------------------------------------------------
def token_dynamics(norms, tolerance: float = 0.0) -> pd.DataFrame:
    """Classify each token's norm trajectory over depth (INFERRED measure after Vo et al., "Demystifying the Token Dynamics of Deep Selective State Space Models" (arXiv 2410.03292)).

    Args:
        norms: ``[depth, n_tokens]`` residual norms (e.g. ``geometry(hidden)["norm"]`` flattened over tokens),
            or hidden states ``[depth, n_tokens, d]`` (norms are taken).
        tolerance: slopes within ``+-tolerance`` are ``flat``.

    Returns one row per token: ``token`` index, ``slope`` (least-squares slope of ln-norm per layer),
    ``monotone`` (norm strictly monotone over depth) and ``kind``: ``convergent`` (slope < 0), ``divergent``
    (slope > 0) or ``flat``. :func:`dynamics_shares` gives the share of each kind.
    """
    x = torch.as_tensor(norms).double()
    if x.ndim == 3:
        x = x.norm(dim=-1)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"norms must be [depth >= 2, n_tokens] (or hidden [depth, n_tokens, d]), got {tuple(x.shape)}")
    if (x <= 0).any() or not torch.isfinite(x).all():
        raise ValueError("norms must be finite and positive (drop padding positions first)")
    depth = torch.arange(x.shape[0], dtype=torch.float64)  # one step per residual site
    y = x.log()
    dc = depth - depth.mean()
    slope = (dc[:, None] * (y - y.mean(0))).sum(0) / (dc ** 2).sum()
    diffs = x[1:] - x[:-1]
    monotone = (diffs > 0).all(0) | (diffs < 0).all(0)
    kind = np.where(slope.numpy() > tolerance, "divergent", np.where(slope.numpy() < -tolerance, "convergent", "flat"))
    return pd.DataFrame({"token": np.arange(x.shape[1]), "slope": slope.numpy(), "monotone": monotone.numpy(),
                         "kind": kind})


def dynamics_shares(table: pd.DataFrame) -> dict[str, float]:
    """Share of ``convergent`` / ``divergent`` / ``flat`` tokens in a :func:`token_dynamics` table."""
    counts = table["kind"].value_counts(normalize=True)
    return {k: float(counts.get(k, 0.0)) for k in ("convergent", "divergent", "flat")}


def io_matrix_eigenvalues(s_c: torch.Tensor, s_b: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of ``S_C^T S_B`` (the input-output matrix of a selective SSM, Vo et al.), sorted ascending.

    All positive -> the continuous-time token dynamics diverge; all negative -> they converge.
    """
    mu = s_c.double().T @ s_b.double()
    return torch.linalg.eigvals(mu).real.sort().values


# ---------------------------------------------------------------------------------------------------------------
# Belief-state predictability
# ---------------------------------------------------------------------------------------------------------------
def belief_state_r2(h_t, e_next, h_next, regressor: str = "ridge", groups=None, test_fraction: float = 0.25,
                    alpha: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Held-out R^2 of predicting ``h_{t+1}`` from ``[h_t; e(x_{t+1})]``.

    Args:
        h_t, e_next, h_next: ``[n, d_h]``, ``[n, d_e]``, ``[n, d_h]`` arrays or tensors, one row per transition.
        regressor: ``"ridge"`` (linear on the concatenation, standardised inputs; default) or ``"mlp"``
            (one hidden layer of 256 ReLU units; needed when the transition is not linear, e.g. a finite-state
            machine's table).
        groups: ``[n]`` sequence ids; the split keeps each sequence on one side (no leakage between neighbours).
        test_fraction: share of rows (or groups) held out.

    Returns ``r2`` (variance-weighted over output dims, held out), ``cosine`` (mean cosine of prediction and
    truth), ``n_train``, ``n_test``.
    """
    def arr(a):
        return a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float64)

    ht, en, hn = arr(h_t), arr(e_next), arr(h_next)
    if not (ht.ndim == en.ndim == hn.ndim == 2) or not (len(ht) == len(en) == len(hn)):
        raise ValueError(f"h_t, e_next, h_next must be [n, d] with the same n; got {ht.shape}, {en.shape}, {hn.shape}")
    if len(ht) < 8:
        raise ValueError(f"belief-state R^2 needs at least 8 transitions, got {len(ht)}")
    if regressor not in ("ridge", "mlp"):
        raise ValueError(f"regressor={regressor!r}: use 'ridge' or 'mlp'")
    x = np.concatenate([ht, en], 1)
    if groups is not None:
        split = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
        train, test = next(split.split(x, hn, groups=np.asarray(groups)))
    else:
        train, test = next(ShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed).split(x))
    model = Ridge(alpha=alpha) if regressor == "ridge" else \
        MLPRegressor(hidden_layer_sizes=(256,), max_iter=2000, random_state=seed, tol=1e-6)
    pipe = make_pipeline(StandardScaler(), model).fit(x[train], hn[train])
    pred = pipe.predict(x[test])
    cos = cosine(torch.from_numpy(pred), torch.from_numpy(hn[test])).mean()
    return {"r2": float(r2_score(hn[test], pred, multioutput="variance_weighted")), "cosine": float(cos),
            "n_train": int(len(train)), "n_test": int(len(test))}


def belief_state_predictability(handle, prompts: Sequence[str], layers: Sequence[int] | None = None,
                                regressor: str = "ridge", batch_size: int = 8, add_bos: bool | None = None,
                                progress: bool = True, seed: int = 0) -> pd.DataFrame:
    """Per layer: held-out R^2 of ``h^(l)_{t+1} ~ f(h^(l)_t, e(x_{t+1}))`` over all adjacent real-token pairs.

    ``e(x_{t+1})`` is the ``embed`` site at position t+1 (the model's input embedding of the next token).
    Sequences are split 75/25 by prompt. Returns ``layer``, ``r2``, ``cosine``, ``n_train``, ``n_test``.
    """
    layers = parse_layers("*" if layers is None else layers, handle.n_layers, what="layers")
    if len(prompts) < 4:
        raise ValueError("belief-state predictability needs at least 4 prompts (held-out split by prompt)")
    sites = ["embed"] + [f"blocks.{layer}.resid_post" for layer in layers]
    cur: dict[int, list] = {layer: [] for layer in layers}
    nxt: dict[int, list] = {layer: [] for layer in layers}
    emb, groups = [], []
    prompts = list(prompts)
    for start in tqdm(batch_starts(len(prompts), batch_size), desc="belief-state capture", disable=not progress):
        with capture(handle, sites, to="cpu") as cache:
            out = handle.run(prompts[start:start + batch_size], add_bos=add_bos, logits=False)
        mask = out.attention_mask.cpu().bool()
        pair = mask[:, :-1] & mask[:, 1:]
        rows = torch.arange(mask.shape[0])[:, None].expand_as(pair)[pair] + start
        groups.append(rows)
        emb.append(cache["embed"][:, 1:][pair].float())
        for layer in layers:
            h = cache[f"blocks.{layer}.resid_post"].float()
            cur[layer].append(h[:, :-1][pair])
            nxt[layer].append(h[:, 1:][pair])
    e = torch.cat(emb)
    g = torch.cat(groups).numpy()
    out_rows = []
    for layer in tqdm(layers, desc="belief-state fit", disable=not progress):
        r = belief_state_r2(torch.cat(cur[layer]), e, torch.cat(nxt[layer]), regressor, groups=g, seed=seed)
        out_rows.append({"layer": layer, **r})
    return pd.DataFrame(out_rows)
