"""The command line: one module per command or group, every command listed in its help, shared options, the one
layer parser, and user errors as one line with exit status 2 (a traceback only with --debug)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hiddenlens.cli import app, main

TOP = {"info", "capture", "demo", "dashboard", "train-lens", "train-decider", "train-adapter", "patch", "doctor",
       "analyze", "bench", "bb", "truth", "steer", "reproduce"}
GROUPS = {"analyze": {"intention", "dynamics", "sinks", "leakage", "iteration", "tuned-lens"},
          "bench": {"capture", "store", "dimensionality", "steer", "gpu", "ray", "dashboard", "bb", "prefix",
                    "sinks-ablation", "steer-eval"},
          "bb": {"train", "reproduce"}, "truth": {"directions", "truthprint"}, "steer": {"run", "eval"}}
#: commands that load a model offer the shared options
LOADERS = [["info"], ["capture"], ["demo"], ["dashboard"], ["train-lens"], ["train-decider"],
           ["analyze", "intention"], ["analyze", "dynamics"], ["analyze", "sinks"], ["analyze", "leakage"],
           ["analyze", "iteration"], ["analyze", "tuned-lens"], ["truth", "directions"], ["truth", "truthprint"],
           ["steer", "run"], ["steer", "eval"], ["patch"], ["train-adapter"], ["reproduce"]]


def test_every_command_is_in_the_help():
    import typer.main

    root = typer.main.get_command(app)
    assert set(root.commands) == TOP
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    for name in TOP:
        assert name in res.output
    for group, names in GROUPS.items():
        assert set(root.commands[group].commands) == names
        out = CliRunner().invoke(app, [group, "--help"]).output
        assert all(n in out for n in names), (group, out)


def test_one_module_per_command_or_group():
    folder = Path(__import__("hiddenlens.cli", fromlist=["x"]).__file__).parent
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__", "options"}
    assert modules == {n.replace("-", "_") for n in TOP}


@pytest.mark.parametrize("cmd", LOADERS, ids=lambda c: "-".join(c))
def test_model_loading_commands_offer_the_shared_options(cmd):
    import typer.main

    command = typer.main.get_command(app)
    for part in cmd:
        command = command.commands[part]
    opts = {o for p in command.params for o in p.opts}
    model = {"--model"} if cmd != ["info"] else set()      # info takes the model as its argument
    assert model | {"--backend", "--device", "--dtype"} <= opts, (cmd, opts)


def _main(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_user_error_is_one_line_with_status_2(capsys, monkeypatch):
    monkeypatch.delenv("HIDDENLENS_DEBUG", raising=False)
    code, _, err = _main(["truth", "directions", "--model", "tiny-llama", "--layers", "3-1", "--k-heads", "0"],
                         capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: --layers:") and "reversed" in lines[0]
    assert "Traceback" not in err


def test_debug_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv("HIDDENLENS_DEBUG", raising=False)
    with pytest.raises(ValueError, match="out of range"):
        main(["--debug", "truth", "directions", "--model", "tiny-llama", "--layers", "9", "--k-heads", "0"])
    monkeypatch.setenv("HIDDENLENS_DEBUG", "1")
    with pytest.raises(ValueError, match="out of range"):
        main(["truth", "directions", "--model", "tiny-llama", "--layers", "9", "--k-heads", "0"])


def test_steer_prompt_runs_the_default_command(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("HIDDENLENS_DEBUG", raising=False)
    missing = tmp_path / "nothing.json"
    for argv in (["steer", "The capital of France is", "--direction", str(missing)],
                 ["steer", "--direction", str(missing), "The capital of France is"],
                 ["steer", "run", "The capital of France is", "--direction", str(missing)]):
        code, _, err = _main(argv + ["--model", "tiny-llama"], capsys)
        assert code == 2 and err.startswith("error: ") and "nothing" in err, (argv, err)


def test_leakage_ranges_go_through_the_layer_parser(capsys, monkeypatch):
    monkeypatch.delenv("HIDDENLENS_DEBUG", raising=False)
    code, _, err = _main(["analyze", "leakage", "--model", "tiny-llama", "--ranges", "0-3,3-1", "--limit", "1"],
                         capsys)
    assert code == 2 and "--ranges" in err and "reversed" in err


def test_no_private_layer_parsers():
    folder = Path(__import__("hiddenlens.cli", fromlist=["x"]).__file__).parent
    for p in folder.glob("*.py"):
        text = p.read_text()
        assert "def _layers" not in text and "resolve_sites" not in text, p.name


def test_console_script_reports_errors_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hiddenlens", "capture", "--prompts", str(tmp_path / "none.txt"),
                           "--sites", "blocks.0.resid_post", "--out", str(tmp_path / "o"), "--model", "tiny-llama"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
