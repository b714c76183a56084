"""Dead letter triage: redrive (retry) and purge, as audited procedures.

* **retry** re-produces each pending dead letter's original record -- its key, payload and headers, plus
  ``caracal-dlq-redrive-of: <dlq id>`` -- to its source topic on the configured bus (Kafka, or the event
  log), waits until the bus has every one, then marks them ``redriven``. Every consumer group reading that
  topic sees the record again; they are idempotent (the ledger by the event's id, the aggregates by their
  seen sets, the audit log by the audit event's id), so a record that was applied already changes nothing.
  A dead letter that is not pending (redriven or purged already) is left alone: retrying it again is a
  no-op. If the bus fails, nothing is marked and the retry can simply be run again.
* **purge** marks pending dead letters ``purged`` (they stay in ``dlq_events`` for the record, out of the
  lists and the DLQ gauges). It is destructive: the CLI asks for the typed confirmation unless ``--yes``.

Both run through :mod:`caracal_ops.procedures.framework`: a plan, then audited steps
(``dlq.retry.started`` / ``.finished`` in the audit log, with the dead letter ids).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from caracal_ops.procedures.framework import Plan, StepContext, StepFailed, utcnow
from caracald.bus.base import BusError, RecordProducer
from caracald.core.errors import NotFoundError, ValidationError
from caracald.runtime.config import CaracalConfig
from caracald.store import dlq as dlq_store
from caracald.store.dlq import DeadLetter, DeadLetterStatus

REDRIVE_HEADER = "caracal-dlq-redrive-of"


@dataclass
class DlqEnv:
    """What the DLQ procedures need: the configuration, the database and a producer for the bus."""

    config: CaracalConfig
    database_url: Callable[[], str]
    actor: str
    #: Makes the producer for redrives (default: Kafka or the event log, per ``bus.kind``).
    producer: Callable[[], RecordProducer] | None = None
    timeout: float = 60.0
    _url: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        if self._url is None:
            self._url = self.database_url()
        return self._url

    def connect(self) -> psycopg.Connection[dict[str, Any]]:
        return psycopg.connect(
            self.url, row_factory=dict_row, connect_timeout=self.config.database.connect_timeout_seconds
        )

    def make_producer(self) -> RecordProducer:
        if self.producer is not None:
            return self.producer()
        if self.config.bus.kind == "kafka":
            from caracald.bus.kafka import KafkaProducer, client_config

            return KafkaProducer(client_config(self.config.kafka, **{"log_level": 0}))
        from caracald.bus.pg_log import PgLogProducer

        return PgLogProducer(self.url, application_name="caracal-dlq-redrive")


def parse_ids(values: Sequence[str]) -> tuple[list[int], list[uuid.UUID]]:
    """``--event-id`` values: dead letter ids (integers) and metering event ids (UUIDs)."""
    ids: list[int] = []
    events: list[uuid.UUID] = []
    for value in values:
        text = value.strip()
        if text.isdigit():
            ids.append(int(text))
            continue
        try:
            events.append(uuid.UUID(text))
        except ValueError:
            raise ValidationError(
                f"not an event id: {value!r} (a dead letter id from `caracal dlq list`, "
                "or a metering event id)"
            ) from None
    return ids, events


def find(env: DlqEnv, values: Sequence[str]) -> list[DeadLetter]:
    """The dead letters ``values`` name (any status); raises NotFoundError for one that names none."""
    ids, events = parse_ids(values)
    with env.connect() as conn:
        found = {d.dlq_id: d for d in dlq_store.get_many(conn, ids)}
        missing = [str(i) for i in ids if i not in found]
        for event_id in events:
            letters = dlq_store.list_letters(conn, status=None, event_id=event_id, limit=10_000)
            if not letters:
                missing.append(str(event_id))
            found.update((d.dlq_id, d) for d in letters)
    if missing:
        raise NotFoundError(f"no dead letter {', '.join(missing)} (see caracal dlq list)")
    return [found[k] for k in sorted(found, key=lambda k: k or 0)]


def _ids(letters: Sequence[DeadLetter]) -> list[int]:
    return [d.dlq_id for d in letters if d.dlq_id is not None]


def _summary(letters: Sequence[DeadLetter]) -> str:
    by_topic: dict[str, int] = {}
    for d in letters:
        by_topic[d.source_topic] = by_topic.get(d.source_topic, 0) + 1
    return ", ".join(f"{topic}: {n}" for topic, n in sorted(by_topic.items()))


def _note_resolved(plan: Plan, letters: Sequence[DeadLetter]) -> None:
    done = [d for d in letters if d.status is not DeadLetterStatus.PENDING]
    if done:
        plan.note(
            "already resolved, left alone: "
            + ", ".join(f"{d.dlq_id} ({d.status.value} by {d.resolved_by})" for d in done)
        )


def plan_retry(env: DlqEnv, *, event_ids: Sequence[str] = (), all_pending: bool = False) -> Plan:
    """Redrive the named dead letters (or every pending one) to their source topics."""
    if bool(event_ids) == all_pending:
        raise ValidationError("give --event-id (one or more) or --all-pending")
    if all_pending:
        with env.connect() as conn:
            letters = dlq_store.list_letters(conn, status=DeadLetterStatus.PENDING, limit=1_000_000)
    else:
        letters = find(env, event_ids)
    pending = [d for d in letters if d.status is DeadLetterStatus.PENDING]
    ids = _ids(pending)
    plan = Plan(
        "dlq.retry",
        f"Redrive {len(ids)} dead letter(s) to their source topics",
        params={"event_ids": list(event_ids), "all_pending": all_pending, "dlq_ids": ids},
    )
    _note_resolved(plan, letters)
    if not pending:
        return plan

    def redrive(step: StepContext) -> str:
        done: list[int] = []
        with env.connect() as conn, conn.transaction():
            # Locked until the marks commit: a concurrent retry of the same ones waits, then skips them.
            current = [
                d
                for d in dlq_store.get_many(conn, ids, for_update=True)
                if d.status is DeadLetterStatus.PENDING
            ]
            if not current:
                return "nothing left to redrive (retried meanwhile)"
            producer = env.make_producer()
            try:
                futures = [
                    producer.send(
                        d.source_topic,
                        d.payload,
                        key=d.key,
                        headers=[*d.headers, (REDRIVE_HEADER, str(d.dlq_id).encode())],
                    )
                    for d in current
                ]
                producer.flush(env.timeout)
                for n, future in enumerate(futures, 1):
                    try:
                        future.result(timeout=env.timeout)
                    except (BusError, TimeoutError) as exc:
                        raise StepFailed(
                            f"the bus did not take the redriven records: {exc}",
                            state="no dead letter was marked redriven (any record the bus did take is "
                            "absorbed by the consumers' idempotency): run the retry again",
                        ) from None
                    step.progress(n, len(futures), "acknowledged")
            finally:
                producer.close()
            done = _ids(current)
            dlq_store.resolve(conn, done, DeadLetterStatus.REDRIVEN, by=env.actor, at=utcnow())
        step.result["redriven"] = done
        return f"{len(done)} redriven ({_summary(current)})"

    plan.add(
        "redrive",
        f"Re-produce {len(ids)} record(s) to their source topics ({_summary(pending)}), "
        "then mark them redriven",
        redrive,
        long_running=len(ids) > 100,
    )
    return plan


def plan_purge(env: DlqEnv, *, event_ids: Sequence[str] = (), before: datetime | None = None) -> Plan:
    """Mark the named pending dead letters (or every pending one that failed before ``before``) purged."""
    if bool(event_ids) == (before is not None):
        raise ValidationError("give --event-id (one or more) or --before")
    if before is not None:
        with env.connect() as conn:
            letters = dlq_store.list_letters(
                conn, status=DeadLetterStatus.PENDING, until=before, limit=10_000_000
            )
    else:
        letters = find(env, event_ids)
    pending = [d for d in letters if d.status is DeadLetterStatus.PENDING]
    ids = _ids(pending)
    plan = Plan(
        "dlq.purge",
        f"Purge {len(ids)} dead letter(s)",
        params={"event_ids": list(event_ids), "before": before, "dlq_ids": ids},
    )
    _note_resolved(plan, letters)
    if not pending:
        return plan
    plan.note("purged dead letters stay in dlq_events with status purged; they are never redriven")

    def purge(step: StepContext) -> str:
        with env.connect() as conn, conn.transaction():
            changed = dlq_store.resolve(conn, ids, DeadLetterStatus.PURGED, by=env.actor, at=utcnow())
        step.result["purged"] = ids
        return f"{changed} purged"

    plan.add(
        "purge",
        f"Mark {len(ids)} pending dead letter(s) purged ({_summary(pending)})",
        purge,
        destructive=True,
    )
    return plan
