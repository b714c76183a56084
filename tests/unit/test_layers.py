"""The architecture's layering holds: checked by import-linter and by what a real import loads."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_linter_contracts_hold() -> None:
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports, "import-linter is not installed in this environment"
    result = subprocess.run([lint_imports], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower() or "0 broken" in result.stdout.lower()


def _loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return {name.split(".")[0] for name in result.stdout.split()}


def test_the_cli_never_loads_textual() -> None:
    assert "textual" not in _loaded_after_import("caracal_ops.cli.main")


def test_the_core_loads_no_io_library() -> None:
    loaded = _loaded_after_import("caracald.core.policy, caracald.core.pricebook, caracald.core.allowlist")
    forbidden = {"psycopg", "psycopg_pool", "confluent_kafka", "redis", "starlette", "textual", "typer", "sh"}
    assert not loaded & forbidden
