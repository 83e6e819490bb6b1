"""The ``hiddenlens`` command line (typer): one module per top-level command or command group.

    info.py  capture.py  demo.py  doctor.py  dashboard.py  train_lens.py  train_decider.py    top-level commands
    patch.py                                                                       top-level command
    analyze.py  bench.py  bb.py  truth.py  steer.py                               command groups
    options.py                                                                    shared options, model loading

User errors (``hiddenlens.common.errors.UserError`` and its subclasses, ``ValueError``, ``KeyError``, the
``OSError`` kinds a wrong path raises, and ``BackendError``) print one line ``error: ...`` that names the input and
the fix, and exit with status 2; ``--debug`` (or ``HIDDENLENS_DEBUG=1``) shows the full traceback instead.
"""
from __future__ import annotations

import os
import sys

import typer

from hiddenlens.common.errors import UserError
from hiddenlens.probes.backends.errors import BackendError

from . import (analyze, bb, bench, capture, dashboard, demo, doctor, info, patch, reproduce, steer, train_adapter,
               train_decider, train_lens, truth)

#: errors that describe a bad input, a path or folder that cannot be used, or an unsupported request (a backend
#: lacking a capability), not a bug
USER_ERRORS = (UserError, ValueError, KeyError, FileNotFoundError, FileExistsError, IsADirectoryError,
               NotADirectoryError, PermissionError, BackendError)
DEBUG_ENV = "HIDDENLENS_DEBUG"

app = typer.Typer(help="hiddenlens: look inside language models and change what they do.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help=f"show the full traceback of an error (also "
                                                              f"{DEBUG_ENV}=1)")) -> None:
    """hiddenlens: look inside language models and change what they do."""
    _state["debug"] = debug


app.command("info")(info.info)
app.command("capture")(capture.capture)
app.command("demo")(demo.demo)
app.command("doctor")(doctor.doctor)
app.command("dashboard")(dashboard.dashboard)
app.command("train-lens")(train_lens.train_lens)
app.command("train-decider")(train_decider.train_decider)
app.command("train-adapter")(train_adapter.train_adapter)
app.command("patch")(patch.patch)
app.command("reproduce")(reproduce.reproduce)
app.add_typer(analyze.app, name="analyze")
app.add_typer(bench.app, name="bench")
app.add_typer(bb.app, name="bb")
app.add_typer(truth.app, name="truth")
app.add_typer(steer.app, name="steer")


def _debug() -> bool:
    return _state["debug"] or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


def error_message(exc: BaseException) -> str:
    """One line: the exception's message (a KeyError's without its quotes), whitespace collapsed."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> None:
    """The console entry point (``hiddenlens`` and ``python -m hiddenlens``)."""
    from typer.exceptions import Abort, TyperException

    _state["debug"] = False
    try:
        status = app(args=argv, prog_name="hiddenlens", standalone_mode=False)
    except USER_ERRORS as exc:
        if _debug():
            raise
        typer.echo(f"error: {error_message(exc)}", err=True)
        sys.exit(2)
    except Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except TyperException as exc:  # the command line itself: an unknown option, a value out of range, ...
        if getattr(exc, "ctx", None) is not None and type(exc).__name__ == "NoArgsIsHelpError":
            typer.echo(exc.ctx.get_help())
            sys.exit(0)
        where = f"; see '{exc.ctx.command_path} --help'" if getattr(exc, "ctx", None) is not None else ""
        typer.echo(f"error: {error_message(Exception(exc.format_message())).rstrip('.')}{where}", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(status if isinstance(status, int) else 0)  # as click's standalone mode does: --help returns 0
