"""Follow-the-Flow token replacement for causal LMs: swap a span's contextual states for its uncontextualized ones.

Kaplan, Toker et al. ("Follow the Flow: On Information Flow Across Textual Tokens in Text-to-Image Models", arXiv
2504.01137) fix semantic leakage in text-to-image encoders by "replacing the leaked item's representation after the
textual encoding with its uncontextualized representation". The paper gives no exact construction; this module
implements our transfer to decoder LMs (**INFERRED** design choices, listed here):

* The *uncontextualized* state of a span is its state when ``[BOS] + span tokens`` runs alone through the same
  model. The span keeps the token ids it has inside the prompt (so a word keeps its leading-space token), which
  makes the replacement token-for-token.
* ``mode="isolated"``: the lone run uses positions ``0..n`` (BOS at 0, the span at 1..n), the cheapest reading of
  "encoded alone". ``mode="original"``: BOS stays at position 0 and the span tokens get their original absolute
  positions through ``position_ids`` (a position gap where the context was), which matters for absolute position
  embeddings (GPT-2) and changes the BOS-to-span distance under RoPE.
* Where: residual-stream sites, named like every site in hiddenlens. ``layers`` are **block indices** (the one
  convention, :func:`hiddenlens.probes.sites.parse_layers`): layer ``l`` replaces ``blocks.{l}.resid_post`` (the
  output of block ``l``); the word ``embed`` adds the embedding output (the input of block 0). E.g.
  ``"embed,0-29"`` replaces the span everywhere, ``"15-29"`` from block 15's output on. Replacing a site
  overwrites the span's rows of the residual stream there; the rest of the forward pass runs natively, so a range
  keeps the span uncontextualized through those blocks.
* ``tokens="all"`` replaces every span token, ``tokens="last"`` only the last one (the paper found one or two
  tokens carry an item).

Spans are substrings or character ranges of the prompt, mapped to whole tokens through the tokenizer's offsets;
a span boundary that cuts a token is an error naming the token. During ``generate`` only the prompt pass holds the
span, so later tokens see the replaced states through the KV cache.

Reads go through :func:`hiddenlens.capture` and the replacement is an edit (:func:`hiddenlens.edit`), so it runs
on every backend. Every replacement returns a :class:`ReplacementLog` of what it changed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import pandas as pd
import torch

from hiddenlens.common.stats import kl_divergence, log_probs
from hiddenlens.probes.capture import capture
from hiddenlens.probes.edit import Apply, Edit
from hiddenlens.probes.sites import parse_layers

from hiddenlens.interventions.steer import decode_greedy

MODES = ("isolated", "original")
TOKEN_CHOICES = ("all", "last")


@dataclass(frozen=True)
class Span:
    """A span of a prompt mapped to tokens.

    ``input_ids`` are the prompt's ids (with BOS when it was added); the span is ``input_ids[token_start:token_end]``
    at absolute positions ``token_start..token_end-1``; ``char_start:char_end`` is the span in ``prompt``.
    """

    prompt: str
    char_start: int
    char_end: int
    token_start: int
    token_end: int
    input_ids: tuple[int, ...]

    @property
    def span_ids(self) -> list[int]:
        return list(self.input_ids[self.token_start:self.token_end])

    @property
    def positions(self) -> list[int]:
        return list(range(self.token_start, self.token_end))

    @property
    def n_tokens(self) -> int:
        return self.token_end - self.token_start

    @property
    def text(self) -> str:
        return self.prompt[self.char_start:self.char_end]


@dataclass
class ReplacementLog:
    """What a replacement changed: per patched (forward pass, site) the number of rows overwritten and the
    largest and mean L2 norm of the change ``|h_new - h_old|`` over those rows (same units as the residual)."""

    sites: list[str]
    positions: list[int]
    events: list[dict] = field(default_factory=list)

    @property
    def n_patched(self) -> int:
        return len(self.events)

    def by_site(self) -> dict[str, float]:
        """Largest L2 change per site over all patched forward passes."""
        out: dict[str, float] = {}
        for e in self.events:
            out[e["site"]] = max(out.get(e["site"], 0.0), e["max_l2_change"])
        return out


def replacement_sites(layers, n_layers: int) -> list[str]:
    """Residual sites to replace, in forward order: ``layers`` is a block-index spec for
    :func:`~hiddenlens.probes.sites.parse_layers` (``3``, ``"15-29"``, ``(15, 29)`` inclusive, a list), where the
    word ``"embed"`` may stand alone or in a list / comma-separated string. Layer ``l`` -> ``blocks.{l}.resid_post``."""
    if isinstance(layers, tuple) and len(layers) == 2 and all(isinstance(x, int) for x in layers):
        layers = f"{layers[0]}-{layers[1]}"
    parts = layers.split(",") if isinstance(layers, str) else ([layers] if isinstance(layers, int) else list(layers))
    embed = any(isinstance(p, str) and p.strip() == "embed" for p in parts)
    rest = [p for p in parts if not (isinstance(p, str) and p.strip() == "embed")]
    blocks = parse_layers(",".join(str(p).strip() for p in rest), n_layers, what="layers") if rest else []
    if not embed and not blocks:
        raise ValueError("no layers given: pass block indices (e.g. '15-29') and/or 'embed'")
    return (["embed"] if embed else []) + [f"blocks.{l}.resid_post" for l in blocks]


def prompt_ids(handle, prompt: str, add_bos: bool | None = True) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``prompt`` and each token's ``(char_start, char_end)``; special tokens get ``(0, 0)``.

    BOS follows :meth:`ModelHandle.tokenize`'s rule, and the ids are checked against it."""
    tok = handle.tokenizer
    if not getattr(tok, "is_fast", False):
        raise ValueError("span mapping needs a fast tokenizer (offset mapping); this tokenizer is not fast")
    enc = tok(prompt, add_special_tokens=True, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    special = set(tok.all_special_ids)
    offs = [(0, 0) if i in special else o for i, o in zip(ids, offs)]
    bos = tok.bos_token_id
    if add_bos and ids[:1] != [bos]:
        ids, offs = [bos] + ids, [(0, 0)] + offs
    elif add_bos is False and bos is not None and ids[:1] == [bos]:
        ids, offs = ids[1:], offs[1:]
    expected = handle.tokenize(prompt, add_bos=add_bos).input_ids[0].tolist()
    if ids != expected:
        raise RuntimeError("offset-mapped tokenization differs from handle.tokenize; cannot map spans exactly")
    return ids, offs


def locate_span(handle, prompt: str, span: str | tuple[int, int], add_bos: bool | None = True,
                occurrence: int = 0) -> Span:
    """Map ``span`` (a substring, its ``occurrence``-th match, or a ``(char_start, char_end)`` range) of ``prompt``
    to whole tokens. Raises if the span is empty, missing, or cuts through a token (the message names it)."""
    if not prompt:
        raise ValueError("empty prompt")
    if isinstance(span, str):
        if not span:
            raise ValueError("empty span: pass a non-empty substring of the prompt")
        start = -1
        for _ in range(occurrence + 1):
            start = prompt.find(span, start + 1)
            if start < 0:
                raise ValueError(f"span {span!r} (occurrence {occurrence}) is not in the prompt {prompt!r}")
        cs, ce = start, start + len(span)
    else:
        cs, ce = int(span[0]), int(span[1])
        if not 0 <= cs < ce <= len(prompt):
            raise ValueError(f"character range {span} is not a non-empty range inside the prompt (length "
                             f"{len(prompt)})")
    # Whitespace at the span edges belongs to no token boundary decision.
    while cs < ce and prompt[cs].isspace():
        cs += 1
    while ce > cs and prompt[ce - 1].isspace():
        ce -= 1
    if cs == ce:
        raise ValueError("the span holds only whitespace")
    ids, offs = prompt_ids(handle, prompt, add_bos)
    inside = []
    for j, (s, e) in enumerate(offs):
        chars = [c for c in range(s, e) if not prompt[c].isspace()]
        if not chars:
            continue
        hit = [cs <= c < ce for c in chars]
        if all(hit):
            inside.append(j)
        elif any(hit):
            raise ValueError(f"the span {prompt[cs:ce]!r} cuts through token {j} "
                             f"{handle.tokenizer.decode([ids[j]])!r} (chars {s}..{e}); widen the span to whole "
                             f"tokens, e.g. {prompt[min(s, cs):max(e, ce)].strip()!r}")
    if not inside:
        raise ValueError(f"no token lies inside the span {prompt[cs:ce]!r}")
    if inside != list(range(inside[0], inside[-1] + 1)):
        raise RuntimeError(f"span tokens {inside} are not contiguous")
    return Span(prompt, cs, ce, inside[0], inside[-1] + 1, tuple(ids))


def isolated_inputs(handle, span: Span, mode: str = "isolated") -> tuple[list[int], list[int]]:
    """Token ids ``[BOS] + span`` and their position ids for the lone run of ``span``."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    bos = handle.tokenizer.bos_token_id
    if bos is None:
        raise ValueError("the uncontextualized run needs a BOS token; this tokenizer has no bos_token_id")
    ids = [bos] + span.span_ids
    if mode == "isolated":
        return ids, list(range(len(ids)))
    if span.token_start < 1:
        raise ValueError("mode='original' needs the span to start at position >= 1 (BOS keeps position 0); "
                         "tokenize the prompt with add_bos=True or use mode='isolated'")
    return ids, [0] + span.positions


def isolated_states(handle, span: Span, layers, mode: str = "isolated") -> torch.Tensor:
    """Uncontextualized states of the span tokens at :func:`replacement_sites` ``(layers)``:
    ``[n_sites, span.n_tokens, d_model]`` (model dtype)."""
    sites = replacement_sites(layers, handle.n_layers)
    ids, pos = isolated_inputs(handle, span, mode)
    position_ids = torch.tensor([pos], device=handle.device)
    with capture(handle, sites) as cache:
        handle.run([ids], add_bos=None, logits=False, position_ids=position_ids)
    return torch.stack([cache[s][0, 1:].clone() for s in sites])


class _Replacement(Edit):
    """The edit behind :func:`replacement`: forwards that start at position 0 must carry the span's prompt."""

    def __init__(self, handle, span: Span, sites: list[str], targets: dict[str, torch.Tensor], positions, log):
        super().__init__(handle, {s: Apply(self._patch) for s in sites}, positions=positions)
        self.n_prompt, self.targets, self.log, self.keep = len(span.input_ids), targets, log, positions

    def begin_forward(self, offset, attention_mask=None, length=None):
        if offset == 0 and length is not None and length != self.n_prompt:
            raise ValueError(f"this forward pass starts at position 0 with {length} tokens, but the span's prompt "
                             f"has {self.n_prompt}; run the same prompt (no padding) inside replacement()")
        super().begin_forward(offset, attention_mask, length)

    def _patch(self, region: torch.Tensor, where) -> torch.Tensor:
        k = [self.keep.index(int(p)) for p in where.positions]
        target = self.targets[where.site.name][k].to(device=region.device, dtype=region.dtype)
        change = (region - target).norm(dim=-1)
        self.log.events.append({"site": where.site.name, "offset": self.offset, "rows": int(change.numel()),
                                "max_l2_change": float(change.max()), "mean_l2_change": float(change.mean())})
        return target.expand_as(region).clone()


@contextlib.contextmanager
def replacement(handle, span: Span, layers, mode: str = "isolated", tokens: str = "all",
                states: torch.Tensor | None = None) -> Iterator[ReplacementLog]:
    """While the block runs, every forward pass over the span's prompt gets the span's states replaced by their
    uncontextualized versions at :func:`replacement_sites` ``(layers)`` (an edit: any backend).

    Forward passes whose input starts at position 0 must carry exactly the span's prompt (rows may repeat it,
    e.g. several samples); decode steps of ``generate`` that do not cover the span are left alone. ``states``
    (``[n_sites, n_tokens, d_model]``) skips recomputing :func:`isolated_states`. Yields the
    :class:`ReplacementLog`, filled as passes run. A capture opened *inside* this block sees the replaced states.
    """
    if tokens not in TOKEN_CHOICES:
        raise ValueError(f"tokens={tokens!r}: choose one of {TOKEN_CHOICES}")
    sites = replacement_sites(layers, handle.n_layers)
    if states is None:
        states = isolated_states(handle, span, layers, mode)
    if states.shape[:2] != (len(sites), span.n_tokens) or states.shape[-1] != handle.adapter.d_model:
        raise ValueError(f"states shape {tuple(states.shape)} != [sites={len(sites)}, tokens={span.n_tokens}, "
                         f"d_model={handle.adapter.d_model}]")
    keep = list(range(span.n_tokens)) if tokens == "all" else [span.n_tokens - 1]
    positions = [span.positions[k] for k in keep]
    log = ReplacementLog(sites=sites, positions=positions)
    targets = {s: states[i, keep] for i, s in enumerate(sites)}
    with _Replacement(handle, span, sites, targets, positions, log):
        yield log


@dataclass
class ReplacedRun:
    """Logits of the prompt before and after replacement, ``[pos, vocab]`` each, plus the log."""

    span: Span
    logits_before: torch.Tensor
    logits_after: torch.Tensor
    log: ReplacementLog


def run_replaced(handle, prompt: str, span: str | tuple[int, int] | Span, layers, mode: str = "isolated",
                 tokens: str = "all", add_bos: bool | None = True) -> ReplacedRun:
    """One forward pass of ``prompt`` without and with the replacement of ``span`` at ``layers``."""
    sp = span if isinstance(span, Span) else locate_span(handle, prompt, span, add_bos)
    ids = [list(sp.input_ids)]
    with torch.inference_mode():
        before = handle.run(ids, add_bos=None).logits[0]
        with replacement(handle, sp, layers, mode, tokens) as log:
            after = handle.run(ids, add_bos=None).logits[0]
    return ReplacedRun(sp, before, after, log)


def generate_replaced(handle, span: Span, layers, mode: str = "isolated", tokens: str = "all",
                      n: int = 1, max_new_tokens: int = 20, do_sample: bool = False, seed: int = 0,
                      replace: bool = True, **kwargs):
    """Continue ``span.prompt`` ``n`` times with (``replace=True``) or without the replacement.

    Sampling is seeded with ``seed`` so a run with and one without replacement draw the same random numbers.
    Returns ``(GenerationOutput, ReplacementLog | None)``; the ``n`` rows all hold the same prompt."""
    ids = [list(span.input_ids)] * n
    torch.manual_seed(seed)
    with torch.inference_mode():
        if not replace:
            return handle.generate(ids, max_new_tokens=max_new_tokens, do_sample=do_sample, add_bos=None,
                                   **kwargs), None
        with replacement(handle, span, layers, mode, tokens) as log:
            gen = handle.generate(ids, max_new_tokens=max_new_tokens, do_sample=do_sample, add_bos=None, **kwargs)
    return gen, log


def every_site(n_layers: int) -> str:
    """The layer spec of every replaceable site (``"embed,0-{n_layers - 1}"``): one lone run at these sites
    (:func:`isolated_states`) serves every layer range (:func:`select_states`)."""
    return f"embed,0-{n_layers - 1}"


def select_states(states: torch.Tensor, layers, n_layers: int) -> torch.Tensor:
    """The rows of ``states`` (``[n_layers + 1, n_tokens, d_model]``, :func:`isolated_states` at
    :func:`every_site`) for :func:`replacement_sites` ``(layers)``: ``[n_sites, n_tokens, d_model]``."""
    order = replacement_sites(every_site(n_layers), n_layers)
    if states.shape[0] != len(order):
        raise ValueError(f"states hold {states.shape[0]} sites; every_site({n_layers}) has {len(order)}")
    return states[[order.index(s) for s in replacement_sites(layers, n_layers)]]


@dataclass
class Continuation:
    """A greedy continuation of a span's prompt: ``prompt_ids`` (the prompt as it ran), ``new_ids``, ``text`` (the
    new tokens decoded, special tokens skipped) and ``log_probs`` ``[vocab]`` (float32, CPU), the next-token
    distribution at the prompt's last position."""

    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    log_probs: torch.Tensor


def continue_span_prompt(handle, span: Span, layers=None, mode: str = "isolated", tokens: str = "all",
                         states: torch.Tensor | None = None, max_new_tokens: int = 20,
                         on_token=None) -> tuple[Continuation, ReplacementLog | None]:
    """Greedy continuation of ``span.prompt`` without (``layers`` None) or with the replacement of ``span`` at
    ``layers`` (``states`` as in :func:`replacement`), in one KV-cache loop on the ``hf`` view over the same
    weights (:func:`hiddenlens.interventions.steer.decode_greedy`; the same tokens as ``handle.generate``). The
    prompt's pass also gives the next-token distribution, so a before / after comparison needs no other forward.
    ``on_token(new ids so far)`` follows the tokens as they come."""
    view = handle.with_backend("hf")
    ids = list(span.input_ids)
    if layers is None:
        new, first = decode_greedy(view, ids, max_new_tokens, on_token=on_token)
        log = None
    else:
        with replacement(view, span, layers, mode, tokens, states) as log:
            new, first = decode_greedy(view, ids, max_new_tokens, on_token=on_token)
    text = handle.tokenizer.decode(new, skip_special_tokens=True)
    return Continuation(ids, new, text, log_probs(first)), log


@dataclass
class ReplacementComparison:
    """For the dashboard: next-token top-k before/after (``table``: token, p_before, p_after), the KL between the
    two next-token distributions (nats), greedy continuations before/after (text; ``new_tokens_*``: how many
    tokens each generated, an EOS included), and the replacement log."""

    span: Span
    table: pd.DataFrame
    kl_after_before: float
    continuation_before: str
    continuation_after: str
    log: ReplacementLog
    new_tokens_before: int = 0
    new_tokens_after: int = 0


def compare_replacement(handle, prompt: str, span: str | tuple[int, int] | Span, layers, mode: str = "isolated",
                        tokens: str = "all", add_bos: bool | None = True, top_k: int = 10,
                        max_new_tokens: int = 20, before: Continuation | None = None,
                        states: torch.Tensor | None = None, on_token=None) -> ReplacementComparison:
    """Next-token distribution and greedy continuation of ``prompt`` before and after replacing ``span``: two
    greedy runs (:func:`continue_span_prompt`). What a view can keep across changes: ``before`` (the plain run,
    independent of the span and the layers) and ``states`` (the span's lone-run states at these layers' sites,
    e.g. :func:`select_states` of one run at :func:`every_site`). ``on_token`` streams the "after" tokens."""
    sp = span if isinstance(span, Span) else locate_span(handle, prompt, span, add_bos)
    if before is None:
        before, _ = continue_span_prompt(handle, sp, max_new_tokens=max_new_tokens)
    elif before.prompt_ids != list(sp.input_ids):
        raise ValueError("before= continues another prompt (or another BOS choice) than the span's; pass the "
                         "continuation of this prompt")
    after, log = continue_span_prompt(handle, sp, layers, mode, tokens, states, max_new_tokens, on_token)
    lp_b, lp_a = before.log_probs, after.log_probs
    kl = float(kl_divergence(lp_a, lp_b, from_log_probs=True))
    top = torch.unique(torch.cat([lp_b.topk(top_k).indices, lp_a.topk(top_k).indices]))
    table = pd.DataFrame({"token_id": top.tolist(),
                          "token": [handle.tokenizer.decode([int(t)]) for t in top],
                          "p_before": lp_b[top].exp().tolist(), "p_after": lp_a[top].exp().tolist()})
    table = table.sort_values("p_before", ascending=False, ignore_index=True)
    return ReplacementComparison(sp, table, kl, before.text, after.text, log, len(before.new_ids),
                                 len(after.new_ids))
