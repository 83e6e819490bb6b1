"""Latent iteration, training-free: Coconut continuous thoughts and Think-at-Hard selective iteration.

**Coconut** (Hao et al., "Training Large Language Models to Reason in a Continuous Latent Space", arXiv
2412.06769): the last layer's post-final-norm hidden state of the previous position is fed back as the next input embedding, one forward pass per latent ("continuous thought"),
reusing the KV cache; then decoding continues normally. Optionally each thought is rescaled to the mean norm of
the input-embedding rows (INFERRED: Coconut trains the model for this; an untrained model gets out-of-distribution
inputs, which the rescaling only partly softens).

**Think-at-Hard** (TaH; Fu et al., "Think-at-Hard: Selective Latent Iterations to Improve Reasoning Language
Models", arXiv 2511.08577), without TaH's depth-aware LoRA:

* iteration 0 is the untouched model; a decider picks positions to iterate;
* an iteration at position ``p`` feeds back ``e = sum_{v in topk(z)} softmax(z_topk)_v E[v]`` (k = 100) at the
  *same* position id ``p``;
* logits accumulate, ``z^(i) = z^(i-1) + z_new``, and a finished token's output is its cumulative logits;
* every (position, iteration) pair owns its KV slot, and a query at ``(p, i)`` may attend to slot ``(p', i')`` iff
  ``p' <= p`` and ``i' <= i`` (duo-causal mask); ``max_iter`` counts passes (TaH releases ``max_iter = 2``).

Because depth-``i`` slots only see slots of depth ``<= i``, teacher-forced iteration over a whole text is exact:
one pass per depth over all positions chosen at that depth, with a custom 4-D mask over the KV cache.

Hidden states for deciders are read through :func:`hiddenlens.capture` at **sites** named like every site in
hiddenlens (``blocks.{l}.resid_post``...). TaH's recipe names HF ``hidden_states`` indices; :func:`hidden_state_site`
converts one (``0`` = ``embed``, ``i`` = ``blocks.{i-1}.resid_post``, ``L`` = ``final_norm``) for reading old files.

Both methods feed new input embeddings with their own KV cache and 4-D duo-causal masks, a decoding loop the
backend interface does not expose; they run the transformers modules through an ``hf`` handle over the same
weights (``handle.with_backend("hf")``; a TransformerLens bridge shares those tensors, nnsight wraps those very
modules), so they work whatever the handle's backend.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from hiddenlens.probes.capture import capture

DEFAULT_TOPK = 100


# ---- building blocks -------------------------------------------------------------------------------------------
def soft_embedding(logits: torch.Tensor, embedding: torch.Tensor, k: int = DEFAULT_TOPK) -> torch.Tensor:
    """TaH's ``topk_softmax_input_update``: ``[..., vocab]`` logits -> ``[..., d_model]`` mixture of embedding rows
    ``embedding`` (``[vocab, d_model]``) weighted by the softmax over the top-``k`` logits."""
    if logits.shape[-1] != embedding.shape[0]:
        raise ValueError(f"logits have {logits.shape[-1]} classes but the embedding has {embedding.shape[0]} rows")
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k={k} must be in 1..{logits.shape[-1]}")
    top = logits.float().topk(k, dim=-1)
    w = torch.softmax(top.values, dim=-1)
    rows = embedding[top.indices].float()  # [..., k, d]
    return (w.unsqueeze(-1) * rows).sum(-2).to(embedding.dtype)


def duo_causal_allowed(q_pos: torch.Tensor, q_iter: torch.Tensor, k_pos: torch.Tensor, k_iter: torch.Tensor,
                       k_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean ``[q, kv]``: query ``(p, i)`` may attend to slot ``(p', i')`` iff ``p' <= p`` and ``i' <= i`` (and the
    slot is valid)."""
    allowed = (k_pos[None, :] <= q_pos[:, None]) & (k_iter[None, :] <= q_iter[:, None])
    if k_valid is not None:
        allowed &= k_valid[None, :].bool()
    return allowed


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[q, kv]`` bool -> ``[1, 1, q, kv]`` additive mask (0 where allowed, the dtype's minimum elsewhere)."""
    m = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    m.masked_fill_(~allowed, torch.finfo(dtype).min)
    return m[None, None]


def hidden_state_site(index: int, n_layers: int) -> str:
    """The site of HF ``hidden_states[index]`` (for TaH's recipe and decider files that name indices)."""
    if not 0 <= index <= n_layers:
        raise ValueError(f"hidden-state index {index} out of range 0..{n_layers}")
    if index == 0:
        return "embed"
    return "final_norm" if index == n_layers else f"blocks.{index - 1}.resid_post"


# ---- Coconut ----------------------------------------------------------------------------------------------------
def coconut_loop(step: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], prompt_embeds: torch.Tensor,
                 n_latent: int, rescale_to: float | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Model-agnostic core. ``step(embeds [1, t, d]) -> (last hidden [d], last logits [vocab])`` runs one forward on
    new input embeddings (keeping its own cache). Returns the ``n_latent`` thoughts fed back (``[d]`` each) and the
    logits after the last thought."""
    if n_latent < 0:
        raise ValueError("n_latent must be >= 0")
    h, logits = step(prompt_embeds)
    thoughts = []
    for _ in range(n_latent):
        t = h if rescale_to is None else h * (rescale_to / h.norm().clamp(min=1e-12))
        thoughts.append(t)
        h, logits = step(t.view(1, 1, -1))
    return thoughts, logits


@dataclass
class CoconutResult:
    """``thoughts`` ``[n_latent, d_model]`` (what was fed back, after any rescaling), ``thought_tokens`` (the LM
    head's argmax reading of each thought: the token the model would have emitted there instead), ``new_tokens``
    (greedy continuation ids after the thoughts) and ``text``."""

    thoughts: torch.Tensor
    thought_tokens: list[str]
    new_tokens: list[int]
    text: str


def mean_embedding_norm(handle) -> float:
    """Mean L2 norm of the input-embedding rows."""
    return float(handle.adapter.embedding(handle.hf_model).weight.detach().float().norm(dim=-1).mean())


def continuous_thoughts(handle, prompt: str | Sequence[int], n_latent: int = 2, rescale: bool = False,
                        max_new_tokens: int = 20, add_bos: bool | None = True) -> CoconutResult:
    """Training-free Coconut: ``n_latent`` continuous thoughts after ``prompt``, then greedy decoding."""
    handle = handle.with_backend("hf")
    model = handle.hf_model
    emb = handle.adapter.embedding(model)
    ids = handle.tokenize([prompt] if isinstance(prompt, str) else [list(prompt)], add_bos=add_bos).input_ids
    state = {"cache": None}
    with capture(handle, "final_norm", positions="last") as cache:
        def step(embeds: torch.Tensor):
            out = model(inputs_embeds=embeds, cache=state["cache"], use_cache=True)
            state["cache"] = out.cache
            return cache.chunks("final_norm")[-1].value[0, -1], out.logits[0, -1]

        thoughts, logits = coconut_loop(step, emb(ids), n_latent,
                                        mean_embedding_norm(handle) if rescale else None)
        new = []
        for _ in range(max_new_tokens):
            tok = int(logits.argmax())
            new.append(tok)
            if tok == handle.tokenizer.eos_token_id:
                break
            out = model(input_ids=torch.tensor([[tok]], device=handle.device), cache=state["cache"], use_cache=True)
            state["cache"] = out.cache
            logits = out.logits[0, -1]
    lens = handle.adapter.unembedding(model)  # a thought is a post-norm state: the LM head reads it directly
    with torch.inference_mode():
        thought_tokens = [handle.tokenizer.decode([int(lens(t.to(lens.weight.dtype)).argmax())]) for t in thoughts]
    stacked = torch.stack(thoughts) if thoughts else torch.empty(0, handle.adapter.d_model)
    return CoconutResult(stacked.clone(), thought_tokens, new, handle.tokenizer.decode(new, skip_special_tokens=True))


# ---- Think-at-Hard ---------------------------------------------------------------------------------------------
@dataclass
class DeciderInput:
    """What a decider sees for ``n`` positions at one depth: ``positions`` ``[n]``, ``depth``, cumulative
    ``logits`` ``[n, vocab]`` and ``hidden`` ``{site: [n, d_model]}`` of this depth's pass."""

    positions: torch.Tensor
    depth: int
    logits: torch.Tensor
    hidden: dict[str, torch.Tensor]


class Decider(Protocol):
    """``score(inp) -> [n]`` (higher = iterate); iterate iff ``score > threshold``; ``sites``: the residual sites
    it reads (may be empty)."""

    threshold: float
    sites: Sequence[str]

    def score(self, inp: DeciderInput) -> torch.Tensor: ...


@dataclass
class FirstPass:
    """Iteration 0 over one text: ``input_ids`` ``[T]``, ``logits`` ``[T, vocab]`` (float32, CPU), ``hidden``
    ``{site: [T, d]}`` (CPU) and the model's KV cache (``T`` slots)."""

    input_ids: torch.Tensor
    logits: torch.Tensor
    hidden: dict[str, torch.Tensor]
    cache: object

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def first_pass(handle, input_ids: Sequence[int] | torch.Tensor, sites: Sequence[str] = ()) -> FirstPass:
    """Run iteration 0 (the plain model) over ``input_ids`` with the KV cache, reading ``sites``."""
    handle = handle.with_backend("hf")
    ids = torch.as_tensor(list(input_ids) if not isinstance(input_ids, torch.Tensor) else input_ids).long()
    if ids.ndim != 1 or ids.numel() < 2:
        raise ValueError("first_pass needs one sequence of at least 2 token ids")
    sites = list(sites)
    with capture(handle, sites or "embed") as cache:
        out = handle.hf_model(input_ids=ids[None].to(handle.device), use_cache=True)
    hidden = {s: cache[s][0].float().cpu() for s in sites}
    return FirstPass(ids, out.logits[0].float().cpu(), hidden, out.cache)


@dataclass
class IterationResult:
    """Selective iteration over one text. ``depth`` ``[T]``: extra iterations run per position (0 = skipped);
    ``logits`` ``[T, vocab]``: cumulative logits; ``pred0`` / ``pred`` ``[T]``: argmax before / after;
    ``scores`` ``[T]``: the decider's depth-0 score; ``iterated`` per depth: positions run at depth i (i >= 1)."""

    input_ids: torch.Tensor
    depth: torch.Tensor
    logits: torch.Tensor
    pred0: torch.Tensor
    pred: torch.Tensor
    scores: torch.Tensor
    iterated: list[torch.Tensor] = field(default_factory=list)


def _crop_to(cache, length: int) -> None:
    """Drop KV slots beyond the first ``length`` (transformers 5 ``crop`` takes the negative count to remove)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def iterate_from(handle, fp: FirstPass, decider: Decider, max_iter: int = 2, k: int = DEFAULT_TOPK,
                 lora=None) -> IterationResult:
    """Think-at-Hard over a teacher-forced text, starting from its :class:`FirstPass` (whose cache is cropped
    back to iteration 0 first, so several deciders can share one first pass). ``lora``: the handle of TaH's
    LoRA-adapted copy (:func:`hiddenlens.interventions.tah_adapter.load_adapter`) that runs iterations >= 1;
    None runs them on the base model (training-free)."""
    if max_iter < 1:
        raise ValueError("max_iter counts passes and must be >= 1 (1 = no iteration)")
    handle = (lora if lora is not None else handle).with_backend("hf")
    model = handle.hf_model
    T = fp.length
    _crop_to(fp.cache, T)
    E = handle.adapter.embedding(model).weight
    cum = fp.logits.clone()
    depth = torch.zeros(T, dtype=torch.long)
    positions = torch.arange(T)
    inp = DeciderInput(positions, 0, cum, {s: fp.hidden[s] for s in decider.sites})
    scores0 = decider.score(inp).float().cpu()
    active = positions[scores0 > decider.threshold]
    slot_pos, slot_iter = torch.arange(T), torch.zeros(T, dtype=torch.long)
    iterated = []
    sites = list(decider.sites)
    for d in range(1, max_iter):
        if active.numel() == 0:
            break
        iterated.append(active.clone())
        embeds = soft_embedding(cum[active].to(E.device), E, k)[None]
        q_pos, q_iter = active, torch.full_like(active, d)
        all_pos, all_iter = torch.cat([slot_pos, q_pos]), torch.cat([slot_iter, q_iter])
        mask = additive_mask(duo_causal_allowed(q_pos, q_iter, all_pos, all_iter), embeds.dtype).to(E.device)
        with capture(handle, sites or "embed") as cache:
            out = model(inputs_embeds=embeds, position_ids=active[None].to(E.device), attention_mask=mask,
                        cache=fp.cache, use_cache=True)
        slot_pos, slot_iter = all_pos, all_iter
        cum[active] += out.logits[0].float().cpu()
        depth[active] = d
        if d + 1 >= max_iter:
            break
        hid = {s: cache[s][0].float().cpu() for s in sites}
        sc = decider.score(DeciderInput(active, d, cum[active], hid)).float().cpu()
        active = active[sc > decider.threshold]
    _crop_to(fp.cache, T)
    return IterationResult(fp.input_ids, depth, cum, fp.logits.argmax(-1), cum.argmax(-1), scores0, iterated)


def iterate_teacher_forced(handle, input_ids: Sequence[int] | torch.Tensor, decider: Decider, max_iter: int = 2,
                           k: int = DEFAULT_TOPK, lora=None) -> IterationResult:
    """:func:`first_pass` (base model) then :func:`iterate_from` (iterations >= 1 on ``lora`` when given)."""
    return iterate_from(handle, first_pass(handle, input_ids, decider.sites), decider, max_iter, k, lora)
