"""The in-process budget counters (``budget.backend: local``, the embedded default), rebuilt from the ledger.

They die with the process, so at start they are seeded from the ledger's charges of the last ``SEED_SPAN``
(every calendar or rolling window is shorter): a restart does not forget spend.

The holds of the calls the last run had in flight die with it too. Their reservations stay in the ledger,
closed by no settlement or expiry; with in-process counters only this process holds anything, so what
is open at start an earlier run left open when it stopped (``kill -9``, a crash, a lost machine), the call
possibly made. Each is charged at its amount, as an expired hold is: counted in the seed, and an expiry
event (dated at the admission, ``"left_open": true``) goes to the ledger. Only once the ledger writer has
applied everything on the PostgreSQL event log, though: a settlement of that run still on its way would
otherwise be charged as well. With Kafka as the bus, whose backlog is not read here, they stay open.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from caracald.budget.base import ExpiredHold
from caracald.budget.local_backend import LocalBudget
from caracald.core.budget import spend_slot
from caracald.core.events import METERING_TOPIC
from caracald.core.money import Money
from caracald.gateway.billing import expiry_event
from caracald.gateway.sinks import EventSink
from caracald.store import spend as spend_store
from caracald.store.database import Connection, Database
from caracald.store.gateway import charged_since, load_snapshot

log = logging.getLogger(__name__)

#: How far back the counters are rebuilt from the ledger (longer than any window).
SEED_SPAN = timedelta(days=32)


@dataclass
class LedgerSeed:
    """What the ledger says the counters start from."""

    totals: dict[tuple[uuid.UUID, str], Money]
    #: The holds an earlier run left open, counted in ``totals``, their expiries still to send.
    left_open: list[ExpiredHold] = field(default_factory=list)
    #: The ledger writer has not applied the whole event log yet: the holds left open were not looked for.
    ledger_behind: bool = False


def _ledger_caught_up(conn: Connection) -> bool:
    """Whether the ledger writer has applied every event on the PostgreSQL event log."""
    from caracald.bus import pg_log
    from caracald.consumers.ledger_writer import GROUP

    end = pg_log.end_offset(conn, METERING_TOPIC)
    return pg_log.committed_offsets(conn, GROUP).get((METERING_TOPIC, 0), 0) >= end


def _unclosed_holds(conn: Connection, since: datetime) -> list[ExpiredHold]:
    return [
        ExpiredHold(
            request_id=row["request_id"],
            agent_id=row["agent_id"],
            amount=Money(Decimal(row["hold"]), row["currency"].strip()),
            policy_ids=tuple(uuid.UUID(p) for p in row["policy_ids"]),
            reserved_at=row["occurred_at"],
        )
        for row in spend_store.unclosed_reservations(conn, since)
    ]


def read_seed(db: Database, now: datetime, *, event_log: bool) -> LedgerSeed:
    """Charges per (policy, spend slot) for the policies in force at ``now``, and the holds left open when
    ``event_log`` (the bus is the PostgreSQL event log) and the ledger shows all of it.

    One transaction on the primary: a lagging read replica would under-count.
    """
    since = now - SEED_SPAN
    with db.transaction() as conn:
        snapshot = load_snapshot(conn)
        events = charged_since(conn, since)
        caught_up = event_log and _ledger_caught_up(conn)
        left_open = _unclosed_holds(conn, since) if caught_up else []
    windows = {p.policy_id: p.terms.window for p in snapshot.policies}
    charges = [(e.policy_ids, e.occurred_at, Money(e.cost, e.currency)) for e in events]
    charges += [(h.policy_ids, h.reserved_at, h.amount) for h in left_open]
    totals: dict[tuple[uuid.UUID, str], Money] = {}
    for policy_ids, occurred_at, amount in charges:
        for policy_id in policy_ids:
            spec = windows.get(policy_id)
            if spec is None:
                continue
            key = (policy_id, spend_slot(spec, occurred_at))
            totals[key] = totals[key] + amount if key in totals else amount
    return LedgerSeed(totals, left_open, ledger_behind=event_log and not caught_up)


async def _expire_left_open(holds: Sequence[ExpiredHold], sink: EventSink, now: datetime) -> None:
    log.warning(
        "%d hold(s) left open by an earlier run (stopped before settling them): charged at their amount",
        len(holds),
    )
    for hold in holds:
        event = expiry_event(hold, now)
        try:
            await sink.emit(replace(event, extra={**event.extra, "left_open": True}))
        except Exception as exc:  # counted anyway; still open in the ledger, found again next start
            log.error("expiry of %s not recorded: %s", hold.request_id, exc)


async def open_local_budget(db: Database, sink: EventSink, *, event_log: bool) -> LocalBudget:
    """In-process counters seeded from the ledger; the expiries of the holds left open sent to ``sink``."""
    now = datetime.now(UTC)
    seed = await asyncio.to_thread(read_seed, db, now, event_log=event_log)
    if seed.ledger_behind:
        log.warning(
            "the ledger writer has not applied every event yet: holds left open are looked for next start"
        )
    budget = LocalBudget()
    await budget.seed(seed.totals)
    log.info("in-process budget counters seeded from %d ledger slot(s)", len(seed.totals))
    if seed.left_open:
        await _expire_left_open(seed.left_open, sink, now)
    return budget
