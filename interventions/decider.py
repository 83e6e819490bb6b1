"""Iteration deciders for Think-at-Hard selective iteration ("Think-at-Hard: Selective Latent Iterations to Improve
Reasoning Language Models", arXiv 2511.08577).

* :class:`EntropyDecider`: iterate iff the entropy (nats) of the current cumulative next-token distribution is
  above a threshold. A training-free baseline.
* :class:`MLPDecider`: TaH's ``MLPIterDecider`` at a smaller size. Input: hidden states at chosen residual sites
  (``blocks.{l}.resid_post``, concatenated) and the sorted top-``k`` logit values through
  ``Linear(k, d_model)``; ``Linear(-> hidden)``, ``n_blocks`` residual blocks
  (``LN -> Linear(h, 4h) -> GELU -> Dropout -> Linear(4h, h) -> Dropout`` plus the skip), head
  ``LN -> Linear(h, 1)``. Iterate iff ``sigmoid(logit) > threshold``.
  Trained with BCE on "first pass mispredicted" labels (``argmax z_t != x_{t+1}``, the model's own greedy
  prediction, TaH's ``label.py`` with the model itself as reference) over held-out prose.
  **INFERRED deviations** from TaH, for a small CPU-trained decider: hidden 256 and 2 blocks instead of 512 and 6;
  inputs standardized with training-set mean and std (TaH: ``normalize_input=False``); ``pos_weight`` =
  negatives / positives of the training set (TaH: 5.4); Adam, lr 1e-3; the threshold is a fixed number (TaH learns
  it). Saved as ``decider.safetensors`` + ``decider.json``; never pickled. :func:`cached_decider` trains one per
  model weights on first use (:data:`CACHE_RECIPE`, under the user cache directory) and reads it afterwards.
* :class:`MaskDecider`: a fixed set of positions at depth 0 (``always`` and the ``oracle`` in evaluations).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
from filelock import FileLock
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from hiddenlens.common.errors import DamagedFileError
from hiddenlens.common.files import write_json
from hiddenlens.common.folders import committed_folder
from hiddenlens.common.stats import auroc, entropy
from hiddenlens.interventions.iterate import DEFAULT_TOPK, DeciderInput, first_pass, hidden_state_site
from hiddenlens.models.embedded import cache_dir
from hiddenlens.models.tiny import offline_prose
from hiddenlens.probes.store import weights_hash

#: TaH's hidden_states indices 2, 10, 18, 26 of a 30-layer model, as sites (block l's output is hidden_states[l+1])
DEFAULT_SITES = ("blocks.1.resid_post", "blocks.9.resid_post", "blocks.17.resid_post", "blocks.25.resid_post")
#: ``progress``: True / False for a tqdm bar, or a callback ``(fraction done in [0, 1], what it is doing)``
Progress = Union[bool, Callable[[float, str], None]]


def _report(progress: Progress, fraction: float, what: str) -> None:
    """Call a progress callback (``progress`` callable); True / False bars are tqdm's."""
    if callable(progress):
        progress(min(max(float(fraction), 0.0), 1.0), what)


def default_sites(n_layers: int) -> list[str]:
    """TaH's four read-out depths (``hidden_states`` 2, 10, 18, 26 of 30 blocks) scaled to a model of ``n_layers``
    blocks: :data:`DEFAULT_SITES` for 30 blocks; distinct sites, in depth order, for shallower models."""
    if n_layers < 1:
        raise ValueError(f"n_layers={n_layers}: a model has at least one block")
    blocks = sorted({min(max(round(i * n_layers / 30) - 1, 0), n_layers - 1) for i in (2, 10, 18, 26)})
    return [f"blocks.{b}.resid_post" for b in blocks]


class EntropyDecider:
    """Iterate iff the entropy (nats) of the cumulative next-token distribution exceeds ``threshold``."""

    sites: Sequence[str] = ()

    def __init__(self, threshold: float = 2.5):
        if not np.isfinite(threshold):
            raise ValueError("the entropy threshold must be a finite number of nats")
        self.threshold = float(threshold)

    def score(self, inp: DeciderInput) -> torch.Tensor:
        return entropy(inp.logits)


class MaskDecider:
    """Iterate exactly at ``mask`` (bool ``[T]``) at depth 0, never deeper; scores are the mask as 0/1."""

    sites: Sequence[str] = ()
    threshold = 0.5

    def __init__(self, mask: torch.Tensor):
        self.mask = mask.bool().cpu()

    def score(self, inp: DeciderInput) -> torch.Tensor:
        if inp.depth > 0:
            return torch.zeros(len(inp.positions))
        return self.mask[inp.positions].float()


@dataclass
class MLPDeciderConfig:
    """Architecture and decision settings of an :class:`MLPDecider` (stored in ``decider.json``)."""

    sites: list[str] = field(default_factory=lambda: list(DEFAULT_SITES))
    d_model: int = 576
    topk: int = DEFAULT_TOPK
    hidden: int = 256
    n_blocks: int = 2
    dropout: float = 0.1
    threshold: float = 0.5
    model: str = ""
    metrics: dict = field(default_factory=dict)


class _Block(nn.Module):
    def __init__(self, h: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, 4 * h), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * h, h), nn.Dropout(dropout))

    def forward(self, x):
        return x + self.net(x)


class MLPDecider(nn.Module):
    """Scores ``sigmoid(MLP([hidden states at sites] ++ Linear(topk logits))) `` per position; see module doc."""

    def __init__(self, config: MLPDeciderConfig):
        super().__init__()
        c = config
        self.config = c
        n_in = len(c.sites) * c.d_model
        self.register_buffer("mean", torch.zeros(n_in + c.topk))
        self.register_buffer("std", torch.ones(n_in + c.topk))
        self.topk_proj = nn.Linear(c.topk, c.d_model)
        self.input_projection = nn.Linear(n_in + c.d_model, c.hidden)
        self.blocks = nn.Sequential(*[_Block(c.hidden, c.dropout) for _ in range(c.n_blocks)])
        self.head = nn.Sequential(nn.LayerNorm(c.hidden), nn.Linear(c.hidden, 1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
                nn.init.zeros_(m.bias)

    @property
    def sites(self) -> list[str]:
        return list(self.config.sites)

    @property
    def threshold(self) -> float:
        return self.config.threshold

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` ``[n, len(sites) * d_model + topk]`` (raw) -> logits ``[n]``."""
        if features.ndim != 2 or features.shape[1] != self.mean.shape[0]:
            raise ValueError(f"decider expects features [n, {self.mean.shape[0]}] (sites {self.sites}, d_model "
                             f"{self.config.d_model}, top-{self.config.topk}; trained on {self.config.model!r}), "
                             f"got {tuple(features.shape)}: use a decider trained for this model")
        x = (features - self.mean) / self.std
        n_h = len(self.config.sites) * self.config.d_model
        x = torch.cat([x[:, :n_h], self.topk_proj(x[:, n_h:])], -1)
        return self.head(self.blocks(self.input_projection(x))).squeeze(-1)

    def score(self, inp: DeciderInput) -> torch.Tensor:
        with torch.no_grad():
            return torch.sigmoid(self(decider_features(inp.hidden, inp.logits, self.sites, self.config.topk)))


def decider_features(hidden: dict[str, torch.Tensor], logits: torch.Tensor, sites: Sequence[str],
                     k: int) -> torch.Tensor:
    """``[n, len(sites) * d + k]``: hidden states at ``sites`` concatenated, then the sorted top-``k`` logits."""
    missing = [s for s in sites if s not in hidden]
    if missing:
        raise KeyError(f"hidden states at {missing} were not read; available: {sorted(hidden)}")
    parts = [hidden[s].float().cpu() for s in sites] + [logits.float().cpu().topk(k, -1).values]
    return torch.cat(parts, -1)


# ---- data ---------------------------------------------------------------------------------------------------
def prose_chunks(handle, split: str, n_chunks: int, seq_len: int = 128) -> list[list[int]]:
    """``n_chunks`` token-id sequences of ``seq_len`` (BOS + text) from the offline prose. ``split="train"`` reads
    the first half of the text, ``"eval"`` the second half, so the two never overlap."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: use 'train' or 'eval'")
    if n_chunks < 1 or seq_len < 4:
        raise ValueError("n_chunks must be >= 1 and seq_len >= 4")
    text = offline_prose()
    half = len(text) // 2
    part = text[:half] if split == "train" else text[half:]
    ids = handle.tokenizer(part[: n_chunks * seq_len * 8], add_special_tokens=False)["input_ids"]
    body = seq_len - 1
    if len(ids) < n_chunks * body:
        raise ValueError(f"the {split} prose gives only {len(ids) // body} chunks of {seq_len} tokens")
    bos = handle.tokenizer.bos_token_id
    head = [bos] if bos is not None else []
    return [head + ids[i * body:(i + 1) * body] for i in range(n_chunks)]


def decider_dataset(handle, chunks: list[list[int]], sites: Sequence[str], k: int = DEFAULT_TOPK,
                    progress: Progress = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features ``[n, len(sites) * d + k]``, labels ``[n]`` (1 = first pass mispredicted) and first-pass
    entropies ``[n]`` for every position with a next token (the last one of each chunk has none)."""
    feats, labels, ents = [], [], []
    with torch.inference_mode():
        for i, ids in enumerate(tqdm(chunks, desc="decider data", disable=progress is not True)):
            _report(progress, i / len(chunks), f"reading prose chunk {i + 1} of {len(chunks)}")
            fp = first_pass(handle, ids, sites)
            n = fp.length - 1
            feats.append(decider_features({s: h[:n] for s, h in fp.hidden.items()}, fp.logits[:n], sites, k))
            labels.append((fp.logits[:n].argmax(-1) != fp.input_ids[1:]).float())
            ents.append(entropy(fp.logits[:n]))
    return torch.cat(feats), torch.cat(labels), torch.cat(ents)


# ---- training --------------------------------------------------------------------------------------------------
def train_mlp_decider(features: torch.Tensor, labels: torch.Tensor, config: MLPDeciderConfig, epochs: int = 8,
                      lr: float = 1e-3, batch_size: int = 256, val_fraction: float = 0.2, seed: int = 0,
                      progress: Progress = True) -> MLPDecider:
    """Train with BCE (``pos_weight`` = negatives/positives) on a random split; validation AUROC and accuracy go to
    ``config.metrics``."""
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"features {tuple(features.shape)} and labels {tuple(labels.shape)} do not align")
    if not torch.isfinite(features).all():
        raise ValueError("decider features hold NaN or Inf")
    n = features.shape[0]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_val = max(1, int(n * val_fraction))
    val, tr = perm[:n_val], perm[n_val:]
    y_tr = labels[tr]
    pos = float(y_tr.sum())
    if pos == 0 or pos == len(tr):
        raise ValueError("the training labels hold a single class; use more text")
    torch.manual_seed(seed)
    model = MLPDecider(config)
    model.mean.copy_(features[tr].mean(0))
    model.std.copy_(features[tr].std(0).clamp(min=1e-6))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(tr) - pos) / pos))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in tqdm(range(epochs), desc="train decider", disable=progress is not True):
        _report(progress, epoch / epochs, f"training the decider, epoch {epoch + 1} of {epochs}")
        model.train()
        for idx in torch.randperm(len(tr), generator=g).split(batch_size):
            opt.zero_grad()
            loss = loss_fn(model(features[tr[idx]]), y_tr[idx])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        p_val = torch.sigmoid(model(features[val])).numpy()
    y_val = labels[val].numpy()
    config.metrics = {"n_train": int(len(tr)), "n_val": int(n_val), "train_positive_rate": pos / len(tr),
                      "val_auroc": auroc(y_val, p_val, single_class="nan"),
                      "val_share_iterated": float((p_val > config.threshold).mean()),
                      "val_recall": float((p_val[y_val == 1] > config.threshold).mean()),
                      "epochs": epochs, "lr": lr, "pos_weight": (len(tr) - pos) / pos}
    return model


def save_decider(model: MLPDecider, folder: str | Path, overwrite: bool = False) -> Path:
    """Write ``decider.safetensors`` and ``decider.json`` into ``folder`` as one commit (a used folder is refused
    unless ``overwrite``, which replaces it whole, so the two files always belong together)."""
    folder = Path(folder)
    with committed_folder(folder, overwrite, fix="pass overwrite=True (--overwrite) to replace it") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "decider.safetensors"))
        write_json(tmp / "decider.json", asdict(model.config))
    return folder


def load_decider(folder: str | Path, threshold: float | None = None) -> MLPDecider:
    """Load a decider saved by :func:`save_decider` (safetensors + JSON only)."""
    folder = Path(folder)
    cfg_path, w_path = folder / "decider.json", folder / "decider.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(f"{folder} lacks decider.json / decider.safetensors; train one with "
                                f"`hiddenlens train-decider --out {folder}`")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        state = load_file(str(w_path))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as exc:
        raise DamagedFileError(f"the decider in {folder} is damaged or truncated ({' '.join(str(exc).split())}); "
                               "train it again (`hiddenlens train-decider`)") from None
    if "layers" in meta:  # written before sites: TaH's hidden_states indices of a model with n_layers blocks
        n_layers = int(meta.pop("n_layers", 30))
        meta["sites"] = [hidden_state_site(i, n_layers) for i in meta.pop("layers")]
    try:
        config = MLPDeciderConfig(**meta)
        if threshold is not None:
            config.threshold = float(threshold)
        model = MLPDecider(config)
        model.load_state_dict(state)
    except (TypeError, RuntimeError) as exc:
        raise DamagedFileError(f"decider.json and decider.safetensors in {folder} do not fit together "
                               f"({' '.join(str(exc).split())[:200]}); train it again") from None
    return model.eval()


# ---- the decider trained once per model and cached -----------------------------------------------------------
#: how :func:`cached_decider` trains: prose chunks of the first half of the offline prose (the evaluation split
#: of ``prose_chunks`` is the second half), the decider's default architecture, sites :func:`default_sites`
CACHE_RECIPE = {"chunks": 48, "seq_len": 128, "topk": DEFAULT_TOPK, "epochs": 8, "lr": 1e-3, "seed": 0}


def cached_decider_dir(handle) -> Path:
    """Where the cached decider of ``handle``'s weights lives: ``<cache>/deciders/<weights sha256>/``
    (cache: :func:`hiddenlens.models.embedded.cache_dir`)."""
    sha = handle.info.setdefault("weights_sha256", weights_hash(handle.hf_model))
    return cache_dir() / "deciders" / sha


def cached_decider(handle, threshold: float | None = None, progress: Progress = True,
                   retrain: bool = False) -> MLPDecider:
    """The MLP decider of ``handle``'s exact weights: read from :func:`cached_decider_dir`, or trained on first use
    (:data:`CACHE_RECIPE`) and written there as one folder commit (a killed run leaves nothing; two processes
    training at once wait on one lock). A damaged cached decider is trained again (with a warning), never loaded.
    ``threshold`` overrides the stored one (0.5)."""
    folder = cached_decider_dir(handle)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".train.lock"):
        if (folder / "decider.json").is_file() and not retrain:
            try:
                model = load_decider(folder, threshold)
                _report(progress, 1.0, f"decider read from {folder}")
                return model
            except DamagedFileError as exc:
                warnings.warn(f"the cached decider could not be used ({exc}); training it again", stacklevel=2)
        model = train_decider_for(handle, progress=progress, **CACHE_RECIPE)
        save_decider(model, folder, overwrite=True)
    if threshold is not None:
        model.config.threshold = float(threshold)
    return model


def train_decider_for(handle, sites: Sequence[str] | None = None, chunks: int = 48, seq_len: int = 128,
                      topk: int = DEFAULT_TOPK, hidden: int = 256, n_blocks: int = 2, epochs: int = 8,
                      lr: float = 1e-3, threshold: float = 0.5, seed: int = 0, progress: Progress = True
                      ) -> MLPDecider:
    """Build the training set from ``chunks`` training-split prose chunks of ``seq_len`` tokens
    (:func:`prose_chunks`, :func:`decider_dataset`) at ``sites`` (default :func:`default_sites`) and train an
    :class:`MLPDecider` on it (:func:`train_mlp_decider`); data is the first 80 % of ``progress``."""
    sites = list(sites) if sites is not None else default_sites(handle.n_layers)
    step = (lambda f, w: _report(progress, 0.8 * f, w)) if callable(progress) else progress
    feats, labels, _ = decider_dataset(handle, prose_chunks(handle, "train", chunks, seq_len), sites, topk, step)
    cfg = MLPDeciderConfig(sites=sites, d_model=handle.adapter.d_model, topk=topk, hidden=hidden, n_blocks=n_blocks,
                           threshold=threshold, model=handle.spec)
    step = (lambda f, w: _report(progress, 0.8 + 0.2 * f, w)) if callable(progress) else progress
    model = train_mlp_decider(feats, labels, cfg, epochs=epochs, lr=lr, seed=seed, progress=step)
    _report(progress, 1.0, "decider trained")
    return model
