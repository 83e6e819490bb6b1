"""Bigram-Backcopy (BB): the synthetic task of Guo et al. (arXiv 2410.13835) where attention sinks emerge.

Generator (methods.md 2.3, the official ``BBM/data.py`` class ``bbm``), with statistics from ``pydoc_data.topics``
(tiny-Shakespeare is not available offline)::

    vocabulary   the characters of the text (ids 0..V-1, sorted), then <s> = BOS (id V) and <d> = delimiter (V+1)
    marginal     unigram frequencies; cond[i] = bigram row i, normalised
    triggers     the k most frequent characters under the marginal
    x0 = BOS;  x1 ~ marginal with the triggers zeroed and renormalised
    t >= 2:  x_t = x_{t-2} if x_{t-1} is a trigger (backcopy), else x_t ~ cond[x_{t-1}] (bigram)

INFERRED (not in the official code, which uses tiny-Shakespeare where it cannot happen): a character that only
ever ends the text has an empty bigram row; its row is the marginal. The delimiter is in the vocabulary but never
sampled (``delimiter_p = 0``, as in the scripts).

Model: a transformers ``GPT2LMHeadModel`` with one head, pre-norm LayerNorm (eps 1e-5), learned absolute
positions, ReLU FFN (4 x width), untied output, every bias (linear and LayerNorm) zeroed and frozen, so it is the
bias-free model of the paper while every hiddenlens backend and site works unchanged. ``attention="relu"`` swaps
softmax for ``relu(QK^T/sqrt(d) + mask) / n_keys`` (row i divided by i + 1), registered with transformers'
``AttentionInterface`` as ``bb_relu`` and declared to the capture with
:func:`hiddenlens.probes.attention.register_pattern_function`, so ``attn.pattern`` reports the ReLU weights.

Training: AdamW or SGD with momentum, fresh samples every step, full next-token cross-entropy; the loss is also
logged on trigger queries (backcopy targets) and on non-trigger queries (bigram targets) beside the bigram optimum
(the mean entropy of ``cond[x_p]`` over those queries). Checkpoints are folders ``step_000500/`` holding
``model.safetensors``, ``config.json`` and ``hiddenlens_model.json`` (``{"kind": "bigram-backcopy", ...}``), so
``hiddenlens.load_model(folder)`` loads them like any other model.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hiddenlens.probes.atomic import atomic_path, write_json, write_text

from .loading import MARKER, register_directory_loader

KIND = "bigram-backcopy"
RELU_ATTENTION = "bb_relu"
BOS_TOKEN, DELIM_TOKEN = "<s>", "<d>"


# ---- statistics and generator -------------------------------------------------------------------------------
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


# ---- ReLU attention -----------------------------------------------------------------------------------------
def relu_attention_with_weights(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
    """``A = relu(QK^T * scaling + mask) / n_keys`` (n_keys = unmasked keys of the row, i + 1 without padding).

    Returns ``(attn_output [b, q, h, d], scores [b, h, q, k], pattern [b, h, q, k])`` like the eager path.
    """
    from hiddenlens.probes.attention import _additive_mask

    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    mask = _additive_mask(attention_mask, query.shape[2], key.shape[2], scores.dtype, scores.device)
    mask = mask[..., : key.shape[2]]
    scores = scores + mask
    n_keys = (mask > torch.finfo(scores.dtype).min / 2).sum(-1, keepdim=True).clamp_min(1)
    pattern = torch.relu(scores) / n_keys
    if dropout and module.training:
        pattern = torch.nn.functional.dropout(pattern, p=dropout)
    out = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    return out, scores, pattern


def _relu_attention(module, query, key, value, attention_mask, *args, **kwargs):
    out, _, pattern = relu_attention_with_weights(module, query, key, value, attention_mask, *args, **kwargs)
    return out, pattern


def _register_relu_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    from hiddenlens.probes.attention import register_pattern_function

    AttentionInterface.register(RELU_ATTENTION, _relu_attention)
    AttentionMaskInterface.register(RELU_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    register_pattern_function(RELU_ATTENTION, relu_attention_with_weights)


# ---- model and tokenizer ------------------------------------------------------------------------------------
@dataclass
class BBConfig:
    """One BB training run. ``attention``: softmax | relu; ``optimizer``: adamw | sgd (momentum 0.9)."""

    d_model: int = 64
    n_layers: int = 1
    seq_length: int = 32
    k: int = 3
    attention: str = "softmax"
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    batch_size: int = 64
    steps: int = 1000
    seed: int = 0
    checkpoint_every: int = 0  # 0: only the final checkpoint (when an output folder is given)

    def __post_init__(self):
        if self.attention not in ("softmax", "relu"):
            raise ValueError(f"attention={self.attention!r}: use 'softmax' or 'relu'")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer={self.optimizer!r}: use 'adamw' or 'sgd'")
        if not 1 <= self.n_layers <= 12:
            raise ValueError(f"n_layers={self.n_layers}: use 1 to 12 (the paper uses 1 to 3)")
        for name in ("d_model", "seq_length", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


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


def build_model(cfg: BBConfig, vocab_size: int, bos_id: int):
    """A bias-free 1-head GPT-2 (see the module docstring), weights seeded by ``cfg.seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if cfg.attention == "relu":
        _register_relu_attention()
    config = GPT2Config(vocab_size=vocab_size, n_positions=cfg.seq_length, n_embd=cfg.d_model,
                        n_layer=cfg.n_layers, n_head=1, n_inner=4 * cfg.d_model, activation_function="relu",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                        tie_word_embeddings=False, bos_token_id=bos_id, eos_token_id=None, pad_token_id=bos_id)
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(config)
    _torch_default_init(model)
    _freeze_biases(model)
    model.config._attn_implementation = RELU_ATTENTION if cfg.attention == "relu" else "eager"
    return model


def _torch_default_init(model) -> None:
    """Re-initialise like a plain PyTorch model (INFERRED: the official BBM model is built from ``nn.Linear`` /
    ``nn.Embedding``): embeddings N(0, 1), projections U(-1/sqrt(fan_in), 1/sqrt(fan_in)), LayerNorm weights 1.
    GPT-2's own init (N(0, 0.02)) gave a weaker sink in our runs."""
    from transformers.pytorch_utils import Conv1D

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Embedding):
                mod.weight.normal_(0.0, 1.0)
            elif isinstance(mod, (Conv1D, torch.nn.Linear)):
                fan_in = mod.weight.shape[0] if isinstance(mod, Conv1D) else mod.weight.shape[1]
                mod.weight.uniform_(-fan_in ** -0.5, fan_in ** -0.5)
            elif isinstance(mod, torch.nn.LayerNorm):
                mod.weight.fill_(1.0)


def _freeze_biases(model) -> None:
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            with torch.no_grad():
                p.zero_()
            p.requires_grad_(False)


# ---- checkpoints --------------------------------------------------------------------------------------------
def save_checkpoint(model, gen: BBGenerator, cfg: BBConfig, folder: str | Path, step: int) -> Path:
    """Write ``model.safetensors``, ``config.json`` and the marker (last, so half-written folders never load)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    write_text(folder / "config.json", model.config.to_json_string())
    write_json(folder / MARKER, {"kind": KIND, "step": step, "attention": cfg.attention, "config": asdict(cfg),
                                 "chars": gen.stats.chars, "triggers": gen.triggers})
    return folder


def load_directory(path: str | Path, dtype: torch.dtype = torch.float32):
    """The directory loader of kind ``bigram-backcopy``: ``(GPT2LMHeadModel, tokenizer)``."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(path)
    meta = json.loads((path / MARKER).read_text())
    if meta.get("kind") != KIND:
        raise ValueError(f"{path / MARKER} has kind {meta.get('kind')!r}, expected {KIND!r}")
    if meta["attention"] == "relu":
        _register_relu_attention()
    config = GPT2Config.from_json_file(str(path / "config.json"))
    model = GPT2LMHeadModel(config)
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    model.config._attn_implementation = RELU_ATTENTION if meta["attention"] == "relu" else "eager"
    return model.to(dtype).eval(), build_tokenizer(meta["chars"])


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint folders under ``folder`` (or ``folder`` itself), ordered by training step."""
    folder = Path(folder)
    if (folder / MARKER).is_file():
        return [folder]
    found = [p.parent for p in folder.glob(f"*/{MARKER}")]
    if not found:
        raise FileNotFoundError(f"no BB checkpoints (folders with {MARKER}) under {folder}")
    return sorted(found, key=lambda p: json.loads((p / MARKER).read_text()).get("step", 0))


def checkpoint_step(folder: str | Path) -> int:
    return int(json.loads((Path(folder) / MARKER).read_text()).get("step", 0))


# ---- metrics ------------------------------------------------------------------------------------------------
def as_handle(model, tokenizer, spec: str = KIND):
    """Wrap a BB model into a :class:`hiddenlens.models.handle.ModelHandle` (hf backend) for captures."""
    from .adapter import discover_adapter
    from .handle import ModelHandle

    return ModelHandle(model, tokenizer, discover_adapter(model), spec, info={"spec": spec})


@torch.no_grad()
def bb_metrics(handle, gen: BBGenerator, n_seqs: int = 256, seed: int = 12345) -> dict:
    """Sink metrics of a BB model on fresh sequences, per layer (head 0), through ``hiddenlens.capture``.

    Queries are input positions p >= 1; a trigger query holds a trigger token (its target is x_{p-1}).
    Returns ``{"loss", "trigger_loss", "nontrigger_loss", "bigram_optimum", "layers": [per-layer dict]}`` with
    per layer: ``bos_attn_nontrigger`` (mean A[p, 0]), ``bos_attn_trigger``, ``copy_attn_trigger`` (mean
    A[p, p-1] at trigger queries), ``bos_share`` (sum of A[p, 0] over the sum of all weights, non-trigger
    queries; equals ``bos_attn_nontrigger`` under softmax), ``value_norm_ratio`` (||W_O v_BOS|| over the mean of
    the other positions), ``resid_ratio_mean`` / ``resid_ratio_max`` (block output norm at BOS over the mean / max
    of the others).
    """
    from hiddenlens.analyses.sinks import head_value_norms, o_proj_matrix
    from hiddenlens.probes.capture import capture

    g = torch.Generator().manual_seed(seed)
    x = gen.sample(n_seqs, g).to(handle.device)
    inp, tgt = x[:, :-1], x[:, 1:]
    was_training = handle.hf_model.training
    handle.hf_model.eval()
    try:
        with capture(handle, ["blocks.*.attn.pattern", "blocks.*.attn.v", "blocks.*.resid_post"],
                     to="cpu", dtype=torch.float32) as cache:
            logits = handle.run(inp, add_bos=None).logits.float()
    finally:
        handle.hf_model.train(was_training)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none").cpu()
    inp = inp.cpu()
    trig = gen.is_trigger(inp)
    query = torch.ones_like(trig)
    query[:, 0] = False
    nontrig = query & ~trig
    h_opt = gen.bigram_entropy()[inp]
    out = {"loss": float(ce.mean()), "trigger_loss": float(ce[trig].mean()) if trig.any() else float("nan"),
           "nontrigger_loss": float(ce[nontrig].mean()), "bigram_optimum": float(h_opt[nontrig].mean()),
           "n_trigger_queries": int(trig.sum()), "n_nontrigger_queries": int(nontrig.sum()), "layers": []}
    rows = torch.arange(inp.shape[1])
    for layer in range(handle.adapter.n_layers):
        a = cache[f"blocks.{layer}.attn.pattern"][:, 0]                              # [n, q, k]
        to_bos = a[:, :, 0]
        prev = torch.zeros_like(to_bos)
        prev[:, 1:] = a[:, rows[1:], rows[1:] - 1]
        total = a.sum(-1)
        vnorm = head_value_norms(cache[f"blocks.{layer}.attn.v"], o_proj_matrix(handle, layer).cpu(),
                                 handle.adapter.n_heads)[:, 0]                       # [n, pos]
        r = cache[f"blocks.{layer}.resid_post"].norm(dim=-1)                         # [n, pos]
        out["layers"].append({
            "layer": layer,
            "bos_attn_nontrigger": float(to_bos[nontrig].mean()),
            "bos_attn_trigger": float(to_bos[trig].mean()) if trig.any() else float("nan"),
            "copy_attn_trigger": float(prev[trig].mean()) if trig.any() else float("nan"),
            "bos_share": float(to_bos[nontrig].sum() / total[nontrig].sum().clamp_min(1e-12)),
            "value_norm_ratio": float(vnorm[:, 0].mean() / vnorm[:, 1:].mean()),
            "resid_ratio_mean": float(r[:, 0].mean() / r[:, 1:].mean()),
            "resid_ratio_max": float((r[:, 0] / r[:, 1:].max(1).values).mean()),
        })
    return out


def flat_metrics(m: dict) -> dict:
    """One flat row: the losses plus each layer's metrics as ``L{layer}_{name}``."""
    row = {k: v for k, v in m.items() if k != "layers"}
    for lm in m["layers"]:
        row.update({f"L{lm['layer']}_{k}": v for k, v in lm.items() if k != "layer"})
    return row


# ---- training -----------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """``model`` (trained, eval mode), ``tokenizer``, ``generator``, ``history`` (one row per evaluation:
    step, losses and :func:`bb_metrics` per layer) and ``checkpoints`` (folders, by step)."""

    model: object
    tokenizer: object
    generator: BBGenerator
    history: pd.DataFrame
    checkpoints: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def handle(self):
        return as_handle(self.model, self.tokenizer)


def _optimizer(cfg: BBConfig, params):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train(cfg: BBConfig, out_dir: str | Path | None = None, stats: BBStatistics | None = None,
          eval_every: int = 0, eval_seqs: int = 256, progress: bool = False) -> TrainResult:
    """Train one BB model.

    Args:
        cfg: the run (see :class:`BBConfig`).
        out_dir: where checkpoints go (``step_000000`` ... every ``cfg.checkpoint_every`` steps, plus the last
            step); None keeps the model in memory only.
        stats: character statistics (default: ``pydoc_data.topics``).
        eval_every: also record :func:`bb_metrics` every this many steps (0: only at the end); evaluation uses
            its own random stream, so it does not change training.
        eval_seqs: sequences per evaluation.
        progress: a tqdm bar over steps.
    """
    gen = BBGenerator(stats, k=cfg.k, seq_length=cfg.seq_length)
    model = build_model(cfg, gen.vocab_size, gen.bos_id)
    tok = build_tokenizer(gen.stats.chars)
    handle = as_handle(model, tok)
    opt = _optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    data_rng = torch.Generator().manual_seed(cfg.seed)
    history, ckpts = [], []
    eval_steps = set(range(0, cfg.steps + 1, eval_every)) if eval_every else set()
    ckpt_steps = set(range(0, cfg.steps + 1, cfg.checkpoint_every)) if cfg.checkpoint_every else set()
    eval_steps.add(cfg.steps)
    ckpt_steps.add(cfg.steps)

    def checkpoint(step: int) -> None:
        if step in eval_steps:
            history.append({"step": step} | flat_metrics(bb_metrics(handle, gen, eval_seqs)))
        if out_dir is not None and step in ckpt_steps:
            ckpts.append(save_checkpoint(model, gen, cfg, Path(out_dir) / f"step_{step:06d}", step))

    start = time.perf_counter()
    steps = range(1, cfg.steps + 1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=f"BB {cfg.attention}/{cfg.optimizer} L{cfg.n_layers} seed {cfg.seed}", unit="step")
    model.train()
    checkpoint(0)
    for step in steps:
        x = gen.sample(cfg.batch_size, data_rng)
        inp = x[:, :-1]
        logits = model(input_ids=inp, attention_mask=torch.ones_like(inp), use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"BB training diverged at step {step} (loss {float(loss)}); lower lr={cfg.lr}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        checkpoint(step)
    model.eval()
    return TrainResult(model, tok, gen, pd.DataFrame(history), ckpts, time.perf_counter() - start)


register_directory_loader(KIND, load_directory)
