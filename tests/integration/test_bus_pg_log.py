"""The embedded bus: the event log in PostgreSQL, against a real server."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from caracald.bus.base import BusUnavailableError, CommitFailedError
from caracald.bus.pg_log import (
    PgLogConsumer,
    PgLogProducer,
    append_records,
    committed_offsets,
    prune,
    reset_offsets,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def producer(database_url: str) -> Iterator[PgLogProducer]:
    p = PgLogProducer(database_url)
    yield p
    p.close()


def consumer(url: str, group: str = "g", topics: tuple[str, ...] = ("t",), **kwargs: Any) -> PgLogConsumer:
    return PgLogConsumer(url, group, list(topics), lock_retry_seconds=0.1, **kwargs)


def send_all(producer: PgLogProducer, topic: str, values: list[bytes], **kwargs: Any) -> None:
    for future in [producer.send(topic, v, **kwargs) for v in values]:
        future.result(timeout=10)


def drain(c: PgLogConsumer, expected: int, timeout: float = 10.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        got += c.poll_batch(1000, 0.2)
    return got


def test_records_round_trip_with_key_headers_and_time(database_url: str, producer: PgLogProducer) -> None:
    producer.send("t", b"v1", key=b"agent-1", headers=[("h", b"\x00\xff"), ("h", b"again")]).result(10)
    producer.send("t", b"v2").result(10)
    c = consumer(database_url)
    try:
        first, second = drain(c, 2)
        assert (first.topic, first.partition, first.key, first.value) == ("t", 0, b"agent-1", b"v1")
        assert first.headers == [("h", b"\x00\xff"), ("h", b"again")]
        assert first.header("h") == b"again"
        assert first.timestamp is not None and first.timestamp.tzinfo is not None
        assert (second.key, second.headers) == (None, [])
        assert second.offset > first.offset
    finally:
        c.close()


def test_a_group_resumes_after_its_commit_and_groups_are_independent(
    database_url: str, producer: PgLogProducer
) -> None:
    send_all(producer, "t", [b"a", b"b", b"c"])
    c = consumer(database_url)
    batch = drain(c, 3)
    c.commit(batch[:2])  # the offset after b
    c.close()
    with psycopg.connect(database_url) as conn:
        assert committed_offsets(conn, "g") == {("t", 0): batch[1].offset + 1}

    again = consumer(database_url)
    try:
        assert [r.value for r in drain(again, 1)] == [b"c"]
    finally:
        again.close()
    other = consumer(database_url, group="other")
    try:
        assert [r.value for r in drain(other, 3)] == [b"a", b"b", b"c"]
    finally:
        other.close()


def test_a_new_group_can_start_at_the_end(database_url: str, producer: PgLogProducer) -> None:
    send_all(producer, "t", [b"old"])
    c = consumer(database_url, start="latest")
    try:
        assert c.poll_batch(10, 0.3) == []
        send_all(producer, "t", [b"new"])
        assert [r.value for r in drain(c, 1)] == [b"new"]
    finally:
        c.close()


def test_topics_are_separate_and_one_consumer_reads_several(
    database_url: str, producer: PgLogProducer
) -> None:
    send_all(producer, "a", [b"a1", b"a2"])
    send_all(producer, "b", [b"b1"])
    send_all(producer, "c", [b"c1"])
    c = consumer(database_url, topics=("a", "b"))
    try:
        got = drain(c, 3)
        assert sorted(r.value for r in got) == [b"a1", b"a2", b"b1"]
        c.commit(got)
        lags = c.lag()
        assert lags == {("a", 0): 0, ("b", 0): 0}
    finally:
        c.close()


def test_an_idle_consumer_wakes_on_insert(database_url: str, producer: PgLogProducer) -> None:
    c = consumer(database_url)
    try:
        assert c.poll_batch(10, 0.1) == []
        threading.Timer(0.3, lambda: producer.send("t", b"late")).start()
        started = time.monotonic()
        got = c.poll_batch(10, 10.0)
        waited = time.monotonic() - started
        assert [r.value for r in got] == [b"late"]
        assert waited < 2.0  # woken by NOTIFY, not by the 10 s timeout
    finally:
        c.close()


def test_a_later_producer_waits_until_the_earlier_one_commits(database_url: str) -> None:
    """The point of the trigger: offsets become visible in order, so no consumer skips a late commit."""
    c = consumer(database_url)
    slow = psycopg.connect(database_url)  # not autocommit: its transaction stays open
    try:
        append_records(slow, [("t", None, b"first", [])])
        done = threading.Event()

        def fast_producer() -> None:
            with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
                append_records(conn, [("t", None, b"second", [])])
            done.set()

        thread = threading.Thread(target=fast_producer)
        thread.start()
        time.sleep(0.5)
        assert not done.is_set()  # blocked on the topic's lock, not committed ahead of "first"
        with psycopg.connect(database_url) as watcher:
            waiting = watcher.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone()
        assert waiting is not None and waiting[0] == 1
        assert c.poll_batch(10, 0.2) == []  # nothing committed yet
        slow.commit()
        thread.join(10)
        assert done.is_set()
        got = drain(c, 2)
        assert [r.value for r in got] == [b"first", b"second"]
        assert got[0].offset < got[1].offset
    finally:
        slow.close()
        c.close()


def test_concurrent_producers_with_rollbacks_are_read_exactly_once_in_order(database_url: str) -> None:
    """Producers in parallel, some rolling back, each holding its transaction open for a while, while a
    consumer reads and commits as fast as it can: it sees every committed record once, and nothing else."""
    committed: list[bytes] = []
    committed_lock = threading.Lock()
    producers_done = threading.Event()
    errors: list[BaseException] = []

    def produce(worker: int) -> None:
        rng = random.Random(worker)
        try:
            with psycopg.connect(database_url) as conn:
                for txn in range(25):
                    values = [f"{worker}-{txn}-{i}".encode() for i in range(rng.randint(1, 4))]
                    append_records(conn, [("t", None, v, []) for v in values])
                    time.sleep(rng.uniform(0, 0.01))
                    if rng.random() < 0.2:
                        conn.rollback()
                    else:
                        conn.commit()
                        with committed_lock:
                            committed.extend(values)
        except BaseException as exc:
            errors.append(exc)

    seen: list[Any] = []

    def consume() -> None:
        c = consumer(database_url)
        try:
            while True:
                finished = producers_done.is_set()
                batch = c.poll_batch(7, 0.02)
                if batch:
                    seen.extend(batch)
                    c.commit(batch)
                elif finished:
                    return
        except BaseException as exc:
            errors.append(exc)
        finally:
            c.close()

    reader = threading.Thread(target=consume)
    reader.start()
    writers = [threading.Thread(target=produce, args=(w,)) for w in range(6)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    producers_done.set()
    reader.join(60)
    assert not errors
    offsets = [r.offset for r in seen]
    assert offsets == sorted(set(offsets))  # increasing, no record twice
    assert sorted(r.value for r in seen) == sorted(committed)
    assert len(seen) == len(committed) > 50


def test_one_consumer_per_group_and_a_standby_takes_over(database_url: str, producer: PgLogProducer) -> None:
    send_all(producer, "t", [b"1", b"2"])
    owner = consumer(database_url)
    standby = consumer(database_url)
    try:
        got = drain(owner, 2)
        assert standby.poll_batch(10, 0.3) == []
        assert owner.assignment == ["t"]
        assert standby.assignment == []
        owner.commit(got[:1])
        with pytest.raises(CommitFailedError):
            standby.commit(got)
        owner.close()  # its session ends, and with it the group's lock
        assert [r.value for r in drain(standby, 1)] == [b"2"]  # from the committed offset on
        assert standby.assignment == ["t"]
    finally:
        owner.close()
        standby.close()


def test_a_rolled_back_insert_leaves_a_harmless_hole(database_url: str, producer: PgLogProducer) -> None:
    send_all(producer, "t", [b"before"])
    with psycopg.connect(database_url) as conn:
        append_records(conn, [("t", None, b"never", [])])
        conn.rollback()
    send_all(producer, "t", [b"after"])
    c = consumer(database_url)
    try:
        got = drain(c, 2)
        assert [r.value for r in got] == [b"before", b"after"]
        assert got[1].offset - got[0].offset == 2
    finally:
        c.close()


def test_records_are_immutable(database_url: str, producer: PgLogProducer) -> None:
    send_all(producer, "t", [b"x"])
    with psycopg.connect(database_url) as conn, pytest.raises(psycopg.errors.IntegrityConstraintViolation):
        conn.execute("UPDATE event_log SET payload = 'y'")


def test_transactions_writing_topics_in_any_order_do_not_deadlock(database_url: str) -> None:
    errors: list[BaseException] = []

    def write(topics: list[str]) -> None:
        try:
            with psycopg.connect(database_url) as conn:
                for _ in range(30):
                    append_records(conn, [(t, None, t.encode(), []) for t in topics])
                    time.sleep(0.002)
                    conn.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=write, args=(order,)) for order in (["a", "b"], ["b", "a"], ["b", "a"])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_a_producer_without_a_database_fails_its_futures(postgres_service: Any) -> None:
    p = PgLogProducer(postgres_service.admin_uri("no_such_database"), connect_timeout=2)
    try:
        with pytest.raises(BusUnavailableError):
            p.send("t", b"x").result(timeout=30)
    finally:
        p.close()
    c = PgLogConsumer(postgres_service.admin_uri("no_such_database"), "g", ["t"], connect_timeout=2)
    with pytest.raises(BusUnavailableError):
        c.poll_batch(1, 0.1)


def test_many_concurrent_sends_share_transactions(database_url: str, producer: PgLogProducer) -> None:
    futures = [producer.send("t", str(i).encode()) for i in range(3000)]
    assert producer.flush(30) == 0
    for f in futures:
        f.result(0)
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT log_offset) FROM event_log").fetchone()
    assert row == (3000, 3000)


def test_prune_keeps_what_some_group_still_needs(database_url: str, producer: PgLogProducer) -> None:
    send_all(producer, "t", [b"1", b"2", b"3"])
    send_all(producer, "untracked", [b"x"])
    fast = consumer(database_url, group="fast")
    slow = consumer(database_url, group="slow")
    try:
        fast.commit(drain(fast, 3))
        slow.commit(drain(slow, 3)[:1])
    finally:
        fast.close()
        slow.close()
    with psycopg.connect(database_url) as conn:
        assert prune(conn, timedelta(hours=1)) == 0  # too recent
        assert prune(conn, timedelta(0)) == 1  # only "1": "slow" has not read "2"
        remaining = [bytes(r[0]) for r in conn.execute("SELECT payload FROM event_log ORDER BY log_offset")]
    assert remaining == [b"2", b"3", b"x"]


def test_reset_offsets_replays_a_topic(database_url: str, producer: PgLogProducer) -> None:
    send_all(producer, "t", [b"1", b"2"])
    c = consumer(database_url)
    c.commit(drain(c, 2))
    c.close()
    with psycopg.connect(database_url) as conn:
        reset_offsets(conn, "g", "t", 0)
    again = consumer(database_url)
    try:
        assert [r.value for r in drain(again, 2)] == [b"1", b"2"]
    finally:
        again.close()
