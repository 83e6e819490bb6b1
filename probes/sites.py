"""Site names: one scheme for every backend.

A *site* names one tensor inside the model::

    embed                              [batch, pos, d_model]   input to block 0 (== HF hidden_states[0])
    blocks.{i}.resid_pre               [batch, pos, d_model]   input to block i
    blocks.{i}.attn.q                  [batch, n_heads, pos, head_dim]     query projection, before RoPE
    blocks.{i}.attn.k | attn.v         [batch, n_kv_heads, pos, head_dim]  key / value projection (GQA: per KV head)
    blocks.{i}.attn.z                  [batch, n_heads, pos, head_dim]     per-head attention output, before W_O
    blocks.{i}.attn.scores             [batch, n_heads, q_pos, k_pos]      pre-softmax logits, mask added
    blocks.{i}.attn.pattern            [batch, n_heads, q_pos, k_pos]      softmax attention weights
    blocks.{i}.attn.out                [batch, pos, d_model]   attention sub-block output (what the residual adds)
    blocks.{i}.resid_mid               [batch, pos, d_model]   resid_pre + attn.out (sequential-residual models)
    blocks.{i}.mlp.pre                 [batch, pos, d_mlp]     MLP pre-activation (gate projection for GLU MLPs)
    blocks.{i}.mlp.post                [batch, pos, d_mlp]     MLP hidden after the activation (input to W_out)
    blocks.{i}.mlp.out                 [batch, pos, d_model]   MLP sub-block output
    blocks.{i}.resid_post              [batch, pos, d_model]   output of block i (pre final norm, also for the last block)
    final_norm                         [batch, pos, d_model]   output of the final norm (== HF hidden_states[-1])
    logits                             [batch, pos, d_vocab]

Patterns: ``blocks.*.resid_post`` (every layer), ``blocks.3-7.attn.pattern`` (inclusive range),
``blocks.0,4,8.mlp.out`` (a list), and TransformerLens names (``blocks.5.hook_resid_post``,
``blocks.5.attn.hook_pattern``, ``hook_embed``, ``ln_final.hook_normalized``) as aliases.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

GLOBAL_SITES = ("embed", "final_norm", "logits")
BLOCK_SITES = (
    "resid_pre",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.z",
    "attn.scores",
    "attn.pattern",
    "attn.out",
    "resid_mid",
    "mlp.pre",
    "mlp.post",
    "mlp.out",
    "resid_post",
)
#: Sites whose tensors are laid out ``[batch, head, pos, ...]``.
HEAD_SITES = frozenset({"attn.q", "attn.k", "attn.v", "attn.z", "attn.scores", "attn.pattern"})
#: Sites that need the (per-layer) eager attention path.
ATTENTION_WEIGHT_SITES = frozenset({"attn.scores", "attn.pattern"})

_TL_ALIASES = {
    "hook_embed": "embed",
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn.out",
    "hook_mlp_out": "mlp.out",
    "attn.hook_q": "attn.q",
    "attn.hook_k": "attn.k",
    "attn.hook_v": "attn.v",
    "attn.hook_z": "attn.z",
    "attn.hook_attn_scores": "attn.scores",
    "attn.hook_pattern": "attn.pattern",
    "mlp.hook_pre": "mlp.pre",
    "mlp.hook_post": "mlp.post",
    "ln_final.hook_normalized": "final_norm",
    "unembed": "logits",
    "hook_logits": "logits",
}


class UnknownSiteError(KeyError):
    """A site name that matches no capturable tensor of this model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True, order=True)
class Site:
    """A parsed site: ``layer`` is None for global sites (embed, final_norm, logits)."""

    layer: int | None
    kind: str

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"blocks.{self.layer}.{self.kind}"

    @property
    def per_head(self) -> bool:
        return self.kind in HEAD_SITES

    def __str__(self) -> str:
        return self.name


def all_site_names(n_layers: int) -> list[str]:
    """Every capturable site of a model with ``n_layers`` blocks, in forward order."""
    names = ["embed"]
    for i in range(n_layers):
        names += [f"blocks.{i}.{k}" for k in BLOCK_SITES]
    return names + ["final_norm", "logits"]


def _canonical_kind(kind: str) -> str:
    return _TL_ALIASES.get(kind, kind)


def _parse_layers(spec: str, n_layers: int, original: str) -> list[int]:
    if spec == "*":
        return list(range(n_layers))
    layers: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part.strip())
        if not m:
            raise UnknownSiteError(f"cannot read the layer part {spec!r} of site {original!r}: use an index, "
                                   "'*', a range 'a-b' or a list 'a,b,c'")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        for i in range(lo, hi + 1):
            j = i + n_layers if i < 0 else i
            if not 0 <= j < n_layers:
                raise UnknownSiteError(f"layer {i} in site {original!r} is out of range: this model has "
                                       f"{n_layers} blocks (valid layers 0-{n_layers - 1})")
            layers.append(j)
    return layers


def resolve_sites(patterns: str | list[str] | tuple[str, ...], n_layers: int,
                  unavailable: dict[str, str] | None = None) -> list[Site]:
    """Expand names, globs, ranges and TransformerLens aliases into a sorted list of unique sites.

    ``unavailable`` maps a block kind (e.g. ``"resid_mid"``) to the reason this architecture lacks it.
    Raises :class:`UnknownSiteError` naming the closest valid names for anything that matches nothing.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ValueError("no sites requested: pass at least one site name, e.g. 'blocks.*.resid_post'")
    unavailable = unavailable or {}
    out: set[Site] = set()
    for raw in patterns:
        name = raw.strip()
        kind = _canonical_kind(name)
        if kind in GLOBAL_SITES:
            out.add(Site(None, kind))
            continue
        m = re.fullmatch(r"blocks\.([^.]+)\.(.+)", name)
        if m:
            kind = _canonical_kind(m.group(2))
            if kind in BLOCK_SITES:
                if kind in unavailable:
                    raise UnknownSiteError(f"site {name!r} does not exist in this architecture: "
                                           f"{unavailable[kind]}")
                out.update(Site(i, kind) for i in _parse_layers(m.group(1), n_layers, name))
                continue
        valid = all_site_names(n_layers)
        close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
        hint = f"closest valid names: {', '.join(close)}" if close else f"valid kinds: {', '.join(GLOBAL_SITES + BLOCK_SITES)}"
        raise UnknownSiteError(f"unknown site {name!r}; {hint}. Patterns like 'blocks.*.resid_post' and "
                               "'blocks.3-7.attn.pattern' are accepted; `hiddenlens info MODEL` lists every site.")
    order = {k: j for j, k in enumerate(BLOCK_SITES)}

    def key(s: Site) -> tuple[int, int]:
        if s.kind == "embed":
            return (-1, 0)
        if s.layer is None:
            return (n_layers, 0 if s.kind == "final_norm" else 1)
        return (s.layer, order[s.kind])

    return sorted(out, key=key)
