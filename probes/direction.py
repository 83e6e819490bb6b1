"""``Direction``: a unit vector at one site (plus head), the object steering adds and detectors project on.

A direction is addressed like every other tensor in hiddenlens: by its site name (``blocks.12.resid_post``) and,
for per-head sites, a ``head``. Files are a ``.safetensors`` (the vectors) + ``.json`` (everything else) pair with
a ``format`` field; version 1 files (``layer`` + site kind, written before the site-name convention) still load.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hiddenlens.common.files import atomic_path, write_json

from .sites import HEAD_SITES, Site, parse_site

#: version of the JSON side of a direction file
FORMAT = 2
_META = ("sigma", "site", "head", "method", "model", "data_hash", "metrics")


@dataclass(repr=False)
class Direction:
    """A direction at ``site`` (``head`` set for per-head sites such as ``attn.z``).

    ``vector``: unit ``[d]`` (d = d_model, or head_dim on a head); ``sigma``: std of the projections ``h . vector``
    over the data it was fitted on (units of h), so ``alpha * sigma * vector`` moves h by ``alpha`` std;
    ``detector = (a, b)``: ``p_true = sigmoid(a * (h . vector) + b)``.
    """

    vector: torch.Tensor
    sigma: float
    site: str
    head: int | None = None
    method: str = "mass_mean"
    model: str = ""
    data_hash: str = ""
    detector: tuple[float, float] = (1.0, 0.0)
    metrics: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        parsed = parse_site(self.site)
        self.site = parsed.name
        if (self.head is not None) != (parsed.kind in HEAD_SITES):
            raise ValueError(f"direction at {self.site}: head={self.head} ("
                             + ("per-head sites need a head" if parsed.kind in HEAD_SITES
                                else "only per-head sites take a head") + ")")

    @property
    def parsed(self) -> Site:
        return parse_site(self.site)

    @property
    def layer(self) -> int | None:
        """Block index of the site (None for global sites such as ``embed``)."""
        return self.parsed.layer

    @property
    def name(self) -> str:
        where = f"L{self.layer}" + (f"H{self.head}" if self.head is not None else "")
        return f"{self.method}@{where}"

    def __repr__(self) -> str:
        head = f"[head {self.head}]" if self.head is not None else ""
        return (f"Direction({self.method} at {self.site}{head}, d={self.vector.numel()}, sigma={self.sigma:.4g}, "
                f"model={self.model!r})")

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """``h . vector`` over the last axis (``[..., d]`` -> ``[...]``)."""
        if h.shape[-1] != self.vector.numel():
            raise ValueError(f"activation width {h.shape[-1]} does not match direction width {self.vector.numel()}")
        return h.float() @ self.vector.float().to(h.device)

    def p_true(self, h: torch.Tensor) -> torch.Tensor:
        a, b = self.detector
        return torch.sigmoid(a * self.project(h) + b)

    def meta(self) -> dict:
        return {k: getattr(self, k) for k in _META} | {"detector": list(self.detector)}

    def save(self, path: str | Path) -> Path:
        """Write ``path.safetensors`` + ``path.json`` (a one-direction file); returns the stem."""
        return save_directions([self], path)

    @classmethod
    def load(cls, path: str | Path) -> "Direction":
        """Read a file holding exactly one direction (``path`` with or without suffix)."""
        found = load_directions(path)
        if len(found) != 1:
            raise ValueError(f"{path} holds {len(found)} directions; use load_directions")
        return found[0]


def _stem(path: str | Path) -> Path:
    return Path(str(path).removesuffix(".safetensors").removesuffix(".json"))


def save_directions(directions: list[Direction], path: str | Path) -> Path:
    """Several directions (e.g. ITI's top-K heads) in one ``.safetensors`` + ``.json`` pair; returns the stem."""
    stem = _stem(path)
    with atomic_path(stem.with_suffix(".safetensors")) as tmp:
        save_file({f"vector.{i}": d.vector.detach().float().cpu().contiguous() for i, d in enumerate(directions)},
                  str(tmp))
    write_json(stem.with_suffix(".json"), {"format": FORMAT, "directions": [d.meta() for d in directions]})
    return stem


def _from_v1(meta: dict) -> dict:
    """Version-1 metadata (``layer`` + site kind ``resid_post`` / ``attn.z``) -> current fields."""
    meta = dict(meta)
    layer, kind = meta.pop("layer"), meta.get("site", "resid_post")
    meta["site"] = f"blocks.{layer}.{kind}"
    return meta


def load_directions(path: str | Path) -> list[Direction]:
    """Read a direction file (current or version-1 format); always returns a list."""
    stem = _stem(path)
    for p in (stem.with_suffix(".safetensors"), stem.with_suffix(".json")):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: a direction is a .safetensors + .json pair (write one with "
                                    "`hiddenlens truth directions`)")
    meta = json.loads(stem.with_suffix(".json").read_text())
    vecs = load_file(str(stem.with_suffix(".safetensors")))
    version = meta.get("format", 1)
    if version > FORMAT:
        raise ValueError(f"{stem}.json has direction format {version}; this hiddenlens reads up to {FORMAT}: upgrade")
    if version == 1:  # single ({..., "layer"}) or multi ({"directions": [...]}) files, keys vector / vector.i
        metas = meta["directions"] if "directions" in meta else [meta]
        metas = [_from_v1(m) for m in metas]
        keys = [f"vector.{i}" for i in range(len(metas))] if "directions" in meta else ["vector"]
    else:
        metas, keys = meta["directions"], [f"vector.{i}" for i in range(len(meta["directions"]))]
    return [Direction(vector=vecs[k], **(m | {"detector": tuple(m["detector"])})) for k, m in zip(keys, metas)]
