"""``hiddenlens dashboard``: start the Streamlit dashboard (local only by default)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from . import app

MODEL_ENV = "HIDDENLENS_DASHBOARD_MODEL"  # same name as hiddenlens.dashboard.modelstore.MODEL_ENV (no streamlit import)
RUNS_ENV = "HIDDENLENS_RUNS_DIR"


def app_path() -> Path:
    import hiddenlens.dashboard

    return Path(hiddenlens.dashboard.__file__).parent / "app.py"


def streamlit_command(model: str, port: int = 8501, address: str = "127.0.0.1", runs: str | None = None,
                      headless: bool = True) -> tuple[list[str], dict[str, str]]:
    """The ``streamlit run`` argv and environment that serve the dashboard on ``address:port``."""
    argv = [sys.executable, "-m", "streamlit", "run", str(app_path()),
            f"--server.address={address}", f"--server.port={port}", f"--server.headless={str(headless).lower()}",
            "--server.enableXsrfProtection=true", "--server.maxUploadSize=16", "--server.maxMessageSize=64",
            "--server.fileWatcherType=none", "--server.runOnSave=false", "--browser.gatherUsageStats=false",
            "--client.toolbarMode=viewer", "--client.showErrorDetails=none", "--global.developmentMode=false"]
    env = dict(os.environ, **{MODEL_ENV: model})
    if runs:
        env[RUNS_ENV] = runs
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return argv, env


@app.command()
def dashboard(model: str = typer.Option("smollm2-135m-instruct", help="model opened first: embedded, tiny-llama, "
                                        "tiny-gpt2, a checkpoint folder or a hub id"),
              port: int = typer.Option(8501, help="port to serve on"),
              address: str = typer.Option("127.0.0.1", help="interface to bind; 0.0.0.0 exposes the dashboard to "
                                          "your network (no authentication)"),
              runs: str = typer.Option("runs", help="folder searched for project checkpoints and report folders"),
              headless: bool = typer.Option(True, help="do not open a browser window")) -> None:
    """Start the interactive dashboard on MODEL (open the printed URL in a browser)."""
    if model in ("embedded", "smollm2-135m-instruct"):
        from hiddenlens.models.embedded import ensure_converted

        ensure_converted()  # the one-off GGUF conversion runs here, visibly, not behind the first page load
    if address not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"warning: binding {address}: anyone who can reach this machine can use the dashboard",
                    fg=typer.colors.YELLOW, err=True)
    argv, env = streamlit_command(model, port, address, runs, headless)
    typer.echo(f"hiddenlens dashboard on http://{address}:{port} (model {model}); Ctrl-C stops it")
    os.execvpe(argv[0], argv, env)
