"""The gateway's provider client against aiohttp's: latency and CPU per call, one keep-alive connection each.

Both call the fake provider (``tests/e2e/fake_upstream.py``, in a process of its own, as in the gateway bench)
with the same OpenAI chat completion, on uvloop, one call at a time, in interleaved blocks of 100 after a
warm-up, then 2,000 calls each for the CPU time of this process per call::

    .venv/bin/python bench/upstream_client_bench.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import uvloop

from bench.gateway_bench import free_port, serve_upstream
from caracald.gateway.http_client import UpstreamClient
from tests.e2e.fake_upstream import OPENAI_KEY

BODY = json.dumps(
    {
        "model": "bench-model",
        "messages": [{"role": "user", "content": "Say hello to the benchmark, briefly."}],
        "max_tokens": 16,
    }
).encode()


async def measure(port: int, calls: int) -> None:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=10), auto_decompress=True)
    headers = {"Authorization": f"Bearer {OPENAI_KEY}", "Content-Type": "application/json"}
    client = UpstreamClient(connect_timeout=5, read_timeout=30, total_timeout=30)
    raw_headers = [
        (b"authorization", f"Bearer {OPENAI_KEY}".encode()),
        (b"content-type", b"application/json"),
    ]

    async def with_aiohttp() -> None:
        async with session.post(url, headers=headers, data=BODY) as reply:
            await reply.read()

    async def with_caracal() -> None:
        reply = await client.request("POST", url, raw_headers, BODY)
        await reply.read()
        reply.release()

    clients: dict[str, Callable[[], Awaitable[None]]] = {"aiohttp": with_aiohttp, "caracal": with_caracal}
    seconds: dict[str, list[float]] = {name: [] for name in clients}
    try:
        for call in clients.values():
            for _ in range(300):
                await call()
        for _ in range(max(1, calls // 100)):
            for name, call in clients.items():
                for _ in range(100):
                    started = time.perf_counter()
                    await call()
                    seconds[name].append(time.perf_counter() - started)
        print(f"{'client':<10} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/call':>12}")
        for name, call in clients.items():
            cpu = time.process_time()
            for _ in range(calls):
                await call()
            per_call = (time.process_time() - cpu) / calls * 1e6
            ordered = sorted(seconds[name])
            p50, p99 = ordered[len(ordered) // 2] * 1e3, ordered[int(len(ordered) * 0.99)] * 1e3
            print(f"{name:<10} {p50:>8.3f} {p99:>8.3f} {per_call:>12.1f}")
    finally:
        await session.close()
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per client (latency and CPU each)")
    args = parser.parse_args()
    port = free_port()
    upstream = multiprocessing.Process(target=serve_upstream, args=(port,), daemon=True)
    upstream.start()
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the fake provider did not start") from None
                time.sleep(0.1)
        uvloop.run(measure(port, args.calls))
    finally:
        upstream.terminate()
        upstream.join(5)


if __name__ == "__main__":
    main()
