"""``hiddenlens dashboard``: start the Streamlit dashboard (local only by default)."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import typer

from .options import DEFAULT_MODEL, Backend, Device, Dtype, Model

# the same names as in hiddenlens.dashboard.modelstore (not imported here: that imports streamlit)
MODEL_ENV = "HIDDENLENS_DASHBOARD_MODEL"
BACKEND_ENV, DEVICE_ENV, DTYPE_ENV = ("HIDDENLENS_DASHBOARD_BACKEND", "HIDDENLENS_DASHBOARD_DEVICE",
                                      "HIDDENLENS_DASHBOARD_DTYPE")
RUNS_ENV = "HIDDENLENS_RUNS_DIR"
#: host names always allowed in the Host header of the dashboard's WebSocket (Streamlit's server.allowedHosts)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")


def app_path() -> Path:
    """The dashboard's Streamlit script, found without importing the dashboard (a sibling layer of the CLI)."""
    import importlib.util

    spec = importlib.util.find_spec("hiddenlens.dashboard")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the hiddenlens.dashboard package is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "app.py"


def check_port(port: int) -> int:
    """``port`` when it is a TCP port (1-65535); a one-line ``ValueError`` naming ``--port`` otherwise."""
    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port}: a port is a number from 1 to 65535 (e.g. --port 8501)")
    return port


def allowed_hosts(address: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The host names the server accepts in a WebSocket's Host header (against DNS rebinding): the bound
    ``address`` (for a wildcard bind, this machine's host name), the local names, and ``extra`` (``--allow-host``,
    e.g. the name a reverse proxy forwards; ``*`` accepts any)."""
    own = [socket.gethostname(), socket.getfqdn()] if address in WILDCARD_ADDRESSES else [address]
    for host in extra:
        if not host.strip() or host.count(":") == 1 or any(c in host for c in "/@ "):
            raise ValueError(f"--allow-host {host!r}: give a host name or address (e.g. --allow-host "
                             "dash.example.org), without scheme, path or port")
    return list(dict.fromkeys(h.strip().strip("[]").lower() for h in [*own, *LOCAL_HOSTS, *extra]))


def streamlit_command(model: str, port: int = 8501, address: str = "127.0.0.1", runs: str | None = None,
                      headless: bool = True, backend: str = "hf", device: str = "auto",
                      dtype: str = "auto", allow_hosts: list[str] | tuple[str, ...] = ()
                      ) -> tuple[list[str], dict[str, str]]:
    """The ``streamlit run`` argv and environment that serve the dashboard on ``address:port``; WebSocket
    connections are accepted only with a Host header naming one of :func:`allowed_hosts`."""
    argv = [sys.executable, "-m", "streamlit", "run", str(app_path()),
            f"--server.address={address}", f"--server.port={port}", f"--server.headless={str(headless).lower()}",
            "--server.enableXsrfProtection=true", "--server.maxUploadSize=16", "--server.maxMessageSize=64",
            "--server.fileWatcherType=none", "--server.runOnSave=false", "--browser.gatherUsageStats=false",
            "--client.toolbarMode=viewer", "--client.showErrorDetails=none", "--global.developmentMode=false"]
    argv += [f"--server.allowedHosts={host}" for host in allowed_hosts(address, allow_hosts)]
    env = dict(os.environ, **{MODEL_ENV: model, BACKEND_ENV: backend, DEVICE_ENV: device, DTYPE_ENV: dtype})
    if runs:
        env[RUNS_ENV] = runs
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return argv, env


def dashboard(model: Model = DEFAULT_MODEL, backend: Backend = "hf", device: Device = "auto", dtype: Dtype = "auto",
              port: int = typer.Option(8501, help="port to serve on (1-65535)"),
              address: str = typer.Option("127.0.0.1", help="interface to bind; 0.0.0.0 exposes the dashboard to "
                                          "your network (no authentication)"),
              runs: str = typer.Option("runs", help="runs root: project checkpoints and run folders "
                                       "(runs/<study>/<name>)"),
              headless: bool = typer.Option(True, help="do not open a browser window"),
              allow_host: list[str] = typer.Option([], "--allow-host", help="also accept this host name in the "
                                                   "Host header (repeatable; e.g. the name of a reverse proxy); "
                                                   "the bound address and localhost are always accepted")) -> None:
    """Start the interactive dashboard on MODEL (open the printed URL in a browser)."""
    check_port(port)
    hosts = allowed_hosts(address, allow_host)  # a bad --allow-host fails here, before any conversion
    if model in ("embedded", DEFAULT_MODEL):
        from hiddenlens.models.embedded import ensure_converted

        ensure_converted()  # the one-off GGUF conversion runs here, visibly, not behind the first page load
    if address not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"warning: binding {address}: anyone who can reach this machine can use the dashboard",
                    fg=typer.colors.YELLOW, err=True)
    if address in WILDCARD_ADDRESSES:
        typer.secho(f"note: only connections naming {', '.join(hosts)} in the URL are accepted; add the name or "
                    "address others use with --allow-host", err=True)
    argv, env = streamlit_command(model, port, address, runs, headless, backend, device, dtype, allow_host)
    typer.echo(f"hiddenlens dashboard on http://{address}:{port} (model {model}); Ctrl-C stops it")
    os.execvpe(argv[0], argv, env)
