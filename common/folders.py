"""Output folders that are never mixed and never read as complete before they are.

Every writer of a folder holds an exclusive lock on it (:func:`locked`, a ``filelock`` file beside the folder, so
the lock survives the folder being swapped). A run that writes a whole folder (a study, a training run) writes
into a fresh hidden temporary folder beside it and renames it into place at the end (:func:`committed_folder`): a
killed run leaves only the hidden ``.<name>.partial-*`` folder, which the next writer of that name removes, and a
rerun into a used folder either refuses (the default) or, with ``overwrite=True``, replaces the whole folder.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from .errors import FolderExistsError, FolderLockedError

PARTIAL = ".partial-"
OLD = ".replaced-"


def lock_path(folder: str | Path) -> Path:
    """The lock file of ``folder``: ``<parent>/.<name>.lock``."""
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def locked(folder: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock on ``folder`` for the block; raise :class:`FolderLockedError` at once if another
    process (or thread) holds it."""
    folder = Path(folder)
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), thread_local=False, is_singleton=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FolderLockedError(f"{folder} is being written by another run (lock {path}); wait for it to finish "
                                "or choose another output folder") from None
    try:
        yield folder
    finally:
        lock.release()


def is_used(folder: str | Path) -> bool:
    """True when ``folder`` exists and holds anything (an empty folder counts as free)."""
    folder = Path(folder)
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))


def check_free(folder: str | Path, overwrite: bool = False, fix: str = "pass --overwrite to replace it") -> Path:
    """Refuse early (before a long run) when ``folder`` already holds results and ``overwrite`` is False."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FolderExistsError(f"{folder} is a file, not a folder; choose another output folder")
    if is_used(folder) and not overwrite:
        raise FolderExistsError(f"{folder} already holds results; choose a new folder, or {fix}")
    return folder


def _remove_stale(folder: Path) -> None:
    for p in folder.parent.glob(f".{folder.name}{PARTIAL}*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in folder.parent.glob(f".{folder.name}{OLD}*"):
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def committed_folder(folder: str | Path, overwrite: bool = False,
                     fix: str = "pass --overwrite to replace it") -> Iterator[Path]:
    """Yield a fresh temporary folder to write ``folder``'s content into; on success it replaces ``folder``.

    The lock on ``folder`` is held for the whole block. A used ``folder`` is refused (the message ends with
    ``fix``, how to replace it) unless ``overwrite`` (checked
    again at the commit, so a run that finished meanwhile is not overwritten silently). On an exception the
    temporary folder is removed and ``folder`` is left as it was.
    """
    folder = Path(folder)
    with locked(folder):
        check_free(folder, overwrite, fix)
        _remove_stale(folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}{PARTIAL}", dir=folder.parent))
        try:
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())
            if is_used(folder):
                check_free(folder, overwrite, fix)
                old = Path(tempfile.mkdtemp(prefix=f".{folder.name}{OLD}", dir=folder.parent))
                os.replace(folder, old / folder.name)
                os.replace(tmp, folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                if folder.exists():
                    folder.rmdir()
                os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
