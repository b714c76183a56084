"""Event replay: move a consumer group's offsets back to a point in time, and follow its progress.

``caracal replay start`` resets the committed offsets of one consumer group on one topic to the first record
produced at or after a timestamp (Kafka: ``offsets_for_times``; the event log: the first ``log_offset`` with
``produced_at`` >= the timestamp), or to a snapshot's time. The plan shows, per partition, the offset the
group committed, the new one, and how many records it will read again; nothing changes without
``--execute``. Replaying is safe because every consumer is idempotent: the ledger by each event's id (and
its spend totals follow the rows actually inserted), the Redis aggregates by their seen sets, the audit log
by the audit event's id.

**Live members.** While the group has live members the reset is refused, unless ``--force``:

* Kafka: ``describe_consumer_groups`` lists the members; Kafka itself refuses to move the offsets of a
  group with members, so ``--force`` cannot help there -- stop the consumers
  (``caracal services down --component ledger-writer``) and start them again afterwards;
* the event log: the live member is the session holding the group's advisory lock on the topic. The reset
  is made while holding that lock itself, so no consumer can start reading mid-way. With ``--force`` it is
  made anyway; the running consumer notices at its next commit (its commit no longer matches the committed
  offset, see :meth:`caracald.bus.pg_log.PgLogConsumer.commit`) and reads again from the new offset.

``caracal replay status`` reports, from the shared state any process can read (committed offsets, end
offsets, and the last replay's record in the audit log), per partition: committed, end, lag, and the
progress of the last replay (records re-read of those it rewound over).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import psycopg
from psycopg.rows import dict_row

from caracal_ops.procedures.framework import Plan, StepContext, StepFailed
from caracald.bus.base import BusError
from caracald.core.errors import CaracalError, NotFoundError, StoreUnavailableError, ValidationError
from caracald.core.events import AUDIT_TOPIC, METERING_TOPIC
from caracald.runtime.config import CaracalConfig

#: The topic each known consumer group reads.
GROUP_TOPICS: dict[str, str] = {
    "ledger-writer-group": METERING_TOPIC,
    "metrics-aggregator-group": METERING_TOPIC,
    "audit-logger-group": AUDIT_TOPIC,
}
#: How far before a snapshot's time a replay from it starts: events produced a little before the snapshot
#: may not have been applied when it was taken (consumer lag); replaying more changes nothing.
SNAPSHOT_MARGIN = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class PartitionMove:
    topic: str
    partition: int
    committed: int | None  # None: the group never committed here
    new: int
    end: int

    @property
    def to_replay(self) -> int:
        """Records the group will read from the new offset to the end."""
        return max(self.end - self.new, 0)

    @property
    def rewind(self) -> int:
        """Records already read (committed) that will be read again."""
        if self.committed is None:
            return self.to_replay
        return max(self.committed - self.new, 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "committed_offset": self.committed,
            "new_offset": self.new,
            "end_offset": self.end,
            "events_to_replay": self.to_replay,
            "events_read_again": self.rewind,
        }


class ReplayBus(Protocol):
    """The operations a replay needs, on Kafka or on the event log."""

    kind: str

    def partitions(self, topic: str) -> list[int]: ...

    def committed(self, group: str, topic: str) -> dict[int, int]: ...

    def end_offsets(self, topic: str) -> dict[int, int]: ...

    def offsets_for_time(self, topic: str, at: datetime) -> dict[int, int]: ...

    def members(self, group: str, topic: str) -> list[str]:
        """Descriptions of the group's live members (empty when none)."""
        ...

    def reset(self, group: str, topic: str, offsets: dict[int, int], *, force: bool) -> None: ...

    def groups(self) -> list[str]: ...


class EventLogBus:
    """The event log in PostgreSQL (one partition, 0, per topic)."""

    kind = "postgres"

    def __init__(self, url: str, *, connect_timeout: int = 5) -> None:
        self.url = url
        self.connect_timeout = connect_timeout

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout)
        except psycopg.OperationalError as exc:
            raise StoreUnavailableError(f"PostgreSQL is unavailable: {_first_line(exc)}") from None

    def partitions(self, topic: str) -> list[int]:
        return [0]

    def committed(self, group: str, topic: str) -> dict[int, int]:
        from caracald.bus import pg_log

        with self._connect() as conn:
            return {p: o for (t, p), o in pg_log.committed_offsets(conn, group).items() if t == topic}

    def end_offsets(self, topic: str) -> dict[int, int]:
        from caracald.bus import pg_log

        with self._connect() as conn:
            return {0: pg_log.end_offset(conn, topic)}

    def offsets_for_time(self, topic: str, at: datetime) -> dict[int, int]:
        from caracald.bus import pg_log

        with self._connect() as conn:
            return {0: pg_log.offset_for_time(conn, topic, at)}

    def members(self, group: str, topic: str) -> list[str]:
        from caracald.bus import pg_log

        with self._connect() as conn:
            return [
                f"{m['application_name'] or 'session'} (pid {m['pid']}"
                + (f", from {m['client_addr']}" if m["client_addr"] else "")
                + ")"
                for m in pg_log.group_members(conn, group, topic)
            ]

    def reset(self, group: str, topic: str, offsets: dict[int, int], *, force: bool) -> None:
        from caracald.bus import pg_log

        with self._connect() as conn:
            locked = pg_log.try_lock_group(conn, group, topic)
            if not locked and not force:
                raise StepFailed(
                    f"consumer group {group} started reading {topic} meanwhile",
                    state="the offsets are unchanged: stop the group's consumers, or pass --force",
                )
            try:
                with conn.transaction():
                    for partition, offset in offsets.items():
                        if partition != pg_log.PARTITION:
                            raise StepFailed(f"the event log has no partition {partition}")
                        pg_log.reset_offsets(conn, group, topic, offset)
            finally:
                if locked:
                    pg_log.unlock_group(conn, group, topic)

    def groups(self) -> list[str]:
        from caracald.bus import pg_log

        with self._connect() as conn:
            return pg_log.groups(conn)


class KafkaBus:
    """Kafka, through the admin client (offsets, members) and a throwaway consumer (end offsets)."""

    kind = "kafka"

    def __init__(self, settings: dict[str, Any], *, timeout: float = 15.0) -> None:
        self.settings = {**settings, "log_level": 0}
        self.timeout = timeout
        self._client: Any = None

    def _admin(self) -> Any:
        # One client, kept: a request's future is served by its client, and never resolves once it is gone.
        if self._client is None:
            from confluent_kafka.admin import AdminClient

            self._client = AdminClient({k: v for k, v in self.settings.items() if k != "logger"})
        return self._client

    def _fail(self, what: str, exc: Exception) -> CaracalError:
        return StoreUnavailableError(f"Kafka: cannot {what}: {exc}")

    def partitions(self, topic: str) -> list[int]:
        from confluent_kafka import KafkaException

        try:
            metadata = self._admin().list_topics(topic, timeout=self.timeout)
        except KafkaException as exc:
            raise self._fail(f"describe {topic}", exc) from None
        described = metadata.topics.get(topic)
        if described is None or described.error is not None or not described.partitions:
            raise NotFoundError(f"topic {topic} does not exist")
        return sorted(described.partitions)

    def committed(self, group: str, topic: str) -> dict[int, int]:
        # Through a consumer of the group, not the admin API, which can crash the process right after a
        # broker restart (see caracald.bus.kafka.committed_offsets).
        from caracald.bus.kafka import committed_offsets

        self.partitions(topic)  # a clear error for a missing topic
        try:
            return committed_offsets(self.settings, group, topic, timeout=self.timeout)
        except BusError as exc:
            raise StoreUnavailableError(f"Kafka: {exc}") from None

    def _list_offsets(self, topic: str, spec: Any, attempts: int = 10) -> dict[int, int]:
        from confluent_kafka import KafkaError, KafkaException, TopicPartition

        request = {TopicPartition(topic, p): spec for p in self.partitions(topic)}
        for attempt in range(attempts):
            try:
                futures = self._admin().list_offsets(request, request_timeout=self.timeout)
                return {tp.partition: int(f.result(timeout=self.timeout).offset) for tp, f in futures.items()}
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                settling = isinstance(error, KafkaError) and (
                    error.retriable()
                    or error.code() in (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE)
                )
                if not settling or attempt + 1 == attempts:
                    raise self._fail(f"list the offsets of {topic}", exc) from None
                time.sleep(0.25)  # a partition whose leadership is still settling (a topic just made)
        raise AssertionError("unreachable")

    def end_offsets(self, topic: str) -> dict[int, int]:
        from confluent_kafka.admin._listoffsets import OffsetSpec

        return self._list_offsets(topic, OffsetSpec.latest())  # type: ignore[no-untyped-call]

    def offsets_for_time(self, topic: str, at: datetime) -> dict[int, int]:
        from confluent_kafka.admin._listoffsets import OffsetSpec

        found = self._list_offsets(topic, OffsetSpec.for_timestamp(int(at.timestamp() * 1000)))
        ends = self.end_offsets(topic)
        # -1: no record at or after the time in that partition; start at its end
        return {p: (o if o >= 0 else ends[p]) for p, o in found.items()}

    def members(self, group: str, topic: str) -> list[str]:
        from confluent_kafka import KafkaException

        try:
            future = self._admin().describe_consumer_groups([group], request_timeout=self.timeout)[group]
            description = future.result(timeout=self.timeout)
        except KafkaException as exc:
            raise self._fail(f"describe group {group}", exc) from None
        return [f"{m.client_id} ({m.host}, member {m.member_id})" for m in description.members]

    def reset(self, group: str, topic: str, offsets: dict[int, int], *, force: bool) -> None:
        from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition

        request = ConsumerGroupTopicPartitions(
            group, [TopicPartition(topic, p, o) for p, o in offsets.items()]
        )
        try:
            future = self._admin().alter_consumer_group_offsets([request], request_timeout=self.timeout)[
                group
            ]
            result = future.result(timeout=self.timeout)
        except KafkaException as exc:
            raise StepFailed(
                f"Kafka refused to move the offsets of {group}: {exc}",
                state="the offsets are unchanged (Kafka moves them only for a group without live members: "
                "stop its consumers first)",
            ) from None
        failed = [p for p in result.topic_partitions if p.error is not None]
        if failed:
            raise StepFailed(
                "Kafka refused some partitions: " + ", ".join(f"{p.partition}: {p.error}" for p in failed),
                state="the other partitions were moved; run the replay again once the cause is fixed",
            )

    def groups(self) -> list[str]:
        from confluent_kafka import KafkaException

        try:
            result = (
                self._admin().list_consumer_groups(request_timeout=self.timeout).result(timeout=self.timeout)
            )
        except KafkaException as exc:
            raise self._fail("list the consumer groups", exc) from None
        return sorted(g.group_id for g in result.valid)


@dataclass
class ReplayEnv:
    config: CaracalConfig
    database_url: Callable[[], str]
    actor: str
    #: The bus (default: Kafka or the event log, per ``bus.kind``).
    bus: ReplayBus | None = None
    _url: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        if self._url is None:
            self._url = self.database_url()
        return self._url

    def the_bus(self) -> ReplayBus:
        if self.bus is None:
            if self.config.bus.kind == "kafka":
                from caracald.bus.kafka import client_config

                self.bus = KafkaBus(client_config(self.config.kafka))
            else:
                self.bus = EventLogBus(self.url, connect_timeout=self.config.database.connect_timeout_seconds)
        return self.bus


def topic_for(group: str, topic: str | None) -> str:
    if topic:
        return topic
    try:
        return GROUP_TOPICS[group]
    except KeyError:
        raise ValidationError(
            f"consumer group {group} is not one of Caracal's ({', '.join(GROUP_TOPICS)}): give --topic"
        ) from None


def snapshot_time(env: ReplayEnv, snapshot_id: str) -> tuple[datetime, str]:
    """The time a replay from the snapshot starts (its time less :data:`SNAPSHOT_MARGIN`), and a note."""
    try:
        from caracal_ops.procedures import snapshot as snapshots
    except ImportError:
        raise ValidationError(
            "snapshots are not available in this installation (no `caracal snapshot`): replay with "
            "--from-timestamp instead"
        ) from None
    from caracald.store.database import Database

    parsed = snapshots.parse_snapshot_id(snapshot_id)
    with Database(env.url) as db:
        info, _where = snapshots.find_snapshot(db, parsed, snapshots.snapshot_dir(env.config))
    start = info.created_at - SNAPSHOT_MARGIN
    return start, (
        f"snapshot {info.snapshot_id} was taken at {info.created_at.isoformat()}; the replay starts "
        f"{int(SNAPSHOT_MARGIN.total_seconds() // 60)} minutes earlier, at {start.isoformat()}, to cover "
        "events still in flight then (replaying applied events changes nothing)"
    )


def moves(bus: ReplayBus, group: str, topic: str, at: datetime) -> list[PartitionMove]:
    committed = bus.committed(group, topic)
    ends = bus.end_offsets(topic)
    targets = bus.offsets_for_time(topic, at)
    return [
        PartitionMove(topic, p, committed.get(p), targets.get(p, ends.get(p, 0)), ends.get(p, 0))
        for p in sorted(set(ends) | set(targets))
    ]


def plan_start(
    env: ReplayEnv,
    *,
    group: str,
    topic: str | None = None,
    from_timestamp: datetime | None = None,
    from_snapshot: str | None = None,
    force: bool = False,
) -> tuple[Plan, list[PartitionMove]]:
    """The replay's plan, and its per-partition moves (for the caller to show)."""
    if (from_timestamp is None) == (from_snapshot is None):
        raise ValidationError("give --from-timestamp or --from-snapshot")
    topic = topic_for(group, topic)
    notes: list[str] = []
    if from_snapshot is not None:
        at, note = snapshot_time(env, from_snapshot)
        notes.append(note)
    else:
        assert from_timestamp is not None
        at = from_timestamp
    bus = env.the_bus()
    planned = moves(bus, group, topic, at)
    live = bus.members(group, topic)
    if live and not force:
        raise ValidationError(
            f"consumer group {group} has live members: {'; '.join(live)}. Stop them first "
            f"(caracal services down --component <consumer>) or pass --force"
        )
    plan = Plan(
        "replay.start",
        f"Replay {topic} for {group} from {at.isoformat()}",
        params={
            "consumer_group": group,
            "topic": topic,
            "from": at,
            "from_snapshot": from_snapshot,
            "force": force,
            "bus": bus.kind,
        },
        confirm_word="replay",
    )
    for note in notes:
        plan.note(note)
    if live:
        plan.note(
            f"the group has live members ({'; '.join(live)})"
            + (
                ": Kafka will refuse the reset until they stop"
                if bus.kind == "kafka"
                else ": each notices at its next commit and reads again from the new offset"
            )
        )
    plan.note("already-applied events are read again and change nothing (the consumers are idempotent)")
    total = sum(m.to_replay for m in planned)

    def reset(step: StepContext) -> str:
        bus.reset(group, topic, {m.partition: m.new for m in planned}, force=force)
        step.result.update(
            {
                "consumer_group": group,
                "topic": topic,
                "from": at,
                "bus": bus.kind,
                "partitions": [m.as_dict() for m in planned],
            }
        )
        return f"{len(planned)} partition(s) moved; {total:,} event(s) to replay"

    plan.add(
        "reset-offsets",
        f"Move the committed offsets of {group} on {topic} ({len(planned)} partition(s), "
        f"{total:,} event(s) to replay)",
        reset,
        destructive=True,
        on_failure="the offsets are unchanged",
    )
    return plan, planned


@dataclass(frozen=True, slots=True)
class PartitionProgress:
    topic: str
    partition: int
    committed: int | None
    end: int
    replay_from: int | None  # the last replay's new offset
    replay_until: int | None  # the end offset when it started

    @property
    def lag(self) -> int:
        return max(self.end - (self.committed or 0), 0)

    @property
    def replayed(self) -> int | None:
        if self.replay_from is None or self.replay_until is None:
            return None
        return min(max((self.committed or 0) - self.replay_from, 0), self.replay_until - self.replay_from)

    @property
    def progress(self) -> float | None:
        """Share of the last replay done: records re-read of those it rewound over (None: no replay)."""
        if self.replay_from is None or self.replay_until is None:
            return None
        span = self.replay_until - self.replay_from
        if span <= 0:
            return 1.0
        done = self.replayed or 0
        return min(done / span, 1.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "committed_offset": self.committed,
            "end_offset": self.end,
            "lag": self.lag,
            "replay_from": self.replay_from,
            "replay_until": self.replay_until,
            "replayed": self.replayed,
            "progress": None if self.progress is None else round(self.progress, 4),
        }


@dataclass(frozen=True, slots=True)
class GroupProgress:
    group: str
    topic: str
    partitions: list[PartitionProgress]
    last_replay: dict[str, Any] | None  # when, by whom, from

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def progress(self) -> float | None:
        spans = [
            (p.replayed or 0, (p.replay_until or 0) - (p.replay_from or 0))
            for p in self.partitions
            if p.replay_from is not None
        ]
        if not spans:
            return None
        total = sum(max(s, 0) for _, s in spans)
        return 1.0 if total == 0 else min(sum(d for d, _ in spans) / total, 1.0)


def last_replay(url: str, group: str, topic: str) -> dict[str, Any] | None:
    """The last finished ``replay.start`` of ``group`` on ``topic``, from the audit log."""
    try:
        with psycopg.connect(url, row_factory=dict_row, connect_timeout=5) as conn:
            row = conn.execute(
                """
                SELECT occurred_at, actor, details FROM audit_log
                 WHERE event_type = 'ops_procedure' AND action = 'replay.start.finished'
                   AND details->'result'->>'consumer_group' = %s AND details->'result'->>'topic' = %s
                 ORDER BY audit_id DESC LIMIT 1
                """,
                (group, topic),
            ).fetchone()
    except psycopg.OperationalError as exc:
        raise StoreUnavailableError(f"PostgreSQL is unavailable: {_first_line(exc)}") from None
    if row is None:
        return None
    details = row["details"] if isinstance(row["details"], dict) else json.loads(row["details"])
    result = details.get("result") or {}
    return {
        "at": row["occurred_at"],
        "by": row["actor"],
        "from": result.get("from"),
        "run_id": details.get("run_id"),
        "partitions": {int(p["partition"]): p for p in result.get("partitions", [])},
    }


def status(env: ReplayEnv, group: str | None = None, topic: str | None = None) -> list[GroupProgress]:
    """Committed vs end offsets per partition of one group (or of every group on the bus)."""
    bus = env.the_bus()
    if group is not None:
        wanted = [(group, topic_for(group, topic))]
    else:
        known = set(bus.groups()) | set(GROUP_TOPICS)
        wanted = sorted((g, GROUP_TOPICS.get(g) or topic or "") for g in known if g in GROUP_TOPICS or topic)
    out: list[GroupProgress] = []
    ends_cache: dict[str, dict[int, int]] = {}
    for name, name_topic in wanted:
        if name_topic not in ends_cache:
            try:
                ends_cache[name_topic] = bus.end_offsets(name_topic)
            except NotFoundError:
                ends_cache[name_topic] = {}
        ends = ends_cache[name_topic]
        committed = bus.committed(name, name_topic) if ends else {}
        replay = last_replay(env.url, name, name_topic)
        moved = replay["partitions"] if replay else {}
        partitions = [
            PartitionProgress(
                name_topic,
                p,
                committed.get(p),
                end,
                moved[p]["new_offset"] if p in moved else None,
                moved[p]["end_offset"] if p in moved else None,
            )
            for p, end in sorted(ends.items())
        ]
        if replay:
            replay = {k: v for k, v in replay.items() if k != "partitions"}
        out.append(GroupProgress(name, name_topic, partitions, replay))
    return out


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
