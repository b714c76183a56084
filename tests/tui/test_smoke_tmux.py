"""The real ``caracal-tui`` binary in a real terminal (tmux) against the embedded default: it starts the embedded
PostgreSQL in a fresh CARACAL_HOME, paints, switches views on keys, and quits on ``q``; the screen is read
back with ``tmux capture-pane``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "caracal-tui"
CARACAL = Path(sys.executable).parent / "caracal"

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Terminal:
    def __init__(self, session: str, env: dict[str, str]) -> None:
        self.session = session
        self.env = env

    def run(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", *args], check=True, capture_output=True, text=True, env=self.env
        ).stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.session)

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", self.session, *keys)

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.screen()
            if text in shown:
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} did not appear within {timeout} s; the screen:\n{shown}")
            time.sleep(0.2)

    def alive(self) -> bool:
        found = subprocess.run(
            ["tmux", "has-session", "-t", self.session], capture_output=True, env=self.env, check=False
        )
        return found.returncode == 0


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "caracal-home"
    folder.mkdir()
    yield folder
    # the embedded server is left running by design; stop the one this test started
    env = {**os.environ, "CARACAL_HOME": str(folder)}
    subprocess.run([str(CARACAL), "db", "stop"], env=env, capture_output=True, timeout=120, check=False)


def test_the_binary_paints_navigates_and_quits(home: Path, tmp_path: Path) -> None:
    session = f"caracal-tui-{uuid.uuid4().hex[:8]}"
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("CARACAL", "TMUX", "PYTEST"))
    }
    env.update({"CARACAL_HOME": str(home), "TERM": "xterm-256color", "TMUX_TMPDIR": str(tmp_path)})
    terminal = Terminal(session, env)
    status_file = tmp_path / "exit-status"
    command = f"{BIN} --refresh 1; echo $? > {status_file}; sleep 60"
    terminal.run("new-session", "-d", "-s", session, "-x", "100", "-y", "30", command)
    try:
        # the frame paints at once, before the embedded server is up
        shown = terminal.wait_for("Caracal ▸ Overview", timeout=30)
        assert "Components" in shown
        # then the embedded store answers, freshly initialised and migrated
        shown = terminal.wait_for("● OK", timeout=180)
        assert "store" in shown
        assert "embedded PostgreSQL in " + str(home) in shown.replace("\n", "") or "embedded" in shown
        assert "Traceback" not in shown

        terminal.keys("2")
        shown = terminal.wait_for("Caracal ▸ Agents and budgets")
        terminal.wait_for("0 agents")

        terminal.keys(":")
        terminal.wait_for("view:")
        terminal.keys("dlq", "Enter")
        shown = terminal.wait_for("no dead letters waiting")

        terminal.keys("?")
        terminal.wait_for("Keys: DLQ triage")
        terminal.keys("Escape")
        # a key sent right after Escape would read as alt+key: wait for the dialog to close first
        deadline = time.monotonic() + 30
        while "Keys: DLQ triage" in terminal.screen() and time.monotonic() < deadline:
            time.sleep(0.2)

        terminal.keys("6")
        shown = terminal.wait_for("operations available")
        assert "emergency stop-writes" in shown

        terminal.keys("q")
        deadline = time.monotonic() + 30
        while not status_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status_file.read_text().strip() == "0"
        assert "Traceback" not in terminal.screen()
    finally:
        if terminal.alive():
            terminal.run("kill-session", "-t", session)
