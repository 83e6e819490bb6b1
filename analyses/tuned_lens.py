"""Tuned lens (Belrose et al. 2023; "Eliciting Latent Predictions from Transformers with the Tuned Lens" (arXiv 2303.08112)): one affine translator per layer, trained on forward KL.

``logits_l = W_U FinalNorm(h_l + A_l h_l + b_l)``. Translators are zero-initialised, so an untrained lens is
exactly the logit lens. Training minimises ``KL(p_final || p_lens)`` at the same position (token shift 0) over
the depths ``embed, blocks.0 .. blocks.{L-2}`` (the last block's readout already is the model's output), with
SGD + Nesterov momentum 0.9, learning rate scaled by (1 - momentum), weight decay 1e-3, as tuned-lens does. The
final norm and unembedding are the model's own modules, called with detached parameters (the model is never
modified and gets no gradients). Lenses are saved and loaded as safetensors (plus JSON metadata in the header).

    lens, history = train_tuned_lens(handle, prompts, steps=50)
    lens.save("lens.safetensors"); lens = TunedLens.load("lens.safetensors", handle)
    df = logit_lens(handle, "The capital of France is", lens=lens)   # hiddenlens.analyses.dynamics

A lens made for a model records its identity (``d_model``, ``n_layers``, ``vocab_size``, the spec and the sha256 of
the weights, :func:`hiddenlens.probes.store.weights_hash`); loading it for another model raises
:class:`LensMismatchError` naming both.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from hiddenlens.common.batching import batch_starts
from hiddenlens.common.errors import UserError
from hiddenlens.common.files import atomic_path
from hiddenlens.common.stats import kl_divergence, log_probs
from hiddenlens.probes.capture import capture
from hiddenlens.probes.sites import parse_site, residual_sites
from hiddenlens.probes.store import weights_hash

#: what a lens records about the model it was made for (all strings in the safetensors header)
IDENTITY_KEYS = ("n_layers", "vocab_size", "weights_sha256", "dtype")


class LensMismatchError(UserError, ValueError):
    """A tuned lens loaded for a model other than the one it was trained on."""


def model_identity(handle) -> dict[str, str]:
    """``n_layers``, ``vocab_size``, ``weights_sha256`` (cached in ``handle.info``) and ``dtype`` of a model."""
    sha = handle.info.setdefault("weights_sha256", weights_hash(handle.hf_model))
    vocab = int(handle.adapter.unembedding(handle.hf_model).weight.shape[0])
    return {"n_layers": str(handle.n_layers), "vocab_size": str(vocab), "weights_sha256": sha,
            "dtype": str(handle.dtype).replace("torch.", "")}


class TunedLens(nn.Module):
    """Affine translators ``[d_model -> d_model]`` for the residual ``sites`` (``embed``, ``blocks.{l}.resid_post``).

    Sites without a translator (the last block) are read out unchanged, i.e. by the logit lens.
    """

    def __init__(self, d_model: int, sites: Sequence[str], model: str = "", identity: dict[str, str] | None = None):
        super().__init__()
        self.d_model, self.sites, self.model = int(d_model), [parse_site(s).name for s in sites], model
        #: the model this lens was made for (see :func:`model_identity`; empty for a lens built by hand)
        self.identity = dict(identity or {})
        self.translators = nn.ModuleList(nn.Linear(self.d_model, self.d_model) for _ in self.sites)
        for t in self.translators:
            nn.init.zeros_(t.weight)
            nn.init.zeros_(t.bias)
        self._index = {site: j for j, site in enumerate(self.sites)}

    @classmethod
    def for_model(cls, handle, include_embed: bool = True) -> "TunedLens":
        """A zero-initialised lens for ``handle``: translators for embed (optional) and blocks 0..L-2."""
        return cls(handle.adapter.d_model, residual_sites(handle.n_layers - 1, include_embed), handle.spec,
                   model_identity(handle))

    def translate(self, h: torch.Tensor, site: str) -> torch.Tensor:
        """``h + A h + b`` for ``h [..., d_model]`` at ``site`` (identity where there is no translator)."""
        if h.shape[-1] != self.d_model:
            raise ValueError(f"this lens expects d_model {self.d_model}, got states of width {h.shape[-1]}")
        j = self._index.get(site)
        if j is None:
            return h
        t = self.translators[j]
        return h + t(h.to(t.weight.dtype)).to(h.dtype)

    # ---- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the translators to ``path`` (safetensors, atomic) with ``sites``/``d_model``/``model`` metadata."""
        meta = {"format": "hiddenlens.tuned_lens", "sites": json.dumps(self.sites), "d_model": str(self.d_model),
                "model": self.model, **self.identity}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, handle=None, check_weights: bool = True) -> "TunedLens":
        """Read a lens written by :meth:`save`. With ``handle``, raise :class:`LensMismatchError` unless the lens
        fits the model: its width and depth, and (for lenses that record them) the number of blocks, the vocabulary
        and, with ``check_weights``, the exact weights (a lens trained on one checkpoint misreads another)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tuned lens at {path}; train one with `hiddenlens train-lens`")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "hiddenlens.tuned_lens":
            raise ValueError(f"{path} is not a hiddenlens tuned lens (metadata {meta})")
        if "sites" in meta:
            sites = json.loads(meta["sites"])
        else:  # written before sites: depth labels, -1 = embed
            sites = ["embed" if i < 0 else f"blocks.{i}.resid_post" for i in json.loads(meta["layers"])]
        lens = cls(int(meta["d_model"]), sites, meta.get("model", ""),
                   {k: meta[k] for k in IDENTITY_KEYS if k in meta})
        lens.load_state_dict(load_file(str(path)))
        if handle is not None:
            lens.check_fits(handle, path, check_weights)
        return lens

    def check_fits(self, handle, path: str | Path = "", check_weights: bool = True) -> None:
        """Raise :class:`LensMismatchError` naming this lens's model and ``handle``'s when they differ."""
        deepest = max((parse_site(s).layer or 0) for s in self.sites)
        mine = dict(self.identity, d_model=str(self.d_model))
        theirs = dict(model_identity(handle) if self.identity else {}, d_model=str(handle.adapter.d_model))
        keys = ["d_model", "n_layers", "vocab_size"] + (["weights_sha256"] if check_weights else [])
        differ = [k for k in keys if k in mine and mine[k] != theirs.get(k)]
        if not differ and deepest < handle.n_layers:
            return
        dtype_hint = (f"; the dtypes differ too: load the model with dtype {mine['dtype']}"
                      if "weights_sha256" in differ and mine.get("dtype") != theirs.get("dtype") else "")
        raise LensMismatchError(
            f"tuned lens {path} does not fit this model: it was made for {_describe(self.model, mine, keys)}, "
            f"blocks up to {deepest}; this is {_describe(handle.spec, theirs, keys)}, {handle.n_layers} blocks"
            f"{dtype_hint}. Train a lens for this model with `hiddenlens train-lens --model {handle.spec}`")


def _describe(model: str, identity: dict[str, str], keys: list[str]) -> str:
    """``spec (d_model 64, n_layers 4, ..., weights_sha256 <12 hex>, dtype float32)`` for an error message."""
    fields = ", ".join(f"{k} {identity[k][:12]}" for k in keys + ["dtype"] if k in identity)
    return f"{model or '?'} ({fields})"


def _check_positive(**values: int) -> None:
    """Raise naming the first argument that is not a positive integer."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")


def _readout(handle, h: torch.Tensor) -> torch.Tensor:
    """Final norm + unembedding with detached parameters (gradients reach only ``h``)."""
    m = handle.hf_model
    out = h
    for module in (handle.adapter.final_norm(m), handle.adapter.unembedding(m)):
        params = {k: v.detach() for k, v in module.named_parameters()}
        out = functional_call(module, params, (out,))
    return out


def collect_states(handle, prompts: Sequence[str], sites: Sequence[str], max_tokens: int = 4096,
                   batch_size: int = 8, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual states of every real token: ``(states [n_tokens, len(sites), d], final_normed [n_tokens, d])``.

    Stops after ``max_tokens`` tokens (memory: n_tokens x (depth + 1) x d floats).
    """
    _check_positive(max_tokens=max_tokens, batch_size=batch_size)
    sites = list(sites) + ["final_norm"]
    states, finals, total = [], [], 0
    prompts = list(prompts)
    for start in tqdm(batch_starts(len(prompts), batch_size), desc="lens states", disable=not progress):
        with capture(handle, sites, to="cpu") as cache:
            out = handle.run(prompts[start:start + batch_size], logits=False)
        mask = out.attention_mask.cpu().bool()
        states.append(torch.stack([cache[s][mask].float() for s in sites[:-1]], 1))
        finals.append(cache["final_norm"][mask].float())
        total += int(mask.sum())
        if total >= max_tokens:
            break
    if total == 0:
        raise ValueError("the prompts held no tokens")
    return torch.cat(states)[:max_tokens], torch.cat(finals)[:max_tokens]


def lens_kl(handle, lens: TunedLens, states: torch.Tensor, final_normed: torch.Tensor,
            chunk: int = 256) -> np.ndarray:
    """Mean ``KL(p_final || p_lens)`` (nats) per translated depth of ``lens`` over ``states [n, depth, d]``."""
    out = np.zeros(len(lens.sites))
    with torch.no_grad():
        for start in range(0, len(states), chunk):
            final = log_probs(_readout(handle, final_normed[start:start + chunk]))
            for j, site in enumerate(lens.sites):
                logp = log_probs(_readout(handle, lens.translate(states[start:start + chunk, j], site)))
                out[j] += float(kl_divergence(final, logp, from_log_probs=True).sum())
    return out / len(states)


def train_tuned_lens(handle, prompts: Sequence[str], steps: int = 50, tokens_per_step: int = 256,
                     lr: float = 1.0, momentum: float = 0.9, weight_decay: float = 1e-3, max_tokens: int = 4096,
                     batch_size: int = 8, include_embed: bool = True, seed: int = 0, lens: TunedLens | None = None,
                     progress: bool = True) -> tuple[TunedLens, pd.DataFrame]:
    """Train a tuned lens on ``prompts``; returns ``(lens, history)``.

    ``history`` has one row per step: ``step`` and ``kl`` (training-batch KL summed over depths, nats).
    Cost per step is ``depth x tokens_per_step x d_model x vocab`` multiply-adds, three times (forward + backward):
    about 11 s per step on 2 CPU cores for the embedded model at 64 tokens per step.
    """
    _check_positive(steps=steps, tokens_per_step=tokens_per_step)
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr}: the learning rate must be a positive finite number")
    if lens is not None:
        lens.check_fits(handle)
    lens = lens or TunedLens.for_model(handle, include_embed)
    states, final_normed = collect_states(handle, prompts, lens.sites, max_tokens, batch_size, progress)
    states, final_normed = states.to(handle.device), final_normed.to(handle.device)
    lens.to(handle.device)
    opt = torch.optim.SGD(lens.parameters(), lr=lr * (1 - momentum), momentum=momentum, nesterov=True,
                          weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for step in tqdm(range(steps), desc="train tuned lens", disable=not progress):
        idx = torch.randint(0, len(states), (min(tokens_per_step, len(states)),), generator=gen).to(handle.device)
        with torch.no_grad():
            final = log_probs(_readout(handle, final_normed[idx]))
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for j, site in enumerate(lens.sites):  # one graph per depth keeps memory at one [tokens, vocab] logit
            logp = log_probs(_readout(handle, lens.translate(states[idx, j], site)))
            loss = kl_divergence(final, logp, from_log_probs=True).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"tuned-lens loss became {loss.item()} at step {step}, site {site}; "
                                         "lower lr")
            loss.backward()
            total += loss.detach().item()
        opt.step()
        history.append({"step": step, "kl": total})
    return lens.cpu(), pd.DataFrame(history)
