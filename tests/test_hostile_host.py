"""Hostile cases for the host serving the dashboard: a DNS-rebinding WebSocket handshake (a page on a foreign name
that resolves to 127.0.0.1) against the real ``streamlit run`` server that ``hiddenlens dashboard`` starts, and a
port out of range."""
from __future__ import annotations

import os

import pytest
import websocket
from test_browser import streamlit_server

from hiddenlens.cli import main
from hiddenlens.cli.dashboard import allowed_hosts, streamlit_command


@pytest.fixture(scope="module")
def live_port(tmp_path_factory):
    """The port of a live dashboard server (tiny-llama, the exact ``hiddenlens dashboard`` command)."""
    tmp = tmp_path_factory.mktemp("host")
    (tmp / "runs").mkdir()
    with streamlit_server(tmp / "runs", tmp) as (_, port):
        yield port


def handshake(port: int, host: str) -> websocket.WebSocket:
    """A WebSocket handshake to the dashboard's stream as a browser on ``http://host`` makes it."""
    return websocket.create_connection(f"ws://127.0.0.1:{port}/_stcore/stream", host=host, origin=f"http://{host}",
                                       subprotocols=["streamlit"], timeout=20)


@pytest.mark.hostile("host", "WebSocket handshake with a foreign Host header (DNS rebinding)", expect="error",
                     risk="security")
def test_foreign_host_websocket_is_refused(live_port):
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        handshake(live_port, f"evil.example:{live_port}")
    assert refused.value.status_code == 403
    ws = handshake(live_port, f"127.0.0.1:{live_port}")  # the same server still takes its own name
    try:
        assert ws.connected
    finally:
        ws.close()


def test_allowed_hosts_follow_the_address_and_allow_host():
    assert allowed_hosts("127.0.0.1") == ["127.0.0.1", "localhost", "::1"]
    assert allowed_hosts("10.0.0.5", ["Dash.Example.org"]) == ["10.0.0.5", "localhost", "127.0.0.1", "::1",
                                                                "dash.example.org"]
    argv, _ = streamlit_command("tiny-llama", allow_hosts=["proxy.lan"])
    assert "--server.allowedHosts=proxy.lan" in argv and "--server.allowedHosts=localhost" in argv
    with pytest.raises(ValueError, match="--allow-host 'http://x'"):
        allowed_hosts("127.0.0.1", ["http://x"])


@pytest.mark.hostile("inputs", "hiddenlens dashboard --port 99999", expect="error", risk="raw")
def test_dashboard_port_out_of_range(capsys, monkeypatch):
    def started(*args):
        raise AssertionError(f"streamlit was started: {args[1]}")

    monkeypatch.setattr(os, "execvpe", started)  # a regression fails here instead of replacing the test process
    with pytest.raises(SystemExit) as exited:
        main(["dashboard", "--model", "tiny-llama", "--port", "99999"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.count("\n") == 1 and "--port 99999" in err and "1 to 65535" in err, err
