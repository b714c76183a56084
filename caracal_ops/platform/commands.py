"""Running external commands (systemctl, kubectl, pg_dump ...) through ``sh``: argument lists, never a shell
string; a timeout on every call; output captured; one clear error when a command fails."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import sh

from caracald.core.errors import CaracalError


@dataclass(frozen=True, slots=True)
class CommandResult:
    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str


class CommandError(CaracalError):
    """A command failed, timed out or is not installed. ``result`` is set when it ran."""

    reason = "command_failed"

    def __init__(self, message: str, result: CommandResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class CommandRunner(Protocol):
    """Runs one command; the platforms take one so that tests can record the argv they would run."""

    def __call__(
        self, argv: Sequence[str], *, timeout: float, ok_codes: Sequence[int] = (0,)
    ) -> CommandResult: ...


def display(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def run_command(
    argv: Sequence[str],
    *,
    timeout: float,
    ok_codes: Sequence[int] = (0,),
    env: Mapping[str, str] | None = None,
    on_stderr_line: Callable[[str], None] | None = None,
) -> CommandResult:
    """Run ``argv`` (no shell), wait at most ``timeout`` seconds, return its exit code and output.

    ``env`` replaces the environment (pass ``{**os.environ, ...}`` to extend it). ``on_stderr_line`` gets
    each line of standard error as it comes (progress); the lines are also kept in the result.
    """
    argv = tuple(str(a) for a in argv)
    shown = display(argv)
    try:
        command = sh.Command(argv[0])
    except sh.CommandNotFound:
        raise CommandError(f"{argv[0]} not found: cannot run `{shown}`") from None
    err_lines: list[str] = []

    def collect(line: str) -> None:
        err_lines.append(line)
        if on_stderr_line is not None:
            on_stderr_line(line.rstrip("\n"))

    try:
        finished = command(
            *argv[1:],
            _timeout=timeout,
            _ok_code=list(ok_codes),
            _return_cmd=True,
            _tty_out=False,
            _tty_in=False,
            _in="",
            _err=collect,
            _decode_errors="replace",
            _env=dict(env) if env is not None else None,
        )
    except sh.TimeoutException:
        raise CommandError(f"`{shown}` timed out after {timeout:g} s") from None
    except sh.ErrorReturnCode as exc:
        result = CommandResult(argv, int(exc.exit_code), _text(exc.stdout), "".join(err_lines))
        why = _last_line(result.stderr) or _last_line(result.stdout) or "no output"
        raise CommandError(f"`{shown}` failed (exit {result.exit_code}): {why}", result) from None
    return CommandResult(argv, int(finished.exit_code), _text(finished.stdout), "".join(err_lines))
