"""Read a run folder of a hiddenlens study (``runs/<study>/<name>``, written by a study's ``Result.write``; see
:mod:`hiddenlens.studies`) for the Results page, safely: the page may be reachable by others, and the folder may
hold files someone else put there.

* Only folders under the runs root are opened (:func:`safe_run_folder`): paths are resolved, anything outside the
  resolved root is refused, and so is any symbolic link on the way; inside the folder, links are not read.
* Only safe formats are read: ``summary.json`` and other ``*.json``, tables from ``*.parquet`` (or ``*.csv`` when no
  Parquet twin exists), ``*.png`` figures (decoded once to check them), ``*.md`` / ``*.txt`` text and the tensor
  names/shapes of ``*.safetensors`` headers. Nothing is unpickled.
* Nothing is read whole when it can be large: tables give their first :data:`MAX_ROWS` rows, reports their first
  :data:`MAX_TEXT_BYTES`; JSON and PNG files over their limits are skipped.
* Reports are cut into Markdown and images (:func:`report_parts`): remote images (``http:``, ``https:``, ``//``,
  ``data:``, HTML ``<img>``) become a text note, so the browser never fetches them; images that name a PNG of the
  folder are shown from that file.

``study.json`` names the study that wrote the folder; a missing path or a folder with nothing readable raises
:class:`ResultsError`; one broken file is reported in :attr:`Results.problems` and the rest still loads.
"""
from __future__ import annotations

import codecs
import io
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import pandas as pd

from hiddenlens.common.errors import UserError

MAX_ROWS = 1_000                   # rows of a table read and shown
MAX_CSV_BYTES = 8 * 2**20          # bytes of a CSV read to find those rows
MAX_TEXT_BYTES = 2 * 2**20         # bytes of a report (*.md, *.txt) shown; the rest is cut off with a warning
MAX_JSON_BYTES = 2 * 2**20         # larger JSON files are skipped
MAX_IMAGE_BYTES = 20 * 2**20       # larger PNG files are skipped
MAX_IMAGE_PIXELS = 16_000_000      # larger PNG images (width x height) are skipped
MAX_HEADER_BYTES = 16 * 2**20      # larger safetensors headers are skipped
STUDY_FILE = "study.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ResultsError(UserError, ValueError):
    """The path is not a readable results folder under the runs root; the message says why."""


@dataclass
class Results:
    path: Path
    study: str | None = None       # the study that wrote the folder (study.json), None for older folders
    summary: dict | None = None
    json_files: dict[str, object] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    table_notes: dict[str, str] = field(default_factory=dict)   # table -> "showing the first N rows of ..."
    figures: dict[str, bytes] = field(default_factory=dict)     # file stem -> PNG bytes (checked)
    texts: dict[str, str] = field(default_factory=dict)
    text_notes: dict[str, str] = field(default_factory=dict)    # file name -> why only part of it is shown
    tensors: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # file -> {tensor name: shape}
    problems: dict[str, str] = field(default_factory=dict)  # file name -> what went wrong

    @property
    def empty(self) -> bool:
        return not (self.summary or self.json_files or self.tables or self.figures or self.texts or self.tensors)


# ---- where the page may read ---------------------------------------------------------------------------------
def runs_root(root: str | Path) -> Path:
    """The runs root, resolved (it may itself be a link, set by whoever started the dashboard)."""
    if not str(root).strip():
        raise ResultsError("no runs root is set: start the dashboard with `hiddenlens dashboard --runs FOLDER`")
    p = Path(str(root).strip()).expanduser()
    if not p.is_dir():
        raise ResultsError(f"the runs root {p} is not a folder: start the dashboard with "
                           "`hiddenlens dashboard --runs FOLDER` (or set HIDDENLENS_RUNS_DIR)")
    return p.resolve()


def safe_run_folder(root: str | Path, user_path: str | Path) -> Path:
    """The folder ``user_path`` names (relative paths from the working directory), as a path under the resolved
    runs ``root``; raises :class:`ResultsError` when it is outside the root, when any part of it below the root is
    a symbolic link, or when it is not an existing folder."""
    text = str(user_path).strip()
    if not text:
        raise ResultsError("no folder given: pick a run, or type the path of a run folder under the runs root")
    real_root = runs_root(root)
    p = Path(os.path.normpath(Path(text).expanduser().absolute()))
    rel = None
    for base in (Path(os.path.normpath(Path(str(root).strip()).expanduser().absolute())), real_root):
        if p == base or base in p.parents:
            rel = p.relative_to(base)
            break
    if rel is None:
        raise ResultsError(f"{text} is outside the runs root {real_root}: the Results page opens only folders under "
                           "it (start the dashboard with `--runs` to serve another root)")
    folder = real_root
    for part in rel.parts:
        folder = folder / part
        if folder.is_symlink():
            raise ResultsError(f"{text}: {folder} is a symbolic link; the Results page does not follow links "
                               "(copy the run folder under the runs root instead)")
    if not folder.exists():
        raise ResultsError(f"{folder} does not exist")
    if not folder.is_dir():
        raise ResultsError(f"{folder} is a file, not a folder; give the run folder that holds summary.json")
    return folder


def check_no_links(folder: Path) -> None:
    """Raise :class:`ResultsError` when ``folder`` holds a symbolic link at any depth (a study's own reader, which
    follows links, may then read it)."""
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            if os.path.islink(os.path.join(top, name)):
                raise ResultsError(f"{folder} holds a symbolic link ({os.path.join(top, name)}); the dashboard does "
                                   "not read run folders with links (copy the files in instead)")


def find_runs(root: str | Path, max_depth: int = 3) -> list[str]:
    """Run folders (with a ``study.json`` naming a known study) under ``root``, the runs root
    (``runs/<study>/<name>``), sorted; symbolic links and hidden folders are not followed. ``[]`` when the root
    is missing."""
    try:
        real_root = runs_root(root)
    except ResultsError:
        return []
    found, level = [], [real_root]
    for _ in range(max_depth + 1):
        found += [d for d in level if _study_name(d) is not None]
        level = [sub for d in level for sub in _subfolders(d)]
    return sorted(str(d) for d in found)


def _subfolders(folder: Path) -> list[Path]:
    """The folders in ``folder``, not links, not hidden; [] when it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            return [Path(e.path) for e in it if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    except OSError:
        return []


def _study_name(folder: Path) -> str | None:
    """The known study named by ``folder/study.json`` (a regular file, not a link), else None."""
    from hiddenlens.studies import STUDIES

    try:
        meta = _read_json(folder / STUDY_FILE)
    except (OSError, ValueError, RecursionError):
        return None
    name = meta.get("study") if isinstance(meta, dict) else None
    return name if name in STUDIES else None


# ---- reading one file, never through a link ----------------------------------------------------------------------
def _open(f: Path) -> io.BufferedReader:
    """``f`` opened for reading; refuses a symbolic link (``O_NOFOLLOW``), also one swapped in after listing."""
    return os.fdopen(os.open(f, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb")


def _read_bytes(f: Path, limit: int) -> bytes:
    """The first ``limit`` bytes of ``f``."""
    with _open(f) as fh:
        return fh.read(limit)


def _read_json(f: Path):
    size = f.lstat().st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(f"skipped: {_mib(size)}, larger than the {_mib(MAX_JSON_BYTES)} limit for JSON files")
    return json.loads(_read_bytes(f, MAX_JSON_BYTES).decode("utf-8"))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def read_table(f: Path, size: int) -> tuple[pd.DataFrame, str]:
    """The first :data:`MAX_ROWS` rows of a Parquet or CSV table and a note when there are more (else "")."""
    if f.suffix == ".parquet":
        import pyarrow.parquet as pq

        with _open(f) as fh:
            pf = pq.ParquetFile(fh)
            total = pf.metadata.num_rows
            batch = next(pf.iter_batches(batch_size=MAX_ROWS), None)
            df = batch.to_pandas() if batch is not None else pf.schema_arrow.empty_table().to_pandas()
        more = total > len(df)
        return df, f"showing the first {len(df):,} of {total:,} rows ({_mib(size)} file)" if more else ""
    head = _read_bytes(f, MAX_CSV_BYTES)
    cut = len(head) < size
    if cut:  # whole lines only
        if b"\n" not in head:
            raise ValueError(f"skipped: no line break in its first {_mib(MAX_CSV_BYTES)}: not a table")
        head = head[:head.rfind(b"\n") + 1]
    df = pd.read_csv(io.BytesIO(head), nrows=MAX_ROWS + 1)
    more = cut or len(df) > MAX_ROWS
    df = df.head(MAX_ROWS)
    return df, f"showing the first {len(df):,} rows ({_mib(size)} file)" if more else ""


def read_text(f: Path, size: int) -> tuple[str, str]:
    """A report's text (UTF-8), cut at :data:`MAX_TEXT_BYTES`, and a note when cut (else "")."""
    data = _read_bytes(f, MAX_TEXT_BYTES)
    text = codecs.getincrementaldecoder("utf-8")().decode(data, final=size <= MAX_TEXT_BYTES)
    if size <= MAX_TEXT_BYTES:
        return text, ""
    return text, f"{f.name} is {_mib(size)}: showing its first {_mib(MAX_TEXT_BYTES)} only"


def read_png(f: Path, size: int) -> bytes:
    """The bytes of a PNG file, decoded once to check them (a broken image raises here, not on the page)."""
    from PIL import Image

    if size > MAX_IMAGE_BYTES:
        raise ValueError(f"skipped: {_mib(size)}, larger than the {_mib(MAX_IMAGE_BYTES)} limit for images")
    data = _read_bytes(f, MAX_IMAGE_BYTES)
    if data[:8] != PNG_MAGIC:
        raise ValueError("not a PNG image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            pixels = im.width * im.height
            if pixels <= MAX_IMAGE_PIXELS:
                im.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a damaged file
        raise ValueError(f"not a readable PNG image ({exc})") from exc
    if pixels > MAX_IMAGE_PIXELS:
        raise ValueError(f"skipped: {im.width} x {im.height} pixels, over the limit of {MAX_IMAGE_PIXELS:,}")
    return data


def tensor_shapes(f: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a ``.safetensors`` header (8-byte little-endian length, then JSON)."""
    with _open(f) as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"header of {n:,} bytes: not a safetensors file, or a damaged one")
        header = json.loads(fh.read(n).decode("utf-8"))
    return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}


# ---- the folder ------------------------------------------------------------------------------------------------
def open_results(root: str | Path, path: str | Path) -> Results:
    """Load every readable file of the run folder ``path`` (not recursive), which must lie under the runs
    ``root`` (:func:`safe_run_folder`)."""
    p = safe_run_folder(root, path)
    res = Results(path=p)
    try:
        with os.scandir(p) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise ResultsError(f"cannot list {p}: {exc.strerror or exc}") from exc
    for name in (e.name for e in entries if e.is_symlink()):
        res.problems[name] = "skipped: a symbolic link (the Results page does not follow links)"
    files = [Path(e.path) for e in entries if e.is_file(follow_symlinks=False)]
    stems_with_parquet = {f.stem for f in files if f.suffix == ".parquet"}
    for f in files:
        try:
            _read_file(res, f, stems_with_parquet)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, the others still load
            res.problems[f.name] = _why(exc)
    if STUDY_FILE in res.json_files:
        _read_study(res, res.json_files[STUDY_FILE])
    if res.empty:
        detail = "; unreadable: " + "; ".join(f"{k} ({v})" for k, v in res.problems.items()) if res.problems else ""
        raise ResultsError(f"{p} holds no results: no summary.json, tables, figures or report{detail}")
    return res


def _why(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return (text if text.startswith("skipped") else f"{type(exc).__name__}: {text}")[:300]


def _read_file(res: Results, f: Path, stems_with_parquet: set[str]) -> None:
    size = f.lstat().st_size
    if f.name == "summary.json":
        res.summary = _read_json(f)
    elif f.suffix == ".json":
        res.json_files[f.name] = _read_json(f)
    elif f.suffix == ".parquet" or (f.suffix == ".csv" and f.stem not in stems_with_parquet):
        res.tables[f.stem], note = read_table(f, size)
        if note:
            res.table_notes[f.stem] = note
    elif f.suffix == ".png":
        res.figures[f.stem] = read_png(f, size)
    elif f.suffix in (".md", ".txt"):
        res.texts[f.name], note = read_text(f, size)
        if note:
            res.text_notes[f.name] = note
    elif f.suffix == ".safetensors":
        res.tensors[f.name] = tensor_shapes(f)


def _read_study(res: Results, meta) -> None:
    """The study named by ``study.json``, with a problem noted for an unknown study or an incomplete run."""
    from hiddenlens.studies import STUDIES

    if not isinstance(meta, dict):
        res.problems[STUDY_FILE] = "not a JSON object: cannot tell which study wrote this folder"
        return
    res.study = meta.get("study")
    if res.study not in STUDIES:
        res.problems[STUDY_FILE] = f"names an unknown study {res.study!r} (known: {', '.join(STUDIES)})"
    elif meta.get("complete") is False:
        res.problems[STUDY_FILE] = "the run stopped before the end: these results are incomplete"


# ---- reports -----------------------------------------------------------------------------------------------------
#: ``![alt](src "title")``: group 2 is the source (``<...>`` or up to a space or ``)``)
_INLINE_IMAGE = re.compile(r"!\[([^\]\n]*)\]\(\s*(<[^>\n]*>|[^)\s]*)"
                           r"(?:\s+(?:\"[^\"\n]*\"|'[^'\n]*'|\([^)\n]*\)))?\s*\)")
_HTML_IMAGE = re.compile(r"<\s*(img|image|picture|source|video|audio|iframe|embed|object|link)\b[^>]*>", re.I)
_REMOTE = re.compile(r"^\s*(?:[a-z][a-z0-9+.-]*:|//|\\\\)", re.I)


def report_parts(text: str, figures: dict[str, bytes]) -> list[tuple[str, str]]:
    """``text`` (Markdown) cut into ``("markdown", text)`` and ``("image", figure stem)`` parts. Only an image whose
    source is a relative path naming a checked PNG of the folder (a key of ``figures``) stays an image; any other
    (a remote ``http:`` / ``https:`` / ``//`` / ``data:`` URL, a path outside the folder, a reference-style image,
    an HTML ``<img>``) becomes a visible text note, so the browser never fetches it."""
    parts: list[tuple[str, str]] = []
    pos = 0
    for m in _INLINE_IMAGE.finditer(text):
        stem = _local_figure(m.group(2).strip("<>"), figures)
        if stem is None:
            continue
        parts.append(("markdown", text[pos:m.start()]))
        parts.append(("image", stem))
        pos = m.end()
    parts.append(("markdown", text[pos:]))
    return [(kind, _neutralize(body) if kind == "markdown" else body) for kind, body in parts
            if kind == "image" or body.strip()]


def _local_figure(src: str, figures: dict[str, bytes]) -> str | None:
    """The stem of the figure ``src`` names (``name.png`` or ``./name.png``), or None."""
    if _REMOTE.match(src):
        return None
    name = unquote(src).removeprefix("./")
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() == ".png" and "/" not in name and "\\" not in name and stem in figures else None


def _neutralize(markdown: str) -> str:
    """Every image left in ``markdown`` as a text note; ``![`` escaped so no reference-style image remains."""
    def note(src: str) -> str:
        shown = re.sub(r"[`\s]+", " ", src).strip()[:200]
        why = "remote image not loaded" if _REMOTE.match(src) else "image not shown (not a PNG of this run folder)"
        return f"*[{why}: `{shown}`]*"

    markdown = _INLINE_IMAGE.sub(lambda m: note(m.group(2).strip("<>")), markdown)
    markdown = _HTML_IMAGE.sub(lambda m: note(_html_source(m.group(0))), markdown)
    return markdown.replace("![", "!\\[")


def _html_source(tag: str) -> str:
    m = re.search(r"\b(?:src|srcset|href|data|poster)\s*=\s*[\"']?([^\"'\s>]+)", tag, re.I)
    return m.group(1) if m else tag
