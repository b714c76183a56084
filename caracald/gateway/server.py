"""Running the gateway from the configuration: the store, the budget backend, the event sink, uvicorn.

* Budget: ``budget.backend: local`` runs the in-process counters, seeded at start from the ledger
  (:mod:`caracald.gateway.local_counters`); ``redis`` shares them with every replica (``redis.url``).
* Events: with ``bus.kind: kafka`` they go to Kafka, otherwise to the event log in PostgreSQL, through the
  local spool when ``bus.spool_dir`` is set; the ledger writer applies them (``caracald up`` runs it, and the
  audit logger, in process).
* The deny-all switch is read from PostgreSQL, and from Redis when ``redis.url`` is set.

One uvicorn worker per process, on uvloop with the httptools parser when they are installed (they are
dependencies; the plain asyncio loop and h11 remain the fallback), without an access log (the metrics count
every answer); ``READY=1`` goes to systemd once the socket listens, and the watchdog is fed while the event
loop turns and the cache can serve.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import ssl
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import uvicorn

from caracald.budget.base import BudgetBackend
from caracald.gateway.app import GatewayDeps, create_app
from caracald.gateway.cache import PostgresSnapshotSource
from caracald.gateway.counters import CounterGuard
from caracald.gateway.journal import ChargeJournal
from caracald.gateway.sinks import EventSink, LoopDelivery, SplitSink
from caracald.gateway.switches import PostgresSwitch, RedisSwitch, SwitchSource
from caracald.runtime.config import CaracalConfig
from caracald.runtime.sdnotify import Notifier, Watchdog
from caracald.store.connect import daemon_pool_sizes, open_database
from caracald.store.database import Database

log = logging.getLogger(__name__)

#: Redis connections per gateway process, and how long a request may wait for a free one. A burst of
#: hundreds of requests queues for connections while the event loop works through it: that wait is load,
#: not an unreachable Redis (a dead or hung Redis fails each command within its 1 s socket timeout).
REDIS_CONNECTIONS = 256
REDIS_POOL_TIMEOUT_SECONDS = 10.0

#: The subfolder of ``bus.spool_dir`` where earlier versions' unbatched Kafka producer spooled.
PROMPT_SPOOL = "prompt"
#: The write-ahead journal of charges, in ``bus.spool_dir``.
JOURNAL_FILE = "charges.journal"


async def make_budget(
    config: CaracalConfig, db: Database, stack: AsyncExitStack, sink: EventSink
) -> BudgetBackend:
    if config.budget.backend == "redis":
        from caracald.budget.redis_backend import RedisBudget

        if config.redis.url is None:
            raise SystemExit("budget.backend is redis but redis.url is not set")
        redis_budget = RedisBudget.from_url(
            config.redis.url.get_secret_value(),
            max_connections=REDIS_CONNECTIONS,
            pool_timeout=REDIS_POOL_TIMEOUT_SECONDS,
            require_loaded=True,  # empty counters (Redis lost its data) must refuse, not admit anything
        )
        stack.push_async_callback(redis_budget.close)
        guard = CounterGuard(redis_budget, db)
        try:
            await guard.ensure_loaded()
        except Exception as exc:  # admission fails closed until the guard manages it
            log.warning("budget counters not checked at start: %s", exc)
        watching = asyncio.create_task(guard.run(), name="caracal-budget-counters")
        stack.callback(watching.cancel)
        return redis_budget
    from caracald.gateway.local_counters import open_local_budget

    return await open_local_budget(db, sink, event_log=config.bus.kind == "postgres")


def make_sink(config: CaracalConfig, db: Database) -> EventSink:
    if config.bus.kind == "kafka":
        from caracald.bus.base import ProducerSink
        from caracald.bus.kafka import KafkaProducer, client_config

        if config.bus.spool_dir is not None:
            from caracald.bus.spool import SUFFIX, Spool, SpoolingSink

            # With a spool folder the gateway journals its reservations (see ``serve``) and no request waits
            # for their acknowledgement: one producer, through the spool, batching for as long as the config
            # allows. Its deliveries reach the event loop in batches (LoopDelivery).
            linger = {"linger.ms": config.kafka.gateway_linger_ms}
            batched: Any = LoopDelivery(KafkaProducer(client_config(config.kafka, **linger)))
            sink = SpoolingSink(batched, Spool(config.bus.spool_dir))
            leftover = config.bus.spool_dir / PROMPT_SPOOL
            if leftover.is_dir() and any(leftover.glob(f"*{SUFFIX}")):
                # What an earlier version's unbatched producer left in its spool is forwarded too.
                return SplitSink(SpoolingSink(batched, Spool(leftover)), sink, quiet_below=0)
            return sink
        # Without one, requests wait for their reservation events (see SplitSink): a producer without linger
        # for those of a quiet gateway, the batching one for everything else.
        batched = LoopDelivery(KafkaProducer(client_config(config.kafka)))
        prompt: Any = LoopDelivery(KafkaProducer(client_config(config.kafka, **{"linger.ms": 0})))
        return SplitSink(ProducerSink(prompt), ProducerSink(batched))
    # The event log in PostgreSQL: the ledger writer applies the events (caracald up runs it in process).
    from caracald.bus.base import ProducerSink
    from caracald.bus.pg_log import PgLogProducer

    log_producer = PgLogProducer(db.url, application_name="caracal-gateway-events")
    if config.bus.spool_dir is not None:
        from caracald.bus.spool import Spool, SpoolingSink

        return SpoolingSink(log_producer, Spool(config.bus.spool_dir))
    return ProducerSink(log_producer)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def uvicorn_config(config: CaracalConfig, app: Any) -> uvicorn.Config:
    gateway = config.gateway
    tls: dict[str, Any] = {}
    if gateway.tls.cert_file and gateway.tls.key_file:
        tls = {"ssl_certfile": str(gateway.tls.cert_file), "ssl_keyfile": str(gateway.tls.key_file)}
        if gateway.tls.client_ca_file:
            tls.update(ssl_ca_certs=str(gateway.tls.client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return uvicorn.Config(
        app,
        host=gateway.host,
        port=gateway.port,
        workers=1,
        lifespan="on",
        proxy_headers=False,
        server_header=False,
        http="httptools" if _has("httptools") else "h11",
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=30,
        **tls,
    )


async def serve(config: CaracalConfig, *, db: Database | None = None) -> None:
    """Run the gateway until SIGINT/SIGTERM."""
    async with AsyncExitStack() as stack:
        if db is None:
            db = await asyncio.to_thread(open_database, config, sizes=daemon_pool_sizes(config))
            stack.callback(db.close)
        sink = make_sink(config, db)
        closer = getattr(sink, "close", None)
        if closer is not None:
            if asyncio.iscoroutinefunction(closer):
                stack.push_async_callback(closer)
            else:
                stack.callback(closer)
        start = getattr(sink, "start", None)
        if start is not None and asyncio.iscoroutinefunction(start):
            await start()
        budget = await make_budget(config, db, stack, sink)
        switches: list[SwitchSource] = [PostgresSwitch(db)]
        if config.redis.url is not None:
            redis_switch = RedisSwitch(config.redis.url.get_secret_value())
            stack.push_async_callback(redis_switch.close)
            switches.append(redis_switch)
        journal = None
        if config.bus.spool_dir is not None:
            # Beside the spool, owned by this process like it: the charges a kill -9 must not lose.
            journal = ChargeJournal(config.bus.spool_dir / JOURNAL_FILE)
            stack.callback(journal.close)
        deps = GatewayDeps(
            config=config.gateway,
            snapshots=PostgresSnapshotSource(db),
            budget=budget,
            sink=sink,
            switches=switches,
            journal=journal,
        )
        app = create_app(deps)
        app.state.gateway.metrics.watch_pools(db.pool_sizes)
        server = uvicorn.Server(uvicorn_config(config, app))
        notifier = Notifier.from_environment()
        stack.callback(notifier.close)
        state = app.state.gateway

        async def ready() -> None:
            # uvicorn runs the lifespan before it binds: READY=1 only once the socket listens.
            while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
                await asyncio.sleep(0.05)
            # Everything built so far (modules, configuration, the first cache) lives as long as the process:
            # out of the collector's way, a full collection no longer walks it, which keeps those pauses off
            # the requests.
            gc.freeze()
            notifier.ready(f"serving on {config.gateway.host}:{config.gateway.port}")
            await Watchdog(notifier).run(healthy=lambda: state.cache.state != "unavailable")

        helper = asyncio.create_task(ready())
        try:
            await server.serve()
        finally:
            helper.cancel()
            notifier.stopping()


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (None: asyncio's own)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(config: CaracalConfig, *, db: Database | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(config, db=db))
