"""The runbook cannot drift from the CLI: every command line in it names a real command and real options."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from caracal_ops.cli.main import app as caracal_app
from caracald.cli import app as caracald_app

RUNBOOK = Path(__file__).resolve().parents[2] / "runbooks" / "runbook.md"
_BLOCK = re.compile(r"```bash\n(.*?)```", re.DOTALL)


def command_lines() -> list[str]:
    lines = []
    for block in _BLOCK.findall(RUNBOOK.read_text()):
        lines += [
            line.strip() for line in block.splitlines() if line.strip().startswith(("caracal ", "caracald "))
        ]
    return lines


def _split(line: str) -> tuple[str, list[str], list[str]]:
    words = shlex.split(line)
    program, rest = words[0], words[1:]
    path = []
    for word in rest:
        if word.startswith("-"):
            break
        path.append(word)
    options = [w.split("=", 1)[0] for w in rest if w.startswith("--")]
    return program, path, options


def test_the_runbook_has_commands() -> None:
    assert len(command_lines()) > 40


@pytest.mark.parametrize("line", command_lines())
def test_every_runbook_command_exists_with_its_options(line: str) -> None:
    program, path, options = _split(line)
    app = caracal_app if program == "caracal" else caracald_app
    # the longest prefix of the words that is a command; the rest are its arguments
    runner = CliRunner()
    for cut in range(len(path), 0, -1):
        result = runner.invoke(app, [*path[:cut], "--help"], env={"COLUMNS": "200"})
        if result.exit_code == 0 and "Commands" not in result.stdout.split("Options")[0][-200:]:
            break
    else:
        pytest.fail(f"no such command: {line}")
    assert result.exit_code == 0, result.output
    for option in options:
        assert option in result.stdout, (
            f"{line}: option {option} is not in `{program} {' '.join(path[:cut])} --help`"
        )
