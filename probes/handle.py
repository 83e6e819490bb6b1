"""``ModelHandle``: one object for a loaded model, whatever the backend; ``load_model`` builds it.

``handle.run`` and ``handle.generate`` take prompts as strings or token ids, tokenize with left padding, batch,
tell the open capture / edit blocks of the calling thread which prompts each run covers, and run the handle's
backend object (:mod:`hiddenlens.probes.backends`), so consumers never depend on the backend.
``handle.run(..., logits=False)`` stops after the last block any open read or edit needs (TransformerLens's
``stop_at_layer``, nnsight's ``stop()``): capturing layer 12 of 30 costs about 13/30 of a forward.

Inputs are checked before any forward: token ids must lie in ``0..vocab_size-1`` (:class:`TokenIdError`), a prompt
(plus ``max_new_tokens`` under ``generate``) must fit the model's context, ``max_position_embeddings`` /
``n_positions`` (:class:`ContextLengthError`), and ``batch_size`` must be positive.

BOS handling is explicit: ``add_bos=True`` prepends ``tokenizer.bos_token_id`` unless the sequence already starts
with it, ``False`` never adds it, ``None`` (the default) keeps the tokenizer's own behaviour. The embedded
SmolLM2 tokenizer adds no BOS (its ``bos_token`` is ``<|im_start|>``, id 1), so attention-sink analyses pass
``add_bos=True`` to get a fixed first token.
"""
from __future__ import annotations

import gc
import operator
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from hiddenlens.common.errors import UserError
from hiddenlens.models.adapter import ArchitectureAdapter
from hiddenlens.models.loading import LoadedModel, input_device, load_parts, share_weights_clone

from . import context
from .backends import make_backend
from .capture import ActivationCache, capture
from .sites import all_site_names

Prompts = str | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor


class ContextLengthError(UserError, ValueError):
    """A prompt (plus the tokens to generate) is longer than the model's context (its position table)."""


class TokenIdError(UserError, ValueError):
    """A token id given as input is not an id of the model's vocabulary."""


@dataclass
class Batch:
    """Tokenized prompts, left-padded: ``input_ids`` / ``attention_mask`` ``[batch, pos]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(1)

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions counted from each row's first real token (0 on padding), as HF's ``generate`` does, so a
        left-padded row gets the same positions (RoPE / learned) as the prompt run alone."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class RunOutput:
    """Result of :meth:`ModelHandle.run`: ``logits`` ``[batch, pos, vocab]`` (None with ``logits=False``)."""

    logits: torch.Tensor | None
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class GenerationOutput:
    """Result of :meth:`ModelHandle.generate`: ``sequences`` ``[batch, prompt + new]`` (left-padded prompt)."""

    sequences: torch.Tensor
    prompt_length: int
    texts: list[str]
    attention_mask: torch.Tensor
    scores: list[torch.Tensor] = field(default_factory=list)

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]


@dataclass(frozen=True)
class PrefixCache:
    """The KV cache of a prompt prefix that many prompts share (few-shot examples, a system prompt), made by
    :meth:`ModelHandle.prefix_cache` and passed to ``generate(..., prefix=...)``: ``ids`` (the prefix tokens) and
    ``past`` (a transformers ``Cache`` of batch 1, never mutated: each batch gets its own expanded copy)."""

    ids: tuple[int, ...]
    past: object

    def expanded(self, batch: int):
        """A fresh copy of ``past`` for ``batch`` rows (``[batch, kv_heads, len(ids), head_dim]`` per layer)."""
        import copy

        past = copy.deepcopy(self.past)
        past.batch_repeat_interleave(batch)
        return past


def common_prefix(rows: Sequence[Sequence[int]]) -> list[int]:
    """The longest token prefix of every row in ``rows``, cut so each row keeps at least one token after it."""
    rows = [list(r) for r in rows]
    n = min(len(r) for r in rows) - 1
    for i in range(max(n, 0)):
        if any(r[i] != rows[0][i] for r in rows):
            return rows[0][:i]
    return rows[0][:max(n, 0)]


class ModelHandle:
    """A loaded model: ``.hf_model`` (the transformers model underneath), ``.backend`` (the backend object that
    runs it: ``.backend.name`` is ``hf`` | ``transformer_lens`` | ``nnsight``), ``.model`` (the torch module the
    backend runs), ``.tokenizer``, ``.adapter``, ``.device``, ``.dtype`` and ``.spec``."""

    def __init__(self, hf_model, tokenizer, adapter: ArchitectureAdapter, spec: str, backend: str = "hf",
                 info: dict | None = None):
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.spec = spec
        self.info = dict(info or {})
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.backend = make_backend(backend, self)

    @classmethod
    def from_parts(cls, parts: LoadedModel, backend: str = "hf") -> "ModelHandle":
        return cls(parts.hf_model, parts.tokenizer, parts.adapter, parts.spec, backend, parts.info)

    # ---- basic properties ----------------------------------------------------------------------------
    @property
    def model(self):
        """The torch module this backend runs (HF model, TransformerBridge, or nnsight model)."""
        return self.backend.model

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embedding (for a model split across devices by accelerate,
        the device its embedding runs on; see :func:`hiddenlens.models.loading.input_device`)."""
        return input_device(self.hf_model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def max_positions(self) -> int | None:
        """The model's context length (``max_position_embeddings`` / ``n_positions`` of its config; None: none)."""
        cfg = self.hf_model.config
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: valid token ids are ``0..vocab_size-1``."""
        return int(self.hf_model.get_input_embeddings().weight.shape[0])

    def site_names(self) -> list[str]:
        """Every capturable (and editable) site of this model (architectures without resid_mid omit it)."""
        return [s for s in all_site_names(self.n_layers)
                if not any(s.endswith("." + k) for k in self.adapter.unavailable)]

    def __repr__(self) -> str:
        a = self.adapter
        return (f"ModelHandle({self.spec!r}, backend={self.backend.name!r}, family={a.family!r}, "
                f"layers={a.n_layers}, d_model={a.d_model}, heads={a.n_heads}/{a.n_kv_heads} kv, "
                f"device={self.device}, dtype={self.dtype})")
    # ---- tokenization --------------------------------------------------------------------------------
    def tokenize(self, prompts: Prompts, add_bos: bool | None = None) -> Batch:
        """Strings or token-id lists -> a left-padded :class:`Batch` on the model's device."""
        if isinstance(prompts, torch.Tensor):
            if prompts.ndim not in (1, 2) or prompts.is_floating_point() or prompts.dtype == torch.bool:
                raise TokenIdError(f"token ids as a tensor must be a 1-D or [batch, pos] integer tensor, got shape "
                                   f"{tuple(prompts.shape)} of {prompts.dtype}")
            ids = prompts if prompts.ndim == 2 else prompts[None]
            rows = [r.tolist() for r in ids]
        else:
            if isinstance(prompts, str):
                prompts = [prompts]
            if len(prompts) == 0:
                raise ValueError("no prompts given: pass at least one string or token-id list")
            if all(isinstance(p, str) for p in prompts):
                rows = self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
            else:
                rows = [_id_row(r) for r in prompts]
        if not rows:
            raise ValueError("no prompts given: the tensor of token ids has no rows")
        self._check_ids(rows)
        bos = self.tokenizer.bos_token_id
        if add_bos:
            if bos is None:
                raise ValueError("add_bos=True but this tokenizer has no bos_token_id")
            rows = [r if r[:1] == [bos] else [bos] + r for r in rows]
        elif add_bos is False and bos is not None:
            rows = [r[1:] if r[:1] == [bos] else r for r in rows]
        if any(len(r) == 0 for r in rows):
            raise ValueError("a prompt tokenized to zero tokens; pass non-empty text or add_bos=True")
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, width - len(r):] = torch.tensor(r)
            mask[j, width - len(r):] = 1
        return Batch(ids.to(self.device), mask.to(self.device))

    def _check_ids(self, rows: list[list[int]]) -> None:
        """Raise :class:`TokenIdError` naming the first id outside ``0..vocab_size-1``."""
        vocab = self.vocab_size
        for j, r in enumerate(rows):
            bad = [i for i in r if not 0 <= i < vocab]
            if bad:
                raise TokenIdError(f"token id {bad[0]} (prompt {j}) is not in this model's vocabulary of {vocab} "
                                   f"ids (valid ids 0..{vocab - 1}); pass ids from {self.spec}'s tokenizer")

    def _check_length(self, batch: Batch, new_tokens: int = 0) -> None:
        """Raise :class:`ContextLengthError` when a prompt (plus ``new_tokens`` to generate) exceeds the model's
        context: positions past it are untrained (RoPE) or do not exist (learned positions)."""
        limit = self.max_positions
        if limit is None:
            return
        lengths = batch.lengths
        j = int(lengths.argmax())
        n = int(lengths[j])
        if n + new_tokens <= limit:
            return
        need = f"{n} tokens + max_new_tokens={new_tokens}" if new_tokens else f"{n} tokens"
        fix = " or lower max_new_tokens" if new_tokens else ""
        raise ContextLengthError(f"prompt {j} has {need}, more than {self.spec}'s context of {limit} positions "
                                 f"(max_position_embeddings); shorten or split the prompt{fix}")

    def _batches(self, prompts: Prompts, batch_size: int | None, add_bos, sort_by_length: bool,
                 new_tokens: int = 0):
        if batch_size is not None and not _is_positive_int(batch_size):
            raise ValueError(f"batch_size={batch_size!r}: use a positive number of prompts per forward (or None: "
                             "all at once)")
        whole = self.tokenize(prompts, add_bos)
        self._check_length(whole, new_tokens)
        n = whole.input_ids.shape[0]
        order = list(range(n))
        if sort_by_length:
            order.sort(key=lambda j: -int(whole.lengths[j]))
        size = batch_size or n
        for start in range(0, n, size):
            rows = order[start:start + size]
            mask = whole.attention_mask[rows]
            keep = int(mask.sum(1).max())
            yield rows, Batch(whole.input_ids[rows][:, -keep:], mask[:, -keep:])

    # ---- running -------------------------------------------------------------------------------------
    def _stop_layer(self, blocks) -> int | None:
        """The last block any open read or edit needs, or None when one needs the final norm / logits."""
        layers = []
        for b in blocks:
            for site in b.sites:
                if site.layer is None and site.kind != "embed":
                    return None
                layers.append(site.layer or 0)
        return max(layers) if layers else None

    def run(self, prompts: Prompts, batch_size: int | None = None, add_bos: bool | None = None,
            logits: bool = True, sort_by_length: bool = False, progress: bool = False, **kwargs) -> RunOutput:
        """Forward pass over prompts. Returns logits ``[n, pos, vocab]`` in prompt order (left-padded).

        ``logits=False`` skips the LM head and stops after the last block that an open capture or edit needs
        (nothing past it runs). ``sort_by_length`` batches prompts of similar length together (less padding);
        captured tensors still come back in prompt order. Extra keyword arguments go to the backend's forward.
        Runs without autograd unless an open block asked for ``grad=True``.
        """
        blocks = context.open_blocks(self)
        stop = None if logits else self._stop_layer(blocks)
        grad = torch.is_grad_enabled() and any(b.grad for b in blocks)
        outs, masks, ids, order = [], [], [], []
        batches = list(self._batches(prompts, batch_size, add_bos, sort_by_length))
        if progress:
            batches = tqdm(batches, desc="forward", unit="batch")
        with torch.enable_grad() if grad else torch.no_grad():
            for rows, batch in batches:
                for b in blocks:
                    b.set_rows(rows)
                outs.append(self.backend.forward(batch, logits=logits, stop_after=stop, **kwargs))
                masks.append(batch.attention_mask)
                ids.append(batch.input_ids)
                order += rows
        return _assemble_run(outs, ids, masks, order, self.tokenizer.pad_token_id)

    def run_with_cache(self, prompts: Prompts, sites, **capture_kwargs) -> tuple[torch.Tensor, ActivationCache]:
        """TransformerLens-style one-liner: ``logits, cache = handle.run_with_cache(prompts, sites)``.

        ``capture_kwargs`` go to :func:`hiddenlens.capture` (positions, reduce, to, dtype...); ``batch_size`` and
        ``add_bos`` go to :meth:`run`."""
        run_kw = {k: capture_kwargs.pop(k) for k in ("batch_size", "add_bos", "sort_by_length", "progress")
                  if k in capture_kwargs}
        with capture(self, sites, **capture_kwargs) as cache:
            out = self.run(prompts, **run_kw)
        return out.logits, cache

    def generate(self, prompts: Prompts, max_new_tokens: int = 32, do_sample: bool = False,
                 add_bos: bool | None = None, batch_size: int | None = None, output_scores: bool = False,
                 streamer=None, prefix: PrefixCache | None = None, **kwargs) -> GenerationOutput:
        """Generate with the KV cache (greedy by default). Prompts are left-padded; returns all sequences.

        ``prefix`` (from :meth:`prefix_cache`; hf backend): every prompt starts with ``prefix.ids``, whose KV cache
        is reused instead of recomputed; each batch runs ``[prefix][padding][rest of the prompt]`` with the
        padding masked, so positions and outputs equal the plain path within float error (tested). Open captures
        see the forwards after the prefix (absolute positions stay right); open edits are refused, since they
        could not reach the prefix.
        """
        if not _is_positive_int(max_new_tokens):
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: generate at least one token")
        batches = list(self._batches(prompts, batch_size, add_bos, sort_by_length=False, new_tokens=max_new_tokens))
        if prefix is not None:
            self._check_prefix(prefix, batches)
        results = []
        for rows, batch in batches:
            for b in context.open_blocks(self):
                b.set_rows(rows)
            if prefix is None:
                seqs, scores = self.backend.generate(batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                                     output_scores=output_scores, streamer=streamer, **kwargs)
            else:
                split = _prefix_batch(batch, prefix, self.tokenizer.pad_token_id)
                seqs, scores = self.backend.generate(split, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                                     output_scores=output_scores, streamer=streamer,
                                                     cache=prefix.expanded(len(rows)), **kwargs)
                seqs = torch.cat([batch.input_ids, seqs[:, batch.input_ids.shape[1]:]], 1)
            plen = batch.input_ids.shape[1]
            new = seqs[:, plen:]
            mask = torch.cat([batch.attention_mask, torch.ones_like(new)], 1)
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            results.append(GenerationOutput(seqs, plen, texts, mask, scores))
        if len(results) == 1:
            return results[0]
        pad = self.tokenizer.pad_token_id
        width = max(r.sequences.shape[1] for r in results)
        seqs = torch.cat([torch.nn.functional.pad(r.sequences, (width - r.sequences.shape[1], 0), value=pad)
                          for r in results])
        masks = torch.cat([torch.nn.functional.pad(r.attention_mask, (width - r.sequences.shape[1], 0))
                           for r in results])
        plen = width - max_new_tokens
        return GenerationOutput(seqs, plen, [t for r in results for t in r.texts], masks)

    @torch.no_grad()
    def prefix_cache(self, ids: Sequence[int]) -> PrefixCache:
        """One forward over the prefix ``ids`` (batch 1, no open blocks) -> its KV cache, for
        ``generate(..., prefix=...)``. hf backend only."""
        if self.backend.name != "hf":
            raise ValueError(f"prefix reuse needs the hf backend (this handle runs {self.backend.name!r}); use "
                             "handle.with_backend('hf')")
        if context.open_blocks(self):
            raise ValueError("build the prefix cache before entering capture / edit blocks (it would be recorded "
                             "as a forward of theirs)")
        ids = _id_row(ids)
        if not ids:
            raise ValueError("the prefix is empty: pass at least one token id")
        self._check_ids([ids])
        out = self.hf_model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
        return PrefixCache(tuple(ids), out.cache)

    def _check_prefix(self, prefix: PrefixCache, batches) -> None:
        """Refuse a prefix the prompts do not start with, another backend, and open edits (see ``generate``)."""
        from .edit import Edit

        if self.backend.name != "hf":
            raise ValueError(f"generate(prefix=...) needs the hf backend (this handle runs {self.backend.name!r})")
        if any(isinstance(b, Edit) for b in context.open_blocks(self)):
            raise ValueError("generate(prefix=...) inside hl.edit: the edit could not reach the cached prefix; "
                             "generate without prefix=")
        n = len(prefix.ids)
        want = torch.tensor(prefix.ids, device=self.device)
        for rows, batch in batches:
            for j, (ids, mask) in enumerate(zip(batch.input_ids, batch.attention_mask)):
                real = ids[mask.bool()]
                if len(real) <= n or not torch.equal(real[:n], want):
                    raise ValueError(f"prompt {rows[j]} does not start with the prefix's {n} tokens followed by at "
                                     "least one more; build the prefix from the prompts' common start "
                                     "(hiddenlens.probes.handle.common_prefix)")

    def with_attention(self, implementation: str) -> "ModelHandle":
        """A new ``hf`` handle over the SAME weight tensors (no copy, no reload) whose model runs
        ``implementation`` attention (e.g. ``"eager"`` for parity with HF's ``output_attentions``)."""
        clone = share_weights_clone(self.hf_model)
        clone.config._attn_implementation = implementation
        return ModelHandle(clone, self.tokenizer, self.adapter, self.spec, backend="hf",
                           info=dict(self.info, attn_implementation=implementation))

    def with_backend(self, backend: str) -> "ModelHandle":
        """A new handle over the SAME ``hf_model`` (no copy) run by another backend (``hf`` | ``transformer_lens``
        | ``nnsight``)."""
        return ModelHandle(self.hf_model, self.tokenizer, self.adapter, self.spec, backend, self.info)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        return self.tokenizer.decode(ids if not isinstance(ids, torch.Tensor) else ids.tolist(),
                                     skip_special_tokens=True)

    def unload(self) -> None:
        """Drop the weights (and free accelerator memory)."""
        self.hf_model = self.backend = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _prefix_batch(batch: Batch, prefix: PrefixCache, pad_id: int) -> Batch:
    """``batch`` (left-padded full prompts, each starting with ``prefix.ids``) rearranged as ``[prefix][padding]
    [rest]`` with the same width, so the cached prefix covers columns ``0..len(prefix)-1`` of every row."""
    n, width = len(prefix.ids), batch.input_ids.shape[1]
    ids = torch.full_like(batch.input_ids, pad_id)
    mask = torch.zeros_like(batch.attention_mask)
    ids[:, :n] = torch.tensor(prefix.ids, device=ids.device)
    mask[:, :n] = 1
    for j, length in enumerate(batch.lengths.tolist()):
        rest = length - n
        ids[j, width - rest:] = batch.input_ids[j, width - rest:]
        mask[j, width - rest:] = 1
    return Batch(ids, mask)


def _is_positive_int(value) -> bool:
    """An int (numpy ints too, not bools or floats) of at least 1."""
    return not isinstance(value, bool) and hasattr(value, "__index__") and operator.index(value) >= 1


def _id_row(row) -> list[int]:
    """One prompt given as token ids -> a list of ints (floats, bools and text are refused, not truncated)."""
    if isinstance(row, str):
        raise TokenIdError(f"prompts mix text and token ids ({row!r:.80}); pass all strings or all id lists")
    try:
        ids = [operator.index(i) for i in row]
        if any(isinstance(i, bool) for i in row):
            raise TypeError
    except (TypeError, ValueError, RuntimeError):
        raise TokenIdError(f"a prompt given as token ids must be a list of ints, got {row!r:.80}") from None
    return ids


def _assemble_run(outs, ids, masks, order, pad_id) -> RunOutput:
    width = max(i.shape[1] for i in ids)

    def lpad(t, value):
        return torch.nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (width - t.shape[1], 0), value=value)

    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(len(order))
    input_ids = torch.cat([lpad(i, pad_id) for i in ids])[inv.to(ids[0].device)]
    mask = torch.cat([lpad(m, 0) for m in masks])[inv.to(ids[0].device)]
    logits = None
    if outs[0] is not None:
        logits = torch.cat([torch.nn.functional.pad(o, (0, 0, width - o.shape[1], 0)) for o in outs])
        logits = logits[inv.to(logits.device)]
    return RunOutput(logits, input_ids, mask)


def load_model(spec: str | None = None, backend: str = "hf", **kwargs) -> ModelHandle:
    """Load a model (see :func:`hiddenlens.models.loading.load_parts` for ``spec`` and the keyword arguments:
    device, dtype, attn_implementation, device_map, max_memory, offload_folder, adapter_overrides, revision, seed)
    and return a :class:`ModelHandle` run by ``backend`` (``hf`` | ``transformer_lens`` | ``nnsight``)."""
    parts = load_parts(spec, **kwargs) if spec is not None else load_parts(**kwargs)
    return ModelHandle.from_parts(parts, backend)
