"""Every ledger event names an agent that exists, and that agent stays (migration 0008).

The check runs once per statement (the ledger writer inserts thousands of events in one) but keeps the
foreign key's guarantees: the same error, the same locks, and no agent with events deleted or renumbered.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import psycopg
import pytest

from caracald.core.ledger import LedgerEvent, LedgerEventType
from caracald.core.money import Money
from caracald.store import ledger as ledger_store
from tests.integration.pipeline import add_agents

pytestmark = pytest.mark.integration

CONSTRAINT = "ledger_events_agent_id_fkey"


def settlement(agent: uuid.UUID) -> LedgerEvent:
    return LedgerEvent(
        uuid.uuid4(), LedgerEventType.SETTLEMENT, agent, datetime.now(UTC), Money(Decimal("0.25"), "USD")
    )


def count_events(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM ledger_events").fetchone()
    assert row is not None
    return int(row[0])


def test_an_event_for_an_unknown_agent_is_refused_with_the_foreign_key_error(database_url: str) -> None:
    [known] = add_agents(database_url, 1)
    with psycopg.connect(database_url) as conn:
        unknown = uuid.uuid4()
        with pytest.raises(psycopg.errors.ForeignKeyViolation) as refused:
            ledger_store.insert_events(conn, [settlement(known), settlement(unknown), settlement(known)])
        conn.rollback()
    assert refused.value.diag.constraint_name == CONSTRAINT
    assert refused.value.diag.table_name == "ledger_events"
    assert f"Key (agent_id)=({unknown}) is not present" in (refused.value.diag.message_detail or "")
    assert count_events(database_url) == 0  # the whole statement, the known agent's events too


def test_events_of_known_agents_are_inserted_in_one_statement(database_url: str) -> None:
    agents = add_agents(database_url, 3)
    with psycopg.connect(database_url) as conn:
        events = [settlement(agents[i % 3]) for i in range(30)]
        assert ledger_store.insert_events(conn, events) == 30
        assert ledger_store.insert_events(conn, events[:10]) == 0  # recorded already: skipped
        conn.commit()
        keys = [r[0] for r in conn.execute("SELECT idempotency_key FROM ledger_events ORDER BY event_id")]
    assert keys == [e.idempotency_key for e in events]  # in the order given


def test_an_event_cannot_be_moved_to_an_unknown_agent(database_url: str) -> None:
    agent, other = add_agents(database_url, 2)
    with psycopg.connect(database_url) as conn:
        ledger_store.insert_events(conn, [settlement(agent)])  # not placed in the tree: still updatable
        conn.commit()
        with pytest.raises(psycopg.errors.ForeignKeyViolation) as refused:
            conn.execute("UPDATE ledger_events SET agent_id = %s", (uuid.uuid4(),))
        conn.rollback()
        conn.execute("UPDATE ledger_events SET agent_id = %s", (other,))  # to a known agent: allowed
        conn.commit()
    assert refused.value.diag.constraint_name == CONSTRAINT


def test_an_agent_with_events_can_be_neither_deleted_nor_renumbered(database_url: str) -> None:
    used, unused = add_agents(database_url, 2)
    with psycopg.connect(database_url) as conn:
        ledger_store.insert_events(conn, [settlement(used)])
        conn.commit()
        with pytest.raises(psycopg.errors.ForeignKeyViolation) as deleting:
            conn.execute("DELETE FROM agents WHERE agent_id = %s", (used,))
        conn.rollback()
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute("UPDATE agents SET agent_id = %s WHERE agent_id = %s", (uuid.uuid4(), used))
        conn.rollback()
        # touching other columns, or an agent without events, is not the ledger's business
        conn.execute("UPDATE agents SET agent_id = agent_id, name = 'renamed' WHERE agent_id = %s", (used,))
        conn.execute("DELETE FROM agents WHERE agent_id = %s", (unused,))
        conn.commit()
        names = [r[0] for r in conn.execute("SELECT name FROM agents")]
    assert names == ["renamed"]
    assert deleting.value.diag.constraint_name == CONSTRAINT
    assert 'is still referenced from table "ledger_events"' in (deleting.value.diag.message_detail or "")


def test_an_insert_holds_its_agents_until_it_commits(database_url: str) -> None:
    """The check locks the agents it saw, as the foreign key did: a delete waits for the insert, then fails."""
    [agent] = add_agents(database_url, 1)
    with psycopg.connect(database_url) as inserting, psycopg.connect(database_url) as deleting:
        ledger_store.insert_events(inserting, [settlement(agent)])  # transaction still open
        deleting.execute("SET lock_timeout = '300ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            deleting.execute("DELETE FROM agents WHERE agent_id = %s", (agent,))
        deleting.rollback()
        inserting.commit()
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            deleting.execute("DELETE FROM agents WHERE agent_id = %s", (agent,))


def test_an_insert_racing_a_delete_of_its_agent_is_refused_once_the_delete_commits(database_url: str) -> None:
    [agent] = add_agents(database_url, 1)
    outcome: list[BaseException | int] = []
    with psycopg.connect(database_url) as deleting, psycopg.connect(database_url) as inserting:
        deleting.execute("DELETE FROM agents WHERE agent_id = %s", (agent,))  # not committed yet

        def insert() -> None:
            try:
                outcome.append(ledger_store.insert_events(inserting, [settlement(agent)]))
                inserting.commit()
            except psycopg.Error as exc:
                inserting.rollback()
                outcome.append(exc)

        racer = threading.Thread(target=insert)
        racer.start()
        racer.join(0.5)
        assert racer.is_alive(), "the insert must wait for the delete of its agent"
        deleting.commit()
        racer.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.ForeignKeyViolation), outcome
    assert count_events(database_url) == 0
