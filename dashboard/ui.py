"""Small UI helpers shared by the pages: the active model and prompt, and errors shown on the page."""
from __future__ import annotations

import contextlib
from typing import Callable

import streamlit as st

from hiddenlens.studies.report import PREPEND_BOS, StudyResult, default_out

from .modelstore import ModelKey

KEY_STATE = "hl_model_key"
PROMPT_STATE = "hl_prompt"
BOS_STATE = "hl_add_bos"
DEFAULT_PROMPT = "The capital of France is Paris. The capital of Germany is"
PROMPTS_STATE = "hl_prompts"
#: prompts offered in the sidebar's prompt list before the user keeps any (one per kind of page)
EXAMPLE_PROMPTS = (DEFAULT_PROMPT, "The Eiffel Tower is in the city of", "He likes yellow. His father works as a",
                   "The capital of Australia is", "def add(a, b):\n    return a +")


def error_text(exc: BaseException) -> str:
    """One readable line for an exception (never a traceback)."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


@contextlib.contextmanager
def shown_errors(what: str):
    """Run a block; if it raises, show ``what`` and the error on the page instead of a traceback."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the page shows every failure as a message
        st.error(f"{what} failed: {error_text(exc)}")


def model_key() -> ModelKey | None:
    return st.session_state.get(KEY_STATE)


def require_model() -> ModelKey:
    """The loaded model's key, or stop the page with a message."""
    key = model_key()
    if key is None:
        st.warning("No model is loaded: pick one in the sidebar.")
        st.stop()
    return key


def prompt() -> str:
    """The prompt shared across pages (sidebar); stops the page when it is empty."""
    text = st.session_state.get(PROMPT_STATE, DEFAULT_PROMPT) or ""
    if not text.strip():
        st.warning("The prompt is empty: type one in the sidebar.")
        st.stop()
    return text


def add_bos() -> bool:
    """The sidebar's "Prepend BOS" toggle (default :data:`hiddenlens.studies.report.PREPEND_BOS`, as the CLI)."""
    return bool(st.session_state.get(BOS_STATE, PREPEND_BOS))


def save_as_run(make_result: Callable[[], StudyResult], study: str, key: str) -> None:
    """A "Save as run" button: on click, ``make_result()`` (a study's ``Result``) is written through its writer to a
    new folder ``<runs root>/<study>/<timestamp>`` (the Results page and ``Result.read`` open it)."""
    if st.button("Save as run", key=key, help=f"write this view as a {study} run folder under the runs root"):
        with shown_errors("Saving the run"):
            folder = make_result().write(default_out(study))
            st.success(f"Saved the {study} run: {folder}")


def save_view(key: ModelKey, page: str, params: dict, tables: dict, summary: dict | None = None,
               button_key: str = "") -> None:
    """"Save as run" for a page whose computation is not a paper study: the tables it shows, written through
    :mod:`hiddenlens.studies.view` (study ``view``) with the model, the prompt and ``params``."""
    from hiddenlens.studies.view import view_result

    save_as_run(lambda: view_result(key, page, prompt(), params, tables, summary), "view",
                button_key or f"save_{page}")


def table(df, name: str, key: str, **dataframe_kw) -> None:
    """Show ``df`` (``st.dataframe``, index hidden) with a "Download CSV" button beside it (file ``<name>.csv``,
    every row of ``df``, not only those on screen)."""
    st.dataframe(df, hide_index=True, **dataframe_kw)
    st.download_button("Download CSV", df.to_csv(index=False).encode(), file_name=f"{name}.csv", mime="text/csv",
                       key=key, on_click="ignore")
