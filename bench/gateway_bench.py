"""What the gateway adds: latency at concurrency 1 and throughput at concurrency 32, against two floors.

    .venv/bin/python bench/gateway_bench.py                  # about 5 minutes on 2 cores
    .venv/bin/python bench/gateway_bench.py --rounds 1 --duration 5 --latency-requests 300   # quick look

Three targets, each a server in its own process (uvicorn, one worker, uvloop + httptools, no access log),
all on loopback, all in front of the same fake provider (``tests/e2e/fake_upstream.py``, aiohttp, its own
process):

* **A** ``direct``: the fake provider itself;
* **B** ``passthrough``: ``bench/passthrough.py``, a minimal Starlette proxy on aiohttp's client, no checks;
* **C** ``caracal``: ``caracald gateway`` in the distributed deployment: budget counters in Redis, metering
  events to Kafka (``acks=all``, idempotent producer, local spool as fallback), the cache loaded from
  PostgreSQL; every check on (authentication, allowlist, token pricing, the Redis reservation, the
  reservation event acknowledged by Kafka before the answer goes back, the settlement in Redis and its event
  after it).

Every request is the same OpenAI chat completion (``max_tokens`` 16, 5 tokens answered). The run is
interleaved so that drift (CPU frequency, the JVM's JIT, a noisy neighbour) hits every target alike:

* latency: per round, ``--latency-requests`` requests to each target over one keep-alive connection, in
  blocks of ``--block`` taken in turn (A B C A B C ...); p50 and p99 per target and round;
* throughput: per round, ``wrk`` (one thread, ``--connections`` connections, ``--duration`` seconds) on A,
  then B, then C;

and the table shows the median over ``--rounds`` rounds. "Added" is the target's figure minus direct's.
PostgreSQL, Redis and Kafka are started from ``tests/harness`` (Kafka's jars come from its cache folder)
unless ``--postgres-uri``, ``--redis-url`` and ``--kafka-bootstrap`` name running ones.
``--profile DIR`` also records the gateway with py-spy during its throughput runs (``DIR/caracal-*.txt``,
collapsed stacks). ``--before DIR`` adds a fourth target, ``before``: the same deployment run from another
source tree, such as an older commit unpacked with ``git archive <commit> | tar -x -C DIR``.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from tests.harness.kafka import KafkaService

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent
MODEL = "bench-model"
BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello to the benchmark, briefly."}],
        "max_tokens": 16,
    },
    separators=(",", ":"),
)

# Targets from the brief: added latency at concurrency 1, and throughput against the pass-through floor.
TARGET_P50_MS = 1.0
TARGET_P99_MS = 5.0
TARGET_THROUGHPUT_RATIO = 0.5


# -- the fake provider, in a process of its own -------------------------------------------------------------


def serve_upstream(port: int) -> None:
    import uvloop
    from aiohttp import web

    from tests.e2e.fake_upstream import FakeUpstream, Recorded

    class Unrecorded(FakeUpstream):
        """The fake provider without its request log (it would grow for the whole run)."""

        async def _record(self, request: web.Request) -> Recorded:
            body = await request.read()
            return Recorded(request.method, request.path, request.query_string, {}, body)

    web.run_app(
        Unrecorded().app(),
        host="127.0.0.1",
        port=port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


# -- processes ------------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str
    auth: str
    proc: subprocess.Popen[bytes] | None = None
    latency_p50: list[float] = field(default_factory=list)
    latency_p99: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    wrk_p99: list[float] = field(default_factory=list)
    cpu_per_request: list[float] = field(default_factory=list)  # ms of the server process's CPU
    errors: int = 0

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 80


def free_port() -> int:
    from tests.harness.ports import free_port as pick

    return pick()


def spawn(
    argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    from tests.harness import child_argv

    with log.open("wb") as out:
        return subprocess.Popen(
            child_argv(argv), stdout=out, stderr=subprocess.STDOUT, env=env or os.environ.copy(), cwd=cwd
        )


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:  # noqa: S310 - loopback only
                if reply.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer within {timeout:g} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# -- the store, the agent, the config ----------------------------------------------------------------------


@dataclass
class Services:
    database_url: str
    redis_url: str
    kafka_bootstrap: str


def start_services(args: argparse.Namespace) -> Services:
    from caracald.store.migrate import migrate

    if args.postgres_uri:
        from tests.harness.postgres import PostgresService

        postgres = PostgresService.external(args.postgres_uri)
    else:
        from tests.harness.postgres import PostgresService

        print("starting PostgreSQL ...", flush=True)
        postgres = PostgresService.start()
    if args.redis_url:
        redis_url = args.redis_url
    else:
        from tests.harness.redis_server import RedisService

        print("starting Redis ...", flush=True)
        redis_url = RedisService().start().url
    if args.kafka_bootstrap:
        from tests.harness.kafka import KafkaService

        kafka = KafkaService.external(args.kafka_bootstrap)
    else:
        from tests.harness.kafka import KafkaService

        print("starting Kafka ...", flush=True)
        # The test harness runs the broker with the C1 compiler only, which starts fast; a benchmark wants
        # the steady-state broker a deployment runs (C2 too), unless told otherwise.
        os.environ.setdefault("CARACAL_TEST_KAFKA_JAVA_OPTS", "-XX:TieredStopAtLevel=4 -XX:CICompilerCount=2")
        kafka = KafkaService().launch().wait_ready()
    name = f"caracal_bench_{uuid.uuid4().hex[:8]}"
    database_url = postgres.create_database(name)
    migrate(database_url)
    create_metering_topic(kafka)
    return Services(database_url, redis_url, kafka.bootstrap_servers)


def create_metering_topic(kafka: KafkaService) -> None:
    """The topic the gateway produces to, unless it is there already."""
    from caracald.core.events import METERING_TOPIC

    try:
        kafka.create_topic(METERING_TOPIC, 12)
    except Exception as exc:  # already there (an external broker used before)
        if "TOPIC_ALREADY_EXISTS" not in str(exc):
            raise


def make_agent(database_url: str) -> str:
    from tests.integration.conftest import Cli

    cli = Cli(database_url)
    created = json.loads(
        cli.ok(
            "agent", "create", "--name", "bench-agent", "--owner", "bench@example.com", "-o", "json"
        ).stdout
    )
    agent_id = created["agent_id"]
    cli.ok("policy", "create", "--agent-id", agent_id, "--limit", "1000000.00", "--change-reason", "bench")
    cli.ok("allowlist", "create", "--agent-id", agent_id, "--pattern", "http://127.0.0.1:*")
    cli.ok(
        "pricebook",
        "set",
        "--model",
        MODEL,
        "--input",
        "0.15",
        "--output",
        "0.60",
        "--effective-from",
        "2020-01-01T00:00:00Z",
    )
    return str(created["api_key"])


def gateway_config(
    workdir: Path, services: Services, port: int, upstream_port: int, name: str = "caracal"
) -> Path:
    import yaml

    from tests.e2e.fake_upstream import OPENAI_KEY

    config = {
        "database": {"url": services.database_url},
        "redis": {"url": services.redis_url},
        "kafka": {"bootstrap_servers": services.kafka_bootstrap},
        "budget": {"backend": "redis"},
        "bus": {"kind": "kafka", "spool_dir": str(workdir / f"spool-{name}")},
        "gateway": {
            "host": "127.0.0.1",
            "port": port,
            "metrics_port": free_port(),
            "upstreams": {
                "openai": {
                    "base_url": f"http://127.0.0.1:{upstream_port}",
                    "api_key": OPENAI_KEY,
                    "flavor": "openai",
                }
            },
        },
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def make_targets(api_key: str, *, before: bool = False) -> list[Target]:
    """direct, passthrough and caracal (and before), each on a free port; not started yet."""
    from tests.e2e.fake_upstream import OPENAI_KEY

    targets = [
        Target("direct", f"http://127.0.0.1:{free_port()}/v1/chat/completions", OPENAI_KEY),
        Target("passthrough", f"http://127.0.0.1:{free_port()}/v1/chat/completions", OPENAI_KEY),
        Target("caracal", f"http://127.0.0.1:{free_port()}/openai/v1/chat/completions", api_key),
    ]
    if before:
        url = f"http://127.0.0.1:{free_port()}/openai/v1/chat/completions"
        targets.append(Target("before", url, api_key))
    return targets


def launch(targets: list[Target], workdir: Path, services: Services, *, before: Path | None = None) -> None:
    """Start every target's server (``target.proc``) and wait until each answers; the caller stops them
    (:func:`stop` on each ``target.proc``), also when this fails half-way."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARACAL")}
    uvicorn_flags = ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
    direct = targets[0]
    upstream_log = workdir / "upstream.log"
    direct.proc = spawn([sys.executable, __file__, "--serve-upstream", str(direct.port)], upstream_log, env)
    wait_http(f"http://127.0.0.1:{direct.port}/health", direct.proc, upstream_log)
    passthrough = targets[1]
    pass_log = workdir / "passthrough.log"
    passthrough.proc = spawn(
        [
            str(BIN / "uvicorn"),
            "bench.passthrough:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(passthrough.port),
            *uvicorn_flags,
        ],
        pass_log,
        {**env, "PASSTHROUGH_UPSTREAM": f"http://127.0.0.1:{direct.port}"},
    )
    wait_http(f"http://127.0.0.1:{passthrough.port}/health", passthrough.proc, pass_log)
    caracal = targets[2]
    config = gateway_config(workdir, services, caracal.port, direct.port)
    gateway_log = workdir / "gateway.log"
    caracal.proc = spawn([str(BIN / "caracald"), "gateway", "--config", str(config)], gateway_log, env)
    wait_http(f"http://127.0.0.1:{caracal.port}/health", caracal.proc, gateway_log)
    if before is not None:
        # The same deployment, run from another source tree (an older version of the gateway).
        older = targets[3]
        before_config = gateway_config(workdir, services, older.port, direct.port, "before")
        before_log = workdir / "before.log"
        older.proc = spawn(
            [
                sys.executable,
                "-c",
                "from caracald.cli import run; run()",
                "gateway",
                "--config",
                str(before_config),
            ],
            before_log,
            {**env, "PYTHONPATH": str(before)},
            cwd=before,
        )
        wait_http(f"http://127.0.0.1:{older.port}/health", older.proc, before_log)


# -- measuring ---------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latency_round(targets: list[Target], n: int, warmup: int, block: int) -> None:
    """``n`` requests to each target over one keep-alive connection, in blocks of ``block`` taken in turn
    (A B C A B C ...): drift hits every target alike, and a target's background work (the gateway settles
    after it answers) spills at most into the first request of the next block."""
    import aiohttp

    sessions = {t.name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for t in targets}
    samples: dict[str, list[float]] = {t.name: [] for t in targets}

    async def once(target: Target, session: aiohttp.ClientSession) -> float:
        headers = {"Authorization": f"Bearer {target.auth}", "Content-Type": "application/json"}
        started = time.perf_counter()
        async with session.post(target.url, data=BODY, headers=headers) as reply:
            await reply.read()
        elapsed = time.perf_counter() - started
        if reply.status != 200:
            target.errors += 1
        return elapsed * 1000

    try:
        for target in targets:
            for _ in range(warmup):
                await once(target, sessions[target.name])
        done = 0
        while done < n:
            size = min(block, n - done)
            for target in targets:
                session = sessions[target.name]
                samples[target.name].extend([await once(target, session) for _ in range(size)])
            done += size
    finally:
        for session in sessions.values():
            await session.close()
    for target in targets:
        target.latency_p50.append(statistics.median(samples[target.name]))
        target.latency_p99.append(percentile(samples[target.name], 0.99))


def wrk_script(workdir: Path, target: Target) -> Path:
    path = workdir / f"{target.name}.lua"
    body = BODY.replace("\\", "\\\\").replace('"', '\\"')
    path.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = "{body}"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {target.auth}"\n'
    )
    return path


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user and system, every thread) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(
    workdir: Path, target: Target, connections: int, duration: float
) -> tuple[float, float, int, int]:
    """Requests per second, p99 in ms, answers that were not 2xx (or socket errors), and requests done."""
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--latency",
        "-s",
        str(wrk_script(workdir, target)),
        target.url,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True)
    out = done.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99_match = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    p99 = 0.0
    if p99_match:
        p99 = float(p99_match.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99_match.group(2)]
    bad = 0
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        bad += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        bad += sum(int(g) for g in m.groups())
    done_match = re.search(r"(\d+) requests in", out)
    return rps, p99, bad, int(done_match.group(1)) if done_match else 0


def profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(BIN / "py-spy")
    if not Path(spy).exists():
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return None
    argv = [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200", "--nonblocking"]
    return subprocess.Popen(
        [*argv, "-f", "raw", "-o", str(out.with_suffix(".txt"))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


# -- the run -----------------------------------------------------------------------------------------------


def metric(metrics_text: str, name: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def report(targets: list[Target], args: argparse.Namespace) -> bool:
    direct, passthrough, caracal = targets[:3]
    med = statistics.median
    print()
    print(
        f"{'target':<13}{'p50 ms':>9}{'p99 ms':>9}{'added p50':>11}{'added p99':>11}"
        f"{'req/s c' + str(args.connections):>12}{'vs pass':>9}{'wrk p99 ms':>12}{'errors':>8}"
        f"{'CPU ms/req':>12}{'pass/CPU':>10}"
    )
    for t in targets:
        added50 = med(t.latency_p50) - med(direct.latency_p50)
        added99 = med(t.latency_p99) - med(direct.latency_p99)
        rps = med(t.rps) if t.rps else float("nan")
        ratio = rps / med(passthrough.rps) if passthrough.rps else float("nan")
        wrk99 = med(t.wrk_p99) if t.wrk_p99 else float("nan")
        cpu = med(t.cpu_per_request) if t.cpu_per_request else float("nan")
        pass_cpu = med(passthrough.cpu_per_request) if passthrough.cpu_per_request else float("nan")
        print(
            f"{t.name:<13}{med(t.latency_p50):9.3f}{med(t.latency_p99):9.3f}{added50:11.3f}{added99:11.3f}"
            f"{rps:12.0f}{ratio:9.2f}{wrk99:12.2f}{t.errors:8d}{cpu:12.3f}{pass_cpu / cpu:10.2f}"
        )
    print(
        f"(medians of {args.rounds} interleaved round(s); latency over {args.latency_requests} requests "
        f"per target and round at concurrency 1; throughput: wrk, {args.connections} connections, "
        f"{args.duration:g} s; CPU ms/req: the server process's CPU time during its wrk runs per request "
        f"served, and pass/CPU the pass-through's over the target's: what the throughput ratio would be on "
        f"a CPU of its own)"
    )
    added50 = med(caracal.latency_p50) - med(direct.latency_p50)
    added99 = med(caracal.latency_p99) - med(direct.latency_p99)
    checks = [
        (f"added p50 <= {TARGET_P50_MS} ms", added50 <= TARGET_P50_MS, f"{added50:.3f} ms"),
        (f"added p99 <= {TARGET_P99_MS} ms", added99 <= TARGET_P99_MS, f"{added99:.3f} ms"),
    ]
    if caracal.rps and passthrough.rps:
        ratio = med(caracal.rps) / med(passthrough.rps)
        checks.append(
            (f"req/s >= {TARGET_THROUGHPUT_RATIO:.0%} of pass-through", ratio >= 0.5, f"{ratio:.2f}")
        )
    ok = True
    for what, passed, value in checks:
        print(f"  {'met   ' if passed else 'MISSED'} {what}: {value}")
        ok = ok and passed
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=200, help="requests per target before measuring")
    parser.add_argument("--block", type=int, default=100, help="latency requests per target in a row")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per wrk run")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--postgres-uri", help="a running PostgreSQL (superuser URI)")
    parser.add_argument("--redis-url", help="a running Redis")
    parser.add_argument("--kafka-bootstrap", help="a running Kafka broker")
    parser.add_argument("--profile", type=Path, help="record the gateway with py-spy into this folder")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, config)")
    parser.add_argument(
        "--before",
        type=Path,
        help="also measure the gateway of another source tree (e.g. an older commit's, from git archive)",
    )
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return 0
    if shutil.which("wrk") is None and not args.no_throughput:
        raise SystemExit("wrk not found: apt-get install wrk (or run with --no-throughput)")

    workdir = Path(tempfile.mkdtemp(prefix="caracal-bench-"))
    services = start_services(args)
    api_key = make_agent(services.database_url)
    targets = make_targets(api_key, before=args.before is not None)
    try:
        launch(targets, workdir, services, before=args.before)
        print(f"servers up (work folder {workdir}); measuring ...", flush=True)
        load_before = os.getloadavg()

        import uvloop

        for round_no in range(1, args.rounds + 1):
            uvloop.run(latency_round(targets, args.latency_requests, args.warmup, args.block))
            line = "  ".join(
                f"{t.name} p50 {t.latency_p50[-1]:.3f} p99 {t.latency_p99[-1]:.3f}" for t in targets
            )
            print(f"round {round_no} latency (ms): {line}", flush=True)
            if args.no_throughput:
                continue
            for target in targets:
                spy = None
                if args.profile and target.name == "caracal" and target.proc is not None:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    spy = profile(target.proc.pid, args.duration, args.profile / f"caracal-{round_no}")
                assert target.proc is not None
                cpu_before = process_cpu_seconds(target.proc.pid)
                rps, p99, bad, done = run_wrk(workdir, target, args.connections, args.duration)
                cpu = process_cpu_seconds(target.proc.pid) - cpu_before
                if spy is not None:
                    spy.wait(60)
                if done:
                    target.cpu_per_request.append(cpu / done * 1000)
                target.rps.append(rps)
                target.wrk_p99.append(p99)
                target.errors += bad
                per_request = f"{target.cpu_per_request[-1]:.3f}" if done else "?"
                print(
                    f"round {round_no} {target.name}: {rps:.0f} req/s, p99 {p99:.2f} ms, {bad} errors, "
                    f"{per_request} ms of its CPU per request",
                    flush=True,
                )
        # The last wrk run may have just ended: wait for the gateway to settle what it had in flight.
        waited = time.monotonic()
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{targets[2].port}/stats", timeout=5) as reply:
                stats = json.loads(reply.read())
            idle = not stats.get("budget_holds_in_flight") and not stats.get("background_tasks")
            if idle or time.monotonic() - waited > 30:
                break
            time.sleep(0.2)
        stats["seconds_to_settle"] = round(time.monotonic() - waited, 1)
        ok = report(targets, args)
        load_after = os.getloadavg()
        print(
            f"load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
            f"after: {', '.join(f'{x:.2f}' for x in load_after)} ({os.cpu_count()} CPUs)"
        )
        print(f"gateway /stats at the end: {json.dumps(stats, default=str)[:400]}")
        spooled = stats.get("spool_bytes")
        print(f"spool bytes at the end: {spooled} (0: every event was acknowledged by Kafka)")
        return 0 if ok else 1
    finally:
        for target in reversed(targets):
            stop(target.proc)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        from tests.harness import stop_all

        stop_all()


if __name__ == "__main__":
    raise SystemExit(main())
