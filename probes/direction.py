"""``Direction``: a unit vector at one site (plus head), the object steering adds and detectors project on.

A direction is addressed like every other tensor in hiddenlens: by its site name (``blocks.12.resid_post``) and,
for per-head sites, a ``head``. Files are a ``.safetensors`` (the vectors) + ``.json`` (everything else) pair with
a ``format`` field; version 1 files (``layer`` + site kind, written before the site-name convention) still load.
The ``.json`` records the sha256 of the ``.safetensors`` it was written with, so a pair whose halves come from two
different saves (a write interrupted between the two files) is refused; files without it (older saves) still load.

Every field is checked at construction and at load: the vector must be a finite, non-zero floating-point ``[d]``
tensor (it is normalised to unit norm: its length is discarded, only its direction is kept), ``sigma`` a finite
number > 0, the detector's ``(a, b)`` finite.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hiddenlens.common.errors import DamagedFileError, NonFiniteError, UserError
from hiddenlens.common.files import atomic_path, file_sha256, write_json

from .sites import HEAD_SITES, Site, parse_site

#: version of the JSON side of a direction file
FORMAT = 2
_META = ("sigma", "site", "head", "method", "model", "data_hash", "metrics")
#: fields every direction entry of a file must have (version 1 names the block by ``layer`` instead of ``site``)
_REQUIRED = {1: ("sigma", "layer", "head", "detector"), 2: ("sigma", "site", "head", "detector")}
_ALLOWED = {1: {*_META, "detector", "layer"}, 2: {*_META, "detector"}}
_TOP = {"format", "safetensors_sha256", "directions"}
#: a vector this close to unit norm is kept as it is (normalising again would only move its last bits)
_UNIT_TOL = 1e-6


class DirectionError(UserError, ValueError):
    """A direction that cannot be used: a zero or non-floating vector, sigma <= 0, a head where none belongs."""


def unit_vector(vector, where: str) -> torch.Tensor:
    """Check ``vector`` (finite, non-zero, floating, ``[d]``) and return it as a float32 unit vector ``[d]``."""
    if not isinstance(vector, torch.Tensor):
        raise DirectionError(f"{where}: vector must be a torch tensor, not {type(vector).__name__}")
    if not vector.is_floating_point():
        raise DirectionError(f"{where}: vector dtype {vector.dtype} is not floating point; a direction is a float "
                             "tensor (convert with vector.float())")
    if vector.ndim != 1:
        raise DirectionError(f"{where}: vector has shape {tuple(vector.shape)}; a direction is one vector [d]")
    bad = int((~torch.isfinite(vector)).sum())
    if bad:
        raise NonFiniteError(f"{where}: vector holds NaN/Inf in {bad} of {vector.numel()} entries; refit the "
                             "direction")
    v = vector.detach().to(torch.float64)
    norm = float(v.norm())
    if norm == 0.0:
        raise DirectionError(f"{where}: vector is all zeros, so it has no direction and steering would add "
                             "nothing; pass a non-zero vector")
    if abs(norm - 1.0) <= _UNIT_TOL:
        return vector.detach().float().contiguous()
    return (v / norm).float().contiguous()


def _real(value, name: str, where: str) -> float:
    """``value`` as a finite float (a bool, a string or a NaN/Inf is an error)."""
    if isinstance(value, (bool, str, bytes)):
        raise DirectionError(f"{where}: {name}={value!r} is not a number")
    try:
        out = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise DirectionError(f"{where}: {name}={value!r} is not a number") from None
    if not math.isfinite(out):
        raise NonFiniteError(f"{where}: {name}={out} is not finite; refit the direction")
    return out


def _sigma(value, where: str) -> float:
    sigma = _real(value, "sigma", where)
    if sigma <= 0:
        raise DirectionError(f"{where}: sigma={sigma} must be > 0 (the std of the projections, in units of h): "
                             + ("sigma 0 would edit nothing" if sigma == 0 else
                                "a negative sigma would flip the direction; negate alpha to steer the other way"))
    return sigma


def _detector(value, where: str) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise DirectionError(f"{where}: detector={value!r} must be a pair (a, b): p_true = sigmoid(a * (h . u) + b)")
    return _real(value[0], "detector a", where), _real(value[1], "detector b", where)


@dataclass(repr=False)
class Direction:
    """A direction at ``site`` (``head`` set for per-head sites such as ``attn.z``).

    ``vector``: unit ``[d]`` float32 (d = d_model, or head_dim on a head; any non-zero vector given is normalised,
    its length is not kept); ``sigma`` (> 0): std of the projections ``h . vector`` over the data it was fitted
    on (units of h), so ``alpha * sigma * vector`` moves h by ``alpha`` std and has norm ``|alpha| * sigma``;
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
        where = f"direction at {self.site}"
        if self.head is not None:
            if isinstance(self.head, bool) or not isinstance(self.head, numbers.Integral) or self.head < 0:
                raise DirectionError(f"{where}: head={self.head!r} must be a head index >= 0")
            self.head = int(self.head)
        if (self.head is not None) != (parsed.kind in HEAD_SITES):
            raise DirectionError(f"{where}: head={self.head} ("
                                 + ("per-head sites need a head" if parsed.kind in HEAD_SITES
                                    else "only per-head sites take a head") + ")")
        self.vector = unit_vector(self.vector, where)
        self.sigma = _sigma(self.sigma, where)
        self.detector = _detector(self.detector, where)

    def check(self) -> None:
        """Repeat the construction checks (fields may have been reassigned or edited in place since)."""
        where = f"{self.name} at {self.site}"
        if not torch.equal(unit_vector(self.vector, where), self.vector.detach().float()):
            raise DirectionError(f"{where}: vector no longer has unit norm (changed after construction?); build a "
                                 "new Direction, which normalises it")
        _sigma(self.sigma, where)
        _detector(self.detector, where)

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
            raise DirectionError(f"{path} holds {len(found)} directions; use load_directions")
        return found[0]


def _stem(path: str | Path) -> Path:
    return Path(str(path).removesuffix(".safetensors").removesuffix(".json"))


def _pair(stem: Path) -> tuple[Path, Path]:
    """``(stem.safetensors, stem.json)``; a dot inside the stem's name is kept (unlike ``with_suffix``)."""
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_directions(directions: list[Direction], path: str | Path) -> Path:
    """Several directions (e.g. ITI's top-K heads) in one ``.safetensors`` + ``.json`` pair; returns the stem.

    The ``.safetensors`` is written first, then the ``.json`` with its sha256 (each file atomically)."""
    if not directions:
        raise DirectionError(f"nothing to save to {path}: no directions given")
    for d in directions:
        d.check()
    stem = _stem(path)
    tensors, meta = _pair(stem)
    with atomic_path(tensors) as tmp:
        save_file({f"vector.{i}": d.vector.detach().float().cpu().contiguous() for i, d in enumerate(directions)},
                  str(tmp))
        digest = file_sha256(tmp)
    write_json(meta, {"format": FORMAT, "safetensors_sha256": digest, "directions": [d.meta() for d in directions]})
    return stem


def _from_v1(meta: dict) -> dict:
    """Version-1 metadata (``layer`` + site kind ``resid_post`` / ``attn.z``) -> current fields."""
    meta = dict(meta)
    layer, kind = meta.pop("layer"), meta.get("site", "resid_post")
    meta["site"] = f"blocks.{layer}.{kind}"
    return meta


def _read_meta(path: Path) -> dict:
    """The JSON half of a direction file, as a dict (a file that is not one raises DamagedFileError)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DamagedFileError(f"{path} is not a hiddenlens direction file or is damaged: invalid JSON at line "
                               f"{exc.lineno} ({exc.msg}); rewrite it with `hiddenlens truth directions`") from None
    except UnicodeDecodeError:
        raise DamagedFileError(f"{path} is not a hiddenlens direction file (not UTF-8 text); rewrite it with "
                               "`hiddenlens truth directions`") from None
    if not isinstance(meta, dict):
        raise DamagedFileError(f"{path} is not a hiddenlens direction file: it holds a JSON "
                               f"{type(meta).__name__}, not an object")
    return meta


def _read_vectors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DamagedFileError(f"{path} is not a hiddenlens direction file or is damaged (truncated?): "
                               f"{' '.join(str(exc).split())}; rewrite it with `hiddenlens truth directions`") from None


def _entries(meta: dict, path: Path) -> tuple[int, list[dict], list[str]]:
    """``(format, per-direction metadata, safetensors keys)`` of a parsed ``.json``; fails on a missing or unknown
    field, naming it."""
    version = meta.get("format", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DamagedFileError(f"{path}: format={version!r} is not a direction file format (1..{FORMAT})")
    if version > FORMAT:
        raise DirectionError(f"{path} has direction format {version}; this hiddenlens reads up to {FORMAT}: upgrade")
    multi = version > 1 or "directions" in meta
    if multi:
        extra = sorted(set(meta) - _TOP)
        if extra:
            raise DamagedFileError(f"{path}: unknown field(s) {', '.join(extra)} in a direction file")
        metas = meta.get("directions")
        if not isinstance(metas, list) or not metas or not all(isinstance(m, dict) for m in metas):
            raise DamagedFileError(f"{path}: field 'directions' must be a non-empty list of objects (got "
                                   f"{type(metas).__name__}); rewrite it with `hiddenlens truth directions`")
    else:
        metas = [{k: v for k, v in meta.items() if k != "format"}]
    for i, m in enumerate(metas):
        missing = [k for k in _REQUIRED[version] if k not in m]
        unknown = sorted(set(m) - _ALLOWED[version])
        if missing or unknown:
            what = (f"lacks the field {', '.join(map(repr, missing))}" if missing
                    else f"has unknown field(s) {', '.join(map(repr, unknown))}")
            raise DamagedFileError(f"{path}: direction {i} {what}; rewrite it with `hiddenlens truth directions`")
    keys = [f"vector.{i}" for i in range(len(metas))] if multi else ["vector"]
    return version, metas, keys


def load_directions(path: str | Path) -> list[Direction]:
    """Read a direction file (current or version-1 format); always returns a list.

    Raises FileNotFoundError for a missing half, :class:`DamagedFileError` (naming the file, and the field where
    one is missing) for a file that is not a direction file, is truncated or whose halves do not belong together,
    and the construction errors of :class:`Direction` (prefixed with the file name) for a bad value."""
    tensors, meta_path = _pair(_stem(path))
    for p in (tensors, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: a direction is a .safetensors + .json pair (write one with "
                                    "`hiddenlens truth directions`)")
    meta = _read_meta(meta_path)
    version, metas, keys = _entries(meta, meta_path)
    recorded = meta.get("safetensors_sha256")
    if recorded is not None and recorded != file_sha256(tensors):
        raise DamagedFileError(f"{tensors} does not belong to {meta_path}: its sha256 differs from the one the .json "
                               "records (one half was replaced, or a save was interrupted); rewrite both with "
                               "`hiddenlens truth directions`")
    vecs = _read_vectors(tensors)
    if sorted(vecs) != sorted(keys):
        raise DamagedFileError(f"{tensors} holds the vectors {', '.join(sorted(vecs)) or 'none'} but {meta_path} "
                               f"describes {', '.join(keys)}: the two halves do not belong together; rewrite both "
                               "with `hiddenlens truth directions`")
    out = []
    for i, (k, m) in enumerate(zip(keys, metas)):
        m = _from_v1(m) if version == 1 else m
        try:
            out.append(Direction(vector=vecs[k], **m))
        except (UserError, ValueError, TypeError) as exc:
            raise type(exc)(f"{meta_path}: direction {i}: {exc}") from None
    return out
