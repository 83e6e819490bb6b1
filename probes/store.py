"""The activation store: stream chosen sites of a prompt set to safetensors shards, resumably, and read them lazily.

Layout of a store folder::

    manifest.json            model spec + weights hash, sites, dtype, per-site row shape, positions, tokenizer,
                             library versions, the list of finished shards (each with the sha256 of its file, its
                             prompt range and a checksum of the entry itself), ``complete`` once the run finished,
                             and ``manifest_sha256``, a checksum of the manifest itself
    shard-00000.safetensors  per site a tensor [n_rows, ...]; plus "_prompt" (prompt index), "_position"
                             (absolute token position) and "_token" (token id), all [n_rows]
    parts/                   only in a store captured on Ray (``probes/ray_capture.py``): ``plan.json`` and one
                             store per part of the prompts (``part-00003/``, global prompt indices); the top
                             manifest, written once at the end, names their shards by relative path
                             (``parts/part-00003/shard-00000.safetensors``), so the store reads like any other

A row is one token of one prompt (padding never stored). ``positions="last"`` keeps one row per prompt.
A writer holds the folder's lock (``hiddenlens.common.folders.locked``) for its whole run, so two runs never mix
their shards. Shards are written atomically (temp file + rename) and only then recorded in the manifest (also
atomic), so a run killed at any instant resumes with ``resume=True``: the resume checks every recorded shard (file
present, sha256), re-captures from the first bad one, and removes stale temporary files, so the finished store has
no duplicated and no missing row. Opening a store checks the manifest's checksums and prompt ranges and refuses an
incomplete store unless asked; reading memory-maps each shard (``safe_open``), checks its sha256 the first time it
is opened and its tensors against the manifest, so a damaged shard raises instead of returning a wrong tensor.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import json
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hiddenlens.common.errors import DamagedFileError, FolderExistsError, UserError
from hiddenlens.common.files import atomic_path, file_sha256, write_json
from hiddenlens.common.folders import locked

from .capture import capture
from .sites import ATTENTION_WEIGHT_SITES, resolve_sites

FORMAT = "hiddenlens-store/2"
#: the plan of a capture on Ray (its parts), written before the parts start (``probes/ray_capture.py``)
RAY_PLAN = "parts/plan.json"
OLD_FORMATS = ("hiddenlens-store/1",)
META_KEYS = ("_prompt", "_position", "_token")
PROMPT_SUFFIXES = (".txt", ".jsonl")
#: leftovers of a killed writer: ``common.files.atomic_path`` temp files of shards and of the manifest
STALE_GLOBS = (".shard-*.tmp", ".manifest.json.*.tmp")


class StoreError(UserError, RuntimeError):
    """A store folder that is damaged, incomplete, or that does not match what was asked."""


class DamagedStoreError(StoreError, DamagedFileError):
    """A manifest or shard that was edited, truncated or deleted after it was written."""


class PromptFileError(UserError, ValueError):
    """A prompt file (or prompt list) that cannot be read as prompts; the message names the file and line."""


@dataclass
class Prompt:
    id: str
    text: str


def _decode(path: Path) -> str:
    """The file's text (UTF-8, a leading BOM dropped); an undecodable byte raises naming its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PromptFileError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); save the file as "
                              "UTF-8") from None


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of every line that is not blank; ``\\n``, ``\\r\\n`` and ``\\r`` end a line."""
    for n, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n")):
        if line.strip():
            yield n + 1, line


def _jsonl_prompt(path: Path, n: int, line: str, default_id: int) -> Prompt:
    """One JSONL line -> a Prompt; anything but an object with a non-empty string ``text`` raises naming the line."""
    where = f"{path}:{n}"
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, an over-long integer, nesting too deep
        raise PromptFileError(f"{where}: not JSON ({getattr(exc, 'msg', None) or exc}); write one JSON object per "
                              'line, e.g. {"id": "a", "text": "..."}') from None
    if not isinstance(obj, dict):
        raise PromptFileError(f"{where}: a JSON {type(obj).__name__}, not an object; write one object per line, "
                              'e.g. {"id": "a", "text": "..."}')
    if "text" not in obj:
        raise PromptFileError(f"{where}: each JSON line needs a 'text' field")
    text = obj["text"]
    if not isinstance(text, str):
        raise PromptFileError(f"{where}: 'text' is {json.dumps(text)[:40]} ({type(text).__name__}); it must be a "
                              "non-empty string")
    if not text.strip():
        raise PromptFileError(f"{where}: 'text' is empty; give every prompt some text or remove the line")
    pid = obj.get("id", default_id)
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise PromptFileError(f"{where}: 'id' is {json.dumps(pid)[:40]}; it must be a string or an integer")
    return Prompt(str(pid), text)


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a ``.txt`` file (one per non-blank line, ids ``"0"``, ``"1"``, ...) or ``.jsonl`` (objects with
    a non-empty string ``text`` and an optional unique ``id``). The file must be UTF-8 (a leading BOM is dropped);
    anything else raises :class:`PromptFileError` naming the file and line."""
    path = Path(path)
    if path.suffix.lower() not in PROMPT_SUFFIXES:
        raise PromptFileError(f"prompt file {path}: unknown extension {path.suffix!r}; use .txt (one prompt per "
                              "line) or .jsonl (one {'id', 'text'} object per line)")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    lines = _lines(_decode(path))
    if path.suffix.lower() == ".txt":
        out = [Prompt(str(i), line) for i, (_, line) in enumerate(lines)]
    else:
        out, seen = [], {}
        for n, line in lines:
            prompt = _jsonl_prompt(path, n, line, len(out))
            if prompt.id in seen:
                raise PromptFileError(f"{path}:{n}: id {prompt.id!r} repeats line {seen[prompt.id]}; ids must be "
                                      "unique")
            seen[prompt.id] = n
            out.append(prompt)
    if not out:
        raise PromptFileError(f"{path} holds no prompts")
    return out


def as_prompts(prompts: Sequence[str] | Sequence[Prompt] | str | Path) -> list[Prompt]:
    """A prompt file path (``.txt`` / ``.jsonl``) or a list of non-empty strings / :class:`Prompt` -> Prompts."""
    if isinstance(prompts, (str, Path)):
        if Path(prompts).suffix.lower() in PROMPT_SUFFIXES:
            return read_prompts(prompts)
        raise PromptFileError(f"prompts={str(prompts)[:60]!r}: prompts must be a list of strings or a path to a "
                              ".txt/.jsonl file")
    out = []
    for i, p in enumerate(prompts):
        text = p.text if isinstance(p, Prompt) else p
        if not isinstance(text, str):
            raise PromptFileError(f"prompts[{i}] is a {type(text).__name__}: prompts must be non-empty strings")
        if not text.strip():
            raise PromptFileError(f"prompts[{i}] is empty ({text!r}): give every prompt some text")
        out.append(p if isinstance(p, Prompt) else Prompt(str(i), p))
    if not out:
        raise PromptFileError("no prompts to capture")
    return out


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, bytes): identifies the exact weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _digest(obj) -> str:
    """sha256 of ``obj``'s canonical JSON (sorted keys, no spaces, ASCII): the same before writing and after reading."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _entry_digest(index: int, entry: dict) -> str:
    """Checksum of shard entry ``index``: its fields and its place in the list (a swapped entry fails)."""
    return _digest(dict({k: v for k, v in entry.items() if k != "entry_sha256"}, index=index))


def _manifest_digest(manifest: dict) -> str:
    return _digest({k: v for k, v in manifest.items() if k != "manifest_sha256"})


def _write_manifest(path: Path, manifest: dict) -> None:
    write_json(path, dict(manifest, manifest_sha256=_manifest_digest(manifest)))


def _load_manifest(path: Path) -> dict:
    """The manifest's JSON, of a known format; a store of an older format is refused."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DamagedStoreError(f"{path} is not valid JSON ({exc}); re-capture the store into a new folder") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt in OLD_FORMATS:
        raise StoreError(f"{path}: the store was written by an older hiddenlens (format {fmt}, without checksums); "
                         "re-capture it into a new folder")
    if fmt != FORMAT:
        raise StoreError(f"{path}: unknown format {fmt!r} (expected {FORMAT})")
    return manifest


def shard_path(folder: Path, name) -> Path:
    """``folder / name`` for a shard file named in a manifest: a plain name (``shard-00000.safetensors``) or a relative
    path inside the store (``parts/part-00003/shard-00000.safetensors``, a ``--ray`` store); an absolute path, a
    ``..`` or a path that leads out of ``folder`` (through a link) raises :class:`DamagedStoreError`."""
    rel = PurePosixPath(name) if isinstance(name, str) else None
    if rel is None or not name or "\\" in name or rel.is_absolute() or ".." in rel.parts or ":" in name:
        raise DamagedStoreError(f"{folder}: the manifest names shard file {name!r}, which is not a path inside the "
                                "store; re-capture the store")
    path = folder / rel
    if not path.resolve().is_relative_to(folder.resolve()):
        raise DamagedStoreError(f"{folder}: shard file {name!r} leads out of the store folder (a link); re-capture "
                                "the store")
    return path


def _entry_problem(index: int, entry: dict, start: int) -> str | None:
    """What is wrong with shard entry ``index`` of a manifest (checksum, prompt range), or None."""
    if entry.get("entry_sha256") != _entry_digest(index, entry):
        return f"shard entry {index} was edited or moved (its checksum does not match)"
    if entry["prompt_start"] != start or entry["prompt_end"] <= start or entry["rows"] < 1:
        return (f"shard entry {index} covers prompts {entry['prompt_start']}..{entry['prompt_end']} "
                f"({entry['rows']} rows), expected to start at prompt {start}")
    return None


def _shard_problem(folder: Path, index: int, entry: dict, start: int) -> str | None:
    """:func:`_entry_problem`, then the shard file itself: present, and its sha256 the recorded one."""
    problem = _entry_problem(index, entry, start)
    if problem:
        return problem
    path = shard_path(folder, entry["file"])
    if not path.is_file():
        return f"{entry['file']} is missing"
    if file_sha256(path) != entry["sha256"]:
        return f"{entry['file']} is damaged (sha256 differs from the manifest)"
    return None


def _intact_shards(folder: Path, entries: list[dict], offset: int = 0) -> tuple[list[dict], str | None]:
    """The longest run of leading shard entries that pass :func:`_shard_problem` (the first starting at prompt
    ``offset``), and the first problem (or None)."""
    kept: list[dict] = []
    for i, entry in enumerate(entries):
        problem = _shard_problem(folder, i, entry, kept[-1]["prompt_end"] if kept else offset)
        if problem:
            return kept, problem
        kept.append(entry)
    return kept, None


def _remove_leftovers(folder: Path, keep: set[str]) -> None:
    """Delete a killed writer's temp files and every shard file the manifest does not keep (call under the lock)."""
    stale = [p for pattern in STALE_GLOBS for p in folder.glob(pattern)]
    stale += [p for p in folder.glob("shard-*.safetensors") if p.name not in keep]
    for p in stale:
        p.unlink(missing_ok=True)


def _row_shapes(folder: Path, entries: list[dict], sites: list[str]) -> dict[str, list[int]]:
    """Per-site row shape read from the first shard's header ({} without shards)."""
    if not entries:
        return {}
    with safe_open(str(shard_path(folder, entries[0]["file"])), framework="pt") as f:
        return {s: list(f.get_slice(s).get_shape()[1:]) for s in sites}


def _versions() -> dict:
    out = {}
    for pkg in ("hiddenlens", "torch", "transformers", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _check_args(batch_size, shard_rows, dtype, positions) -> None:
    """One-line errors for arguments that would capture nothing or store wrong numbers."""
    for name, value, what in (("batch_size", batch_size, "prompts per forward pass, --batch-size"),
                              ("shard_rows", shard_rows, "rows per shard, --shard-rows")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an integer >= 1 ({what})")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype}: the store keeps activations as floating-point numbers; use float32, "
                         "bfloat16 or float16 (--store-dtype)")
    if positions not in ("all", "last"):
        raise ValueError(f"positions={positions!r}: must be 'all' or 'last' for the store (--positions)")


def _resume_shards(out: Path, manifest_path: Path, settings: dict) -> list[dict]:
    """The intact leading shards of the store being resumed; warns about what is re-captured."""
    old = _load_manifest(manifest_path)
    diff = [k for k in settings if old.get(k) != settings[k]]
    if diff:
        raise StoreError(f"cannot resume {out}: its manifest differs in {diff}; use a new folder")
    if old.get("manifest_sha256") != _manifest_digest(old):
        warnings.warn(f"{manifest_path} was edited or damaged (its checksum does not match); keeping only the shards "
                      "that pass their own checks", stacklevel=4)
    offset = settings.get("prompt_offset", 0)
    kept, problem = _intact_shards(out, old.get("shards", []), offset)
    if problem:
        start = kept[-1]["prompt_end"] if kept else offset
        warnings.warn(f"{out}: {problem}; re-capturing shard {len(kept)} and every later one (from prompt {start})",
                      stacklevel=4)
    return kept


def write_activations(handle, prompts: Sequence[str] | Sequence[Prompt] | str | Path, sites, out: str | Path,
                      positions: str = "all", batch_size: int = 8, dtype: torch.dtype = torch.float32,
                      shard_rows: int = 4096, add_bos: bool | None = None, resume: bool = False,
                      progress: bool = True, lock: bool = True, ray: str | None = None, workers: int | None = None,
                      worker_cpus: float | None = None, worker_gpus: float | None = None,
                      part_prompts: int | None = None) -> "ActivationStore":
    """Capture ``sites`` for every prompt and stream them to ``out`` (see the module docstring).

    Args:
        handle: a loaded :class:`~hiddenlens.probes.handle.ModelHandle`; with ``ray`` also a model spec string
            (each Ray worker loads the model itself, see :mod:`hiddenlens.probes.ray_capture`).
        prompts: non-empty strings, :class:`Prompt` objects, or a path to a ``.txt`` / ``.jsonl`` file.
        positions: ``"all"`` (every non-padding token) or ``"last"`` (the last token of each prompt).
        dtype: a floating dtype for the stored activations.
        shard_rows: rows per shard; RAM use is bounded by about one shard plus one batch.
        resume: continue an interrupted (or repair a damaged) run in ``out`` (its manifest must match these settings);
            shards that are missing or damaged are re-captured, with a warning.
        lock: hold ``out``'s folder lock for the run (another writer raises ``FolderLockedError`` at once); pass
            False only when the caller already holds ``hiddenlens.common.folders.locked(out)``.
        ray: ``"local"`` | ``"auto"`` | a cluster address: capture on a pool of Ray workers (``workers``, each with
            ``worker_cpus`` CPUs and ``worker_gpus`` GPUs, in parts of ``part_prompts`` prompts); the store reads
            exactly like one written here. Without ``ray`` Ray is never imported and those four must be left unset.
    """
    if ray is not None:
        from .ray_capture import write_activations_ray

        return write_activations_ray(handle, prompts, sites, out, ray=ray, workers=workers, worker_cpus=worker_cpus,
                                     worker_gpus=worker_gpus, part_prompts=part_prompts, positions=positions,
                                     batch_size=batch_size, dtype=dtype, shard_rows=shard_rows, add_bos=add_bos,
                                     resume=resume, progress=progress, lock=lock)
    given = [k for k, v in (("workers", workers), ("worker_cpus", worker_cpus), ("worker_gpus", worker_gpus),
                            ("part_prompts", part_prompts)) if v is not None]
    if given:
        raise ValueError(f"{given} only apply to a capture on Ray: pass ray='local' | 'auto' | a cluster address "
                         "(--ray), or leave them out")
    prompts, resolved = _checked(handle, prompts, sites, positions, batch_size, dtype, shard_rows)
    out = Path(out)
    with locked(out) if lock else contextlib.nullcontext():
        return _write(handle, prompts, resolved, out, positions, batch_size, dtype, shard_rows, add_bos, resume,
                      progress)


def write_part(handle, prompts: Sequence[Prompt], sites, out: str | Path, prompt_offset: int, on_batch=None,
               positions: str = "all", batch_size: int = 8, dtype: torch.dtype = torch.float32,
               shard_rows: int = 4096, add_bos: bool | None = None) -> "ActivationStore":
    """One part of a ``--ray`` capture: ``prompts`` are prompts ``prompt_offset ..`` of the whole set, written (or
    resumed: shards already there are verified and kept) as a store in ``out`` under its lock, with global
    ``_prompt`` indices and prompt ranges. ``on_batch(n)`` is called with the number of the part's prompts done after
    each batch (progress)."""
    prompts, resolved = _checked(handle, prompts, sites, positions, batch_size, dtype, shard_rows)
    out = Path(out)
    with locked(out):
        return _write(handle, prompts, resolved, out, positions, batch_size, dtype, shard_rows, add_bos, True,
                      False, prompt_offset, on_batch)


def _checked(handle, prompts, sites, positions, batch_size, dtype, shard_rows):
    """The prompts and resolved sites of a capture; one-line errors for anything that cannot be stored row-wise."""
    prompts = as_prompts(prompts)
    _check_args(batch_size, shard_rows, dtype, positions)
    resolved = resolve_sites(sites, handle.adapter.n_layers, handle.adapter.unavailable)
    bad = [s.name for s in resolved if s.kind in ATTENTION_WEIGHT_SITES]
    if bad:
        raise ValueError(f"{bad}: attention scores/patterns have a ragged key axis and are not stored row-wise; "
                         "reduce them in the capture (hiddenlens.capture(..., reduce=fn)) instead")
    return prompts, resolved


def store_settings(handle, prompts: list[Prompt], site_names: list[str], positions: str, dtype: torch.dtype,
                   add_bos: bool | None) -> dict:
    """The settings a store's manifest records and a resume must match (computes the weights hash once)."""
    if "weights_sha256" not in handle.info:
        handle.info["weights_sha256"] = weights_hash(handle.hf_model)
    return {"format": FORMAT, "model": handle.spec, "weights_sha256": handle.info["weights_sha256"],
            "backend": handle.backend.name, "sites": site_names, "positions": positions,
            "dtype": str(dtype).replace("torch.", ""), "add_bos": add_bos,
            "tokenizer": getattr(handle.tokenizer, "name_or_path", None),
            "prompt_ids_sha256": prompt_ids_sha256(prompts), "n_prompts": len(prompts)}


def prompt_ids_sha256(prompts: list[Prompt]) -> str:
    return hashlib.sha256("\n".join(p.id + "\t" + p.text for p in prompts).encode()).hexdigest()


def _write(handle, prompts: list[Prompt], resolved, out: Path, positions: str, batch_size: int, dtype: torch.dtype,
           shard_rows: int, add_bos: bool | None, resume: bool, progress: bool, prompt_offset: int | None = None,
           on_batch=None) -> "ActivationStore":
    """The body of :func:`write_activations` (and of :func:`write_part`, whose prompts start at global prompt
    ``prompt_offset``), run under the folder lock."""
    settings = store_settings(handle, prompts, [s.name for s in resolved], positions, dtype, add_bos)
    offset = prompt_offset or 0
    if prompt_offset is not None:
        settings["prompt_offset"] = prompt_offset
    elif (out / RAY_PLAN).exists() and not (out / "manifest.json").exists():
        raise StoreError(f"{out} holds an interrupted capture on Ray; resume it with --ray (ray=...) and --resume")
    manifest_path = out / "manifest.json"
    shards: list[dict] = []
    if manifest_path.exists():
        if not resume:
            raise FolderExistsError(f"{out} already holds a store; pass resume=True (--resume) to continue it or "
                                    "choose a new folder")
        shards = _resume_shards(out, manifest_path, settings)
    out.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out, {s["file"] for s in shards})
    done = (shards[-1]["prompt_end"] if shards else offset) - offset
    manifest = dict(settings, prompt_ids=[p.id for p in prompts], versions=_versions(),
                    row_shapes=_row_shapes(out, shards, settings["sites"]), shards=shards)
    _write_manifest(manifest_path, manifest)

    buffer: dict[str, list[torch.Tensor]] = {}
    buffered_rows = 0
    shard_start = done

    def flush(prompt_end: int) -> None:
        nonlocal buffer, buffered_rows, shard_start
        if not buffer:
            return
        tensors = {k: torch.cat(v).contiguous() for k, v in buffer.items()}
        index = len(manifest["shards"])
        path = out / f"shard-{index:05d}.safetensors"
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
        entry = {"file": path.name, "rows": int(tensors["_prompt"].shape[0]), "prompt_start": offset + shard_start,
                 "prompt_end": offset + prompt_end, "sha256": file_sha256(path)}
        manifest["shards"].append(dict(entry, entry_sha256=_entry_digest(index, entry)))
        _write_manifest(manifest_path, manifest)
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
        rows_prompt = torch.arange(offset + start, offset + start + len(chunk))[:, None].expand_as(mask)[keep]
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
        if on_batch is not None:
            on_batch(start + len(chunk))
        if buffered_rows >= shard_rows:
            flush(start + len(chunk))
    flush(len(prompts))
    bar.close()
    manifest["complete"] = True
    _write_manifest(manifest_path, manifest)
    return ActivationStore(out)


def _check_manifest(mpath: Path, manifest: dict, allow_incomplete: bool) -> None:
    """Refuse an edited manifest (checksums), shard entries whose prompt ranges are not contiguous from 0 (and, for a
    complete store, do not end at ``n_prompts``), and an incomplete store unless ``allow_incomplete``."""
    fix = "re-capture the store, or resume it (--resume) to re-capture the damaged part"
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise DamagedStoreError(f"{mpath} was edited or damaged (its checksum does not match its content); {fix}")
    offset = manifest.get("prompt_offset", 0)  # a part of a --ray capture starts at its first global prompt
    end = offset
    for i, entry in enumerate(manifest["shards"]):
        problem = _entry_problem(i, entry, end)
        if problem:
            raise DamagedStoreError(f"{mpath}: {problem}; {fix}")
        end = entry["prompt_end"]
    n = manifest["n_prompts"]
    if manifest.get("complete") and end != offset + n:
        raise DamagedStoreError(f"{mpath}: marked complete but its shards cover prompts {offset}..{end}, not "
                                f"{offset}..{offset + n}; {fix}")
    if not manifest.get("complete") and not allow_incomplete:
        raise StoreError(f"{mpath.parent} is an incomplete store ({end - offset} of {n} prompts captured; its run was "
                         "interrupted): resume it (hiddenlens capture ... --resume, or write_activations(..., "
                         "resume=True)), or pass allow_incomplete=True to read the finished shards")


class ActivationStore:
    """Lazy reader of a store folder. ``store.read(site, rows)`` returns ``[n_rows, ...]`` (per-head sites
    ``[n_rows, head, d]``); ``store.meta(rows)`` gives the prompt index, position and token id of each row."""

    def __init__(self, path: str | Path, verify: bool = True, allow_incomplete: bool = False):
        """Open (and check) the store in ``path``.

        Args:
            verify: check each shard's sha256 the first time it is read.
            allow_incomplete: read a store whose run was interrupted (only its finished shards); by default an
                incomplete store raises :class:`StoreError` saying to resume it.
        """
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.is_file() and (self.path / RAY_PLAN).is_file():
            raise StoreError(f"{self.path} is an interrupted capture on Ray (no manifest.json yet): resume it "
                             "(hiddenlens capture ... --ray ADDRESS --resume, or write_activations(..., ray=..., "
                             "resume=True))")
        if not mpath.is_file():
            raise StoreError(f"{self.path} is not an activation store (no manifest.json)")
        self.manifest = _load_manifest(mpath)
        _check_manifest(mpath, self.manifest, allow_incomplete)
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
        path = shard_path(self.path, info["file"])
        if not path.is_file():
            raise DamagedStoreError(f"shard {path} listed in the manifest is missing; re-capture it (--resume "
                                    "re-captures missing and damaged shards)")
        if self.verify and info["file"] not in self._checked:
            if file_sha256(path) != info["sha256"]:
                raise DamagedStoreError(f"shard {path} is damaged (sha256 differs from the manifest); re-capture it "
                                        "(--resume re-captures missing and damaged shards)")
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
