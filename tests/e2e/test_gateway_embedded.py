"""``caracald up`` on the embedded default ends with a running gateway that meters real SDK calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import yaml

from tests.e2e.fake_upstream import OPENAI_KEY, TOKEN_TEXT
from tests.e2e.gateway_harness import FakeUpstreamThread
from tests.harness.ports import free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def test_caracald_up_serves_and_meters(tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("caracal-up")
    home.chmod(0o755)  # the embedded server runs as its own user when started by root
    port, metrics_port = free_port(), free_port()
    with FakeUpstreamThread() as upstream:
        key_file = home / "openai.key"
        key_file.write_text(OPENAI_KEY + "\n")
        config = home / "caracal.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "gateway": {
                        "port": port,
                        "metrics_port": metrics_port,
                        "cache_refresh_seconds": 0.2,
                        "upstreams": {
                            "openai": {
                                "base_url": upstream.url,
                                "api_key_file": str(key_file),
                                "flavor": "openai",
                            }
                        },
                    }
                }
            )
        )
        env = {**os.environ, "CARACAL_HOME": str(home), "CARACAL_CONFIG": str(config)}
        for name in ("CARACAL_DATABASE_URL", "CARACAL_DATA_DIR"):
            env.pop(name, None)

        def caracal(*args: str) -> str:
            done = subprocess.run(
                [str(BIN / "caracal"), *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            return done.stdout

        up = subprocess.Popen(
            [str(BIN / "caracald"), "up"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 150
            while True:
                assert up.poll() is None, up.stdout.read() if up.stdout else ""
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "caracald up did not start serving"
                time.sleep(0.2)

            agent = json.loads(
                caracal("agent", "create", "--name", "up-agent", "--owner", "o@example.com", "-o", "json")
            )
            agent_id = agent["agent_id"]
            caracal("policy", "create", "--agent-id", agent_id, "--limit", "10.00", "--change-reason", "test")
            caracal("allowlist", "create", "--agent-id", agent_id, "--pattern", f"{upstream.url}/*")
            caracal("pricebook", "set", "--model", "gpt-test", "--input", "1000", "--output", "2000")
            time.sleep(0.5)  # one cache refresh

            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/openai/v1", api_key=agent["api_key"], max_retries=0
            )
            reply = client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "hi there"}]
            )
            assert reply.choices[0].message.content == TOKEN_TEXT * 5
            assert upstream.fake.last.headers["Authorization"] == f"Bearer {OPENAI_KEY}"

            deadline = time.monotonic() + 10
            while True:
                (summary,) = json.loads(
                    caracal("ledger", "query", "--agent-id", agent_id, "--time-window", "daily", "-o", "json")
                ) or [{"event_count": 0}]
                if summary["event_count"] == 1:
                    break
                assert time.monotonic() < deadline, summary
                time.sleep(0.2)
            # 2 input tokens at $0.001 and 5 output tokens at $0.002
            assert Decimal(summary["total_spending"]) == Decimal("0.012")
            assert (
                "caracal_gateway_requests_total" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
            )
        finally:
            up.terminate()
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                up.kill()
            subprocess.run(
                [str(BIN / "caracal"), "db", "stop"], env=env, capture_output=True, timeout=60, check=False
            )
