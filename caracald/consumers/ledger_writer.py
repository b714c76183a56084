"""The ledger writer: metering events from the bus into ``ledger_events``, each exactly once.

One loop, on either bus (the same code reads Kafka or the embedded event log):

1. poll a batch of records (group ``ledger-writer-group`` on ``caracal.metering.events``);
2. decode each one; what cannot be decoded (not JSON, unknown schema version, bad fields) is a dead letter;
3. in **one** PostgreSQL transaction: ``COPY`` the batch into a temporary table, then ``INSERT`` into
   ``ledger_events`` the events it does not hold yet, each placed in the Merkle tree by the same statement
   (seq, batch, canonical bytes: :mod:`caracald.integrity.placement`, so that sealing never rewrites a
   row); and record the batch's dead letters in ``dlq_events``;
4. publish the dead letters to ``caracal.dlq`` and wait for the bus's acknowledgement;
5. commit the offsets, only now.

A crash anywhere replays the batch from the last committed offset, and the replay changes nothing: every
event's id is derived from its request id and kind, and the ledger's unique key absorbs it. So the ledger gets
exactly one row per event however often the records are delivered.

Failures:

* **PostgreSQL unavailable** (connection lost or refused, shutdown, failover, disk full, any error the writer
  does not recognise): the batch is kept, the writer reports not ready and retries with capped exponential
  backoff, without polling; when PostgreSQL is back it writes the batch and goes on. Nothing is dead-lettered
  for an outage.
* **A record PostgreSQL rejects** (constraint or data error, e.g. an unknown agent id): the batch is split in
  halves, each under a savepoint, until the bad records are alone; they become dead letters and the rest is
  written, in the same transaction.
* **Transient errors** (statement timeout, deadlock, serialization failure, lock timeout): the batch is
  retried ``max_retries`` times with backoff; if it still fails, it is split as above and the records that
  still fail are dead-lettered with their retry count.
* **SIGTERM** (:meth:`LedgerWriter.stop`): the batches in hand are finished and committed, then the loop
  ends. A stop during an outage abandons them uncommitted; they are read again on the next start.

Decoding runs on a fast path for well-formed events (canonical UUIDs and so on; parsed and type-checked by
``msgspec``) that builds the ``COPY`` line directly; anything it is unsure about goes through
:func:`caracald.core.events.decode`, the reference, which also gives the error for a dead letter. The two
agree on every event the fast path accepts (tested).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import random
import re
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from types import FrameType
from typing import Any, Final

import msgspec
import psycopg

from caracald.bus.base import (
    BatchConsumer,
    BusError,
    BusUnavailableError,
    CommitFailedError,
    Record,
    RecordProducer,
)
from caracald.consumers import dlq, metrics
from caracald.core import events
from caracald.core.errors import CaracalError, StoreUnavailableError
from caracald.core.events import DLQ_TOPIC, METERING_TOPIC, SCHEMA_VERSION, EventDecodeError
from caracald.core.ledger import LedgerEvent, LedgerEventType
from caracald.core.money import at_ledger_scale
from caracald.integrity import placement
from caracald.integrity.placement import DEFAULT_MAX_BATCH
from caracald.store import dlq as dlq_store
from caracald.store.dlq import DeadLetter

GROUP: Final = "ledger-writer-group"

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- records to COPY lines

#: The ``ledger_events`` columns the writer fills, in ``COPY`` order.
COLUMNS: Final = (
    "idempotency_key",
    "event_type",
    "agent_id",
    "request_id",
    "occurred_at",
    "resource",
    "model",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cost",
    "currency",
    "metadata",
)
_STAGING = "caracal_ledger_batch"
_CREATE_STAGING = f"""
CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGING} (
    idempotency_key uuid, event_type text, agent_id uuid, request_id uuid, occurred_at timestamptz,
    resource text, model text, input_tokens bigint, output_tokens bigint, cached_input_tokens bigint,
    cost numeric(38, 12), currency char(3), metadata jsonb,
    ord bigint GENERATED ALWAYS AS IDENTITY  -- arrival order: event ids (and so seqs) follow it
-- exactly the ledger's column types: the insert encodes these values as the row will hold them
) ON COMMIT DELETE ROWS
"""
_COPY = f"COPY {_STAGING} ({', '.join(COLUMNS)}) FROM STDIN"
#: Events placed in the Merkle tree as they are inserted (caracald.integrity.placement): all of them, or (when
#: some are recorded already: a replay, a duplicate) those not recorded yet, each once.
_INSERT_PLACED = placement.insert_sql(_STAGING, COLUMNS, skip_recorded=False)
_INSERT_PLACED_NEW = placement.insert_sql(_STAGING, COLUMNS, skip_recorded=True)
_IDEMPOTENCY_KEY = "ledger_events_idempotency_key_key"
#: Without a tree state to place them after (its row deleted): inserted unplaced, for the sealer to refuse
#: and the verifier to report, rather than not recorded at all.
_INSERT_UNPLACED = f"""
INSERT INTO ledger_events ({", ".join(COLUMNS)})
SELECT {", ".join(COLUMNS)} FROM {_STAGING} ORDER BY ord
ON CONFLICT (idempotency_key) DO NOTHING
"""

_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_KINDS = frozenset(kind.value for kind in LedgerEventType)
_COPY_SPECIAL = re.compile(r"[\\\t\n\r]")
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_NULL: Final = "\\N"
_TOKEN_FIELDS: Final = ("input_tokens", "output_tokens", "cached_input_tokens")


def _copy_text(value: str) -> str:
    return value.translate(_COPY_ESCAPES) if _COPY_SPECIAL.search(value) else value


# Agents, policies, resources and models recur from event to event: remembering the answers for them is
# cheaper than working them out again (0.1 against 0.6 to 0.9 us each).
_repeated = functools.lru_cache(maxsize=4096)


@_repeated
def _canonical_uuid(text: str) -> bool:
    return _CANONICAL_UUID.match(text) is not None


_copy_text_repeated = _repeated(_copy_text)


def _in_iso_form(text: str, parsed: datetime) -> bool:
    """Whether ``text``, which :meth:`datetime.fromisoformat` read as ``parsed``, is ``parsed.isoformat()``
    already, in UTC as the gateway writes it (the check costs a third of the formatting)."""
    size = len(text)
    return (
        (size == 25 or (size == 32 and text[19] == "." and parsed.microsecond != 0))
        and text[10] == "T"
        and text[4] == text[7] == "-"
        and text[13] == text[16] == ":"
        and text.endswith("+00:00")
    )


def _line(fields: Sequence[str]) -> bytes:
    return ("\t".join(fields) + "\n").encode()


@functools.lru_cache(maxsize=8192)
def _amount(text: str, currency: str) -> tuple[str, str]:
    """(amount at ledger scale, currency code) exactly as :class:`~caracald.core.money.Money` makes them,
    without making one: half the time (most costs are new; holds and zero costs repeat)."""
    amount, code = at_ledger_scale(Decimal(text), currency)
    return str(amount), code


class _WireEvent(msgspec.Struct):
    """A metering event's fields with the types the gateway writes. Decoding checks them in C; a payload
    that does not fit (a field missing or of another type, a number out of 64-bit range, not UTF-8, not
    JSON) goes to the reference decoder, which decides. Unknown fields are ignored, as the reference does;
    a duplicated key counts with its last value, as in the reference."""

    schema_version: int
    event_id: str
    kind: str
    request_id: str
    agent_id: str
    occurred_at: str
    cost: str
    currency: str
    resource: str | None = None
    model: str | None = None
    hold: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None
    policy_ids: list[str] | None = None
    deny_reason: str | None = None
    extra: dict[str, Any] | None = None


_decode_wire = msgspec.json.Decoder(_WireEvent).decode


def _fast_row(payload: bytes) -> tuple[str, bytes] | None:
    """(event id, COPY line) for a well-formed event, or None when the reference decoder must decide.

    Accepts only what :func:`caracald.core.events.decode` accepts, and yields the row its result would make.
    """
    try:
        event = _decode_wire(payload)
    except msgspec.MsgspecError:
        return None
    request_id = event.request_id
    agent_id = event.agent_id
    kind = event.kind
    if (
        event.schema_version != SCHEMA_VERSION
        or kind not in _KINDS
        or not _CANONICAL_UUID.match(request_id)
        or not _canonical_uuid(agent_id)
    ):
        return None
    event_id = events.event_id_text(request_id, kind)
    if event.event_id != event_id:
        return None
    occurred = event.occurred_at
    currency = event.currency
    hold = event.hold
    model = event.model
    deny_reason = event.deny_reason
    extra = event.extra
    policy_ids = event.policy_ids
    resource = event.resource or ""
    tokens = (
        _NULL if event.input_tokens is None else str(event.input_tokens),
        _NULL if event.output_tokens is None else str(event.output_tokens),
        _NULL if event.cached_input_tokens is None else str(event.cached_input_tokens),
    )
    if policy_ids:
        for policy_id in policy_ids:
            if not _canonical_uuid(policy_id):
                return None
    try:
        occurred_at = datetime.fromisoformat(occurred)
        if occurred_at.tzinfo is None:
            return None
        occurred_at.astimezone(UTC)  # OverflowError out of range in UTC, as the reference refuses it
        if not _in_iso_form(occurred, occurred_at):
            occurred = occurred_at.isoformat()
        amount, code = _amount(event.cost, currency)
        held = None if hold is None else _amount(hold, currency)[0]
        if extra:
            # What LedgerEvent.metadata holds: extra, then hold, policy ids and deny reason on top.
            metadata = dict(extra)
            if held is not None:
                metadata["hold"] = held
            if policy_ids:
                metadata["policy_ids"] = list(policy_ids)
            if deny_reason:
                metadata["deny_reason"] = deny_reason
            document = _copy_text(json.dumps(metadata, allow_nan=False))
        else:
            # The same document, built directly: decimals and canonical UUIDs need no JSON escaping.
            parts = []
            if held is not None:
                parts.append(f'"hold":"{held}"')
            if policy_ids:
                parts.append('"policy_ids":["' + '","'.join(policy_ids) + '"]')
            if deny_reason:
                parts.append('"deny_reason":' + _copy_text(json.dumps(deny_reason)))
            document = "{" + ",".join(parts) + "}"
        return event_id, _line(
            (
                event_id,
                kind,
                agent_id,
                request_id,
                occurred,
                _copy_text_repeated(resource),
                _NULL if model is None else _copy_text_repeated(model),
                *tokens,
                amount,
                code,
                document,
            )
        )
    except (ValueError, TypeError, ArithmeticError, OverflowError, CaracalError):
        return None


def _row_from_event(event: LedgerEvent) -> tuple[str, bytes]:
    """The COPY line of a decoded event; raises :class:`EventDecodeError` for fields of the wrong type."""
    tokens = []
    for name in _TOKEN_FIELDS:
        value = getattr(event, name)
        if value is not None and type(value) is not int:
            raise EventDecodeError(f"malformed metering event: {name} is not an integer")
        tokens.append(_NULL if value is None else str(value))
    if event.model is not None and type(event.model) is not str:
        raise EventDecodeError("malformed metering event: model is not a string")
    try:
        document = json.dumps(event.metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise EventDecodeError(f"malformed metering event: metadata is not JSON: {exc}") from None
    key = str(event.idempotency_key)
    return key, _line(
        (
            key,
            str(event.event_type),
            str(event.agent_id),
            _NULL if event.request_id is None else str(event.request_id),
            event.occurred_at.isoformat(),
            _copy_text(str(event.resource)),
            _NULL if event.model is None else _copy_text(event.model),
            *tokens,
            str(event.cost.amount),
            event.cost.currency,
            _copy_text(document),
        )
    )


def ledger_row(payload: bytes) -> tuple[str, bytes]:
    """(event id, ``COPY`` line for ``ledger_events``) of a metering event's payload.

    Raises :class:`~caracald.core.events.EventDecodeError` (or its subclass
    :class:`~caracald.core.events.UnknownSchemaVersionError`) when the payload is not a metering event.
    """
    try:
        row = _fast_row(payload)
        if row is not None:
            return row
        return _row_from_event(events.decode(payload).to_ledger_event())
    except EventDecodeError:
        raise
    except UnicodeEncodeError:  # a lone surrogate, from a JSON escape, is not UTF-8
        raise EventDecodeError("malformed metering event: a string is not valid Unicode") from None
    except Exception as exc:  # no record may take the writer down (e.g. nesting too deep to serialise)
        raise EventDecodeError(f"malformed metering event: {exc!r}") from None


# --------------------------------------------------------------------------- failures


class Failure(Enum):
    OUTAGE = "outage"  # PostgreSQL is away: keep the batch, retry without limit
    TRANSIENT = "transient"  # may pass on retry: bounded retries, then isolate and dead-letter
    PERMANENT = "permanent"  # some record is unacceptable: isolate it and dead-letter it


_TRANSIENT_STATES = frozenset({"57014", "55P03", "55006"})  # query canceled, lock not available, in use


def classify(exc: BaseException, conn: psycopg.Connection[Any] | None = None) -> Failure:
    """How the writer treats a database error."""
    if isinstance(exc, StoreUnavailableError | OSError):
        return Failure.OUTAGE
    if not isinstance(exc, psycopg.Error):
        return Failure.OUTAGE
    if conn is not None and (conn.closed or conn.broken):
        return Failure.OUTAGE
    state = exc.sqlstate
    if state is None:
        return Failure.OUTAGE  # a client-side or connection error
    if state in _TRANSIENT_STATES or state.startswith("40"):
        return Failure.TRANSIENT
    if state[:2] in ("22", "23"):
        return Failure.PERMANENT
    return Failure.OUTAGE


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    if isinstance(exc, psycopg.Error) and exc.diag.message_detail:
        text = f"{text} ({exc.diag.message_detail})"
    return text


def _error_type(exc: BaseException) -> str:
    return type(exc).__name__


class Abandoned(Exception):
    """The writer was stopped while a batch could not be finished; its offsets stay uncommitted."""


@dataclass(slots=True)
class Backoff:
    """Capped exponential backoff with full jitter."""

    initial: float = 0.1
    maximum: float = 10.0
    factor: float = 2.0

    def delay(self, attempt: int) -> float:
        ceiling = min(self.maximum, self.initial * self.factor ** max(attempt, 0))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not security


# --------------------------------------------------------------------------- the writer


@dataclass(slots=True)
class Health:
    """Readiness and liveness of a writer (wall-clock timestamps, seconds since the epoch)."""

    started_at: float = field(default_factory=time.time)
    #: The bus and PostgreSQL both answered the last time they were used.
    ready: bool = False
    #: The last poll of the bus that returned (with or without records).
    last_poll: float | None = None
    #: The last commit of offsets.
    last_commit: float | None = None
    #: The loop's last sign of life (also while it waits out an outage).
    last_heartbeat: float = field(default_factory=time.time)
    last_error: str | None = None

    def live(self, *, now: float | None = None, stale_after: float = 60.0) -> bool:
        """The loop is turning (an outage does not make it dead; a hang does)."""
        return (now if now is not None else time.time()) - self.last_heartbeat < stale_after


_Item = tuple[Record, str, bytes]


@dataclass(slots=True)
class _Batch:
    records: Sequence[Record]
    items: list[_Item]
    letters: list[DeadLetter]
    polled_at: float


@dataclass(frozen=True, slots=True)
class _Applied:
    inserted: int
    rejected: int
    letters: list[DeadLetter]


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    records: int
    inserted: int
    duplicates: int
    dead_lettered: int


class LedgerWriter:
    """Applies metering events from ``consumer`` to the ledger at ``database_url``; see the module doc.

    ``dlq_producer`` sends dead letters to ``dlq_topic`` (on Kafka, or on the event log in the embedded
    deployment).
    """

    def __init__(
        self,
        consumer: BatchConsumer,
        database_url: str,
        dlq_producer: RecordProducer,
        *,
        dlq_topic: str = DLQ_TOPIC,
        batch_size: int = 5000,
        poll_timeout: float = 0.5,
        max_retries: int = 3,
        backoff: Backoff | None = None,
        statement_timeout_ms: int = 60_000,
        connect_timeout: int = 5,
        dlq_timeout: float = 30.0,
        lag_interval: float = 5.0,
        dlq_stats_interval: float = 15.0,
        seal_batch_size: int = DEFAULT_MAX_BATCH,
        database_workers: int = 2,
    ) -> None:
        if seal_batch_size < 1:
            raise ValueError("a Merkle batch holds at least one event")
        if database_workers < 1:
            raise ValueError("the writer needs at least one database thread")
        self.consumer = consumer
        self.group = consumer.group
        self.database_url = database_url
        self.dlq_producer = dlq_producer
        self.dlq_topic = dlq_topic
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.max_retries = max_retries
        self.backoff = backoff or Backoff()
        self.statement_timeout_ms = statement_timeout_ms
        self.connect_timeout = connect_timeout
        self.dlq_timeout = dlq_timeout
        self.lag_interval = lag_interval
        self.dlq_stats_interval = dlq_stats_interval
        #: Events per Merkle batch (integrity.batch_size): the writer opens a new batch after so many.
        self.seal_batch_size = seal_batch_size
        self._sequence: str | None = None  # the identity sequence of ledger_events.event_id
        self.health = Health()
        self._stop = threading.Event()
        #: Database threads: while one inserts a batch, the next batch's COPY goes on in another.
        self.database_workers = database_workers
        self._local = threading.local()
        self._connections: set[psycopg.Connection[Any]] = set()
        self._connections_lock = threading.Lock()
        #: PostgreSQL took the last connection or transaction (no outage since).
        self._database_ok = False
        self._next_lag = 0.0
        self._lag_stale = False
        self._next_dlq_stats = 0.0
        self._errors = metrics.CONSUMER_ERRORS
        self._records = metrics.CONSUMER_RECORDS
        #: Called on every turn of the loop (also while it waits out an outage): the daemon feeds systemd's
        #: watchdog from it (see caracald.runtime.daemon).
        self.on_beat: Callable[[], None] | None = None

    # -- control

    def stop(self) -> None:
        """Finish the batches in hand, commit them and leave :meth:`run` (safe from a signal handler)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the writer gracefully (main thread only)."""

        def handler(signum: int, frame: FrameType | None) -> None:
            _log.info("signal %d: finishing the current batch, then stopping", signum)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def close(self) -> None:
        self.consumer.close()
        self._close_connections()

    def _set_ready(self, ready: bool, error: str | None = None) -> None:
        self.health.ready = ready
        if error is not None:
            self.health.last_error = error
        metrics.CONSUMER_READY.labels(self.group).set(1 if ready else 0)

    def _beat(self) -> None:
        self.health.last_heartbeat = time.time()
        if self.on_beat is not None:
            self.on_beat()

    def _wait(self, seconds: float) -> None:
        """Sleep (in slices, so that the heartbeat goes on); raise :class:`Abandoned` when stopping."""
        deadline = time.monotonic() + seconds
        while True:
            self._beat()
            if self._stop.is_set():
                raise Abandoned("stopped while retrying")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._stop.wait(min(remaining, 1.0))

    # -- the loop

    def run(self, *, max_batches: int | None = None, idle_exit: float | None = None) -> None:
        """Poll and apply batches until :meth:`stop`.

        Batches go through a pipeline: while this thread polls and decodes batch N+2, database threads write
        batches N and N+1, each on its own connection, so that N+1's ``COPY`` runs while N is inserted and
        committed (the insert itself waits for the placing lock: one batch at a time is placed in the Merkle
        tree). Offsets are committed once a batch's transaction has committed, always in order.
        ``max_batches`` and ``idle_exit`` (seconds without records) end the loop earlier, for tools and tests.
        """
        try:
            self._await_database()
        except Abandoned:
            return
        batches = 0
        failures = 0
        idle_since = time.monotonic()
        in_flight: deque[tuple[_Batch, Future[_Applied]]] = deque()
        with ThreadPoolExecutor(
            max_workers=self.database_workers, thread_name_prefix="caracal-ledger-db"
        ) as database:
            try:
                while not self._stop.is_set():
                    self._beat()
                    try:
                        records = self.consumer.poll_batch(self.batch_size, self.poll_timeout)
                    except BusError as exc:
                        records = []
                        self._errors.labels(self.group, _error_type(exc)).inc()
                        self._set_ready(False, f"bus: {exc}")
                        _log.warning("cannot poll the bus: %s", exc)
                        if not in_flight:
                            self._wait(self.backoff.delay(failures))
                        failures += 1
                    else:
                        failures = 0
                        self.health.last_poll = time.time()
                        if not self.health.ready and self._database_ok:
                            self._set_ready(True)
                    batch = self._prepare(records) if records else None
                    # Nothing new: commit what is in flight now rather than when more records come.
                    while in_flight and (batch is None or len(in_flight) >= self.database_workers):
                        self._finish(*in_flight.popleft())
                    if batch is not None:
                        in_flight.append((batch, database.submit(self._apply, batch)))
                        batches += 1
                        idle_since = time.monotonic()
                        if max_batches is not None and batches >= max_batches:
                            break
                    else:
                        if time.monotonic() >= self._next_dlq_stats:
                            # Also checks PostgreSQL while idle, on a thread that owns a connection.
                            database.submit(self._report_dlq)
                        if idle_exit is not None and time.monotonic() - idle_since >= idle_exit:
                            break
                    self._periodic(idle=batch is None and not in_flight)
                while in_flight:  # stopping: finish the batches in hand and commit them
                    self._finish(*in_flight.popleft())
            except Abandoned:
                if in_flight:
                    _log.warning(
                        "stopped with %d records not applied; they will be read again",
                        sum(len(batch.records) for batch, _ in in_flight),
                    )

    def process(self, records: Sequence[Record]) -> BatchOutcome:
        """Apply one batch and commit its offsets, in this thread; raise :class:`Abandoned` when stopped."""
        batch = self._prepare(records)
        done: Future[_Applied] = Future()
        done.set_result(self._apply(batch))
        return self._finish(batch, done)

    def _prepare(self, records: Sequence[Record]) -> _Batch:
        """Decode a batch: COPY lines for the events, dead letters for what is not an event."""
        items: list[_Item] = []
        letters: list[DeadLetter] = []
        for record in records:
            try:
                event_id, line = ledger_row(record.value)
            except EventDecodeError as exc:
                self._errors.labels(self.group, _error_type(exc)).inc()
                letters.append(
                    dlq.dead_letter(
                        record, group=self.group, error_type=_error_type(exc), error_message=str(exc)
                    )
                )
                continue
            items.append((record, event_id, line))
        return _Batch(records, items, letters, time.perf_counter())

    def _apply(self, batch: _Batch) -> _Applied:
        """The database stage: write the batch and its dead letters, publish the dead letters."""
        inserted, rejected = self._store(batch.items, batch.letters)
        letters = [*batch.letters, *rejected]
        if letters:
            self._publish(letters)
            self._next_dlq_stats = 0.0
        self._report_dlq()
        return _Applied(inserted, len(rejected), letters)

    def _finish(self, batch: _Batch, applied: Future[_Applied]) -> BatchOutcome:
        """Wait for the database stage of ``batch``, then commit its offsets and count it."""
        result = applied.result()  # raises Abandoned when the writer stopped during an outage
        self._commit(batch.records)
        duplicates = len(batch.items) - result.rejected - result.inserted
        dead = len(result.letters)
        self._records.labels(self.group, "applied").inc(result.inserted)
        self._records.labels(self.group, "duplicate").inc(duplicates)
        self._records.labels(self.group, "dead_lettered").inc(dead)
        metrics.MESSAGE_PROCESSING_DURATION.labels(self.group).observe(time.perf_counter() - batch.polled_at)
        if dead:
            _log.warning("%d of %d records dead-lettered", dead, len(batch.records))
        return BatchOutcome(len(batch.records), result.inserted, duplicates, dead)

    # -- PostgreSQL

    def _connection(self) -> psycopg.Connection[Any]:
        """This thread's connection (each database thread has its own), opened when needed."""
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            self._drop_connection()
            conn = psycopg.connect(
                self.database_url,
                autocommit=True,
                connect_timeout=self.connect_timeout,
                application_name=f"caracal-ledger-writer:{self.group}",
                # Offsets are committed once the commit returns: it must be durable by then, whatever the
                # server's default (an asynchronous commit lost in a crash would lose those events).
                # Canonical bytes are computed in the insert, with text as UTF-8 (as the sealer's are).
                options=f"-c statement_timeout={self.statement_timeout_ms} -c synchronous_commit=on"
                " -c client_encoding=UTF8",
            )
            try:
                conn.execute(_CREATE_STAGING)
            except BaseException:
                conn.close()
                raise
            self._local.conn = conn
            self._database_ok = True
            with self._connections_lock:
                self._connections.add(conn)
        return conn

    def _await_database(self) -> None:
        """Wait until PostgreSQL takes a connection, retrying while it is unavailable."""
        attempt = 0
        while True:
            try:
                self._connection()
                self._drop_connection()  # the database threads open their own
                return
            except (psycopg.Error, OSError) as exc:
                self._set_ready(False, f"PostgreSQL: {_describe(exc)}")
                self._errors.labels(self.group, _error_type(exc)).inc()
                if attempt == 0:
                    _log.error("cannot connect to PostgreSQL (%s); retrying", _describe(exc))
                self._wait(self.backoff.delay(attempt))
                attempt += 1

    def _drop_connection(self) -> None:
        """Close this thread's connection."""
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._connections_lock:
                self._connections.discard(conn)
            conn.close()

    def _close_connections(self) -> None:
        with self._connections_lock:
            connections, self._connections = self._connections, set()
        for conn in connections:
            conn.close()

    def _store(self, items: list[_Item], letters: list[DeadLetter]) -> tuple[int, list[DeadLetter]]:
        """Write the batch and its dead letters in one transaction, retrying as the failure demands."""
        outages = 0
        transient = 0
        isolate = False
        while True:
            self._beat()
            conn: psycopg.Connection[Any] | None = None
            try:
                conn = self._connection()
                with metrics.database_query("ledger_batch"), conn.transaction():
                    if isolate:
                        inserted, rejected = self._insert_isolating(conn, items, max(transient - 1, 0))
                    else:
                        inserted, rejected = self._insert(conn, [line for _, _, line in items]), []
                    dlq_store.insert(conn, [*letters, *rejected])
                if not self.health.ready:
                    self._set_ready(True)
                    _log.info("PostgreSQL is writable again")
                return inserted, rejected
            except (psycopg.Error, StoreUnavailableError, OSError) as exc:
                failure = classify(exc, conn)
                self._errors.labels(self.group, _error_type(exc)).inc()
                if failure is Failure.PERMANENT and not isolate:
                    isolate = True  # find the culprits at once: retrying will not help
                    continue
                if failure is Failure.TRANSIENT and not isolate:
                    transient += 1
                    _log.warning(
                        "batch failed (%s), attempt %d of %d", _describe(exc), transient, self.max_retries + 1
                    )
                    if transient > self.max_retries:
                        isolate = True
                        continue
                    self._wait(self.backoff.delay(transient - 1))
                    continue
                # An outage (or a failure while isolating, which only an outage or a bad dead letter makes).
                self._database_ok = False
                self._drop_connection()
                self._set_ready(False, f"PostgreSQL: {_describe(exc)}")
                if outages == 0:
                    _log.error(
                        "PostgreSQL is unavailable (%s); holding the batch and retrying", _describe(exc)
                    )
                self._wait(self.backoff.delay(outages))
                outages += 1

    def _insert(self, conn: psycopg.Connection[Any], lines: list[bytes], *, clear: bool = False) -> int:
        """Insert a batch through the staging table: the events the ledger does not hold yet, each once,
        placed in the Merkle tree (seq, batch, canonical bytes) by the same statement."""
        if not lines:
            return 0
        with conn.cursor() as cur:
            with cur.copy(_COPY) as copy:
                copy.write(b"".join(lines))
            placement.lock(conn)  # after the COPY: held only for the insert and the commit
            head = placement.head(conn)
            if head is None:
                _log.error("merkle_state has no row: events are recorded without a place in the Merkle tree")
                cur.execute(_INSERT_UNPLACED)
            else:
                if self._sequence is None:
                    self._sequence = placement.identity_sequence(conn)
                params = placement.insert_params(head, len(lines), self.seal_batch_size, self._sequence)
                try:
                    with conn.transaction():
                        cur.execute(_INSERT_PLACED, params)
                except psycopg.errors.UniqueViolation as exc:
                    if exc.diag.constraint_name != _IDEMPOTENCY_KEY:
                        raise
                    cur.execute(_INSERT_PLACED_NEW, params)
            inserted = max(cur.rowcount, 0)
            if clear:
                cur.execute(f"TRUNCATE {_STAGING}")
        return inserted

    def _insert_isolating(
        self, conn: psycopg.Connection[Any], items: list[_Item], retries: int
    ) -> tuple[int, list[DeadLetter]]:
        """Insert in halves under savepoints until each failing record stands alone: a dead letter.

        ``retries`` is how often the whole batch was retried before (the dead letters' retry count).
        """
        rejected: list[DeadLetter] = []
        inserted = 0

        def attempt(chunk: list[_Item]) -> None:
            nonlocal inserted
            try:
                with conn.transaction():
                    inserted += self._insert(conn, [line for _, _, line in chunk], clear=True)
            except psycopg.Error as exc:
                if classify(exc, conn) is Failure.OUTAGE:
                    raise
                if len(chunk) > 1:
                    middle = len(chunk) // 2
                    attempt(chunk[:middle])
                    attempt(chunk[middle:])
                    return
                record, event_id, _ = chunk[0]
                self._errors.labels(self.group, _error_type(exc)).inc()
                rejected.append(
                    dlq.dead_letter(
                        record,
                        group=self.group,
                        error_type=_error_type(exc),
                        error_message=_describe(exc),
                        retry_count=retries,
                        event_id=uuid.UUID(event_id),
                    )
                )

        attempt(items)
        return inserted, rejected

    # -- the bus

    def _publish(self, letters: list[DeadLetter]) -> None:
        attempt = 0
        while True:
            try:
                dlq.publish(self.dlq_producer, letters, topic=self.dlq_topic, timeout=self.dlq_timeout)
                return
            except BusUnavailableError as exc:
                self._errors.labels(self.group, "DlqPublishError").inc()
                _log.warning("cannot publish %d dead letter(s) yet: %s", len(letters), exc)
                self._wait(self.backoff.delay(attempt))
                attempt += 1
            except BusError as exc:
                # Refused for good (e.g. too large): the dlq_events row, written already, is the record.
                self._errors.labels(self.group, "DlqPublishError").inc()
                _log.error("the DLQ topic refused dead letters (kept in dlq_events): %s", exc)
                return

    def _commit(self, records: Sequence[Record]) -> None:
        try:
            self.consumer.commit(records)
        except (CommitFailedError, BusError) as exc:
            # Applied but not committed: they will be delivered again, and change nothing then.
            self._errors.labels(self.group, "CommitFailedError").inc()
            _log.warning("offsets not committed (the records will be read again): %s", exc)
            return
        self.health.last_commit = time.time()
        self._lag_stale = True

    # -- periodic reports

    def _periodic(self, *, idle: bool = False) -> None:
        now = time.monotonic()
        # Every lag_interval, and once the writer has caught up (so that the gauge settles at 0).
        if now >= self._next_lag or (idle and self._lag_stale):
            self._next_lag = now + self.lag_interval
            self._lag_stale = False
            try:
                metrics.report_lag(self.group, self.consumer.lag())
            except (BusError, psycopg.Error) as exc:
                _log.debug("cannot read the consumer lag: %s", exc)

    def _report_dlq(self) -> None:
        """Refresh the DLQ gauges when due (on the database thread only: it owns the connection)."""
        now = time.monotonic()
        if now < self._next_dlq_stats:
            return
        self._next_dlq_stats = now + self.dlq_stats_interval
        try:
            conn = self._connection()
            with metrics.database_query("dlq_stats"):
                stats = dlq_store.stats(conn)
        except (psycopg.Error, OSError) as exc:
            _log.warning("cannot read the DLQ statistics: %s", _describe(exc))
            if classify(exc, getattr(self._local, "conn", None)) is Failure.OUTAGE:
                self._database_ok = False
                self._drop_connection()
                self._set_ready(False, f"PostgreSQL: {_describe(exc)}")
            return
        if not self.health.ready and self.health.last_poll is not None:
            self._set_ready(True)
        age = (datetime.now(UTC) - stats.oldest_failed_at).total_seconds() if stats.oldest_failed_at else None
        metrics.report_dlq(stats.pending, age)


# --------------------------------------------------------------------------- command line


def build(
    bus: str,
    database_url: str,
    *,
    kafka_config: dict[str, Any] | None = None,
    topic: str = METERING_TOPIC,
    group: str = GROUP,
    dlq_topic: str = DLQ_TOPIC,
    **writer_options: Any,
) -> LedgerWriter:
    """A writer on the ``kafka`` or ``postgres`` (event log) bus."""
    consumer: BatchConsumer
    producer: RecordProducer
    if bus == "kafka":
        from caracald.bus.kafka import KafkaBatchConsumer, KafkaProducer

        if not kafka_config:
            raise BusError("the Kafka bus needs kafka.bootstrap_servers")
        consumer = KafkaBatchConsumer(kafka_config, group, [topic])
        producer = KafkaProducer(kafka_config)
    elif bus == "postgres":
        from caracald.bus.pg_log import PgLogConsumer, PgLogProducer

        consumer = PgLogConsumer(database_url, group, [topic])
        producer = PgLogProducer(database_url)
    else:
        raise ValueError(f"unknown bus {bus!r}")
    return LedgerWriter(consumer, database_url, producer, dlq_topic=dlq_topic, **writer_options)


def main(argv: Sequence[str] | None = None, *, on_ready: Callable[[LedgerWriter], None] | None = None) -> int:
    """``python -m caracald.consumers.ledger_writer``: run one writer until SIGTERM."""
    from caracald.runtime.config import load_config
    from caracald.store.connect import resolve_url
    from caracald.store.migrate import migrate

    parser = argparse.ArgumentParser(prog="caracal-ledger-writer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=str, default=None, help="YAML configuration file")
    parser.add_argument("--bus", choices=("kafka", "postgres"), default=None, help="default: bus.kind")
    parser.add_argument("--topic", default=METERING_TOPIC)
    parser.add_argument("--group", default=GROUP)
    parser.add_argument("--dlq-topic", default=DLQ_TOPIC)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--metrics-port", type=int, default=None, help="serve /metrics on 127.0.0.1:PORT")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from pathlib import Path

    try:
        config = load_config(Path(args.config) if args.config else None)
        url = resolve_url(config)
        if config.embedded_mode:
            migrate(url)
        kafka_config = None
        bus = args.bus or config.bus.kind
        if bus == "kafka":
            from caracald.bus.kafka import client_config

            kafka_config = client_config(config.kafka)
        writer = build(
            bus,
            url,
            kafka_config=kafka_config,
            topic=args.topic,
            group=args.group,
            dlq_topic=args.dlq_topic,
            batch_size=args.batch_size,
            statement_timeout_ms=config.database.statement_timeout_ms,
            connect_timeout=config.database.connect_timeout_seconds,
        )
    except CaracalError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 3
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr="127.0.0.1")
    writer.install_signal_handlers()
    if on_ready is not None:
        on_ready(writer)
    _log.info("ledger writer %s reading %s over %s", args.group, args.topic, bus)
    try:
        writer.run()
    finally:
        writer.close()
        writer.dlq_producer.close()
    _log.info("ledger writer stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
