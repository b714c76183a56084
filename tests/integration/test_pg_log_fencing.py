"""The event log's commit fencing: an offset reset made behind a running consumer's back wins."""

from __future__ import annotations

import psycopg
import pytest

from caracald.bus import pg_log
from caracald.bus.base import CommitFailedError

pytestmark = pytest.mark.integration


def send(url: str, values: list[bytes], topic: str = "t") -> None:
    producer = pg_log.PgLogProducer(url)
    try:
        for value in values:
            producer.send(topic, value)
        assert producer.flush(30) == 0
    finally:
        producer.close()


def committed(url: str, group: str = "g") -> int:
    with psycopg.connect(url) as conn:
        return pg_log.committed_offsets(conn, group)[("t", 0)]


def test_a_reset_behind_a_running_consumer_wins_and_it_reads_again(database_url: str) -> None:
    send(database_url, [b"%d" % n for n in range(10)])
    consumer = pg_log.PgLogConsumer(database_url, "g", ["t"])
    try:
        first = consumer.poll_batch(100, 5)
        assert [r.value for r in first] == [b"%d" % n for n in range(10)]
        consumer.commit(first)
        end = committed(database_url)

        with psycopg.connect(database_url, autocommit=True) as conn:  # a replay, while it runs
            assert not pg_log.try_lock_group(conn, "g", "t")  # it is a live member
            assert pg_log.group_members(conn, "g", "t")[0]["application_name"] == "caracal-consumer:g"
            pg_log.reset_offsets(conn, "g", "t", end - 4)
        send(database_url, [b"10"])
        later = consumer.poll_batch(100, 5)
        assert [r.value for r in later] == [b"10"]
        with pytest.raises(CommitFailedError, match="changed by someone else"):
            consumer.commit(later)
        assert committed(database_url) == end - 4  # not overwritten

        again = consumer.poll_batch(100, 5)  # from the reset offset, under a new claim
        assert [r.value for r in again] == [b"6", b"7", b"8", b"9", b"10"]
        with pytest.raises(CommitFailedError, match="earlier claim"):
            consumer.commit(later)  # records read before the re-claim are never committed
        consumer.commit(again)
        assert committed(database_url) == end + 1
    finally:
        consumer.close()
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert pg_log.try_lock_group(conn, "g", "t")  # nobody reads it any more
        pg_log.unlock_group(conn, "g", "t")
        assert pg_log.offset_for_time(conn, "t", pg_log_time(conn, end - 2)) <= end - 2
        assert pg_log.end_offset(conn, "t") == end + 1
        assert pg_log.pending_count(conn, "t", end - 2) == 3


def pg_log_time(conn: psycopg.Connection[tuple[object, ...]], offset: int) -> object:
    row = conn.execute(
        "SELECT produced_at FROM event_log WHERE topic = 't' AND log_offset = %s", (offset,)
    ).fetchone()
    assert row is not None
    return row[0]
