"""The ledger writer places events in the Merkle tree as it inserts them (seq, batch, canonical bytes), and the
sealer only closes batches: each row is written once, seqs stay gap-free whatever the replays, duplicates or
concurrent writers, and the ledger verifies. Real PostgreSQL, the event log as the bus.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from caracald.bus import pg_log
from caracald.consumers import ledger_writer
from caracald.consumers.ledger_writer import Backoff
from caracald.core.events import METERING_TOPIC, encode
from caracald.core.signing import SigningKey, VerifyingKey
from caracald.integrity import keys, placement, verifier
from caracald.integrity.batches import IntegrityError
from caracald.integrity.encoding import CANONICAL_SQL
from caracald.integrity.sealer import pending_count, seal_pending
from caracald.store import ledger as ledger_store
from caracald.store.database import Database
from tests.integration.pipeline import (
    BASE,
    Running,
    add_agents,
    event_log_committed,
    event_log_end,
    make_events,
    rows,
    send_events,
    wait_for,
)

pytestmark = pytest.mark.integration

FAST = Backoff(initial=0.05, maximum=0.5)
BATCH = 100  # events per Merkle batch in these tests


@pytest.fixture
def signing(database_url: str, tmp_path: Path) -> tuple[SigningKey, list[VerifyingKey]]:
    with Database(database_url) as db:
        keys.generate(db, tmp_path, actor="tests@example.com", at=datetime.now(UTC))
    return keys.load_signing_key(tmp_path), keys.trusted_keys(tmp_path)


def write(
    url: str, events: list[Any], *, topic: str = METERING_TOPIC, group: str = ledger_writer.GROUP
) -> None:
    """Send ``events`` on the event log and let one writer (transactions of 70 events, so that they straddle
    the batches of 100) apply them."""
    producer = pg_log.PgLogProducer(url)
    try:
        send_events(producer, events, topic=topic)
    finally:
        producer.close()
    writer = ledger_writer.build(
        "postgres", url, topic=topic, group=group, batch_size=70, seal_batch_size=BATCH, backoff=FAST
    )
    with Running(writer, lambda: (writer.close(), writer.dlq_producer.close())):
        wait_for(lambda: event_log_committed(url, group, topic) == event_log_end(url, topic), 60, "the drain")


def placed(url: str) -> list[dict[str, Any]]:
    return rows(
        url,
        f"SELECT event_id, seq, merkle_root_id, xmin::text AS version, canonical = {CANONICAL_SQL} AS intact"
        " FROM ledger_events e ORDER BY seq",
    )


def batch_sizes(events: list[dict[str, Any]]) -> list[int]:
    """Events per batch, in seq order (a batch's events must be consecutive)."""
    sizes: list[int] = []
    previous = None
    for e in events:
        if e["merkle_root_id"] != previous:
            sizes.append(0)
            previous = e["merkle_root_id"]
        sizes[-1] += 1
    assert len(sizes) == len({e["merkle_root_id"] for e in events}), "a batch's events are not consecutive"
    return sizes


def assert_gap_free(events: list[dict[str, Any]]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["intact"] for e in events), "canonical bytes that are not the encoding of the columns"
    for a, b in itertools.pairwise(events):
        if a["merkle_root_id"] == b["merkle_root_id"]:
            assert a["event_id"] < b["event_id"], "seqs must follow event ids within a batch"


def verify(url: str, trusted: list[VerifyingKey]) -> verifier.Report:
    with psycopg.connect(url) as conn:
        report = verifier.verify_all(conn, trusted)
    assert report.ok, report.first_problem
    return report


def seal(url: str, key: SigningKey, *, max_age: timedelta = timedelta(minutes=5)) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return seal_pending(conn, key, max_batch=BATCH, max_age=max_age).events


def assert_placed_then_sealed(
    url: str, key: SigningKey, trusted: list[VerifyingKey], sizes: list[int]
) -> None:
    """The ledger's events are placed gap-free in batches of ``sizes``; sealing everything pending seals
    the events not in a batch yet, and the whole ledger verifies."""
    events = placed(url)
    assert_gap_free(events)
    assert batch_sizes(events) == sizes
    with psycopg.connect(url) as conn:
        waiting = pending_count(conn)[0]
    assert seal(url, key, max_age=timedelta(0)) == waiting
    verify(url, trusted)


def test_the_writer_places_events_and_the_sealer_only_closes_batches(
    database_url: str, signing: tuple[SigningKey, list[VerifyingKey]]
) -> None:
    key, trusted = signing
    agents = add_agents(database_url, 3)
    events = make_events(agents, 250)
    # text beyond ASCII reaches the canonical bytes as UTF-8, as the verifier recomputes them
    events[7] = replace(events[7], resource="https://api.example.jp/v1/検索?q=ü")
    write(database_url, events)

    before = placed(database_url)
    assert_gap_free(before)
    assert batch_sizes(before) == [100, 100, 50]

    assert seal(database_url, key) == 200  # the two full batches; the third is open and young
    after = placed(database_url)
    assert [e["version"] for e in after] == [e["version"] for e in before], "sealing rewrote rows"
    report = verify(database_url, trusted)
    assert report.unsealed_events == 50
    # a range holding only the open batch's events: pending, and checked by the batches before it
    with psycopg.connect(database_url) as conn:
        recent = verifier.verify_range(
            conn, BASE + timedelta(seconds=200), BASE + timedelta(seconds=249), trusted
        )
    assert recent.ok, recent.first_problem
    assert (recent.unsealed_events, recent.batches_checked) == (50, 1)
    with psycopg.connect(database_url) as conn:
        assert pending_count(conn)[0] == 50

    assert seal(database_url, key, max_age=timedelta(0)) == 50  # closed by age
    assert verify(database_url, trusted).unsealed_events == 0

    # the next events open a new batch: the closed one is not reopened
    write(database_url, make_events(agents, 30, start=250))
    assert_placed_then_sealed(database_url, key, trusted, [100, 100, 50, 30])


def test_the_sealer_closes_batches_a_writer_has_left_without_waiting_for_it(
    database_url: str, signing: tuple[SigningKey, list[VerifyingKey]]
) -> None:
    """Batches with a later batch begun are sealed while a writer holds the placing lock (a busy writer no
    longer holds sealing back); the batch it may still be adding to waits for its transaction, or is left
    for a later round."""
    key, trusted = signing
    write(database_url, make_events(add_agents(database_url, 2), 250))  # batches of 100, 100, 50
    with psycopg.connect(database_url) as writer:
        placement.lock(writer)  # a writer in the middle of a transaction
        assert seal(database_url, key) == 200
        with psycopg.connect(database_url, autocommit=True) as conn:  # as the periodic sealer asks
            skipped = seal_pending(conn, key, max_batch=BATCH, max_age=timedelta(0), wait_for_writers=False)
        assert skipped.events == 0 and not skipped.busy

        by_age: list[int] = []
        closing = threading.Thread(
            target=lambda: by_age.append(seal(database_url, key, max_age=timedelta(0)))
        )
        closing.start()
        closing.join(0.5)
        assert closing.is_alive(), "the open batch must wait for the writer's transaction"
        writer.rollback()
        closing.join(30)
    assert by_age == [50]
    assert verify(database_url, trusted).unsealed_events == 0


def test_replayed_and_duplicate_events_leave_seqs_gap_free(
    database_url: str, signing: tuple[SigningKey, list[VerifyingKey]]
) -> None:
    key, trusted = signing
    agents = add_agents(database_url, 2)
    first = make_events(agents, 120)
    write(database_url, first)
    # a replay of some, duplicates side by side, and new events among them
    again = [*first[10:40], *first[50:55], *first[50:55], *make_events(agents, 60, start=120)]
    write(database_url, again)

    assert_placed_then_sealed(database_url, key, trusted, [100, 80])


def test_writers_placing_at_once_share_one_gap_free_tree(
    database_url: str, signing: tuple[SigningKey, list[VerifyingKey]]
) -> None:
    key, trusted = signing
    agents = add_agents(database_url, 4)
    streams = [
        (f"test.metering.{uuid.uuid4().hex[:8]}", f"writer-{n}", make_events(agents, 400, start=1000 * n))
        for n in range(2)
    ]
    threads = [
        threading.Thread(target=write, args=(database_url, events), kwargs={"topic": topic, "group": group})
        for topic, group, events in streams
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)

    assert_placed_then_sealed(database_url, key, trusted, [100] * 8)


def test_events_inserted_without_a_place_are_sealed_too(
    database_url: str, signing: tuple[SigningKey, list[VerifyingKey]]
) -> None:
    key, trusted = signing
    agents = add_agents(database_url, 2)
    write(database_url, make_events(agents, 130))
    with Database(database_url) as db, db.transaction() as conn:
        ledger_store.insert_events(conn, [e.to_ledger_event() for e in make_events(agents, 20, start=500)])
    assert rows(database_url, "SELECT count(*) AS n FROM ledger_events WHERE seq IS NULL")[0]["n"] == 20

    assert seal(database_url, key, max_age=timedelta(0)) == 150
    events = placed(database_url)
    assert_gap_free(events)
    assert batch_sizes(events) == [100, 30, 20]  # the writer's, then those placed by the sealer
    verify(database_url, trusted)


def test_the_waiting_count_and_its_oldest_follow_placed_and_unplaced_events(
    database_url: str, signing: tuple[SigningKey, list[VerifyingKey]]
) -> None:
    """What `merkle status` and the dashboard show: every event not in a sealed batch, placed or not, and
    when the first of them was recorded."""
    key, _trusted = signing
    agents = add_agents(database_url, 3)

    def waiting() -> tuple[int, datetime | None]:
        with psycopg.connect(database_url) as conn:
            return pending_count(conn)

    def first_recorded(where: str) -> datetime:
        (row,) = rows(database_url, f"SELECT min(recorded_at) AS at FROM ledger_events WHERE {where}")
        return row["at"]  # type: ignore[no-any-return]

    assert waiting() == (0, None)
    write(database_url, make_events(agents, 250))
    assert waiting() == (250, first_recorded("true"))
    assert seal(database_url, key) == 200
    assert waiting() == (50, first_recorded("seq > 200"))
    # rows another tool inserted, not placed: they wait too
    with Database(database_url) as db, db.transaction() as conn:
        extra = [e.to_ledger_event() for e in make_events(agents, 5, start=1000)]
        assert ledger_store.insert_events(conn, extra) == 5
    assert waiting() == (55, first_recorded("seq > 200 OR seq IS NULL"))
    assert seal(database_url, key, max_age=timedelta(0)) == 55
    assert waiting() == (0, None)


def test_times_follow_the_seqs_when_the_writer_placing_second_began_first(database_url: str) -> None:
    """Two writers (or a writer's two connections): the one whose transaction began first places its events
    second. They are recorded when placed, so the first waiting event by seq is also the oldest."""
    agents = add_agents(database_url, 1)
    earlier, later = make_events(agents, 3), make_events(agents, 3, start=10)
    writer = ledger_writer.build("postgres", database_url, seal_batch_size=BATCH)
    try:
        with psycopg.connect(database_url, autocommit=True) as began_first:
            began_first.execute(ledger_writer._CREATE_STAGING)
            with began_first.transaction():
                began_first.execute("SELECT 1")  # the transaction's time is now
                second = writer._connection()
                with second.transaction():
                    writer._insert(second, [ledger_writer.ledger_row(encode(e))[1] for e in earlier])
                writer._insert(began_first, [ledger_writer.ledger_row(encode(e))[1] for e in later])
    finally:
        writer.close()
        writer.dlq_producer.close()
    recorded = rows(database_url, "SELECT recorded_at FROM ledger_events ORDER BY seq")
    assert len(recorded) == 6
    assert [r["recorded_at"] for r in recorded] == sorted(r["recorded_at"] for r in recorded)
    with psycopg.connect(database_url) as conn:
        assert pending_count(conn) == (6, min(r["recorded_at"] for r in recorded))


def test_without_a_tree_state_the_writer_records_every_event_and_sealing_resumes_once_it_is_back(
    database_url: str, signing: tuple[SigningKey, list[VerifyingKey]]
) -> None:
    """A deleted ``merkle_state`` row must not cost events: the writer records them without a place, the
    sealer refuses to guess a tree, and once the row is restored the sealer places and seals them."""
    key, trusted = signing
    agents = add_agents(database_url, 3)
    write(database_url, make_events(agents, 150))
    assert seal(database_url, key) == 100
    (state,) = rows(database_url, "SELECT * FROM merkle_state")
    with psycopg.connect(database_url) as conn:
        conn.execute("DELETE FROM merkle_state")

    write(database_url, make_events(agents, 40, start=150))
    recorded = placed(database_url)
    assert len(recorded) == 190
    assert [e["seq"] for e in recorded if e["seq"] is not None] == list(range(1, 151))
    assert rows(database_url, "SELECT count(*) AS n FROM dlq_events")[0]["n"] == 0
    with pytest.raises(IntegrityError, match="merkle_state"):
        seal(database_url, key, max_age=timedelta(0))

    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO merkle_state (origin, tree_size, frontier, last_batch_id, updated_at)"
            " VALUES (%(origin)s, %(tree_size)s, %(frontier)s, %(last_batch_id)s, %(updated_at)s)",
            state,
        )
    assert seal(database_url, key, max_age=timedelta(0)) == 90
    events = placed(database_url)
    assert_gap_free(events)
    assert verify(database_url, trusted).unsealed_events == 0
