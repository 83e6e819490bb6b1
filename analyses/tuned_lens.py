"""Tuned lens (Belrose et al. 2023; "Eliciting Latent Predictions from Transformers with the Tuned Lens" (arXiv 2303.08112)): one affine translator per layer, trained on forward KL.

``logits_l = W_U FinalNorm(h_l + A_l h_l + b_l)``. A zero translator is exactly the logit lens. Training has two
stages:

1. **Closed-form initialisation** (:func:`fit_translators`, on by default): each translator is the ridge
   least-squares linear map from ``h_l`` to the last block's residual ``h_L``, fitted on directions (both sides
   divided by their L2 norm, because the final RMS/LayerNorm reads only the direction) and shrunk towards the
   identity. One pass over the states and one ``[d, d]`` solve per depth: seconds, no unembedding involved.
2. **KL fine-tune**: ``KL(p_final || p_lens)`` at the same position (token shift 0) over the depths
   ``embed, blocks.0 .. blocks.{L-2}`` (the last block's readout already is the model's output): by default 8
   Adam steps at lr 1e-4 from the closed form; ``init="zero", optimizer="sgd", lr=1.0`` with many steps is the
   paper's recipe (SGD + Nesterov momentum 0.9, learning rate scaled by (1 - momentum), weight decay 1e-3, zero
   translators). Each step runs every depth through the full unembedding (``depth x tokens x d_model x vocab``
   multiply-adds, three times): 15-45 s per step for the embedded model on 2 busy CPU cores, hence few steps.

The final norm and unembedding are the model's own modules, called with detached parameters (the model is never
modified and gets no gradients). Lenses are saved and loaded as safetensors (plus JSON metadata in the header).

    lens, history = train_tuned_lens(handle, prompts)          # closed form + 8 Adam steps on forward KL
    lens.save("lens.safetensors"); lens = TunedLens.load("lens.safetensors", handle)
    lens = cached_tuned_lens(handle)     # trained once per model weights, cached under the user cache directory
    df = logit_lens(handle, "The capital of France is", lens=lens)   # hiddenlens.analyses.dynamics

A lens made for a model records its identity (``d_model``, ``n_layers``, ``vocab_size``, the spec and the sha256 of
the weights, :func:`hiddenlens.probes.store.weights_hash`); loading it for another model raises
:class:`LensMismatchError` naming both. The cached lens is keyed by that sha256 (:func:`cached_lens_path`).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import pandas as pd
import torch
from filelock import FileLock
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from hiddenlens.common.batching import batch_starts
from hiddenlens.common.errors import DamagedFileError, UserError
from hiddenlens.common.files import atomic_path
from hiddenlens.common.stats import kl_divergence, log_probs
from hiddenlens.models.embedded import cache_dir
from hiddenlens.models.tiny import offline_prose
from hiddenlens.probes.capture import capture
from hiddenlens.probes.sites import parse_site, residual_sites
from hiddenlens.probes.store import weights_hash

#: what a lens records about the model it was made for (all strings in the safetensors header)
IDENTITY_KEYS = ("n_layers", "vocab_size", "weights_sha256", "dtype")
#: ``progress``: True / False for a tqdm bar, or a callback ``(fraction done in [0, 1], what it is doing)``
Progress = Union[bool, Callable[[float, str], None]]


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
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except SafetensorError as exc:
            raise DamagedFileError(f"tuned lens {path} is damaged or truncated ({exc}); delete it and train it "
                                   "again (`hiddenlens train-lens`)") from None
        if meta.get("format") != "hiddenlens.tuned_lens":
            raise ValueError(f"{path} is not a hiddenlens tuned lens (metadata {meta})")
        if "sites" in meta:
            sites = json.loads(meta["sites"])
        else:  # written before sites: depth labels, -1 = embed
            sites = ["embed" if i < 0 else f"blocks.{i}.resid_post" for i in json.loads(meta["layers"])]
        lens = cls(int(meta["d_model"]), sites, meta.get("model", ""),
                   {k: meta[k] for k in IDENTITY_KEYS if k in meta})
        try:
            lens.load_state_dict(tensors)
        except RuntimeError as exc:
            raise DamagedFileError(f"tuned lens {path} does not hold the translators its header names "
                                   f"({' '.join(str(exc).split())[:200]}); train it again") from None
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


def _report(progress: Progress, fraction: float, what: str) -> None:
    """Call a progress callback (``progress`` callable); True / False bars are tqdm's."""
    if callable(progress):
        progress(min(max(float(fraction), 0.0), 1.0), what)


def collect_states(handle, prompts: Sequence[str], sites: Sequence[str], max_tokens: int = 4096,
                   batch_size: int = 8, progress: Progress = True, add_bos: bool | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual states of every real token: ``(states [n_tokens, len(sites), d], final_normed [n_tokens, d])``.

    Stops after ``max_tokens`` tokens (memory: n_tokens x (depth + 1) x d floats). ``add_bos`` as ``handle.run``.
    """
    _check_positive(max_tokens=max_tokens, batch_size=batch_size)
    sites = list(sites) + ["final_norm"]
    states, finals, total = [], [], 0
    prompts = list(prompts)
    starts = list(batch_starts(len(prompts), batch_size))
    for i, start in enumerate(tqdm(starts, desc="lens states", disable=progress is not True)):
        _report(progress, min(i / len(starts), total / max_tokens), "reading residual states")
        with capture(handle, sites, to="cpu") as cache:
            out = handle.run(prompts[start:start + batch_size], logits=False, add_bos=add_bos)
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
    return lens_kl_per_token(handle, lens, states, final_normed, chunk).mean(0)


def lens_kl_per_token(handle, lens: TunedLens, states: torch.Tensor, final_normed: torch.Tensor,
                      chunk: int = 256) -> np.ndarray:
    """``KL(p_final || p_lens)`` (nats) ``[n_tokens, depth]`` of every token at every site of ``lens``
    (``states [n, depth, d]`` in the order of ``lens.sites``; ``final_normed [n, d]`` the final norm's output)."""
    if states.ndim != 3 or states.shape[1] != len(lens.sites) or len(states) != len(final_normed):
        raise ValueError(f"states {tuple(states.shape)} / final_normed {tuple(final_normed.shape)} do not match the "
                         f"lens's {len(lens.sites)} sites")
    out = np.zeros((len(states), len(lens.sites)))
    device = next(lens.parameters()).device
    with torch.no_grad():
        for start in range(0, len(states), chunk):
            final = log_probs(_readout(handle, final_normed[start:start + chunk].to(device)))
            for j, site in enumerate(lens.sites):
                logp = log_probs(_readout(handle, lens.translate(states[start:start + chunk, j].to(device), site)))
                out[start:start + len(final), j] = kl_divergence(final, logp, from_log_probs=True).cpu().numpy()
    return out


def fit_translators(lens: TunedLens, states: torch.Tensor, last: torch.Tensor, ridge: float = 1e-3) -> TunedLens:
    """Closed-form initialisation: set every translator of ``lens`` (in place) to the ridge least-squares linear map
    from ``h_l`` to the last block's residual ``h_L``, with zero bias; returns ``lens``.

    ``states [n, depth, d]`` are the residuals at ``lens.sites`` and ``last [n, d]`` the last block's output for
    the same tokens. Both are divided by their L2 norm (the final norm reads only a direction, so every token
    weighs the same and the attention-sink tokens with norms in the thousands do not dominate), and
    ``(I + A_l) x`` is fitted to the target direction by minimising
    ``sum_i |M x_i - y_i|^2 + ridge * trace(X^T X) / d * |M - I|^2`` over ``M = I + A_l``: the penalty shrinks
    towards the identity, i.e. towards the logit lens. Solved in float64. On directions a linear map is
    scale-free while a bias is not, so the bias is left at 0 (on the embedded model a bias fitted this way and
    rescaled by the mean norm raised the held-out KL, 8.6 -> 10.6 nats averaged over depths); the KL steps of
    :func:`train_tuned_lens` train it.
    """
    if states.ndim != 3 or states.shape[1] != len(lens.sites) or states.shape[2] != lens.d_model:
        raise ValueError(f"states {tuple(states.shape)}: expected [n, {len(lens.sites)}, {lens.d_model}]")
    if last.shape != (states.shape[0], lens.d_model):
        raise ValueError(f"last {tuple(last.shape)}: expected [{states.shape[0]}, {lens.d_model}]")
    if not (np.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge={ridge}: must be a finite number >= 0")
    d = lens.d_model
    eye = torch.eye(d, dtype=torch.float64)
    y = last.double()
    y = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    with torch.no_grad():
        for j in range(len(lens.sites)):
            x = states[:, j].double()
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            gram = x.T @ x
            lam = ridge * float(torch.trace(gram)) / d
            w = torch.linalg.solve(gram + lam * eye, x.T @ y + lam * eye)  # [d_in, d_out] = M^T
            t = lens.translators[j]
            t.weight.copy_((w.T - eye).to(t.weight.dtype))
            t.bias.zero_()
    return lens


def train_tuned_lens(handle, prompts: Sequence[str], steps: int = 8, tokens_per_step: int = 64,
                     lr: float = 1e-4, momentum: float = 0.9, weight_decay: float = 1e-3, max_tokens: int = 4096,
                     batch_size: int = 8, include_embed: bool = True, seed: int = 0, lens: TunedLens | None = None,
                     init: str = "lstsq", ridge: float = 1e-3, optimizer: str = "adam", add_bos: bool | None = None,
                     progress: Progress = True) -> tuple[TunedLens, pd.DataFrame]:
    """Train a tuned lens on ``prompts``; returns ``(lens, history)``.

    ``init``: ``"lstsq"`` (default) sets the translators in closed form first (:func:`fit_translators`; a given
    ``lens`` is overwritten), ``"zero"`` starts from ``lens`` as it is (a new lens: zero translators, the logit
    lens). Then ``steps`` steps on forward KL (``steps=0``: the closed form alone) with ``optimizer`` ``"adam"``
    (default; ``lr`` and ``weight_decay`` as given: per-parameter steps that do not grow with the residual norm) or
    ``"sgd"`` (the paper's recipe from zero: Nesterov, ``lr x (1 - momentum)``, e.g. ``lr=1.0``). On the embedded
    model SGD at lr 1.0 from the closed form diverged (training KL 9 -> 213 nats per depth after one step) while
    Adam at 1e-4 lowered the held-out KL by about a quarter in 6 steps (docs/dynamics.md).
    ``history`` has one row per step: ``step`` and ``kl`` (training-batch KL summed over depths, nats).
    Cost per step is ``depth x tokens_per_step x d_model x vocab`` multiply-adds, three times (forward + backward):
    about 11 s per step on 2 CPU cores for the embedded model at 64 tokens per step.
    """
    _check_positive(tokens_per_step=tokens_per_step)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r}: must be an integer >= 0")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer={optimizer!r}: use 'sgd' or 'adam'")
    if init not in ("lstsq", "zero"):
        raise ValueError(f"init={init!r}: use 'lstsq' (closed form, then KL) or 'zero' (KL from the logit lens)")
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr}: the learning rate must be a positive finite number")
    if lens is not None:
        lens.check_fits(handle)
    lens = lens or TunedLens.for_model(handle, include_embed)
    last_site = f"blocks.{handle.n_layers - 1}.resid_post"
    sites = lens.sites + ([last_site] if init == "lstsq" else [])
    states, final_normed = collect_states(handle, prompts, sites, max_tokens, batch_size,
                                          (lambda f, w: _report(progress, 0.5 * f, w)) if callable(progress)
                                          else progress, add_bos)
    if init == "lstsq":
        _report(progress, 0.5, "fitting the translators in closed form")
        fit_translators(lens, states[:, :-1], states[:, -1], ridge)
        states = states[:, :-1]
    states, final_normed = states.to(handle.device), final_normed.to(handle.device)
    lens.to(handle.device)
    if optimizer == "sgd":
        opt = torch.optim.SGD(lens.parameters(), lr=lr * (1 - momentum), momentum=momentum, nesterov=True,
                              weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(lens.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for step in tqdm(range(steps), desc="train tuned lens", disable=progress is not True):
        _report(progress, 0.5 + 0.5 * step / steps, f"KL fine-tune, step {step + 1} of {steps}")
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
    _report(progress, 1.0, "tuned lens trained")
    return lens.cpu(), pd.DataFrame(history, columns=["step", "kl"])


# ---- the lens trained once per model and cached --------------------------------------------------------------
#: how :func:`cached_tuned_lens` trains (offline prose from character 0; held-out text starts at ``HELD_OUT_SKIP``)
CACHE_RECIPE = {"n_prompts": 64, "chars": 400, "max_tokens": 4096, "init": "lstsq", "steps": 8, "tokens_per_step": 64,
                "optimizer": "adam", "lr": 1e-4}
#: first character of the offline prose never used to train the cached lens (held-out evaluations start here)
HELD_OUT_SKIP = 200_000


def training_prompts(n_prompts: int, chars: int, skip: int = 0) -> list[str]:
    """``n_prompts`` chunks of ``chars`` characters of the offline prose starting at character ``skip``."""
    _check_positive(n_prompts=n_prompts, chars=chars)
    text = offline_prose(skip + n_prompts * chars)
    chunks = [text[i:i + chars] for i in range(skip, skip + n_prompts * chars, chars)]
    if len(chunks[-1]) < chars:
        raise ValueError(f"the offline prose ends before {n_prompts} chunks of {chars} characters from {skip}")
    return chunks


def cached_lens_path(handle) -> Path:
    """Where the cached lens of ``handle``'s weights lives: ``<cache>/lenses/<weights sha256>.safetensors``
    (cache: :func:`hiddenlens.models.embedded.cache_dir`)."""
    return cache_dir() / "lenses" / f"{model_identity(handle)['weights_sha256']}.safetensors"


def cached_tuned_lens(handle, progress: Progress = True, retrain: bool = False) -> TunedLens:
    """The tuned lens of ``handle``'s exact weights: read from :func:`cached_lens_path`, or trained on first use
    (:data:`CACHE_RECIPE`, BOS prepended when the tokenizer has one) and written there atomically (a killed run
    leaves no file; two processes training at once wait on one lock). A cached file that is damaged or belongs to
    other weights is trained again (with a warning), never loaded. ``retrain`` trains again regardless."""
    path = cached_lens_path(handle)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file() and not retrain:
            try:
                lens = TunedLens.load(path, handle)
                _report(progress, 1.0, f"tuned lens read from {path}")
                return lens
            except (DamagedFileError, LensMismatchError, ValueError) as exc:
                warnings.warn(f"the cached tuned lens could not be used ({exc}); training it again", stacklevel=2)
        recipe = dict(CACHE_RECIPE)
        prompts = training_prompts(recipe.pop("n_prompts"), recipe.pop("chars"))
        lens, _ = train_tuned_lens(handle, prompts, add_bos=handle.tokenizer.bos_token_id is not None,
                                   progress=progress, **recipe)
        lens.save(path)
    return lens
