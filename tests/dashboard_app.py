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


def intention_live(n: int = 4, regimes: tuple[str, ...] = ("direct",), budget: int = 4) -> AppTest:
    """The Intention page after "Compute live" on ``n`` problems of ``regimes`` with ``budget`` new tokens."""
    at = run_page("intention")
    at.radio(key="int_source").set_value("Compute live on a small set").run()
    at.slider(key="int_n").set_value(n).run()
    at.multiselect(key="int_regimes").set_value(list(regimes)).run()
    at.slider(key="int_budget").set_value(budget).run()
    at.toggle(key="int_run").set_value(True).run()
    return at
