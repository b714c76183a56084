"""Two real ``caracald gateway`` processes share one budget in Redis; hundreds of concurrent calls never overspend.

The deployment: two gateway processes started from one configuration file (``budget.backend: redis`` on the
test Redis; ``bus.kind: postgres``: events go to the event log in the test database, and a ``caracald
ledger-writer`` process applies them to the ledger), both in front of the fake provider. Each test gives fresh agents a $1.00 daily budget and fires 600 concurrent requests, split
across the two gateways. Then, once every event is written:

* every answer is a 200 (admitted, and settled exactly once: one reservation and one settlement row under
  its request id, the settlement at the exact price of what the provider reported) or a 402 (refused,
  ``budget_exhausted``: no reservation or settlement row, no call reached the provider);
* the settled spend never exceeds the limit (of the agent, and of its delegating parent);
* the Redis counters (``caracal budget status`` on the Redis backend) hold exactly the ledger's sums, with no
  hold left in flight.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import httpx2 as httpx
import psycopg
import pytest
import redis
import yaml
from psycopg.rows import dict_row

from tests.e2e.fake_upstream import OPENAI_KEY
from tests.e2e.gateway_harness import (
    AgentKey,
    FakeUpstreamThread,
    make_agent,
    set_model_price,
    set_request_price,
)
from tests.harness import child_argv, stop_process, tail
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.postgres import PostgresService
from tests.harness.redis_server import RedisService
from tests.integration.conftest import Cli, migrated_template  # noqa: F401

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
GATEWAYS = 2
REQUESTS = 600
LIMIT = Decimal("1.00")
#: The flat price of one call to the "search" upstream.
FLAT = Decimal("0.01")
#: gpt-conc: $10 per million input tokens, $200 per million output tokens.
INPUT, OUTPUT = Decimal("0.00001"), Decimal("0.0002")
MAX_TOKENS = 50


@dataclass
class Gateway:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Stack:
    database_url: str
    cli: Cli
    redis_cli: Cli
    redis_url: str
    upstream: FakeUpstreamThread
    gateways: list[Gateway] = field(default_factory=list)

    def ledger(self, *agent_ids: str) -> list[dict[str, Any]]:
        with psycopg.connect(self.database_url, autocommit=True, row_factory=dict_row) as conn:
            return conn.execute(
                "SELECT * FROM ledger_events WHERE agent_id = ANY(%s) ORDER BY event_id",
                [list(agent_ids)],
            ).fetchall()


def _write_config(workdir: Path, database_url: str, redis_url: str, upstream: str) -> Path:
    config = {
        "database": {"url": database_url, "pool_size": 4, "max_overflow": 4},
        "redis": {"url": redis_url},
        "budget": {"backend": "redis"},
        "bus": {"kind": "postgres"},
        "gateway": {
            "host": LOOPBACK,
            "cache_refresh_seconds": 0.2,
            "upstream_timeout_seconds": 60,
            "upstreams": {
                "openai": {"base_url": upstream, "api_key": OPENAI_KEY, "flavor": "openai"},
                "search": {"base_url": f"{upstream}/search-api", "flavor": "generic"},
            },
        },
    }
    path = workdir / "caracal.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _daemon(
    workdir: Path, name: str, args: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CARACAL")}, **(env or {})}
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            child_argv([str(BIN / "caracald"), *args]), stdout=out, stderr=subprocess.STDOUT, env=env
        )
    return proc, log


def _start_gateway(workdir: Path, index: int, config: Path) -> Gateway:
    port = free_port()
    argv = ["gateway", "--config", str(config), "--port", str(port)]
    proc, log = _daemon(
        workdir, f"gateway-{index}", argv, {"CARACAL__GATEWAY__METRICS_PORT": str(free_port())}
    )
    return Gateway(f"http://{LOOPBACK}:{port}", proc, log)


def _wait_healthy(gateway: Gateway, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert gateway.proc.poll() is None, f"the gateway exited:\n{tail(gateway.log, 60)}"
        try:
            if httpx.get(f"{gateway.url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"the gateway did not become healthy:\n{tail(gateway.log, 60)}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def stack(
    postgres_service: PostgresService,
    migrated_template: str,  # noqa: F811
    redis_service: RedisService,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    name = f"t_conc_{uuid.uuid4().hex[:12]}"
    postgres_service.create_database(name, template=migrated_template)
    database_url = postgres_service.admin_uri(name)
    cli = Cli(database_url)
    redis_cli = Cli(
        database_url, env={"CARACAL__BUDGET__BACKEND": "redis", "CARACAL_REDIS_URL": redis_service.url}
    )
    set_request_price(cli, "http://127.0.0.1:*/search-api/*", str(FLAT))
    set_model_price(cli, "gpt-conc", "10", "200")
    workdir = tmp_path_factory.mktemp("concurrency")
    try:
        with FakeUpstreamThread() as upstream:
            built = Stack(database_url, cli, redis_cli, redis_service.url, upstream)
            config = _write_config(workdir, database_url, redis_service.url, upstream.url)
            writer_argv = ["ledger-writer", "--config", str(config), "--listen-host", LOOPBACK]
            writer_argv += ["--health-port", str(free_port()), "--metrics-port", str(free_port())]
            writer, writer_log = _daemon(workdir, "ledger-writer", writer_argv)
            try:
                for index in range(GATEWAYS):
                    built.gateways.append(_start_gateway(workdir, index, config))
                for gateway in built.gateways:
                    _wait_healthy(gateway)
                assert writer.poll() is None, tail(writer_log, 60)
                yield built
            finally:
                for gateway in built.gateways:
                    stop_process(gateway.proc, timeout=30)
                stop_process(writer, timeout=30)
    finally:
        postgres_service.drop_database(name)


# -- helpers --------------------------------------------------------------------------------------------------


def _await_cache(stack: Stack, timeout: float = 30) -> None:
    """Until every gateway's cache holds every agent in the store, with their policies and allowlists."""
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        agents, policies, rules = conn.execute(
            "SELECT (SELECT count(*) FROM agents), (SELECT count(*) FROM policies),"
            " (SELECT count(*) FROM allowlists WHERE status = 'active')"
        ).fetchone()  # type: ignore[misc]
    deadline = time.monotonic() + timeout
    for gateway in stack.gateways:
        while True:
            cache = httpx.get(f"{gateway.url}/stats", timeout=5).json()["cache"]
            seen = (cache["agents"], cache["policies"], cache["allowlist_rules"])
            if all(have >= want for have, want in zip(seen, (agents, policies, rules), strict=True)):
                break
            assert time.monotonic() < deadline, (cache, agents, policies, rules)
            time.sleep(0.1)


@dataclass
class Reply:
    agent: AgentKey
    status: int
    request_id: str
    deny_reason: str | None
    body: dict[str, Any]


async def _fire(stack: Stack, calls: list[tuple[AgentKey, str, dict[str, str], bytes]]) -> list[Reply]:
    """Send every call at once, the i-th to gateway i mod 2; ``calls`` are (agent, path, headers, body)."""
    timeout = aiohttp.ClientTimeout(total=180)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        start = asyncio.Event()

        async def one(index: int, agent: AgentKey, path: str, headers: dict[str, str], body: bytes) -> Reply:
            gateway = stack.gateways[index % len(stack.gateways)]
            await start.wait()
            async with session.post(
                gateway.url + path,
                data=body,
                headers={
                    "Authorization": f"Bearer {agent.api_key}",
                    "Content-Type": "application/json",
                    **headers,
                },
            ) as reply:
                payload = await reply.read()
                return Reply(
                    agent,
                    reply.status,
                    reply.headers.get("X-Caracal-Request-Id", ""),
                    reply.headers.get("X-Caracal-Deny-Reason"),
                    json.loads(payload) if payload else {},
                )

        tasks = [asyncio.ensure_future(one(i, *call)) for i, call in enumerate(calls)]
        await asyncio.sleep(0.05)
        start.set()
        return await asyncio.gather(*tasks)


def _settled_ledger(stack: Stack, replies: list[Reply], timeout: float = 60) -> list[dict[str, Any]]:
    """The agents' ledger rows, once every admitted request has its settlement and every refusal its denial."""
    agents = sorted({r.agent.agent_id for r in replies})
    admitted = sum(r.status == 200 for r in replies)
    denied = len(replies) - admitted
    deadline = time.monotonic() + timeout
    while True:
        rows = stack.ledger(*agents)
        kinds = Counter(r["event_type"] for r in rows)
        if kinds["settlement"] >= admitted and kinds["denial"] >= denied:
            time.sleep(0.5)  # anything late (there should be nothing) shows up in the checks below
            return stack.ledger(*agents)
        assert time.monotonic() < deadline, f"{kinds} for {admitted} admitted and {denied} denied requests"
        time.sleep(0.2)


def _check_every_request(replies: list[Reply], rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every reply is a 200 settled exactly once or a 402 with nothing charged; the settlements by request id."""
    statuses = Counter(r.status for r in replies)
    assert set(statuses) <= {200, 402}, Counter((r.status, r.deny_reason) for r in replies)
    assert statuses[200] > 0 and statuses[402] > 0, statuses
    by_request: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_request.setdefault(str(row["request_id"]), []).append(row)
    assert not [r for r in rows if r["event_type"] in ("expiry", "adjustment")]
    settlements: dict[str, dict[str, Any]] = {}
    for reply in replies:
        kinds = sorted(row["event_type"] for row in by_request.get(reply.request_id, []))
        if reply.status == 200:
            assert kinds == ["reservation", "settlement"], (reply.request_id, kinds)
            (settlement,) = [row for row in by_request[reply.request_id] if row["event_type"] == "settlement"]
            assert str(settlement["agent_id"]) == reply.agent.agent_id
            settlements[reply.request_id] = settlement
        else:
            assert reply.deny_reason == "budget_exhausted", reply
            assert reply.body["error"]["code"] == "budget_exhausted", reply.body
            assert kinds == ["denial"], (reply.request_id, kinds)
            assert by_request[reply.request_id][0]["cost"] == 0
    replied = {r.request_id for r in replies}
    assert len(replied) == len(replies), "request ids are unique"
    assert set(by_request) <= replied, "no ledger row for a request nobody answered"
    return settlements


def _spent_in(rows: list[dict[str, Any]], start: datetime, end: datetime, agents: set[str]) -> Decimal:
    return sum(
        (
            Decimal(r["cost"])
            for r in rows
            if r["event_type"] in ("settlement", "expiry", "adjustment")
            and str(r["agent_id"]) in agents
            and start <= r["occurred_at"] < end
        ),
        Decimal(0),
    )


def _check_counters(
    stack: Stack, agent: AgentKey, rows: list[dict[str, Any]], spenders: dict[str, set[str]]
) -> None:
    """``caracal budget status`` on Redis: per policy, settled equals the ledger's sum over the agents whose
    spend it carries (``spenders``: the agent owning the policy -> the agents spending on it), nothing held,
    never above the limit."""
    status = json.loads(
        stack.redis_cli.ok("budget", "status", "--agent-id", agent.agent_id, "-o", "json").stdout
    )
    assert status["source"] == "redis"
    assert sorted(p["agent_id"] for p in status["policies"]) == sorted(spenders)
    for policy in status["policies"]:
        start = datetime.fromisoformat(policy["window_start"])
        end = datetime.fromisoformat(policy["window_end"])
        ledger = _spent_in(rows, start, end, spenders[policy["agent_id"]])
        assert Decimal(policy["settled"]) == ledger, (policy, ledger)
        assert Decimal(policy["held"]) == 0 and policy["holds"] == 0, policy
        assert ledger <= Decimal(policy["limit"]), policy


def _flat_calls(agent: AgentKey, count: int) -> list[tuple[AgentKey, str, dict[str, str], bytes]]:
    return [(agent, f"/u/search/item/{uuid.uuid4().hex[:8]}", {}, b"{}") for _ in range(count)]


# -- the tests ------------------------------------------------------------------------------------------------


def test_flat_priced_calls_admit_exactly_what_the_budget_holds(stack: Stack) -> None:
    agent = make_agent(stack.cli, "crowd-flat", limit=str(LIMIT))
    _await_cache(stack)
    seen_before = len(stack.upstream.fake.requests)

    replies = asyncio.run(_fire(stack, _flat_calls(agent, REQUESTS)))

    # Each call costs exactly its hold: the budget takes exactly limit / price of them, whichever gateway.
    admitted = [r for r in replies if r.status == 200]
    assert {r.status for r in replies} == {200, 402}, Counter((r.status, r.deny_reason) for r in replies)
    assert len(admitted) == int(LIMIT / FLAT)
    assert len(stack.upstream.fake.requests) - seen_before == len(admitted), (
        "a refused call reached the provider"
    )
    rows = _settled_ledger(stack, replies)
    settlements = _check_every_request(replies, rows)
    assert all(s["cost"] == FLAT for s in settlements.values())
    assert sum(s["cost"] for s in settlements.values()) == LIMIT
    _check_counters(stack, agent, rows, {agent.agent_id: {agent.agent_id}})


def _token_calls(
    agent: AgentKey, rng: random.Random, count: int
) -> list[tuple[AgentKey, str, dict[str, str], bytes]]:
    calls = []
    for _ in range(count):
        words = " ".join("word" for _ in range(rng.randint(1, 30)))
        body = {
            "model": "gpt-conc",
            "messages": [{"role": "user", "content": words}],
            "max_tokens": MAX_TOKENS,
        }
        headers = {"X-Fake-Output-Tokens": str(rng.randint(0, MAX_TOKENS))}
        calls.append((agent, "/openai/v1/chat/completions", headers, json.dumps(body).encode()))
    return calls


def test_token_priced_calls_of_random_size_never_overspend(stack: Stack) -> None:
    agent = make_agent(stack.cli, "crowd-tokens", limit=str(LIMIT))
    _await_cache(stack)
    rng = random.Random(20240611)
    seen_before = len(stack.upstream.fake.requests)

    replies = asyncio.run(_fire(stack, _token_calls(agent, rng, REQUESTS)))
    # Then smaller waves, each once the one before is settled, until a wave admits nothing: holds are upper
    # bounds and a burst fills the budget with them, but what a call does not use is free again once it is
    # settled, and near the limit the output limit is clamped to what is left.
    for _ in range(30):
        _settled_ledger(stack, replies)
        wave = asyncio.run(_fire(stack, _token_calls(agent, rng, 100)))
        replies += wave
        if not any(r.status == 200 for r in wave):
            break

    admitted = [r for r in replies if r.status == 200]
    assert len(stack.upstream.fake.requests) - seen_before == len(admitted), (
        "a refused call reached the provider"
    )
    rows = _settled_ledger(stack, replies)
    settlements = _check_every_request(replies, rows)
    for reply in admitted:
        # Charged exactly what the provider reported, at the model's price.
        usage = reply.body["usage"]
        expected = usage["prompt_tokens"] * INPUT + usage["completion_tokens"] * OUTPUT
        settlement = settlements[reply.request_id]
        assert settlement["cost"] == expected, (reply.request_id, usage, settlement["cost"])
        assert settlement["cost"] <= Decimal(settlement["metadata"]["hold"])
    spent = sum((s["cost"] for s in settlements.values()), Decimal(0))
    assert spent <= LIMIT
    # The last wave was refused whole: what is left cannot pay for even one output token of any of its calls
    # (each would have been admitted with its output limit clamped to what is left).
    bounds = [r["metadata"]["input_token_bound"] for r in rows if r["event_type"] == "reservation"]
    assert LIMIT - spent < max(bounds) * INPUT + OUTPUT, (spent, max(bounds))
    _check_counters(stack, agent, rows, {agent.agent_id: {agent.agent_id}})


def test_a_parent_and_its_child_share_the_parent_budget(stack: Stack) -> None:
    parent = make_agent(stack.cli, "crowd-parent", limit=str(LIMIT))
    child = make_agent(stack.cli, "crowd-child", limit="0.60", parent=parent.agent_id)
    _await_cache(stack)
    calls = _flat_calls(parent, REQUESTS // 2) + _flat_calls(child, REQUESTS // 2)
    random.Random(7).shuffle(calls)

    replies = asyncio.run(_fire(stack, calls))

    admitted = Counter(r.agent.agent_id for r in replies if r.status == 200)
    # The parent's budget binds the two together: exactly limit / price calls in all, the child's at most
    # its own 0.60 / price.
    assert sum(admitted.values()) == int(LIMIT / FLAT), admitted
    assert 0 < admitted[child.agent_id] <= int(Decimal("0.60") / FLAT), admitted
    rows = _settled_ledger(stack, replies)
    settlements = _check_every_request(replies, rows)
    assert sum(s["cost"] for s in settlements.values()) == LIMIT
    child_spent = sum(s["cost"] for s in settlements.values() if str(s["agent_id"]) == child.agent_id)
    assert child_spent <= Decimal("0.60")
    both = {parent.agent_id, child.agent_id}
    _check_counters(stack, child, rows, {child.agent_id: {child.agent_id}, parent.agent_id: both})
    _check_counters(stack, parent, rows, {parent.agent_id: both})


def test_counters_redis_lost_are_rebuilt_from_the_ledger_before_anything_more_is_admitted(
    stack: Stack,
) -> None:
    agent = make_agent(stack.cli, "crowd-amnesia", limit=str(LIMIT))
    _await_cache(stack)
    affordable = int(LIMIT / FLAT)
    spent_before = affordable * 3 // 5
    first = asyncio.run(_fire(stack, _flat_calls(agent, spent_before)))
    assert {r.status for r in first} == {200}
    _settled_ledger(stack, first)

    # Redis loses all of Caracal's keys (restarted without its data): counters, holds, the loaded marker.
    client = redis.Redis.from_url(stack.redis_url)
    try:
        client.delete(*client.scan_iter("{caracal}:*", count=1000))
    finally:
        client.close()

    # Empty counters would admit the whole budget again: the gateways refuse until one of them has rebuilt
    # the counters from the ledger, and then admit exactly what is left.
    deadline = time.monotonic() + 60
    while True:
        (probe,) = asyncio.run(_fire(stack, _flat_calls(agent, 1)))
        if probe.status == 200:
            break
        assert (probe.status, probe.deny_reason) == (503, "budget_unavailable"), probe
        assert time.monotonic() < deadline, "the counters were not rebuilt"
        time.sleep(0.2)
    replies = asyncio.run(_fire(stack, _flat_calls(agent, affordable)))
    admitted = sum(r.status == 200 for r in replies)
    assert admitted == affordable - spent_before - 1, Counter((r.status, r.deny_reason) for r in replies)
    assert {r.deny_reason for r in replies if r.status != 200} == {"budget_exhausted"}
