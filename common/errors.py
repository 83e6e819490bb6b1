"""The one base class for errors a user can fix: a bad input, a folder in use, a damaged file.

The CLI prints any :class:`UserError` as one line ``error: ...`` (exit status 2); the message names the input and
the fix. Subclasses keep the built-in base that fits (``ValueError``, ``FileExistsError``, ...) so callers that
catch those still do.
"""
from __future__ import annotations


class UserError(Exception):
    """Raised for input the user can correct; the message says what was wrong and what to do instead."""


class FolderLockedError(UserError, RuntimeError):
    """Another process holds the lock on an output folder."""


class FolderExistsError(UserError, FileExistsError):
    """An output folder already holds results and the run was not asked to replace them."""


class DamagedFileError(UserError, ValueError):
    """A file hiddenlens wrote (or is asked to read) is truncated, edited or mismatched."""


class NonFiniteError(UserError, FloatingPointError):
    """A value that must be finite (an input, or a result about to be reported) holds NaN or Inf."""
