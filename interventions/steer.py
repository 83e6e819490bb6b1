"""Steering during generation (``hiddenlens.interventions.steer``): add ``alpha * sigma * u`` at chosen sites.

Steering is an edit (:func:`hiddenlens.edit`, :class:`hiddenlens.Add`): each :class:`~hiddenlens.Direction` adds
``alpha * sigma * u`` at its site: any residual / MLP site (``blocks.{l}.resid_post``, ``resid_mid``, ``mlp.out``...,
``u`` of width d_model or d_mlp) or one head of a per-head site (``blocks.{l}.attn.z`` with ``head``: ITI's
head-wise intervention, ``u`` of width head_dim). Several directions on one site are summed into one vector, so
each edited site costs one addition per forward. It runs on every backend (``hf``, ``transformer_lens``,
``nnsight``), as every edit does.

Modes (positions are **absolute**, right under the KV cache; padding positions of a left-padded batch are never
edited; with left padding every prompt ends at the same column, so a batch gives the same tokens as one prompt at
a time):

``all``          every position (prompt and generated)
``prompt``       prompt positions only (``< P``, P = padded prompt width)
``generated``    the positions that choose new tokens: the last prompt position and every generated token
                 (``>= P - 1``; ITI edits the last position of every forward, which is the same set)
``conditional``  our reading of TruthPrInt ("Mitigating LVLM Object Hallucination Via Latent Space Steering",
                 arXiv 2503.10602; its code is unpublished): generation starts unsteered; a per-token detector (a
                 direction's logistic detector, ``p_true = sigmoid(a * (h . u) + b)`` at its own site) reads every
                 new token, and when ``p_true < threshold`` the token is dropped, the KV cache is cropped to before
                 the position that chose it, and decoding resumes from there with the intervention on (at every
                 position from that one on). At most one rollback per sequence; after it the steering stays on.

Every run reports the per-token L2 norm of what it changed (``added_norm``, aligned with ``sequences``), so a
steering that changed nothing is visible; a direction whose site never ran raises an error.

Inputs are checked before anything runs (:func:`check_request`): a finite alpha; directions whose site, head and
width exist in this model (a :class:`Direction` is itself a finite unit vector with sigma > 0); an added vector
whose norm ``|alpha| * sigma`` (summed per site) and its square fit the model's dtype; options the mode does not
use are errors, not ignored. Generation then checks every step's logits and raises
:class:`~hiddenlens.common.errors.NonFiniteError` on NaN/+Inf (the edit overflowed inside the model) instead of
returning text.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from hiddenlens.common.errors import NonFiniteError
from hiddenlens.probes.capture import capture
from hiddenlens.probes.direction import Direction, DirectionError
from hiddenlens.probes.edit import Add, Edit, EditNotAppliedError
from hiddenlens.probes.sites import HEAD_SITES, resolve_sites

MODES = ("all", "prompt", "generated", "conditional")
#: what a steering vector's width must be, by site kind
_WIDTH = {"embed": "d_model", "resid_pre": "d_model", "resid_mid": "d_model", "resid_post": "d_model",
          "attn.out": "d_model", "mlp.out": "d_model", "final_norm": "d_model", "mlp.pre": "d_mlp",
          "mlp.post": "d_mlp", "attn.q": "head_dim", "attn.k": "head_dim", "attn.v": "head_dim",
          "attn.z": "head_dim"}

SteeringNotAppliedError = EditNotAppliedError
#: the statistics of the norm layer after an edit (RMSNorm's mean of squares) are computed in at least float32
_STATS_DTYPE = torch.float32


def check_directions(handle, directions: Sequence[Direction]) -> None:
    """Fail loudly on directions this model cannot take (not a Direction, unknown site, wrong head or width, a
    field changed since construction)."""
    a = handle.adapter
    if not directions:
        raise ValueError("no directions given: pass at least one Direction (hiddenlens.probes.direction)")
    for d in directions:
        if not isinstance(d, Direction):
            raise DirectionError(f"expected Direction objects, got {type(d).__name__} (load one with load_directions)")
        d.check()
        try:
            site = resolve_sites(d.site, a.n_layers, a.unavailable)[0]
        except ValueError as exc:
            raise type(exc)(f"{d.name}: {exc} (was it fitted on another model? it says model={d.model!r})") from None
        if site.kind not in _WIDTH:
            raise ValueError(f"{d.name}: {site.name} cannot be steered (attention weights are not a vector space "
                             "to add to); steer a residual, MLP or per-head site")
        width = getattr(a, _WIDTH[site.kind])
        if d.vector.numel() != width:
            raise ValueError(f"{d.name}: vector has shape {tuple(d.vector.shape)}, {site.name} needs [{width}] "
                             f"(was it fitted on another model? it says model={d.model!r})")
        if site.kind in HEAD_SITES:
            n = a.n_kv_heads if site.kind in ("attn.k", "attn.v") else a.n_heads
            if not 0 <= d.head < n:
                raise ValueError(f"{d.name}: head {d.head} out of range; {site.name} has heads 0..{n - 1}")


def check_alpha(alpha) -> float:
    """``alpha`` as a finite float (a bool, a string, NaN or Inf is an error)."""
    try:
        if isinstance(alpha, (bool, str, bytes)):
            raise TypeError
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha={alpha!r} is not a number") from None
    if not math.isfinite(value):
        raise NonFiniteError(f"alpha={alpha} is not finite; give a finite number (the edit is alpha * sigma * u)")
    return value


def steering_vectors(handle, directions: Sequence[Direction], alpha: float) -> dict[str, torch.Tensor]:
    """``{site: vector}`` to add: ``alpha * sigma * u`` summed per site, in the site's canonical layout
    (``[d]``, or ``[heads, 1, head_dim]`` with zeros on the heads no direction names), model dtype.

    Raises :class:`NonFiniteError` when a vector's norm, or its square (which the next norm layer computes), does
    not fit the model's dtype, naming the largest alpha that does."""
    a = handle.adapter
    out: dict[str, torch.Tensor] = {}
    for d in directions:
        site = resolve_sites(d.site, a.n_layers)[0]
        vec = alpha * d.sigma * d.vector.to(torch.float64)
        if site.kind in HEAD_SITES:
            n = a.n_kv_heads if site.kind in ("attn.k", "attn.v") else a.n_heads
            full = out.setdefault(site.name, torch.zeros(n, 1, a.head_dim, dtype=torch.float64))
            full[d.head, 0] += vec
        else:
            out[site.name] = out.get(site.name, torch.zeros_like(vec)) + vec
    for name, v in out.items():
        _check_fits(float(v.norm()), alpha, name, handle.dtype)
    return {k: v.to(device=handle.device, dtype=handle.dtype) for k, v in out.items()}


def _check_fits(norm: float, alpha: float, site: str, dtype: torch.dtype) -> None:
    """``norm`` (float64) of the vector added at ``site`` must be finite in ``dtype`` and its square finite in the
    norm layer's statistics dtype."""
    stats = dtype if torch.finfo(dtype).bits >= 32 else _STATS_DTYPE
    limit = min(torch.finfo(dtype).max, math.sqrt(torch.finfo(stats).max))
    if math.isfinite(norm) and norm <= limit:
        return
    largest = abs(alpha) * limit / norm if norm > 0 and math.isfinite(norm) else 0.0
    raise NonFiniteError(f"alpha={alpha}: the vector added at {site} would have norm {norm:.3g}, but {dtype} (and "
                         f"the next norm layer, which squares it) holds norms up to {limit:.3g}; lower |alpha| below "
                         f"{largest:.3g}")


class Steering(Edit):
    """Context manager that adds ``alpha * sigma * u`` for each direction while the block runs (an :class:`Edit`).

    Works with ``handle.generate`` / ``handle.run`` / direct calls of the model on every backend. ``prompt_length``
    fixes P for teacher-forced runs in modes ``prompt`` / ``generated`` (default: the width of each run's first
    forward; other modes take none). For ``mode="conditional"`` the edits are off until :meth:`steer_rows` switches
    them on for some rows of the batch (:func:`steer_generate` does, row by row, when the detector fires).

    After the block, ``changes[run][site]`` holds ``[batch, positions]``: the L2 norm of what was added at each
    absolute position; :meth:`added_norm` combines the sites.
    """

    def __init__(self, handle, directions: Sequence[Direction], alpha: float, mode: str = "generated",
                 prompt_length: int | None = None):
        _check_mode(mode)
        if prompt_length is not None:
            if mode not in ("prompt", "generated"):
                raise ValueError(f"prompt_length= only applies to modes 'prompt' and 'generated' (mode={mode!r})")
            if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 1:
                raise ValueError(f"prompt_length={prompt_length!r}: a number of positions >= 1")
        alpha = check_alpha(alpha)
        directions = [directions] if isinstance(directions, Direction) else list(directions)
        check_directions(handle, directions)
        vectors = steering_vectors(handle, directions, alpha)
        super().__init__(handle, {site: Add(v) for site, v in vectors.items()}, positions=slice(0, 0),
                         require_applied=False)
        self.alpha, self.mode, self.prompt_length = alpha, mode, prompt_length
        self._vectors = vectors
        self._rows: torch.Tensor | None = None  # conditional: the rows steered from now on, [batch] bool

    def steer_rows(self, rows: torch.Tensor) -> None:
        """Conditional mode: from the next forward on, add the vectors at every position of the rows where
        ``rows [batch]`` (bool) is set, and nothing in the other rows."""
        if self.mode != "conditional":
            raise ValueError(f"steer_rows() switches conditional steering (mode={self.mode!r})")
        self._rows = rows.clone()
        for site, op in self.ops.items():
            v = self._vectors[site.name]
            per_row = (v.view(1, -1) if v.ndim == 1 else v).unsqueeze(0)       # [1, 1, d] or [1, heads, 1, hd]
            op.vector = rows.to(per_row).view(-1, *[1] * (per_row.ndim - 1)) * per_row

    def begin_forward(self, offset: int, attention_mask: torch.Tensor | None = None,
                      length: int | None = None) -> None:
        super().begin_forward(offset, attention_mask, length)
        if offset == 0:
            self._p = self.prompt_length or length
        P = self.prompt_length or self._p  # a run may start after a prefilled prompt (offset > 0)
        if self.mode == "all":
            self.positions = None
        elif self.mode == "prompt":
            self.positions = slice(0, P)
        elif self.mode == "generated":
            self.positions = slice(P - 1, None)
        else:
            self.positions = None if self._rows is not None and bool(self._rows.any()) else slice(0, 0)

    def added_norm(self, run: int = 0) -> torch.Tensor:
        """L2 norm of everything added at each position of one run, ``[batch, positions]`` (all sites)."""
        return self.changed(run=run) if self.changes.get(run) else torch.zeros(1, 0)

    @property
    def runs(self) -> list[dict[str, torch.Tensor]]:
        """Per run: ``{site name: [batch, positions]}`` norms of what was added."""
        return [self.changes[r] for r in sorted(self.changes)]


# ---- generation --------------------------------------------------------------------------------------------
@dataclass
class SteerOutput:
    """Result of :func:`steer_generate`. ``sequences [batch, P + new]`` (left-padded prompts, as
    ``handle.generate``); ``added_norm`` has the same shape (what was added at the hidden state of each token);
    ``per_site`` the same per edited site. Conditional mode also fills ``rollback`` (the position in
    ``sequences`` of the token that was replaced, or None per row) and ``p_true`` (the detector's score of every
    token it checked, per row)."""

    sequences: torch.Tensor
    prompt_length: int
    texts: list[str]
    added_norm: torch.Tensor
    per_site: dict[str, torch.Tensor]
    mode: str
    alpha: float
    rollback: list[int | None] = field(default_factory=list)
    p_true: list[list[float]] = field(default_factory=list)

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]


def _fit(t: torch.Tensor, width: int) -> torch.Tensor:
    t = t.detach().float().cpu()
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))[:, :width]


def _check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")


@dataclass
class SteerRequest:
    """The checked arguments of :func:`steer_generate` (``detector`` and ``threshold`` set in conditional mode)."""

    directions: list[Direction]
    alpha: float
    mode: str
    detector: Direction | None = None
    threshold: float | None = None


def check_request(handle, directions, alpha, mode: str = "generated", max_new_tokens: int = 32,
                  detector: Direction | None = None, threshold: float | None = None, streamer=None,
                  on_event=None, generate_kwargs: dict | None = None) -> SteerRequest:
    """Every check :func:`steer_generate` makes before generating (callers that print first run it first):
    mode, options the mode does not use (errors, not ignored), alpha, the directions against this model, the
    added vectors against the model's dtype, ``max_new_tokens`` and, in conditional mode, the detector and a
    threshold in [0, 1] (default 0.5)."""
    _check_mode(mode)
    if mode == "conditional":
        unused = ["streamer="] * (streamer is not None) + [f"{k}=" for k in generate_kwargs or {}]
        if unused:
            raise ValueError(f"{', '.join(unused)} do(es) not apply to mode='conditional' (it decodes greedily in "
                             "its own loop); drop it, or use on_event= to follow its tokens")
    else:
        unused = [k for k, v in (("detector=", detector), ("threshold=", threshold), ("on_event=", on_event))
                  if v is not None]
        if unused:
            raise ValueError(f"{', '.join(unused)} only appl{'ies' if len(unused) == 1 else 'y'} to "
                             f"mode='conditional' (mode={mode!r}); drop it or use mode='conditional'")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: generate at least one token")
    alpha = check_alpha(alpha)
    directions = [directions] if isinstance(directions, Direction) else list(directions)
    check_directions(handle, directions)
    steering_vectors(handle, directions, alpha)
    if mode != "conditional":
        return SteerRequest(directions, alpha, mode)
    detector = detector if detector is not None else directions[0]
    check_directions(handle, [detector])
    return SteerRequest(directions, alpha, mode, detector, _check_threshold(0.5 if threshold is None else threshold))


def _check_threshold(threshold) -> float:
    try:
        if isinstance(threshold, (bool, str, bytes)):
            raise TypeError
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold={threshold!r} is not a number") from None
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"threshold={threshold}: the detector flags a token when p_true < threshold, so it must be "
                         "a probability in [0, 1]")
    return value


def steer_generate(handle, prompts, directions: Sequence[Direction], alpha: float, mode: str = "generated",
                   max_new_tokens: int = 32, add_bos: bool | None = None, detector: Direction | None = None,
                   threshold: float | None = None, streamer=None, on_event: Callable[[str, dict], None] | None = None,
                   **generate_kwargs) -> SteerOutput:
    """Greedy generation with steering. Modes ``all`` / ``prompt`` / ``generated`` run ``handle.generate`` (one
    left-padded batch, any backend) inside :class:`Steering`; ``conditional`` decodes each prompt with its own
    KV-cache loop on ``handle.hf_model`` (the transformers modules every backend runs or shares weights with,
    through an ``hf`` handle over them) with ``detector`` (default: the first direction) as the per-token detector
    and ``threshold`` (default 0.5). ``on_event(kind, info)`` receives ``"token"`` (a checked token's text) and
    ``"rollback"`` events in conditional mode; ``streamer`` and ``generate_kwargs`` go to ``handle.generate``
    otherwise. Options that a mode ignores are errors (:func:`check_request`).

    Raises :class:`NonFiniteError` (naming the new token) when a step's logits hold NaN or +Inf: the edit
    overflowed the model's dtype, and no text is returned.
    """
    req = check_request(handle, directions, alpha, mode, max_new_tokens, detector, threshold, streamer, on_event,
                        generate_kwargs)
    if mode == "conditional":
        return _conditional(handle, prompts, req, max_new_tokens, add_bos, on_event)
    guard = _logits_guard(req, handle.dtype)
    user = generate_kwargs.pop("logits_processor", None) or []
    with Steering(handle, req.directions, req.alpha, mode) as steer:
        gen = handle.generate(prompts, max_new_tokens=max_new_tokens, add_bos=add_bos, streamer=streamer,
                              logits_processor=type(guard).list_type([*user, guard]), **generate_kwargs)
    width = gen.sequences.shape[1]
    per_site = {k: _fit(v, width) for k, v in steer.changes.get(0, {}).items()}
    added = _fit(steer.added_norm(0), width) if per_site else torch.zeros(gen.sequences.shape)
    return SteerOutput(gen.sequences, gen.prompt_length, gen.texts, added, per_site, mode, req.alpha)


def check_logits(logits: torch.Tensor, step: int, req: SteerRequest, dtype: torch.dtype) -> None:
    """Raise :class:`NonFiniteError` when one step's logits ``[..., vocab]`` hold NaN or +Inf, or a row holds no
    finite entry (a -Inf alone is a token masked on purpose, e.g. by ``min_new_tokens``)."""
    bad = torch.isnan(logits).any() | torch.isposinf(logits).any() | ~torch.isfinite(logits).any(-1).all()
    if bool(bad):
        raise NonFiniteError(f"steered generation produced NaN/Inf logits at new token {step} (mode {req.mode!r}, "
                             f"alpha {req.alpha}): the edit overflowed {dtype} inside the model; lower alpha (or "
                             "load the model in float32)")


def _logits_guard(req: SteerRequest, dtype: torch.dtype):
    """A transformers ``LogitsProcessor`` that runs :func:`check_logits` on every step of ``generate``."""
    # transformers is heavy to import: only when steered generation runs
    from transformers import LogitsProcessor, LogitsProcessorList

    class FiniteLogits(LogitsProcessor):
        list_type = LogitsProcessorList

        def __init__(self):
            self.prompt_width: int | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.prompt_width = self.prompt_width or input_ids.shape[1]
            check_logits(scores, input_ids.shape[1] - self.prompt_width, req, dtype)
            return scores

    return FiniteLogits()


def _conditional(handle, prompts, req: SteerRequest, max_new_tokens, add_bos, on_event) -> SteerOutput:
    view = handle.with_backend("hf")
    batch = view.tokenize(prompts, add_bos=add_bos)
    prompt_ids = [batch.input_ids[j][batch.attention_mask[j].bool()].tolist() for j in range(len(prompts))]
    with Steering(view, req.directions, req.alpha, "conditional") as steer, \
            capture(view, [req.detector.site], positions="last") as cache:
        dec = _ConditionalBatch(view, steer, cache, req, prompt_ids, _eos_ids(handle), on_event)
        dec.decode(max_new_tokens)
    rows, rollbacks = dec.seqs, dec.flagged
    per_col = {k: v.float().cpu() for k, v in steer.changes.get(0, {}).items()}
    n_prompt = [len(p) for p in prompt_ids]
    P = max(n_prompt)
    pad = handle.tokenizer.pad_token_id
    new_len = max(len(r) - p for r, p in zip(rows, n_prompt))
    seqs = torch.full((len(rows), P + new_len), pad, dtype=torch.long)
    per_site = {k: torch.zeros(len(rows), P + new_len) for k in per_col}
    for j, (r, p) in enumerate(zip(rows, n_prompt)):
        shift = P - p
        seqs[j, shift:shift + len(r)] = torch.tensor(r)
        cols = torch.tensor(dec.cols[j][:len(r)])          # the cache column that holds each position of row j
        for k, v in per_col.items():
            fed = cols[cols < v.shape[1]]                  # later columns: no forward was logged, nothing added
            per_site[k][j, shift:shift + len(fed)] = v[j, fed]
        if rollbacks[j] is not None:
            rollbacks[j] += shift
    added = (sum(v.pow(2) for v in per_site.values()).sqrt() if per_site else torch.zeros(seqs.shape))
    texts = [handle.tokenizer.decode(r[p:], skip_special_tokens=True) for r, p in zip(rows, n_prompt)]
    return SteerOutput(seqs.to(handle.device), P, texts, added, per_site, "conditional", req.alpha, rollbacks,
                       dec.p_true)


class _ConditionalBatch:
    """Greedy KV-cache decoding of a batch with detect-then-rollback per row (see the module docstring).

    The rows share one cache whose columns are fed in lockstep: each row's positions sit in columns listed in
    :attr:`cols`, its position ids count only its own tokens, and a rollback masks the two columns it drops (the
    flagged token and the position that chose it) and re-feeds that position, steered, in a new column (the other
    rows feed a masked pad there). So every row sees exactly its own sequence, as when decoded alone. Every step's
    logits are checked (:func:`check_logits`) before a token is chosen from them."""

    def __init__(self, view, steer: Steering, cache, req: SteerRequest, prompt_ids: list[list[int]], eos: set[int],
                 on_event):
        # transformers is heavy to import: only when conditional decoding runs
        from transformers import DynamicCache

        self.model, self.device, self.tokenizer = view.hf_model, view.device, view.tokenizer
        self.dtype, self.steer, self.cache, self.req, self.eos, self.on_event = \
            view.dtype, steer, cache, req, eos, on_event
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        b, P = len(prompt_ids), max(map(len, prompt_ids))
        self.seqs = [list(p) for p in prompt_ids]
        self.cols = [list(range(P - len(p), P)) for p in prompt_ids]
        self.mask = torch.zeros(b, P, dtype=torch.long)
        for j, p in enumerate(prompt_ids):
            self.mask[j, P - len(p):] = 1
        self.flagged: list[int | None] = [None] * b
        self.p_true: list[list[float]] = [[] for _ in range(b)]
        self.on = torch.zeros(b, dtype=torch.bool)
        self.kv = DynamicCache(config=self.model.config)
        ids = torch.full((b, P), self.pad, dtype=torch.long)
        for j, p in enumerate(prompt_ids):
            ids[j, P - len(p):] = torch.tensor(p)
        pos = (self.mask.cumsum(1) - 1).clamp(min=0)
        self.logits = self._forward(ids, pos)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Feed ``ids [b, t]`` at position ids ``pos`` after the cache (``self.mask`` already covers them); the
        last column's logits ``[b, vocab]``."""
        return self.model(input_ids=ids.to(self.device), attention_mask=self.mask.to(self.device),
                          position_ids=pos.to(self.device), cache=self.kv, use_cache=True,
                          logits_to_keep=1).logits[:, -1]

    def _column(self, tokens: dict[int, int]) -> torch.Tensor:
        """Feed one new column: ``tokens[row]`` at that row's next position, a masked pad in the other rows."""
        b, col = len(self.seqs), self.mask.shape[1]
        ids = torch.full((b, 1), self.pad, dtype=torch.long)
        pos = torch.zeros(b, 1, dtype=torch.long)
        new = torch.zeros(b, 1, dtype=torch.long)
        for j, tok in tokens.items():
            ids[j, 0], pos[j, 0], new[j, 0] = tok, len(self.cols[j]), 1
            self.cols[j].append(col)
        self.mask = torch.cat([self.mask, new], 1)
        return self._forward(ids, pos)

    def _scores(self) -> torch.Tensor:
        """The detector's ``p_true`` of the last fed column, ``[b]``."""
        det = self.req.detector
        h = self.cache.chunks(det.site)[-1].value
        h = h[:, det.head, -1] if det.head is not None else h[:, -1]
        return det.p_true(h).float().cpu()

    def decode(self, max_new_tokens: int) -> None:
        n_new = [0] * len(self.seqs)
        live = set(range(len(self.seqs)))
        while live:
            chosen = {}
            for j in sorted(live):
                check_logits(self.logits[j], n_new[j], self.req, self.dtype)
                chosen[j] = int(self.logits[j].argmax())
                self.seqs[j].append(chosen[j])
                n_new[j] += 1
            self.logits = self._column(chosen)
            back = {}
            if any(self.flagged[j] is None for j in chosen):
                p = self._scores()
                for j in chosen:
                    if self.flagged[j] is None:
                        self.p_true[j].append(float(p[j]))
                        if p[j] < self.req.threshold:
                            back[j] = self._roll_back(j)
                            n_new[j] -= 1
            if back:
                self.on[list(back)] = True
                self.steer.steer_rows(self.on)
                again = self._column(back)
                self.logits[list(back)] = again[list(back)]
            for j, tok in chosen.items():
                if j in back:
                    continue
                if self.on_event:
                    self.on_event("token", {"text": self.tokenizer.decode([tok]), "id": tok, "row": j})
                if tok in self.eos or n_new[j] >= max_new_tokens:
                    live.discard(j)

    def _roll_back(self, j: int) -> int:
        """Drop row ``j``'s flagged last token and the column of the position that chose it; returns the token
        that position holds (to re-feed, steered)."""
        self.flagged[j] = len(self.seqs[j]) - 1
        self.seqs[j].pop()
        for col in self.cols[j][-2:]:
            self.mask[j, col] = 0
        del self.cols[j][-2:]
        if self.on_event:
            self.on_event("rollback", {"position": self.flagged[j], "p_true": self.p_true[j][-1], "row": j})
        return self.seqs[j][-1]


# ---- a prompt prefilled once, greedy decoding that streams (the dashboard's steering and leakage views) ----------
@dataclass
class PrefilledPrompt:
    """A prompt run once through the model: ``ids`` (its ``P`` token ids, as ``handle.tokenize`` gives them) and
    ``cache``, the transformers KV cache of positions ``0..P-2``, unsteered. The last prompt position is left out
    because mode ``generated`` steers it (it chooses the first new token). Read-only: every use decodes on a copy
    (:meth:`copy_cache`), so one prefill serves any number of alphas."""

    ids: list[int]
    cache: object

    def copy_cache(self):
        return copy.deepcopy(self.cache)


def _eos_ids(handle) -> set[int]:
    eos = handle.hf_model.generation_config.eos_token_id
    return set([eos] if isinstance(eos, int) else (eos or []))


def _empty_cache(view):
    # transformers is heavy to import: only when KV-cache decoding runs
    from transformers import DynamicCache

    return DynamicCache(config=view.hf_model.config)


def _feed(view, kv, tokens: list[int], start: int) -> torch.Tensor:
    """One forward of ``tokens`` at absolute positions ``start..`` on top of ``kv`` (which holds ``0..start-1``);
    the logits of its last position, ``[vocab]``."""
    inp = torch.tensor([tokens], device=view.device)
    mask = torch.ones(1, start + len(tokens), dtype=torch.long, device=view.device)
    return view.hf_model(input_ids=inp, attention_mask=mask, cache=kv, use_cache=True, logits_to_keep=1).logits[0, -1]


def prefill(handle, prompt, add_bos: bool | None = None) -> PrefilledPrompt:
    """Tokenize ``prompt`` (a string or token ids; BOS by :meth:`ModelHandle.tokenize`'s rule) and run positions
    ``0..P-2`` once, keeping their KV cache (on the ``hf`` view over the same weights, as conditional steering)."""
    ids = handle.tokenize([prompt], add_bos=add_bos).input_ids[0].tolist()
    view = handle.with_backend("hf")
    kv = _empty_cache(view)
    if len(ids) > 1:
        with torch.inference_mode():
            _feed(view, kv, ids[:-1], 0)
    return PrefilledPrompt(ids, kv)


def decode_greedy(view, ids: list[int], max_new_tokens: int, start: int = 0, kv=None,
                  on_token: Callable[[list[int]], None] | None = None,
                  check: Callable[[torch.Tensor, int], None] | None = None) -> tuple[list[int], torch.Tensor]:
    """Greedy KV-cache decoding on an ``hf`` handle: feed ``ids[start:]`` on top of ``kv`` (which holds positions
    ``0..start-1`` of ``ids``; None: a new cache, ``start`` 0), then one token per step until ``max_new_tokens``
    or an EOS token (kept, as ``generate`` keeps it). ``check(logits, step)`` sees every step's logits before a
    token is chosen from them; ``on_token(new ids so far)`` follows the tokens as they come (a page streams
    them). Edits and captures open on ``view`` apply, at absolute positions. Returns ``(new token ids, logits
    [vocab] of the first step)``: the next-token distribution of the prompt as it ran."""
    if not 0 <= start < len(ids):
        raise ValueError(f"start={start}: feed at least the last of the {len(ids)} prompt tokens")
    kv = _empty_cache(view) if kv is None else kv
    eos = _eos_ids(view)
    new: list[int] = []
    with torch.inference_mode():
        logits = first = _feed(view, kv, list(ids[start:]), start)
        while True:
            if check is not None:
                check(logits, len(new))
            tok = int(logits.argmax())
            new.append(tok)
            if on_token is not None:
                on_token(list(new))
            if tok in eos or len(new) >= max_new_tokens:
                return new, first.float().cpu()
            logits = _feed(view, kv, [tok], len(ids) + len(new) - 1)


def continue_prefilled(handle, prompt: PrefilledPrompt, max_new_tokens: int = 32,
                       on_token: Callable[[list[int]], None] | None = None) -> list[int]:
    """The plain greedy continuation of a prefilled prompt (the same tokens as ``handle.generate``): new ids."""
    view = handle.with_backend("hf")
    return decode_greedy(view, prompt.ids, max_new_tokens, len(prompt.ids) - 1, prompt.copy_cache(), on_token)[0]


def steer_prefilled(handle, prompt: PrefilledPrompt, directions: Sequence[Direction], alpha: float,
                    mode: str = "generated", max_new_tokens: int = 32,
                    on_token: Callable[[list[int]], None] | None = None) -> SteerOutput:
    """:func:`steer_generate` of one prefilled prompt (the same tokens), decoding greedily in its own KV-cache loop
    so that ``on_token(new ids so far)`` can stream them. Mode ``generated`` starts from a copy of the prompt's
    cache (positions ``0..P-2`` are never steered in that mode), so a new alpha costs the new tokens only; modes
    ``all`` and ``prompt`` steer the prompt and run it again. Conditional mode is :func:`steer_generate`'s."""
    if mode == "conditional":
        raise ValueError("mode='conditional' decodes with rollbacks: use steer_generate(..., on_event=)")
    req = check_request(handle, directions, alpha, mode, max_new_tokens)
    view = handle.with_backend("hf")
    ids, P = prompt.ids, len(prompt.ids)
    start, kv = (P - 1, prompt.copy_cache()) if mode == "generated" else (0, None)

    def check(logits, step):
        check_logits(logits, step, req, view.dtype)

    with Steering(view, req.directions, req.alpha, mode, P if mode in ("prompt", "generated") else None) as steer:
        new, _ = decode_greedy(view, ids, max_new_tokens, start, kv, on_token, check)
    seq = torch.tensor([ids + new], device=handle.device)
    width = seq.shape[1]
    per_site = {k: _fit(v, width) for k, v in steer.changes.get(0, {}).items()}
    added = _fit(steer.added_norm(0), width) if per_site else torch.zeros(seq.shape)
    texts = [handle.tokenizer.decode(new, skip_special_tokens=True)]
    return SteerOutput(seq, P, texts, added, per_site, mode, req.alpha)


def continuation_states(handle, prompt: PrefilledPrompt, ids: Sequence[int], site: str,
                        head: int | None = None) -> torch.Tensor:
    """Unsteered states at ``site`` of positions ``P-1..`` of ``ids`` (a continuation of the prefilled prompt: its
    first ``P`` ids are the prompt's), from one forward on top of a copy of the prompt's cache:
    ``[len(ids) - P + 1, width]`` float32 on the CPU (``width`` d_model, or head_dim of ``head`` at a per-head
    site). Positions ``0..P-2`` are the prompt's own, the same for every continuation."""
    P = len(prompt.ids)
    if list(ids[:P]) != prompt.ids:
        raise ValueError("ids do not start with the prefilled prompt's tokens")
    view = handle.with_backend("hf")
    kv = prompt.copy_cache()
    with capture(view, [site], to="cpu") as cache, torch.inference_mode():
        _feed(view, kv, list(ids[P - 1:]), P - 1)
    h = cache.chunks(site)[0].value[0]
    return (h[head] if head is not None else h).float()
