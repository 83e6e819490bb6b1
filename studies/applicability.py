"""The applicability map (``hiddenlens doctor``): which methodology runs correctly on which backend, workload and
model family, graded like nnbench: SUPPORTED / ERROR / SILENTLY_WRONG.

A **cell** is (family, methodology, workload, backend). It runs the methodology through hiddenlens on a handle
with that backend (``handle.with_backend(name)``, over the same weights) and compares what it returns with a
**reference computed one prompt at a time, unpadded**:

* reads (capture + logit lens, attention pattern, attribution gradients, per-step reads during generation) are
  compared with plain transformers, no hooks: ``hf_model(..., output_hidden_states=True, output_attentions=True)``
  of the eager-attention model (``hidden_states[l + 1]`` is ``blocks.l.resid_post`` for ``l < n - 1``, the last
  entry is after the final norm); gradients with ``torch.autograd.grad`` w.r.t. those hidden states; greedy
  decoding as an uncached argmax loop;
* edits (steering, activation patching, ablation, and their generation forms) are compared with the *same method
  on the* ``hf`` *backend, one prompt at a time, unpadded* (nnbench's per-prompt reference: same method, one
  prompt, no batching, no other backend). This cannot catch a bug the ``hf`` backend has on a single unpadded
  prompt; the read cells check that path against transformers itself.

Tensors must match within ``atol`` (1e-4, fp32) at real (non-padding) positions, or within ``rtol`` (1e-4) of the
tensor's largest reference entry: the embedded model's residual stream reaches 2.4e4, where float32 keeps about 7
digits, and plain transformers itself differs from the prompt run alone, in a left-padded batch, by 0.0011 at
``hidden_states[10]`` (largest entry 67.6) and 0.014 at ``hidden_states[12]`` (2.4e4) (see docs/applicability.md);
logits must also keep their top-1 token. A real indexing error (a wrong position, a padded row read as real)
moves a tensor by a large fraction of its size, far outside this tolerance. For logits the cell also reports
the top-1 agreement and the largest total-variation distance between the softmaxes (for generation: the share of
generated tokens equal to the reference's, and the per-step logits). Grades: SUPPORTED (matches), ERROR (raised:
the message is kept; a backend that lacks something raises :class:`~hiddenlens.probes.backends.BackendError`
naming itself and what it lacks), SILENTLY_WRONG (ran, but does not match), N/A (the workload does not apply:
generation methodologies run on the ``generate`` workload only, the others on ``prompt`` and ``batch``).

The map runs every backend on an eager-attention clone of the model (``handle.with_attention("eager")``; the
TransformerBridge is eager anyway), so that a few float32 roundings between SDPA and eager kernels are not graded
as errors.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import pandas as pd
import torch

from hiddenlens.common.stats import markdown_table
from hiddenlens.probes.capture import capture
from hiddenlens.probes.edit import Add, Patch, Zero, edit

from .report import ModelSpec, StudyResult

STUDY = "applicability"
BACKENDS = ("hf", "transformer_lens", "nnsight")
WORKLOADS = ("prompt", "batch", "generate")
STATUSES = ("SUPPORTED", "ERROR", "SILENTLY_WRONG", "N/A")
#: methodology -> (label, runs during generation)
METHODOLOGIES = {
    "logit_lens": ("capture + logit lens", False),
    "attention_pattern": ("attention pattern", False),
    "steering": ("steering", False),
    "activation_patching": ("activation patching", False),
    "ablation": ("head ablation", False),
    "attribution_patching": ("attribution patching", False),
    "generate_read": ("per-step read during generation", True),
    "generate_steering": ("steering during generation", True),
    "generate_patching": ("patching during generation", True),
}
#: three prompts of different token lengths; the first is the longest, so row 0 of the batch has no padding
PROMPTS = ["The capital of France is a city of", "In the beginning the", "A"]


@dataclass
class ApplicabilityConfig(ModelSpec):
    """``models``: the families to map (tiny-llama, tiny-gpt2; add smollm2-135m-instruct for the embedded one);
    ``backends``; ``atol`` / ``rtol`` (fp32 tolerance: absolute, or relative to each tensor's largest entry);
    ``max_new_tokens`` of the generation workload;
    ``attention``: the attention implementation every backend runs (eager: same kernels as the reference);
    ``threads``: torch CPU threads while mapping (restored after; None keeps torch's own: tiny models run
    several times faster on one thread than on two contended ones)."""

    model: str = "tiny-llama"
    dtype: str = "float32"
    device: str = "cpu"
    models: list[str] = field(default_factory=lambda: ["tiny-llama", "tiny-gpt2"])
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    prompts: list[str] = field(default_factory=lambda: list(PROMPTS))
    atol: float = 1e-4
    rtol: float = 1e-4
    max_new_tokens: int = 4
    attention: str = "eager"
    seed: int = 0
    threads: int | None = 1


# ---- what a method returns, per prompt ------------------------------------------------------------------------
@dataclass
class Out:
    """One prompt's outputs: named tensors (real positions only), logits ``[n, vocab]`` (optional) and generated
    tokens (optional)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    tokens: torch.Tensor | None = None


class Family:
    """One model family: the eager base handle, the prompts as token ids, the clean prompts (first token
    swapped), the layer / head / vector the methods use, and memoized hook-free references."""

    def __init__(self, handle, config: ApplicabilityConfig):
        self.base = handle.with_attention(config.attention) if config.attention else handle
        self.spec = handle.spec
        self.config = config
        a = self.base.adapter
        self.n = a.n_layers
        self.layer = max(0, self.n // 2 - 1) if self.n > 1 else 0   # < n - 1: its resid_post is a hidden state
        self.head = min(1, a.n_heads - 1)
        self.ids = [self.base.tokenize(p).input_ids[0].tolist() for p in config.prompts]
        self.clean = [self._swap_first(r) for r in self.ids]
        self.n_new = config.max_new_tokens
        self._fwd: dict = {}
        self._greedy: dict = {}
        first = self.forward(self.ids[0])
        ref_last = first.logits[0, -1]
        self.answer = int(ref_last.argmax())
        self.wrong = int(ref_last.argsort()[-2])
        hid = first.hidden_states[self.layer + 1][0]
        g = torch.Generator().manual_seed(config.seed)
        v = torch.randn(a.d_model, generator=g)
        self.vector = (v / v.norm() * 2 * float(hid.norm(dim=-1).mean())).to(self.base.dtype)

    def _swap_first(self, ids: list[int]) -> list[int]:
        """The clean prompt: the same tokens with the first non-special one replaced (same length)."""
        tok = self.base.tokenizer
        special = set(tok.all_special_ids)
        out = list(ids)
        j = next((i for i, t in enumerate(out) if t not in special), 0)
        out[j] = next(t for t in range(len(special) + 3, len(tok)) if t != out[j] and t not in special)
        return out

    @property
    def hf(self):
        return self.base.hf_model

    def forward(self, ids: list[int], grad: bool = False):
        """Plain transformers, one unpadded prompt, eager attention, hidden states and attentions (memoized)."""
        key = tuple(ids)
        if grad or key not in self._fwd:
            ctx = torch.enable_grad() if grad else torch.inference_mode()
            with ctx:
                out = self.hf(input_ids=torch.tensor([ids], device=self.base.device), use_cache=False,
                              output_hidden_states=True, output_attentions=True)
            if grad:
                return out
            self._fwd[key] = out
        return self._fwd[key]

    def greedy(self, ids: list[int]) -> tuple[list[int], torch.Tensor]:
        """Reference greedy decoding (uncached argmax loop): new tokens and per-step logits ``[n_new, vocab]``."""
        key = tuple(ids)
        if key not in self._greedy:
            seq, steps = list(ids), []
            for _ in range(self.n_new):
                last = self.forward(seq).logits[0, -1]
                steps.append(last)
                seq.append(int(last.argmax()))
            self._greedy[key] = (seq[len(ids):], torch.stack(steps))
        return self._greedy[key]

    def lens(self, resid: torch.Tensor) -> torch.Tensor:
        """Logit lens of a residual ``[..., d]``: the model's final norm, then its unembedding (plain modules)."""
        a = self.base.adapter
        with torch.inference_mode():
            return a.unembedding(self.hf)(a.final_norm(self.hf)(resid))


def _rows(t: torch.Tensor, lengths: list[int], axes: tuple[int, ...] = (1,)) -> list[torch.Tensor]:
    """Row j of a left-padded ``[b, ...]`` tensor with only its last ``lengths[j]`` entries along ``axes``
    (axes counted in the batched tensor)."""
    out = []
    for j, n in enumerate(lengths):
        r = t[j]
        for ax in axes:
            r = r.narrow(ax - 1, r.shape[ax - 1] - n, n)
        out.append(r.detach().float().cpu())
    return out


def _final_norm(fam: Family, resid: torch.Tensor) -> torch.Tensor:
    """The model's final norm (the plain module) applied to a captured last-block residual."""
    with torch.inference_mode():
        return fam.base.adapter.final_norm(fam.hf)(resid.to(fam.base.device, fam.base.dtype)).float().cpu()


def _site(fam: Family) -> str:
    return f"blocks.{fam.layer}.resid_post"


# ---- the methodologies: (run on a handle for prompt indices) and (reference for one prompt) ---------------------
def _lens_outs(fam: Family, resids: list[torch.Tensor], final: torch.Tensor, logits: torch.Tensor) -> Out:
    """resid_post of every block ``[n, len, d]`` -> tensors (resid_post l < n - 1, final_norm, logits) and the lens
    logits of every layer stacked ``[n * len, vocab]``."""
    t = {f"blocks.{l}.resid_post": resids[l] for l in range(fam.n - 1)}
    t["final_norm"], t["logits"] = final, logits
    lens = torch.cat([fam.lens(r.to(fam.base.dtype)).float() for r in resids[:-1]] + [logits.float()])
    return Out(t, lens.cpu())


def run_logit_lens(fam, h, idx):
    ids = [fam.ids[i] for i in idx]
    with capture(h, ["blocks.*.resid_post", "final_norm", "logits"]) as c:
        h.run(ids)
    n = [len(r) for r in ids]
    per = [_rows(c[f"blocks.{l}.resid_post"], n) for l in range(fam.n)]
    finals, logits = _rows(c["final_norm"], n), _rows(c["logits"], n)
    outs = []
    for j in range(len(ids)):
        o = _lens_outs(fam, [per[l][j] for l in range(fam.n)], finals[j], logits[j])
        # the last block's resid_post is checked through the lens: final_norm(resid_post[n-1]) vs HF's last hidden
        o.tensors["final_norm(last resid_post)"] = _final_norm(fam, per[fam.n - 1][j])
        outs.append(o)
    return outs


def ref_logit_lens(fam, i):
    out = fam.forward(fam.ids[i])
    hid = [hs[0].float().cpu() for hs in out.hidden_states]
    t = {f"blocks.{l}.resid_post": hid[l + 1] for l in range(fam.n - 1)}
    t["final_norm"], t["logits"] = hid[fam.n], out.logits[0].float().cpu()
    t["final_norm(last resid_post)"] = hid[fam.n]
    lens = torch.cat([fam.lens(hid[l + 1].to(fam.base.dtype)).float() for l in range(fam.n - 1)]
                     + [out.logits[0].float()])
    return Out(t, lens.cpu())


def run_attention_pattern(fam, h, idx):
    ids = [fam.ids[i] for i in idx]
    site = f"blocks.{fam.layer}.attn.pattern"
    with capture(h, site) as c:
        h.run(ids, logits=False)
    return [Out({site: r}) for r in _rows(c[site], [len(r) for r in ids], axes=(2, 3))]


def ref_attention_pattern(fam, i):
    return Out({f"blocks.{fam.layer}.attn.pattern": fam.forward(fam.ids[i]).attentions[fam.layer][0].float().cpu()})


def _edit_logits(h, ids, edits, **kw) -> list[torch.Tensor]:
    with torch.inference_mode(), edit(h, edits, **kw):
        logits = h.run(ids).logits
    return _rows(logits, [len(r) for r in ids])


def run_steering(fam, h, idx):
    ids = [fam.ids[i] for i in idx]
    return [Out(logits=r) for r in _edit_logits(h, ids, {_site(fam): Add(fam.vector)})]


def _patched(fam, h, idx):
    ids, clean = [fam.ids[i] for i in idx], [fam.clean[i] for i in idx]
    with torch.inference_mode(), capture(h, _site(fam)) as src:
        h.run(clean, logits=False)
    return [Out(logits=r) for r in _edit_logits(h, ids, {_site(fam): Patch(src)}, positions=[-1])]


def run_ablation(fam, h, idx):
    ids = [fam.ids[i] for i in idx]
    return [Out(logits=r) for r in _edit_logits(h, ids, {f"blocks.{fam.layer}.attn.z": Zero()}, heads=[fam.head])]


def run_attribution(fam, h, idx):
    ids, clean = [fam.ids[i] for i in idx], [fam.clean[i] for i in idx]
    site = _site(fam)
    with torch.inference_mode(), capture(h, site) as cl:
        h.run(clean, logits=False)
    with capture(h, site, grad=True) as co:
        logits = h.run(ids).logits
        metric = (logits[:, -1, fam.answer] - logits[:, -1, fam.wrong]).sum()   # rows are independent
    corrupt = co[site]
    (g,) = torch.autograd.grad(metric, [corrupt])
    attr = ((cl[site].float() - corrupt.detach().float()) * g.float()).sum(-1)
    n = [len(r) for r in ids]
    return [Out({f"grad {site}": gr, "attribution": at}) for gr, at in zip(_rows(g, n), _rows(attr, n))]


def ref_attribution(fam, i):
    site = _site(fam)
    clean = fam.forward(fam.clean[i]).hidden_states[fam.layer + 1][0].float()
    out = fam.forward(fam.ids[i], grad=True)
    hs = out.hidden_states[fam.layer + 1]
    metric = out.logits[0, -1, fam.answer] - out.logits[0, -1, fam.wrong]
    (g,) = torch.autograd.grad(metric, [hs])
    g = g[0].float()
    attr = ((clean - hs[0].detach().float()) * g).sum(-1)
    return Out({f"grad {site}": g.cpu(), "attribution": attr.cpu()})


def run_generate_read(fam, h, idx):
    ids = [fam.ids[i] for i in idx]
    with capture(h, "blocks.*.resid_post") as c:
        out = h.generate(ids, max_new_tokens=fam.n_new)
    n = [len(r) + fam.n_new - 1 for r in ids]
    per = [_rows(c[f"blocks.{l}.resid_post"], n) for l in range(fam.n)]
    res = []
    for j in range(len(ids)):
        t = {f"blocks.{l}.resid_post": per[l][j] for l in range(fam.n - 1)}
        t["final_norm(last resid_post)"] = _final_norm(fam, per[fam.n - 1][j])
        res.append(Out(t, tokens=out.new_tokens[j].cpu()))
    return res


def ref_generate_read(fam, i):
    new, _ = fam.greedy(fam.ids[i])
    out = fam.forward(fam.ids[i] + new[:-1])
    hid = [hs[0].float().cpu() for hs in out.hidden_states]
    t = {f"blocks.{l}.resid_post": hid[l + 1] for l in range(fam.n - 1)}
    t["final_norm(last resid_post)"] = hid[fam.n]
    return Out(t, tokens=torch.tensor(new))


def _generate_edited(fam, h, ids, edits, **kw) -> list[Out]:
    with torch.inference_mode(), edit(h, edits, **kw), capture(h, "logits", positions="last") as c:
        out = h.generate(ids, max_new_tokens=fam.n_new)
    steps = c["logits"]                                  # [b, n_new, vocab]: one per forward
    return [Out(logits=steps[j].float().cpu(), tokens=out.new_tokens[j].cpu()) for j in range(len(ids))]


def run_generate_steering(fam, h, idx):
    return _generate_edited(fam, h, [fam.ids[i] for i in idx], {_site(fam): Add(fam.vector)})


def run_generate_patching(fam, h, idx):
    ids, clean = [fam.ids[i] for i in idx], [fam.clean[i] for i in idx]
    with torch.inference_mode(), capture(h, _site(fam)) as src:   # the clean prompt pass
        h.run(clean, logits=False)
    last = max(len(r) for r in ids) - 1                             # the last prompt column of the padded batch
    return _generate_edited(fam, h, ids, {_site(fam): Patch(src)}, positions=[last])


def _hf_reference(run: Callable) -> Callable:
    """The edit reference: the same method on the hf backend, one prompt, unpadded."""
    def ref(fam, i):
        return run(fam, fam.base, [i])[0]
    return ref


#: methodology -> (run(fam, handle, prompt indices) -> [Out per prompt], reference(fam, prompt index) -> Out)
METHODS: dict[str, tuple[Callable, Callable]] = {
    "logit_lens": (run_logit_lens, ref_logit_lens),
    "attention_pattern": (run_attention_pattern, ref_attention_pattern),
    "steering": (run_steering, _hf_reference(run_steering)),
    "activation_patching": (_patched, _hf_reference(_patched)),
    "ablation": (run_ablation, _hf_reference(run_ablation)),
    "attribution_patching": (run_attribution, ref_attribution),
    "generate_read": (run_generate_read, ref_generate_read),
    "generate_steering": (run_generate_steering, _hf_reference(run_generate_steering)),
    "generate_patching": (run_generate_patching, _hf_reference(run_generate_patching)),
}


EDITS = ("steering", "activation_patching", "ablation", "generate_steering", "generate_patching")


def edit_effect(fam: Family, methodology: str, ref: list[Out], idx: list[int]) -> float:
    """How much the reference edit changes the logits of the plain model (largest absolute change): an edit that
    did nothing would match its reference trivially, so the map reports this beside each edit row."""
    if methodology not in EDITS:
        return np.nan
    worst = 0.0
    for r, i in zip(ref, idx):
        plain = fam.greedy(fam.ids[i])[1] if methodology.startswith("generate") else fam.forward(fam.ids[i]).logits[0]
        n = min(len(plain), len(r.logits))
        worst = max(worst, float((r.logits[:n].float() - plain[:n].float().cpu()).abs().max()))
    return worst


# ---- grading ---------------------------------------------------------------------------------------------------
def compare(got: list[Out], ref: list[Out], atol: float, rtol: float = 0.0) -> dict:
    """Largest absolute difference over every tensor and logit (real positions), top-1 agreement, TV distance,
    token agreement; status SUPPORTED or SILENTLY_WRONG, and where the largest difference lies."""
    if len(got) != len(ref):
        return {"status": "SILENTLY_WRONG", "max_abs_diff": np.nan, "max_rel_diff": np.nan,
                "top1_agreement": np.nan, "tv_distance": np.nan,
                "message": f"returned {len(got)} prompts, expected {len(ref)}"}
    worst, where, notes, rel, worst_scale, within = 0.0, "", [], 0.0, 0.0, True
    top1, tv, tok = [], [], []
    for j, (g, r) in enumerate(zip(got, ref)):
        pairs = [(k, g.tensors.get(k), v) for k, v in r.tensors.items()]
        if r.logits is not None:
            pairs.append(("logits" if not r.tensors else "lens logits", g.logits, r.logits))
        for name, a, b in pairs:
            if a is None:
                notes.append(f"prompt {j}: {name} missing")
                worst = np.inf
                continue
            if a.shape != b.shape:
                notes.append(f"prompt {j}: {name} shape {tuple(a.shape)} != reference {tuple(b.shape)}")
                worst = np.inf
                continue
            d = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
            scale = float(b.float().abs().max()) if b.numel() else 0.0
            rel = max(rel, d / scale if scale > 0 else (0.0 if d == 0 else np.inf))
            if not (np.isfinite(d) and (d <= atol or d <= rtol * scale)):
                if within:
                    notes.append(f"outside the tolerance: prompt {j} {name} differs by {d:.3g} (largest entry "
                                 f"{scale:.3g})")
                within = False
            if not np.isfinite(d) or d > worst:
                worst, where, worst_scale = d, f"prompt {j} {name}", scale
        if r.logits is not None and g.logits is not None and g.logits.shape == r.logits.shape:
            top1.append((g.logits.argmax(-1) == r.logits.argmax(-1)).float().mean().item())
            p, q = torch.softmax(g.logits.double(), -1), torch.softmax(r.logits.double(), -1)
            tv.append(float(0.5 * (p - q).abs().sum(-1).max()))
        if r.tokens is not None:
            gt = g.tokens if g.tokens is not None else torch.empty(0, dtype=torch.long)
            same = (gt.cpu() == r.tokens.cpu()).float().mean().item() if gt.shape == r.tokens.shape else 0.0
            tok.append(same)
            if same < 1:
                notes.append(f"prompt {j}: generated {gt.tolist()}, reference {r.tokens.tolist()}")
    ok = np.isfinite(worst) and within and all(t == 1 for t in tok) and all(t == 1 for t in top1)
    if not ok and where:
        notes.insert(0, f"largest difference {worst:.3g} at {where} (whose largest entry is {worst_scale:.3g})")
    return {"status": "SUPPORTED" if ok else "SILENTLY_WRONG", "max_abs_diff": worst, "max_rel_diff": rel,
            "top1_agreement": float(np.mean(tok)) if tok else (float(np.mean(top1)) if top1 else np.nan),
            "tv_distance": float(max(tv)) if tv else np.nan, "message": "; ".join(notes)}


def cell_workloads(methodology: str) -> tuple[str, ...]:
    """The workloads a methodology runs on (the others are N/A)."""
    return ("generate",) if METHODOLOGIES[methodology][1] else ("prompt", "batch")


def map_family(handle, config: ApplicabilityConfig, progress: bool = False) -> pd.DataFrame:
    """Every cell of one family: one row per (methodology, workload, backend)."""
    before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _map_family(handle, config, progress)
    finally:
        torch.set_num_threads(before)


def _map_family(handle, config: ApplicabilityConfig, progress: bool) -> pd.DataFrame:
    fam = Family(handle, config)
    handles, refs = {}, {}
    rows = []
    for backend in config.backends:
        t0 = time.perf_counter()
        try:
            handles[backend] = fam.base if backend == "hf" else fam.base.with_backend(backend)
        except Exception as exc:  # a backend that cannot wrap this architecture: every cell is an ERROR
            handles[backend] = exc
        build = time.perf_counter() - t0
        if progress:
            print(f"  {fam.spec}: backend {backend} ready ({build:.1f} s)", flush=True)
    for m, (runner, reference) in METHODS.items():
        for workload in WORKLOADS:
            base = {"family": fam.spec, "methodology": m, "label": METHODOLOGIES[m][0], "workload": workload}
            if workload not in cell_workloads(m):
                for backend in config.backends:
                    rows.append(base | {"backend": backend, "status": "N/A", "max_abs_diff": np.nan,
                                        "max_rel_diff": np.nan,
                                        "top1_agreement": np.nan, "tv_distance": np.nan, "seconds": np.nan,
                                        "error_type": "", "message": "", "edit_effect": np.nan})
                continue
            idx = [0] if workload == "prompt" else list(range(len(fam.ids)))
            ref = [refs[(m, i)] if (m, i) in refs else refs.setdefault((m, i), reference(fam, i)) for i in idx]
            effect = edit_effect(fam, m, ref, idx)
            for backend in config.backends:
                h = handles[backend]
                t0 = time.perf_counter()
                try:
                    if isinstance(h, Exception):
                        raise h
                    got = runner(fam, h, idx)
                    secs = time.perf_counter() - t0
                    row = compare(got, ref, config.atol, config.rtol) | {"seconds": secs, "error_type": ""}
                except Exception as exc:
                    secs = time.perf_counter() - t0
                    row = {"status": "ERROR", "max_abs_diff": np.nan, "max_rel_diff": np.nan,
                           "top1_agreement": np.nan,
                           "tv_distance": np.nan, "seconds": secs, "error_type": type(exc).__name__,
                           "message": " ".join(f"{type(exc).__name__}: {exc}".split())}
                rows.append(base | {"backend": backend} | row | {"edit_effect": effect})
                if progress:
                    print(f"  {fam.spec:>24} {m:>22} {workload:>8} {backend:>16}: {row['status']} "
                          f"{row['max_abs_diff']:.2g} ({secs:.2f} s)", flush=True)
    return pd.DataFrame(rows)


# ---- the result --------------------------------------------------------------------------------------------------
def cell_text(row) -> str:
    """``SUPPORTED 3e-07 (0.4 s)``, ``ERROR (0.1 s)``, ``N/A``."""
    if row["status"] == "N/A":
        return "N/A"
    diff = "" if pd.isna(row["max_abs_diff"]) else f" {row['max_abs_diff']:.1g}"
    return f"{row['status']}{diff} ({row['seconds']:.2f} s)"


def family_map(cells: pd.DataFrame, family: str, text: Callable = cell_text) -> pd.DataFrame:
    """One family's map: rows methodology x workload, columns backends, cells ``text(row)``."""
    c = cells[cells["family"] == family]
    backends = list(dict.fromkeys(c["backend"]))
    out = []
    for (m, w), g in c.groupby(["methodology", "workload"], sort=False):
        if (g["status"] == "N/A").all():
            continue
        by = {r["backend"]: text(r) for _, r in g.iterrows()}
        out.append({"methodology": METHODOLOGIES.get(m, (m,))[0], "workload": w} | {b: by.get(b, "") for b in backends})
    return pd.DataFrame(out)


def counts(cells: pd.DataFrame) -> pd.DataFrame:
    """Cells per status per family."""
    t = cells.groupby(["family", "status"]).size().unstack(fill_value=0)
    return t.reindex(columns=[s for s in STATUSES if s in t.columns] or list(t.columns), fill_value=0).reset_index()


@dataclass
class Result(StudyResult):
    """Table ``cells``: one row per (family, methodology, workload, backend) with status, max_abs_diff,
    max_rel_diff (each tensor's difference over its largest reference entry; graded with rtol), top1_agreement,
    tv_distance, seconds, error_type, message and edit_effect (edits: the largest change of the
    reference's logits from the unedited model's, so a do-nothing edit would show)."""

    STUDY: ClassVar[str] = STUDY
    CONFIG: ClassVar[type] = ApplicabilityConfig

    @property
    def cells(self) -> pd.DataFrame:
        return self.tables["cells"]

    def figures(self) -> dict:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap

        cells = self.cells
        fams = list(dict.fromkeys(cells["family"]))
        colors = {"SUPPORTED": "#4caf50", "ERROR": "#ff9800", "SILENTLY_WRONG": "#e53935", "N/A": "#d0d0d0"}
        code = {s: i for i, s in enumerate(colors)}
        fig, axes = plt.subplots(1, len(fams), figsize=(4.2 * len(fams), 5.2), squeeze=False)
        for ax, fam in zip(axes[0], fams):
            grid = family_map(cells, fam, text=lambda r: r["status"])
            labels = [f"{m} / {w}" for m, w in zip(grid["methodology"], grid["workload"])]
            backends = list(grid.columns[2:])
            vals = np.array([[code.get(v, 3) for v in grid[b]] for b in backends]).T
            ax.imshow(vals, cmap=ListedColormap(list(colors.values())), vmin=0, vmax=len(colors) - 1, aspect="auto")
            ax.set_xticks(range(len(backends)), backends, rotation=30, ha="right", fontsize=8)
            ax.set_yticks(range(len(labels)), labels if ax is axes[0][0] else [""] * len(labels), fontsize=8)
            for (y, x), v in np.ndenumerate(vals):
                ax.text(x, y, list(colors)[v].replace("SILENTLY_WRONG", "WRONG")[:9], ha="center", va="center",
                        fontsize=6)
            ax.set_title(fam, fontsize=9)
        fig.suptitle("applicability: status per cell", fontsize=10)
        fig.tight_layout()
        return {"applicability": fig}

    def report(self) -> str:
        cells, s = self.cells, self.summary
        lines = ["# Applicability map", "",
                 f"Backends {', '.join(s.get('backends', []))}; tolerance {s.get('atol')} absolute or {s.get('rtol')} of each "
                 "tensor's largest entry (fp32, real positions); "
                 f"attention {s.get('attention')}; versions: "
                 + ", ".join(f"{k} {v}" for k, v in s.get("versions", {}).items()) + ".", "",
                 "Cells per status:", "", markdown_table(counts(cells)), ""]
        for fam in dict.fromkeys(cells["family"]):
            lines += [f"## {fam}", "", markdown_table(family_map(cells, fam)), ""]
        bad = cells[cells["status"].isin(["ERROR", "SILENTLY_WRONG"])]
        if len(bad):
            lines += ["## ERROR and SILENTLY_WRONG cells", "",
                      markdown_table(bad[["family", "methodology", "workload", "backend", "status", "max_abs_diff",
                                          "max_rel_diff", "top1_agreement", "tv_distance", "message"]],
                                     floatfmt=".2g"), ""]
        lines += ["![applicability](applicability.png)", ""]
        return "\n".join(lines)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "transformer-lens", "nnsight"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def run(config: ApplicabilityConfig, handle=None, progress: bool = True) -> Result:
    """Map every family of ``config.models`` (``handle``, if given, stands for the first of them)."""
    frames = []
    for i, spec in enumerate(config.models):
        own = not (i == 0 and handle is not None)
        h = config.load(spec) if own else handle
        try:
            with torch.random.fork_rng():
                frames.append(map_family(h, config, progress=progress))
        finally:
            if own:
                h.unload()
    cells = pd.concat(frames, ignore_index=True)
    summary = {"models": list(config.models), "backends": list(config.backends), "atol": config.atol,
               "rtol": config.rtol,
               "attention": config.attention, "date": time.strftime("%Y-%m-%d"), "versions": versions(),
               "counts": {f: dict(g["status"].value_counts()) for f, g in cells.groupby("family")}}
    summary["counts"] = {f: {k: int(v) for k, v in c.items()} for f, c in summary["counts"].items()}
    return Result(config, summary, {"cells": cells})
