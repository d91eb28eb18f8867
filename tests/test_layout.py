"""Layout of the code base: no Python file over 300 lines, no function over 50 (tests included), no import pointing
up a room (ARCHITECTURE.md; the contracts in .importlinter)."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = (ROOT / "app" / "zk0", ROOT / "tests")
MAX_FILE_LINES = 300
MAX_FUNCTION_LINES = 50


def _sources() -> list[Path]:
    files = sorted(p for folder in CHECKED for p in folder.rglob("*.py"))
    assert files, f"no Python files under {[str(f) for f in CHECKED]}"
    return files


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def long_files(paths: list[Path], limit: int = MAX_FILE_LINES) -> list[str]:
    """'path (N lines)' for each file longer than `limit` lines."""
    out = []
    for path in paths:
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > limit:
            out.append(f"{_name(path)} ({lines} lines)")
    return out


def long_functions(paths: list[Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'path:line name (N lines)' for each function or method, nested ones too, longer than `limit` lines."""
    out = []
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{_name(path)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_file_is_over_the_limit():
    offenders = long_files(_sources())
    assert not offenders, f"files over {MAX_FILE_LINES} lines (split them by concern):\n" + "\n".join(offenders)


def test_no_function_is_over_the_limit():
    offenders = long_functions(_sources())
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(offenders)


def test_the_checks_find_offenders(tmp_path):
    def body(lines: int, indent: str) -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(lines))

    path = tmp_path / "big.py"
    # fits() is exactly at the limit (a def line and 49 more), the method too_long() one line over it.
    path.write_text(f"def fits():\n{body(49, '    ')}\n\nclass C:\n    def too_long(self):\n{body(50, '        ')}")
    assert [o.split(" ", 1)[1] for o in long_functions([path])] == ["too_long (51 lines)"]
    assert long_functions([path], limit=MAX_FUNCTION_LINES + 1) == []
    assert long_files([path], limit=10) and not long_files([path], limit=1000)


def lint_imports(package_root: Path) -> subprocess.CompletedProcess:
    """Run import-linter's contracts (.importlinter) on the `zk0` package under `package_root`."""
    tool = Path(sys.executable).with_name("lint-imports")
    assert tool.exists(), f"{tool} is missing: pip install -e './app[test]' installs import-linter"
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    return subprocess.run([str(tool), "--no-cache", "--no-logo", str(ROOT / ".importlinter")], cwd=package_root,
                          env=env, capture_output=True, text=True, timeout=120)


def test_each_room_imports_only_the_rooms_below_it():
    """ARCHITECTURE.md's rooms, as import-linter contracts: no import points up (or sideways between node/server)."""
    run = lint_imports(ROOT / "app")
    assert run.returncode == 0, run.stdout + run.stderr


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "app" / "zk0", tmp_path / "zk0", ignore=shutil.ignore_patterns("__pycache__"))
    errors = tmp_path / "zk0" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom .deploy import local  # noqa: F401\n")  # core -> launcher
    run = lint_imports(tmp_path)
    assert run.returncode != 0 and "zk0.errors is not allowed to import zk0.deploy" in run.stdout, run.stdout
