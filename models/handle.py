"""``ModelHandle``: one object for a loaded model, whatever the backend.

``handle.run`` and ``handle.generate`` take prompts as strings or token ids, tokenize with left padding, batch,
and report absolute positions to any active capture, so consumers never depend on the backend.

BOS handling is explicit: ``add_bos=True`` prepends ``tokenizer.bos_token_id`` unless the sequence already starts
with it, ``False`` never adds it, ``None`` (the default) keeps the tokenizer's own behaviour. The embedded
SmolLM2 tokenizer adds no BOS (its ``bos_token`` is ``<|im_start|>``, id 1), so attention-sink analyses pass
``add_bos=True`` to get a fixed first token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .adapter import ArchitectureAdapter

Prompts = str | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor


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


class ModelHandle:
    """A loaded model: ``.model`` (the torch module the backend runs), ``.hf_model`` (the transformers model
    underneath), ``.tokenizer``, ``.adapter``, ``.backend`` (``hf`` | ``transformer_lens`` | ``nnsight``),
    ``.device``, ``.dtype`` and ``.spec``."""

    def __init__(self, hf_model, tokenizer, adapter: ArchitectureAdapter, spec: str, backend: str = "hf",
                 wrapped: Any = None, info: dict | None = None):
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.spec = spec
        self.backend = backend
        self._wrapped = wrapped
        self.info = dict(info or {})
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"

    # ---- basic properties ----------------------------------------------------------------------------
    @property
    def model(self):
        """The torch module this backend runs (HF model, TransformerBridge, or nnsight LanguageModel)."""
        return self._wrapped if self._wrapped is not None else self.hf_model

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    def site_names(self) -> list[str]:
        """Every capturable site of this model (architectures without resid_mid omit it)."""
        from hiddenlens.probes.sites import all_site_names

        return [s for s in all_site_names(self.n_layers)
                if not any(s.endswith("." + k) for k in self.adapter.unavailable)]

    def __repr__(self) -> str:
        a = self.adapter
        return (f"ModelHandle({self.spec!r}, backend={self.backend!r}, family={a.family!r}, layers={a.n_layers}, "
                f"d_model={a.d_model}, heads={a.n_heads}/{a.n_kv_heads} kv, device={self.device}, dtype={self.dtype})")

    # ---- tokenization --------------------------------------------------------------------------------
    def tokenize(self, prompts: Prompts, add_bos: bool | None = None) -> Batch:
        """Strings or token-id lists -> a left-padded :class:`Batch` on the model's device."""
        if isinstance(prompts, torch.Tensor):
            ids = prompts if prompts.ndim == 2 else prompts[None]
            rows = [r.tolist() for r in ids]
        else:
            if isinstance(prompts, str):
                prompts = [prompts]
            if len(prompts) == 0:
                raise ValueError("no prompts given: pass at least one string or token-id list")
            if isinstance(prompts[0], str):
                rows = self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
            else:
                rows = [list(map(int, r)) for r in prompts]
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

    def _batches(self, prompts: Prompts, batch_size: int | None, add_bos, sort_by_length: bool):
        whole = self.tokenize(prompts, add_bos)
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
    def run(self, prompts: Prompts, batch_size: int | None = None, add_bos: bool | None = None,
            logits: bool = True, sort_by_length: bool = False, progress: bool = False, **kwargs) -> RunOutput:
        """Forward pass over prompts. Returns logits ``[n, pos, vocab]`` in prompt order (left-padded).

        ``logits=False`` skips the LM head (faster when only activations are needed). ``sort_by_length``
        batches prompts of similar length together (less padding); captured tensors still come back in prompt
        order. Extra keyword arguments go to the model's forward.
        """
        from hiddenlens.probes.active import active_capture

        outs, masks, ids, order = [], [], [], []
        batches = list(self._batches(prompts, batch_size, add_bos, sort_by_length))
        if progress:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc="forward", unit="batch")
        for rows, batch in batches:
            cap = active_capture(self)
            if cap is not None:
                cap.set_rows(rows)
            out = self._forward(batch, logits=logits, **kwargs)
            outs.append(out)
            masks.append(batch.attention_mask)
            ids.append(batch.input_ids)
            order += rows
        return _assemble_run(outs, ids, masks, order, self.tokenizer.pad_token_id)

    def _forward(self, batch: Batch, logits: bool = True, **kwargs):
        from .backends import backend_forward

        return backend_forward(self, batch, logits=logits, **kwargs)

    def generate(self, prompts: Prompts, max_new_tokens: int = 32, do_sample: bool = False,
                 add_bos: bool | None = None, batch_size: int | None = None, output_scores: bool = False,
                 streamer=None, **kwargs) -> GenerationOutput:
        """Generate with the KV cache (greedy by default). Prompts are left-padded; returns all sequences."""
        from hiddenlens.probes.active import active_capture
        from .backends import backend_generate

        results = []
        for rows, batch in self._batches(prompts, batch_size, add_bos, sort_by_length=False):
            cap = active_capture(self)
            if cap is not None:
                cap.set_rows(rows)
            results.append(backend_generate(self, batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                            output_scores=output_scores, streamer=streamer, **kwargs))
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

    def _attach(self, capture):
        from .backends import attach

        return attach(self, capture)

    def with_attention(self, implementation: str) -> "ModelHandle":
        """A new ``hf`` handle over the SAME weight tensors (no copy, no reload) whose model runs
        ``implementation`` attention (e.g. ``"eager"`` for parity with HF's ``output_attentions``)."""
        clone = share_weights_clone(self.hf_model)
        clone.config._attn_implementation = implementation
        return ModelHandle(clone, self.tokenizer, self.adapter, self.spec, backend="hf",
                           info=dict(self.info, attn_implementation=implementation))

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        return self.tokenizer.decode(ids if not isinstance(ids, torch.Tensor) else ids.tolist(),
                                     skip_special_tokens=True)

    def unload(self) -> None:
        """Drop the weights (and free accelerator memory)."""
        import gc

        self.hf_model = self._wrapped = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def share_weights_clone(model: torch.nn.Module) -> torch.nn.Module:
    """New module objects (and a new config) sharing every parameter and buffer tensor of ``model``."""
    import copy
    import itertools

    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, shared)


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
