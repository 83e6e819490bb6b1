"""The activation store: stream chosen sites of a prompt set to safetensors shards, resumably, and read them lazily.

Layout of a store folder::

    manifest.json            model spec + weights hash, sites, dtype, per-site row shape, positions, tokenizer,
                             library versions, and the list of finished shards (with sha256 and prompt range)
    shard-00000.safetensors  per site a tensor [n_rows, ...]; plus "_prompt" (prompt index), "_position"
                             (absolute token position) and "_token" (token id), all [n_rows]

A row is one token of one prompt (padding never stored). ``positions="last"`` keeps one row per prompt.
Shards are written atomically (temp file + rename) and only then recorded in the manifest (also atomic), so a
run killed at any instant resumes with ``resume=True`` after the last recorded shard: no duplicated and no
missing rows. Reading memory-maps each shard (``safe_open``), checks its sha256 the first time it is opened and
its tensors against the manifest, so a damaged shard raises instead of returning a wrong tensor.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hiddenlens.common.files import atomic_path, write_json

from .capture import capture
from .sites import ATTENTION_WEIGHT_SITES, resolve_sites

FORMAT = "hiddenlens-store/1"
META_KEYS = ("_prompt", "_position", "_token")


class StoreError(RuntimeError):
    """A store folder that is damaged, or that does not match what was asked."""


@dataclass
class Prompt:
    id: str
    text: str


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a ``.txt`` file (one per non-empty line) or ``.jsonl`` (objects with ``text``, optional ``id``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    out: list[Prompt] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n + 1}: not JSON ({exc.msg})") from exc
            if "text" not in obj:
                raise ValueError(f"{path}:{n + 1}: each JSON line needs a 'text' field")
            out.append(Prompt(str(obj.get("id", len(out))), obj["text"]))
    else:
        out = [Prompt(str(i), line) for i, line in
               enumerate(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip())]
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, bytes): identifies the exact weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict:
    out = {}
    for pkg in ("hiddenlens", "torch", "transformers", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def write_activations(handle, prompts: Sequence[str] | Sequence[Prompt] | str | Path, sites, out: str | Path,
                      positions: str = "all", batch_size: int = 8, dtype: torch.dtype = torch.float32,
                      shard_rows: int = 4096, add_bos: bool | None = None, resume: bool = False,
                      progress: bool = True) -> "ActivationStore":
    """Capture ``sites`` for every prompt and stream them to ``out`` (see the module docstring).

    Args:
        prompts: strings, :class:`Prompt` objects, or a path to a ``.txt`` / ``.jsonl`` file.
        positions: ``"all"`` (every non-padding token) or ``"last"`` (the last token of each prompt).
        shard_rows: rows per shard; RAM use is bounded by about one shard plus one batch.
        resume: continue an interrupted run in ``out`` (its manifest must match these settings).
    """
    if isinstance(prompts, (str, Path)) and Path(prompts).suffix in (".txt", ".jsonl"):
        prompts = read_prompts(prompts)
    prompts = [p if isinstance(p, Prompt) else Prompt(str(i), p) for i, p in enumerate(prompts)]
    if not prompts:
        raise ValueError("no prompts to capture")
    if positions not in ("all", "last"):
        raise ValueError("positions must be 'all' or 'last' for the store")
    resolved = resolve_sites(sites, handle.adapter.n_layers, handle.adapter.unavailable)
    bad = [s.name for s in resolved if s.kind in ATTENTION_WEIGHT_SITES]
    if bad:
        raise ValueError(f"{bad}: attention scores/patterns have a ragged key axis and are not stored row-wise; "
                         "reduce them in the capture (hiddenlens.capture(..., reduce=fn)) instead")
    out = Path(out)
    settings = {"format": FORMAT, "model": handle.spec, "weights_sha256": None, "backend": handle.backend.name,
                "sites": [s.name for s in resolved], "positions": positions, "dtype": str(dtype).replace("torch.", ""),
                "add_bos": add_bos, "tokenizer": getattr(handle.tokenizer, "name_or_path", None),
                "prompt_ids_sha256": hashlib.sha256("\n".join(p.id + "\t" + p.text for p in prompts)
                                                    .encode()).hexdigest(), "n_prompts": len(prompts)}
    settings["weights_sha256"] = handle.info.setdefault("weights_sha256", weights_hash(handle.hf_model))
    manifest_path = out / "manifest.json"
    shards: list[dict] = []
    if manifest_path.exists():
        if not resume:
            raise FileExistsError(f"{out} already holds a store; pass resume=True (--resume) to continue it or "
                                  "choose a new folder")
        old = json.loads(manifest_path.read_text())
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise StoreError(f"cannot resume {out}: its manifest differs in {diff}; use a new folder")
        shards = old["shards"]
    out.mkdir(parents=True, exist_ok=True)
    done = shards[-1]["prompt_end"] if shards else 0
    manifest = dict(settings, prompt_ids=[p.id for p in prompts], versions=_versions(), row_shapes={}, shards=shards)
    if shards:
        manifest["row_shapes"] = json.loads(manifest_path.read_text())["row_shapes"]

    buffer: dict[str, list[torch.Tensor]] = {}
    buffered_rows = 0
    shard_start = done

    def flush(prompt_end: int) -> None:
        nonlocal buffer, buffered_rows, shard_start
        if not buffer:
            return
        tensors = {k: torch.cat(v).contiguous() for k, v in buffer.items()}
        path = out / f"shard-{len(manifest['shards']):05d}.safetensors"
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
        manifest["shards"].append({"file": path.name, "rows": int(tensors["_prompt"].shape[0]),
                                   "prompt_start": shard_start, "prompt_end": prompt_end, "sha256": _sha256(path)})
        write_json(manifest_path, manifest)
        buffer, buffered_rows, shard_start = {}, 0, prompt_end

    bar = tqdm(total=len(prompts), initial=done, desc="capture", unit="prompt", disable=not progress)
    for start in range(done, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        with capture(handle, [s.name for s in resolved], positions="last" if positions == "last" else None,
                     dtype=dtype, to="cpu") as cache:
            run = handle.run([p.text for p in chunk], add_bos=add_bos, logits=False)
        mask = run.attention_mask.to("cpu").bool()
        if positions == "last":
            keep = torch.zeros_like(mask)
            keep[:, -1] = True
        else:
            keep = mask
        rows_prompt = torch.arange(start, start + len(chunk))[:, None].expand_as(mask)[keep]
        pos = (mask.long().cumsum(1) - 1)[keep]
        tokens = run.input_ids.to("cpu")[keep]
        for name, value in (("_prompt", rows_prompt), ("_position", pos), ("_token", tokens)):
            buffer.setdefault(name, []).append(value)
        for s in resolved:
            t = cache[s.name]
            if s.per_head:
                t = t.movedim(1, 2)  # [b, pos, head, d]
            if positions == "last":
                t = t[:, -1]
            else:
                t = t[keep]
            manifest["row_shapes"][s.name] = list(t.shape[1:])
            buffer.setdefault(s.name, []).append(t.contiguous())
        buffered_rows += int(keep.sum())
        bar.update(len(chunk))
        if buffered_rows >= shard_rows:
            flush(start + len(chunk))
    flush(len(prompts))
    bar.close()
    manifest["complete"] = True
    write_json(manifest_path, manifest)
    return ActivationStore(out)


class ActivationStore:
    """Lazy reader of a store folder. ``store.read(site, rows)`` returns ``[n_rows, ...]`` (per-head sites
    ``[n_rows, head, d]``); ``store.meta(rows)`` gives the prompt index, position and token id of each row."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.is_file():
            raise StoreError(f"{self.path} is not an activation store (no manifest.json)")
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(f"{mpath} is not valid JSON: {exc.msg}") from exc
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{mpath}: unknown format {self.manifest.get('format')!r} (expected {FORMAT})")
        self.verify = verify
        self._checked: set[str] = set()
        self.shards = self.manifest["shards"]
        self._starts = [0]
        for s in self.shards:
            self._starts.append(self._starts[-1] + s["rows"])

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def __len__(self) -> int:
        return self._starts[-1]

    def _open(self, i: int):
        info = self.shards[i]
        path = self.path / info["file"]
        if not path.is_file():
            raise StoreError(f"shard {path} listed in the manifest is missing")
        if self.verify and info["file"] not in self._checked:
            if _sha256(path) != info["sha256"]:
                raise StoreError(f"shard {path} is damaged (sha256 differs from the manifest); re-capture it")
            self._checked.add(info["file"])
        try:
            return safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise StoreError(f"shard {path} cannot be read: {exc}") from exc

    def _slice(self, i: int, key: str, lo: int, hi: int) -> torch.Tensor:
        with self._open(i) as f:
            if key not in f.keys():
                raise StoreError(f"{self.shards[i]['file']} has no tensor {key!r}")
            t = f.get_slice(key)[lo:hi]
        if key not in META_KEYS:
            want = [hi - lo] + list(self.manifest["row_shapes"][key])
            if list(t.shape) != want or str(t.dtype).replace("torch.", "") != self.manifest["dtype"]:
                raise StoreError(f"{self.shards[i]['file']}:{key} has shape {list(t.shape)} / {t.dtype}, the "
                                 f"manifest says {want} / {self.manifest['dtype']}")
        return t

    def _rows(self, rows) -> list[tuple[int, int, int]]:
        n = len(self)
        if rows is None:
            rows = slice(0, n)
        if not isinstance(rows, slice):
            raise TypeError("rows must be a slice (use store.read(site)[indices] for fancy indexing)")
        lo, hi, step = rows.indices(n)
        if step != 1:
            raise ValueError("rows must be a contiguous slice")
        spans = []
        for i in range(len(self.shards)):
            a, b = max(lo, self._starts[i]), min(hi, self._starts[i + 1])
            if a < b:
                spans.append((i, a - self._starts[i], b - self._starts[i]))
        return spans

    def read(self, site: str, rows: slice | None = None) -> torch.Tensor:
        """Rows of one site, read lazily from the shards that hold them."""
        if site not in self.manifest["sites"] and site not in META_KEYS:
            raise KeyError(f"{site!r} is not in this store; it holds {self.sites}")
        parts = [self._slice(i, site, a, b) for i, a, b in self._rows(rows)]
        if not parts:
            return torch.empty((0, *self.manifest["row_shapes"].get(site, [])))
        return torch.cat(parts)

    def meta(self, rows: slice | None = None) -> dict[str, torch.Tensor]:
        """``{"prompt": [n], "position": [n], "token": [n]}`` for the rows."""
        return {k[1:]: self.read(k, rows) for k in META_KEYS}

    def iter_shards(self, site: str) -> Iterator[torch.Tensor]:
        """Yield one shard's rows of ``site`` at a time (bounded memory)."""
        for i, info in enumerate(self.shards):
            yield self._slice(i, site, 0, info["rows"])
