"""Steering during generation (``hiddenlens.interventions.steer``): add ``alpha * sigma * u`` at chosen sites.

A :class:`~hiddenlens.analyses.truth.Direction` on ``resid_post`` edits the output of decoder block ``layer``
(``h <- h + alpha * sigma * u``, RepE/ITI style); one on ``attn.z`` edits head ``head``'s slice of the input to
the attention output projection (ITI's head-wise intervention). Several directions on the same module are summed
into one vector, so each edited module costs one addition per forward.

Modes (positions are **absolute**: from ``cache_position`` / the KV-cache length, so they are right under the
Hugging Face KV cache, and padding positions of a left-padded batch, read from the attention mask, are never
edited; with left padding every prompt ends at the same column, so a batch gives the same tokens as one prompt at
a time):

``all``          every position (prompt and generated)
``prompt``       prompt positions only (``< P``, P = padded prompt width)
``generated``    the positions that choose new tokens: the last prompt position and every generated token
                 (``>= P - 1``; ITI edits the last position of every forward, which is the same set)
``conditional``  our reading of TruthPrInt (its code and the body of the paper are unpublished; see
                 methods.md 3): generation starts unsteered; a per-token detector (a direction's logistic
                 detector, ``p_true = sigmoid(a * (h . u) + b)`` at its own site) reads every new token, and when
                 ``p_true < threshold`` the token is dropped, the KV cache is cropped to before the position that
                 chose it, and decoding resumes from there with the intervention on (at every position from that
                 one on). At most one rollback per sequence; after it the steering stays on.

Every run reports the per-token L2 norm of what it added (``added_norm``, aligned with ``sequences``), so a
steering that changed nothing is visible; a direction whose hook never fired raises an error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from hiddenlens.analyses.truth import Direction
from hiddenlens.probes.hf_hooks import forward_offset

MODES = ("all", "prompt", "generated", "conditional")


class SteeringNotAppliedError(RuntimeError):
    """A steering hook never fired during the block (the module was not run)."""


@dataclass
class _Edit:
    """All directions on one module, summed: ``delta`` ``[width]`` in the model's dtype, added where gated."""

    module: torch.nn.Module
    name: str
    kind: str  # "output" (block output) | "input" (o_proj input)
    delta: torch.Tensor
    norm: float = 0.0
    fired: int = 0


def check_directions(handle, directions: Sequence[Direction]) -> None:
    """Fail loudly on directions this model cannot take (unknown site, wrong layer/head, width, NaN)."""
    a = handle.adapter
    if not directions:
        raise ValueError("no directions given: pass at least one Direction (hiddenlens.analyses.truth)")
    for d in directions:
        if d.site not in ("resid_post", "attn.z"):
            raise ValueError(f"{d.name}: steering supports sites 'resid_post' and 'attn.z', not {d.site!r}")
        if not 0 <= d.layer < a.n_layers:
            raise ValueError(f"{d.name}: layer {d.layer} out of range; this model has layers 0..{a.n_layers - 1}")
        width = a.d_model if d.site == "resid_post" else a.head_dim
        if d.vector.ndim != 1 or d.vector.numel() != width:
            raise ValueError(f"{d.name}: vector has shape {tuple(d.vector.shape)}, {d.site} needs [{width}] "
                             f"(was it fitted on another model? it says model={d.model!r})")
        if d.site == "attn.z" and (d.head is None or not 0 <= d.head < a.n_heads):
            raise ValueError(f"{d.name}: head {d.head} out of range; this model has heads 0..{a.n_heads - 1}")
        if not torch.isfinite(d.vector).all() or not math.isfinite(d.sigma):
            raise ValueError(f"{d.name}: vector or sigma holds NaN/Inf")


class Steering:
    """Context manager that adds ``alpha * sigma * u`` for each direction while the block runs.

    Works with ``handle.generate`` / ``handle.run`` / direct calls of ``handle.hf_model`` on every backend whose
    forward runs the transformers modules (``hf``, ``nnsight``, ``transformer_lens``). ``prompt_length`` fixes P
    for teacher-forced runs (default: the width of each run's first forward). For ``mode="conditional"`` the
    edits are off until :attr:`start` is set (by :func:`steer_generate`).

    After the block, :attr:`runs` holds one dict per run (a forward at offset 0 starts one): ``{site name:
    norm [batch, positions]}`` of what was added at each absolute position.
    """

    def __init__(self, handle, directions: Sequence[Direction], alpha: float, mode: str = "generated",
                 prompt_length: int | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        if not math.isfinite(float(alpha)):
            raise ValueError(f"alpha={alpha} is not finite")
        if handle.backend == "transformer_lens":
            raise ValueError("Steering hooks the transformers modules, which a transformer_lens handle's bridge "
                             "replaces with a clone; pass hiddenlens.interventions.steer.hf_view(handle) (same "
                             "weights) or use steer_generate, which does that for you")
        directions = [directions] if isinstance(directions, Direction) else list(directions)
        check_directions(handle, directions)
        self.handle, self.alpha, self.mode, self.prompt_length = handle, float(alpha), mode, prompt_length
        self.start: int | None = None  # conditional: first steered position once the detector fired
        self.runs: list[dict[str, torch.Tensor]] = []
        self._edits = self._group(directions)
        self._handles: list = []
        self._gate: torch.Tensor | None = None
        self._active = False
        self._offset = 0

    def _group(self, directions) -> list[_Edit]:
        h, a = self.handle, self.handle.adapter
        model = h.hf_model
        edits: dict[int, _Edit] = {}
        for d in directions:
            vec = self.alpha * d.sigma * d.vector.to(torch.float64)
            if d.site == "resid_post":
                module, kind, name, width, sl = a.block(model, d.layer), "output", f"blocks.{d.layer}.resid_post", \
                    a.d_model, slice(None)
            else:
                module, kind, name = a.sub(model, d.layer, a.o_path), "input", f"blocks.{d.layer}.attn.z"
                width, sl = a.n_heads * a.head_dim, slice(d.head * a.head_dim, (d.head + 1) * a.head_dim)
            e = edits.get(id(module))
            if e is None:
                e = edits[id(module)] = _Edit(module, name, kind, torch.zeros(width, dtype=torch.float64))
            e.delta[sl] += vec
        for e in edits.values():
            e.delta = e.delta.to(device=h.device, dtype=h.dtype)
            e.norm = float(e.delta.float().norm())
        return list(edits.values())

    # ---- hooks ---------------------------------------------------------------------------------------------
    def _bounds(self, prompt_len: int) -> tuple[float, float]:
        if self.mode == "all":
            return 0, math.inf
        if self.mode == "prompt":
            return 0, prompt_len
        if self.mode == "generated":
            return prompt_len - 1, math.inf
        return (self.start, math.inf) if self.start is not None else (math.inf, math.inf)

    def _begin(self, module, args, kwargs):
        offset, mask = forward_offset(args, kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        batch, length = ids.shape[0], ids.shape[1]
        if offset == 0:
            self._p = self.prompt_length or length
            self.runs.append({})
        lo, hi = self._bounds(self._p)
        self._active = lo < offset + length and hi > offset  # decided on the host: no device sync per hook
        pos = torch.arange(offset, offset + length, device=ids.device)
        gate = ((pos >= lo) & (pos < hi))[None].expand(batch, length)
        if mask is not None:
            gate = gate & mask[:, -length:].bool()
        self._offset = offset
        self._gate = gate
        self._gate_f = gate[..., None].to(self.handle.dtype)

    def _record(self, e: _Edit) -> None:
        e.fired += 1
        if not self.runs:
            self.runs.append({})
        run = self.runs[-1]
        norms = self._gate.to(torch.float32) * e.norm
        end = self._offset + norms.shape[1]
        old = run.get(e.name)
        if old is None or old.shape[1] < end:
            grown = torch.zeros(norms.shape[0], end, device=norms.device)
            if old is not None:
                grown[:, :old.shape[1]] = old
            old = run[e.name] = grown
        old[:, self._offset:end] = norms

    def _output_hook(self, e: _Edit):
        def hook(module, args, output):
            self._record(e)
            if not self._active:
                return None
            h = output[0] if isinstance(output, tuple) else output
            new = h + self._gate_f * e.delta
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    def _input_hook(self, e: _Edit):
        def hook(module, args, kwargs):
            self._record(e)
            if not self._active:
                return None
            if args:
                return (args[0] + self._gate_f * e.delta,) + tuple(args[1:]), kwargs
            return args, dict(kwargs, hidden_states=kwargs["hidden_states"] + self._gate_f * e.delta)
        return hook

    def __enter__(self) -> "Steering":
        model = self.handle.hf_model
        backbone = model.base_model if getattr(model, "base_model", None) is not None else model
        try:
            self._handles.append(backbone.register_forward_pre_hook(self._begin, with_kwargs=True))
            for e in self._edits:
                if e.kind == "output":
                    self._handles.append(e.module.register_forward_hook(self._output_hook(e)))
                else:
                    self._handles.append(e.module.register_forward_pre_hook(self._input_hook(e), with_kwargs=True))
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._remove()
        if exc_type is None:
            silent = [e.name for e in self._edits if e.fired == 0]
            if silent:
                raise SteeringNotAppliedError(f"steering hooks never fired on {silent}: no forward pass ran inside "
                                              "the block, or this backend does not run the transformers modules")
        return False

    def added_norm(self, run: int = -1) -> torch.Tensor:
        """L2 norm of everything added at each position of one run, ``[batch, positions]`` (all sites)."""
        per = self.runs[run]
        return torch.stack(list(per.values())).pow(2).sum(0).sqrt()


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


def steer_generate(handle, prompts, directions: Sequence[Direction], alpha: float, mode: str = "generated",
                   max_new_tokens: int = 32, add_bos: bool | None = None, detector: Direction | None = None,
                   threshold: float = 0.5, streamer=None, on_event: Callable[[str, dict], None] | None = None,
                   **generate_kwargs) -> SteerOutput:
    """Greedy generation with steering. Modes ``all`` / ``prompt`` / ``generated`` run ``handle.generate`` (one
    left-padded batch, any backend) inside :class:`Steering`; ``conditional`` decodes each prompt with its own
    KV-cache loop on ``handle.hf_model`` (the modules every backend wraps) and ``detector`` (default: the first
    direction) as the per-token detector. ``on_event(kind, info)`` receives ``"token"`` (a checked token's
    text) and ``"rollback"`` events in conditional mode; ``streamer`` goes to ``handle.generate`` otherwise.
    With a ``transformer_lens`` handle the plain transformers modules that share the bridge's weights run
    (:func:`hf_view`).
    """
    directions = [directions] if isinstance(directions, Direction) else list(directions)
    if handle.backend == "transformer_lens":
        handle = hf_view(handle)
    if mode == "conditional":
        return _conditional(handle, prompts, directions, alpha, max_new_tokens, add_bos,
                            detector or directions[0], threshold, on_event)
    with Steering(handle, directions, alpha, mode) as steer:
        gen = handle.generate(prompts, max_new_tokens=max_new_tokens, add_bos=add_bos, streamer=streamer,
                              **generate_kwargs)
    width = gen.sequences.shape[1]
    per_site = {k: _fit(v, width) for k, v in steer.runs[0].items()}
    return SteerOutput(gen.sequences, gen.prompt_length, gen.texts, _fit(steer.added_norm(0), width), per_site,
                       mode, float(alpha))


def hf_view(handle):
    """A ``hf``-backend handle over the same modules and weights (no copy): conditional decoding uses it so that
    ``hiddenlens.capture``'s PyTorch hooks work whatever the original backend (nnsight wraps these very modules;
    a TransformerLens bridge runs a clone sharing their weights)."""
    from hiddenlens.models.handle import ModelHandle

    if handle.backend == "hf":
        return handle
    return ModelHandle(handle.hf_model, handle.tokenizer, handle.adapter, handle.spec, "hf", info=handle.info)


def _conditional(handle, prompts, directions, alpha, max_new_tokens, add_bos, detector: Direction, threshold,
                 on_event) -> SteerOutput:
    from hiddenlens.probes.capture import capture

    check_directions(handle, [detector])
    view = hf_view(handle)
    batch = view.tokenize(prompts, add_bos=add_bos)
    eos = handle.hf_model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    site = f"blocks.{detector.layer}.{detector.site}"
    rows, norms, sites, rollbacks, scores = [], [], [], [], []
    for j in range(batch.input_ids.shape[0]):
        ids = batch.input_ids[j][batch.attention_mask[j].bool()].tolist()
        with Steering(view, directions, alpha, "conditional") as steer, \
                capture(view, [site], positions="last") as cache:
            seq, flagged, p_list = _decode_one(view, steer, cache, site, detector, ids, max_new_tokens, eos,
                                               threshold, on_event)
        rows.append(seq)
        norms.append(steer.added_norm(0)[0])
        sites.append({k: v[0] for k, v in steer.runs[0].items()})
        rollbacks.append(flagged)
        scores.append(p_list)
    n_prompt = [int(m.sum()) for m in batch.attention_mask]
    P = max(n_prompt)
    pad = handle.tokenizer.pad_token_id
    new_len = max(len(r) - p for r, p in zip(rows, n_prompt))
    seqs = torch.full((len(rows), P + new_len), pad, dtype=torch.long)
    added = torch.zeros(len(rows), P + new_len)
    per_site = {k: torch.zeros(len(rows), P + new_len) for k in sites[0]}
    for j, (r, p) in enumerate(zip(rows, n_prompt)):
        shift = P - p
        seqs[j, shift:shift + len(r)] = torch.tensor(r)
        n = norms[j].float().cpu()[: len(r)]
        added[j, shift:shift + len(n)] = n
        for k, v in sites[j].items():
            v = v.float().cpu()[: len(r)]
            per_site[k][j, shift:shift + len(v)] = v
        if rollbacks[j] is not None:
            rollbacks[j] += shift
    texts = [handle.tokenizer.decode(r[p:], skip_special_tokens=True) for r, p in zip(rows, n_prompt)]
    return SteerOutput(seqs.to(handle.device), P, texts, added, per_site, "conditional", float(alpha), rollbacks,
                       scores)


def _decode_one(view, steer: Steering, cache, site, detector, ids, max_new_tokens, eos, threshold, on_event):
    """Greedy KV-cache decoding of one unpadded prompt with detect-then-rollback (see the module docstring)."""
    from transformers import DynamicCache

    model = view.hf_model
    kv = DynamicCache(config=model.config)
    device = view.device

    def feed(tokens: list[int], start: int) -> torch.Tensor:
        inp = torch.tensor([tokens], device=device)
        mask = torch.ones(1, start + len(tokens), dtype=torch.long, device=device)
        return model(input_ids=inp, attention_mask=mask, cache=kv, use_cache=True, logits_to_keep=1).logits[0, -1]

    def p_true_last() -> float:
        h = cache.chunks(site)[-1].value[0]
        h = h[detector.head, -1] if detector.head is not None else h[-1]
        return float(detector.p_true(h))

    seq = list(ids)
    logits = feed(seq, 0)
    flagged, p_list, n_new = None, [], 0
    while n_new < max_new_tokens:
        tok = int(logits.argmax())
        seq.append(tok)
        n_new += 1
        logits = feed([tok], len(seq) - 1)
        if flagged is None:
            p = p_true_last()
            p_list.append(p)
            if p < threshold:
                flagged = len(seq) - 1
                seq.pop()
                n_new -= 1
                kv.crop(-2)  # drop the flagged token and the position that chose it
                steer.start = len(seq) - 1
                if on_event:
                    on_event("rollback", {"position": flagged, "p_true": p})
                logits = feed([seq[-1]], len(seq) - 1)
                continue
        if on_event:
            on_event("token", {"text": view.tokenizer.decode([tok]), "id": tok})
        if tok in eos:
            break
    return seq, flagged, p_list
