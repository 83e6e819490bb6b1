"""The one way the dashboard tests open the app headless (Streamlit's ``AppTest``)."""
from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

import hiddenlens.dashboard

APP = str(Path(hiddenlens.dashboard.__file__).parent / "app.py")


def run_page(page: str | None = None, timeout: float = 120, **state) -> AppTest:
    """The app run once with ``state`` in its session state, then switched to ``views/<page>.py`` (None: the
    default page); fails on any exception the app raised."""
    at = AppTest.from_file(APP, default_timeout=timeout)
    for k, v in state.items():
        at.session_state[k] = v
    at.run()
    if page is not None:
        at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at
