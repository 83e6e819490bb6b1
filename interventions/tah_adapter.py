"""Think-at-Hard's trained half: a LoRA adapter used only in iterations >= 1.

TaH ("Think-at-Hard: Selective Latent Iterations to Improve Reasoning Language Models", arXiv 2511.08577) adds a
depth-aware LoRA to the model: iteration 0 is the untouched model, iterations >= 1 run with the adapter, so the
extra passes can learn to *refine* a hard token's prediction without disturbing the easy ones. Here:

* :func:`adapted_handle` returns a second :class:`~hiddenlens.probes.handle.ModelHandle` over a **copy** of the
  model with LoRA layers injected by ``peft`` (``inject_adapter_in_model``; module paths, and so hiddenlens site
  names, are unchanged). The shared model is never modified, so other users of it are unaffected.
* :func:`hiddenlens.interventions.iterate.iterate_from` runs depth 0 on the base model and depths >= 1 on the
  adapted handle (``adapter=``); the duo-causal KV cache is shared, exactly as in TaH.
* :func:`train_adapter` trains the LoRA on offline prose, teacher forced: for each chunk the base model's first
  pass gives ``z0``; the positions the decider picks at depth 0 are run at depth 1 through the adapted model with
  gradients, and the loss is the next-token cross-entropy of the cumulative logits ``z0 + z1`` (TaH's output of an
  iterated token). Training alternates with the decider in the simplest way TaH allows (INFERRED: TaH trains both
  in stages): the decider is trained first (``hiddenlens train-decider``, labels "first pass mispredicted") and
  the adapter then learns on the positions that decider iterates.
* Saved as ``adapter.safetensors`` (the LoRA weights only) + ``adapter.json`` (rank, alpha, targets, training
  record and the base model's identity) and loaded by path with :func:`load_adapter`, which refuses an adapter made
  for other weights.

INFERRED (TaH's exact recipe is not reproduced): rank 8, alpha 16, targets ``q_proj, v_proj``, AdamW lr 1e-3, one
chunk per step, positions from the entropy decider unless a trained decider is given.
"""
from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from filelock import FileLock

from hiddenlens.common.errors import DamagedFileError, UserError
from hiddenlens.common.files import atomic_path, write_json
from hiddenlens.common.folders import committed_folder
from hiddenlens.models.embedded import cache_dir
from hiddenlens.probes.handle import ModelHandle
from hiddenlens.probes.store import weights_hash

from .iterate import DEFAULT_TOPK, Decider, DeciderInput, additive_mask, duo_causal_allowed, first_pass, soft_embedding

ADAPTER_FILE, CONFIG_FILE = "adapter.safetensors", "adapter.json"
#: how the cached adapter of a model is trained on first use (:func:`cached_adapter`): prose chunks, tokens per
#: chunk, the entropy decider's threshold (nats) whose positions it learns on, and the optimizer steps
CACHE_RECIPE = {"chunks": 32, "seq_len": 128, "entropy_threshold": 2.5, "steps": 48}


class AdapterMismatchError(UserError, ValueError):
    """An iteration adapter loaded for a model other than the one it was trained on."""


@dataclass
class AdapterConfig:
    """LoRA ``rank`` / ``alpha`` on the ``targets`` projections of every block; training ``lr``, ``steps`` (one
    chunk each), ``k`` (TaH's top-k soft embedding) and ``seed``."""

    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lr: float = 1e-3
    steps: int = 64
    k: int = DEFAULT_TOPK
    seed: int = 0

    def __post_init__(self):
        if self.rank < 1 or self.steps < 1 or not self.lr > 0 or not self.alpha > 0:
            raise ValueError(f"rank, steps, lr and alpha must be positive, got rank={self.rank}, "
                             f"steps={self.steps}, lr={self.lr}, alpha={self.alpha}")
        if not self.targets:
            raise ValueError("name at least one target projection (e.g. q_proj)")


def _lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n}


def adapted_handle(handle, config: AdapterConfig) -> ModelHandle:
    """A handle over a copy of ``handle``'s model with fresh LoRA layers (B = 0: the adapted model starts out
    exactly equal to the base); only the LoRA weights require gradients."""
    from peft import LoraConfig, inject_adapter_in_model

    base = handle.with_backend("hf")
    model = copy.deepcopy(base.hf_model)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.targets), lora_dropout=0.0)
    torch.manual_seed(config.seed)
    model = inject_adapter_in_model(lora, model)
    if not _lora_state(model):
        raise ValueError(f"no module of {handle.spec} matches targets {config.targets}; name its attention "
                         "projections (e.g. q_proj, v_proj)")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    out = ModelHandle(model, base.tokenizer, base.adapter, f"{base.spec}+tah-lora")
    out.info.update({"base_weights_sha256": base.info.setdefault("weights_sha256", weights_hash(base.hf_model)),
                     "adapter_config": asdict(config)})
    return out


def depth_one_logits(adapted: ModelHandle, fp, positions: torch.Tensor, k: int = DEFAULT_TOPK) -> torch.Tensor:
    """Depth-1 logits ``[n, vocab]`` of ``positions`` (``[n]``) through the adapted model, attending to the first
    pass's KV slots (``fp.cache``, cropped back afterwards) under TaH's duo-causal mask; differentiable in the LoRA
    weights."""
    model = adapted.hf_model
    T = fp.length
    E = adapted.adapter.embedding(model).weight
    embeds = soft_embedding(fp.logits[positions].to(E.device), E.detach(), k)[None]
    q_iter = torch.ones_like(positions)
    all_pos = torch.cat([torch.arange(T), positions])
    all_iter = torch.cat([torch.zeros(T, dtype=torch.long), q_iter])
    mask = additive_mask(duo_causal_allowed(positions, q_iter, all_pos, all_iter), embeds.dtype).to(E.device)
    try:
        out = model(inputs_embeds=embeds, position_ids=positions[None].to(E.device), attention_mask=mask,
                    cache=fp.cache, use_cache=True)
    finally:
        extra = fp.cache.get_seq_length() - T
        if extra > 0:
            fp.cache.crop(-extra)
    return out.logits[0].float()


def train_adapter(handle, chunks: Sequence[Sequence[int]], decider: Decider, config: AdapterConfig | None = None,
                  progress: bool = True) -> tuple[ModelHandle, pd.DataFrame]:
    """Train a LoRA for iterations >= 1 on token-id ``chunks`` (cycled, one per step) at the positions ``decider``
    iterates. Returns the adapted handle and the history (``step``, ``n_positions``, ``loss`` (nats, cumulative
    logits), ``loss_first`` (nats, first pass alone, same positions))."""
    config = config or AdapterConfig()
    if not chunks:
        raise ValueError("pass at least one chunk of token ids")
    adapted = adapted_handle(handle, config)
    params = [p for p in adapted.hf_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr)
    rows = []
    for step in tqdm(range(config.steps), desc="TaH adapter", unit="step", disable=not progress):
        ids = torch.as_tensor(list(chunks[step % len(chunks)])).long()
        with torch.no_grad():
            fp = first_pass(handle, ids, decider.sites)
            scores = decider.score(DeciderInput(torch.arange(fp.length), 0, fp.logits,
                                                {s: fp.hidden[s] for s in decider.sites})).float().cpu()
        positions = torch.nonzero(scores[:-1] > decider.threshold).flatten()  # the last position has no target
        if positions.numel() == 0:
            rows.append({"step": step, "n_positions": 0, "loss": float("nan"), "loss_first": float("nan")})
            continue
        target = ids[positions + 1].to(fp.logits.device)
        z1 = depth_one_logits(adapted, fp, positions, config.k)
        z0 = fp.logits[positions].to(z1.device)
        loss = torch.nn.functional.cross_entropy(z0 + z1, target.to(z1.device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        rows.append({"step": step, "n_positions": int(positions.numel()), "loss": float(loss.detach()),
                     "loss_first": float(torch.nn.functional.cross_entropy(z0, target.to(z0.device)))})
    for p in params:
        p.requires_grad_(False)
    adapted.hf_model.eval()
    return adapted, pd.DataFrame(rows)


def save_adapter(adapted: ModelHandle, folder: str | Path, history: pd.DataFrame | None = None,
                 overwrite: bool = False) -> Path:
    """Write ``adapter.safetensors`` + ``adapter.json`` into ``folder`` as one commit."""
    folder = Path(folder)
    meta = {"base_spec": adapted.spec.removesuffix("+tah-lora"),
            "base_weights_sha256": adapted.info["base_weights_sha256"], "config": adapted.info["adapter_config"]}
    if history is not None and len(history):
        meta["train_loss_first_steps"] = float(history["loss"].head(8).mean())
        meta["train_loss_last_steps"] = float(history["loss"].tail(8).mean())
    with committed_folder(folder, overwrite, fix="pass overwrite=True (--overwrite) to replace it") as tmp:
        with atomic_path(tmp / ADAPTER_FILE) as part:
            save_file(_lora_state(adapted.hf_model), str(part))
        write_json(tmp / CONFIG_FILE, meta)
    return folder


def load_adapter(handle, folder: str | Path) -> ModelHandle:
    """The adapted handle of ``handle`` with the LoRA weights saved in ``folder``; raises
    :class:`AdapterMismatchError` when they were trained on other weights, ``FileNotFoundError`` when missing."""
    folder = Path(folder).expanduser()
    for name in (ADAPTER_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: pass the folder written by "
                                    "`hiddenlens train-adapter` (adapter.safetensors + adapter.json)")
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        AdapterConfig(**meta["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DamagedFileError(f"{folder / CONFIG_FILE} is not an adapter description ({exc}); train the adapter "
                               "again") from exc
    sha = handle.info.setdefault("weights_sha256", weights_hash(handle.with_backend("hf").hf_model))
    if meta.get("base_weights_sha256") != sha:
        raise AdapterMismatchError(f"{folder} was trained on {meta.get('base_spec')!r} (weights "
                                   f"{str(meta.get('base_weights_sha256'))[:12]}), not on {handle.spec!r} (weights "
                                   f"{sha[:12]}); train an adapter for this model")
    adapted = adapted_handle(handle, AdapterConfig(**meta["config"]))
    try:
        state = load_file(str(folder / ADAPTER_FILE))
    except SafetensorError as exc:
        raise DamagedFileError(f"{folder / ADAPTER_FILE} is not a readable safetensors file ({exc}); train the "
                               "adapter again") from exc
    own = dict(adapted.hf_model.named_parameters())
    if set(state) != {n for n in own if "lora_" in n}:
        raise AdapterMismatchError(f"{folder / ADAPTER_FILE} does not hold this model's LoRA weights "
                                   f"({len(state)} tensors); train an adapter for this model")
    with torch.no_grad():
        for name, t in state.items():
            own[name].copy_(t)
            own[name].requires_grad_(False)
    adapted.hf_model.eval()
    return adapted


def cached_adapter_dir(handle) -> Path:
    """Where the cached adapter of ``handle``'s weights lives: ``<cache>/adapters/<weights sha256>/``."""
    sha = handle.info.setdefault("weights_sha256", weights_hash(handle.with_backend("hf").hf_model))
    return cache_dir() / "adapters" / sha


def cached_adapter(handle, progress: bool = True, retrain: bool = False) -> ModelHandle:
    """The adapted handle of ``handle``'s exact weights: read from :func:`cached_adapter_dir`, or trained on first
    use (:data:`CACHE_RECIPE`) and written there as one folder commit (two processes training at once wait on one
    lock). A damaged cached adapter is trained again, with a warning, never loaded."""
    from .decider import EntropyDecider, prose_chunks

    folder = cached_adapter_dir(handle)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".train.lock"):
        if (folder / CONFIG_FILE).is_file() and not retrain:
            try:
                return load_adapter(handle, folder)
            except (DamagedFileError, AdapterMismatchError) as exc:
                warnings.warn(f"the cached adapter could not be used ({exc}); training it again", stacklevel=2)
        r = CACHE_RECIPE
        adapted, history = train_adapter(handle, prose_chunks(handle, "train", r["chunks"], r["seq_len"]),
                                         EntropyDecider(r["entropy_threshold"]), AdapterConfig(steps=r["steps"]),
                                         progress=progress)
        save_adapter(adapted, folder, history, overwrite=True)
    return adapted
