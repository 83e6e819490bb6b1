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
from typing import Sequence

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
#: The axes of each site kind's captured tensor (the table above as code): size names are keys of the architecture
#: adapter's ``describe()``; ``batch``, ``pos``, ``q`` (query positions) and ``k`` (key positions) depend on the input.
SITE_AXES = {"embed": ("batch", "pos", "d_model"), "resid_pre": ("batch", "pos", "d_model"),
             "attn.q": ("batch", "n_heads", "pos", "head_dim"), "attn.k": ("batch", "n_kv_heads", "pos", "head_dim"),
             "attn.v": ("batch", "n_kv_heads", "pos", "head_dim"), "attn.z": ("batch", "n_heads", "pos", "head_dim"),
             "attn.scores": ("batch", "n_heads", "q", "k"), "attn.pattern": ("batch", "n_heads", "q", "k"),
             "attn.out": ("batch", "pos", "d_model"), "resid_mid": ("batch", "pos", "d_model"),
             "mlp.pre": ("batch", "pos", "d_mlp"), "mlp.post": ("batch", "pos", "d_mlp"),
             "mlp.out": ("batch", "pos", "d_model"), "resid_post": ("batch", "pos", "d_model"),
             "final_norm": ("batch", "pos", "d_model"), "logits": ("batch", "pos", "d_vocab")}
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


class UnknownSiteError(KeyError, ValueError):
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


def parse_layers(spec: str | int | Sequence[int], n_layers: int, what: str = "layers") -> list[int]:
    """The one layer-list parser: ``3``, ``"3,5-7"``, ``"-1"`` (last block), ``"*"``, ``"2--1"`` or a list of ints
    -> sorted unique block indices in ``0..n_layers-1`` (never an empty list).

    Layers are **block indices** everywhere in hiddenlens: layer ``l`` is block ``l``, whose output is
    ``blocks.{l}.resid_post``; the embedding is the site ``embed``, never a layer number. Negative indices count
    from the end (``-1`` = the last block). A reversed range (``"7-3"``), an empty list and anything that selects no
    block are errors, as is any layer outside the model; the message names ``what`` (e.g. the CLI option) and the
    valid range.
    """
    if n_layers < 1:
        raise ValueError(f"{what}: this model has no blocks, so {spec!r} selects no layer")
    parts = _layer_parts(spec, what)
    if parts == ["*"]:
        return list(range(n_layers))
    layers: set[int] = set()
    for part in parts:
        m = re.fullmatch(r"(-?[0-9]+)(?:-(-?[0-9]+))?", part)
        if not m:
            raise ValueError(f"{what}: cannot read {part!r} in {spec!r}: use an index, '*', a range 'a-b' or a "
                             "list 'a,b,c'")
        low, high = (_block_index(g, spec, n_layers, what) for g in (m.group(1), m.group(2) or m.group(1)))
        if high < low:
            raise ValueError(f"{what}: the range {part!r} in {spec!r} is reversed; write it low-high, e.g. "
                             f"'{high}-{low}'")
        layers.update(range(low, high + 1))
    return sorted(layers)


def _layer_parts(spec, what: str) -> list[str]:
    """The comma-separated pieces of a layer spec (``["*"]`` for every block); raises on an empty piece."""
    if isinstance(spec, bool) or not isinstance(spec, (int, str, list, tuple, range)):
        raise ValueError(f"{what}: {spec!r} is not a layer; use an index, a range 'a-b' or a list 'a,b,c'")
    if isinstance(spec, int):
        return [str(spec)]
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",")]
    else:
        if any(isinstance(x, bool) or not isinstance(x, int) for x in spec):
            raise ValueError(f"{what}: {spec!r}: a list of layers holds block indices (ints)")
        parts = [str(x) for x in spec]
    if not parts or any(p == "" for p in parts):
        raise ValueError(f"{what}: no layers in {spec!r}; use an index, '*', a range 'a-b' or a list 'a,b,c'")
    return parts


def _block_index(text: str, spec, n_layers: int, what: str) -> int:
    """One index of a layer spec -> a block index in ``0..n_layers-1`` (negative ones count from the end)."""
    i = int(text)
    j = i + n_layers if i < 0 else i
    if not 0 <= j < n_layers:
        raise ValueError(f"{what}: layer {i} in {spec!r} is out of range: this model has {n_layers} blocks "
                         f"(valid layers 0..{n_layers - 1}, or -{n_layers}..-1 from the end)")
    return j


def parse_site(name: str) -> Site:
    """One exact site name (no globs or ranges; TransformerLens aliases accepted) -> :class:`Site`, without a
    model: ``blocks.12.resid_post`` -> ``Site(12, "resid_post")``. Checks the layer range only when it is resolved
    against a model (:func:`resolve_sites`)."""
    if not isinstance(name, str):
        raise TypeError(f"site names are strings such as 'blocks.3.resid_post', not {type(name).__name__}")
    kind = _canonical_kind(name.strip())
    if kind in GLOBAL_SITES:
        return Site(None, kind)
    m = re.fullmatch(r"blocks\.([0-9]+)\.(.+)", name.strip())
    if m and _canonical_kind(m.group(2)) in BLOCK_SITES:
        return Site(int(m.group(1)), _canonical_kind(m.group(2)))
    raise UnknownSiteError(f"{name!r} is not one site name; use e.g. 'embed', 'blocks.3.resid_post', "
                           f"'blocks.3.attn.z' (kinds: {', '.join(GLOBAL_SITES + BLOCK_SITES)})")


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
        if not isinstance(raw, str):
            raise UnknownSiteError(f"site names are strings such as 'blocks.3.resid_post', not {raw!r}")
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
                try:
                    layers = parse_layers(m.group(1), n_layers, what=f"site {name!r}")
                except ValueError as exc:
                    raise UnknownSiteError(str(exc)) from None
                out.update(Site(i, kind) for i in layers)
                continue
        valid = all_site_names(n_layers)
        close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
        kinds = ", ".join(GLOBAL_SITES + BLOCK_SITES)
        hint = f"closest valid names: {', '.join(close)}" if close else f"valid kinds: {kinds}"
        raise UnknownSiteError(f"unknown site {name!r}; {hint}. Patterns like 'blocks.*.resid_post' and "
                               "'blocks.3-7.attn.pattern' are accepted; `hiddenlens info MODEL` lists every site.")
    return sorted(out, key=forward_key)


_ORDER = {k: j for j, k in enumerate(BLOCK_SITES)}


def forward_key(site: Site) -> tuple[float, int]:
    """Sort key of a site in forward order (``embed`` first, ``logits`` last)."""
    if site.kind == "embed":
        return (-1, 0)
    if site.layer is None:
        return (float("inf"), 0 if site.kind == "final_norm" else 1)
    return (site.layer, _ORDER[site.kind])


def residual_sites(n_blocks: int, include_embed: bool = True) -> list[str]:
    """The residual stream in forward order: ``embed`` (optional), then ``blocks.{l}.resid_post`` for
    ``l < n_blocks``: the depth axis of the lens and dynamics analyses, addressed by site name."""
    return (["embed"] if include_embed else []) + [f"blocks.{l}.resid_post" for l in range(n_blocks)]


def block_of(site: str) -> int | None:
    """The block index of a site name (None for ``embed``, ``final_norm``, ``logits``)."""
    return parse_site(site).layer
