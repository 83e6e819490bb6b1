"""The import stack is strict: common <- models <- probes <- (analyses | interventions) <- studies <- benchmarks
<- (cli | dashboard), as the ``[tool.importlinter]`` contract in pyproject.toml states.

``lint-imports`` (import-linter, through grimp) finds the modules of ``hiddenlens`` by walking the folder of the
root package; this repository maps the subpackages to separate top-level folders (``[tool.setuptools]
package-dir``), which that walk never reaches. So the test stages a folder whose ``hiddenlens/`` mirrors the
mapping with symbolic links (grimp follows them), links ``pyproject.toml`` beside it, and runs
``lint-imports --config pyproject.toml`` there: the checked files are the repository's own.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: layers below the root package's re-exports: none of them may import ``hiddenlens`` itself
LOWER_LAYERS = ("common", "models", "probes", "analyses", "interventions")


def _stage(tmp: Path) -> Path:
    """``tmp/hiddenlens`` laid out like the installed package, every entry a link into the repository."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    pkg = tmp / "hiddenlens"
    pkg.mkdir()
    for entry in (ROOT / mapping["hiddenlens"]).iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    # shallow names first, so a nested mapping that already sits inside its parent's folder is skipped
    for name, folder in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):
        parts = name.split(".")[1:]
        if not parts:
            continue
        target = pkg.joinpath(*parts)
        if target.exists():
            if target.resolve() != (ROOT / folder).resolve():
                raise AssertionError(f"{name} maps to {folder}, but the staged {target} is {target.resolve()}")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(ROOT / folder)
    (tmp / "pyproject.toml").symlink_to(ROOT / "pyproject.toml")
    return tmp


def test_import_stack_contract_holds(tmp_path):
    """A missing layer is an error too, so a staging that hid a subpackage could not pass silently."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.is_file():
        pytest.fail(f"{lint} not found: install the test extras (pip install -e '.[test]', import-linter)")
    cwd = _stage(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(lint), "--config", "pyproject.toml", "--no-cache"], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"lint-imports failed (exit {res.returncode}):\n{out}"


def _root_imports(path: Path, package: list[str]) -> list[int]:
    """Line numbers where the module at ``path`` (in package ``package``) imports the root ``hiddenlens`` itself:
    ``import hiddenlens [as x]``, ``from hiddenlens import x`` or a relative import that climbs to the root."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import) and any(a.name == "hiddenlens" for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "hiddenlens":
                lines.append(node.lineno)
    return lines


def test_lower_layers_never_import_the_root_package():
    """``hiddenlens/__init__`` re-exports from upper layers, so ``import hiddenlens`` (or ``from hiddenlens import
    x``) in a lower layer would hide an upward import from the contract. Parsed, not grepped: docstring examples
    do not count, imports inside functions do."""
    offenders = []
    for layer in LOWER_LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            rel = path.relative_to(ROOT / layer)
            package = ["hiddenlens", layer, *rel.parent.parts]
            offenders += [f"{path.relative_to(ROOT)}:{no}" for no in _root_imports(path, package)]
    assert not offenders, ("import from the layer's own submodules instead (hiddenlens.probes, hiddenlens.models, "
                           "...), never from the root package:\n" + "\n".join(offenders))
