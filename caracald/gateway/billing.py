"""Holds and their settlement: the budget backend's decisions, and the metering events that record them.

* ``admit`` reserves the hold on every scope at once (402 when any cannot take it, 503 when the backend is
  unreachable); ``record_reservation`` then makes the reservation event durable. With the charge journal
  (a gateway with ``bus.spool_dir``), the event is written there before the call goes out and sent in the
  background: the journal keeps it until the bus has it, and a gateway that cannot write its journal refuses
  the call (503) and releases the hold. Without one, the gateway sends the call while the event is on its
  way and waits for it to be durable (acknowledged by the bus, or spooled) before anything of the answer goes
  back; when it cannot be delivered the request is refused (503) and the hold charged
  (``refuse_unrecorded``). After such a failure, and until an event is delivered again, the gateway waits
  for each reservation event before it forwards the call, and releases the hold when it fails: while the
  sink fails, no call goes out unrecorded.
* ``settle`` replaces the hold by the actual cost and emits the settlement, or an adjustment when the hold had
  already expired (the expiry charged the hold; the adjustment corrects it to the actual cost). A settlement
  the backend does not take after a few tries is left to expiry, which charges the hold: the safe direction.
* ``deny`` records a refusal of an identified agent (cost zero).
* ``expire_loop`` charges holds past their time to live at their amount and emits expiry events.

Every event of one request carries the instant of its admission as ``occurred_at``, so the ledger puts a
settlement in the same budget window the hold was counted in (``settled_at`` travels in ``extra``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from caracald.budget.base import AdmissionRequest, BudgetBackend, ExpiredHold, Scope, Settlement
from caracald.core.agents import Agent
from caracald.core.budget import max_safe_amount
from caracald.core.errors import ConflictError, CurrencyMismatchError, NotFoundError
from caracald.core.events import MeteringEvent, decode, encode
from caracald.core.ledger import LedgerEventType
from caracald.core.money import Money
from caracald.core.pricebook import TokenUsage
from caracald.gateway.errors import Denied
from caracald.gateway.journal import ChargeJournal, Intent, Kind
from caracald.gateway.metrics import GatewayMetrics
from caracald.gateway.pricing import Priced
from caracald.gateway.sinks import EventSink

log = logging.getLogger(__name__)

T = TypeVar("T")

_SETTLE_RETRIES = (0.05, 0.25, 1.0)
#: A journalled charge still unresolved after this long is run again by the expiry loop (the live path
#: resolves one within milliseconds, or gives up after its retries, well before).
RECOVER_AFTER_SECONDS = 30.0


@dataclass(slots=True)
class Hold:
    request_id: uuid.UUID
    agent: Agent
    scopes: tuple[Scope, ...]
    priced: Priced
    resource: str
    admitted_at: datetime
    admitted_mono: float
    extra: dict[str, Any] = field(default_factory=dict)
    settled: bool = False
    #: The reservation event, journalled and not sent yet (see ``Billing.send_reservation``).
    reservation: MeteringEvent | None = None

    @property
    def policy_ids(self) -> tuple[uuid.UUID, ...]:
        return tuple(dict.fromkeys(s.policy_id for s in self.scopes))


class Billing:
    def __init__(
        self,
        budget: BudgetBackend,
        sink: EventSink,
        metrics: GatewayMetrics,
        *,
        clock: Callable[[], datetime],
        hold_ttl: timedelta,
        journal: ChargeJournal | None = None,
    ) -> None:
        self.budget = budget
        self.journal = journal
        #: Holds whose charge is under way right now (the recovery leaves them to it).
        self._charging: set[uuid.UUID] = set()
        #: Request ids the running expiry sweep journalled.
        self._due: set[uuid.UUID] = set()
        self.sink = sink
        self.metrics = metrics
        self.clock = clock
        self.hold_ttl = hold_ttl
        self.holds_in_flight = 0
        #: False once a reservation event could not be delivered, True again after one was: while False, the
        #: gateway waits for each reservation event before it forwards the call.
        self.sink_healthy = True
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        metrics.holds_in_flight.set_function(lambda: self.holds_in_flight)
        self._admitted_evaluations = metrics.policy_evaluations.labels("admitted")
        self._denied_evaluations = metrics.policy_evaluations.labels("denied")

    # -- admission ------------------------------------------------------------------------------------

    async def admit(
        self,
        request_id: uuid.UUID,
        agent: Agent,
        scopes: tuple[Scope, ...],
        priced: Priced,
        resource: str,
        *,
        final: bool = True,
    ) -> Hold:
        """Reserve the hold on every scope (402 when any cannot take it, 503 when the backend is unreachable).

        No event yet: :meth:`record_reservation` emits it. ``final=False`` marks an attempt the caller may
        repeat with a smaller hold: its refusal is not counted as a policy evaluation.
        """
        if priced.hold.amount > max_safe_amount(priced.hold.currency).amount:
            # Beyond the counters' exact range, so above every limit they can hold (an absurd output limit).
            if final:
                self._denied_evaluations.inc()
            raise Denied(402, "budget_exhausted", f"no budget can take {priced.hold.format(exact=True)}")
        at = self.clock()
        started = time.perf_counter()
        try:
            admission = await self.budget.admit(
                AdmissionRequest(request_id, agent.agent_id, scopes, priced.hold, at, self.hold_ttl)
            )
        except CurrencyMismatchError as exc:
            raise Denied(422, "currency_mismatch", exc.message) from None
        except Exception as exc:
            log.error("budget admission failed for %s: %s", request_id, exc)
            raise Denied(503, "budget_unavailable", "the budget service is unavailable") from None
        finally:
            self.metrics.admission_latency.observe(time.perf_counter() - started)
        if not admission.admitted:
            if final:
                self._denied_evaluations.inc()
            scope = admission.denied_scope
            which = f" (policy {scope.policy_id})" if scope else ""
            raise Denied(
                402, "budget_exhausted", f"the budget cannot take {priced.hold.format(exact=True)}{which}"
            )
        self._admitted_evaluations.inc()
        hold = Hold(request_id, agent, scopes, priced, resource, at, time.monotonic())
        self.holds_in_flight += 1
        return hold

    def record_reservation(self, hold: Hold) -> asyncio.Future[bool]:
        """Make the hold's reservation event durable; the future answers whether it is.

        With a journal, the event is written there (the future is done at once: false when the journal cannot
        be written) and sent later by :meth:`send_reservation`: a restarted gateway sends what the journal
        still holds, so nothing of the call need wait for the bus. Without one, the future is the send itself
        (acknowledged by the bus, spooled, or written), and ``sink_healthy`` follows its answer.
        """
        event = self._event(hold, LedgerEventType.RESERVATION, Money.zero(hold.priced.hold.currency))
        if self.journal is None:
            return self.spawn(self._record_reservation(hold.request_id, event))
        durable = self._running_loop().create_future()
        try:
            self.journal.intend("reserve", hold.request_id, encode(event).decode())
        except OSError as exc:
            log.error("reservation of %s not journalled: %s", hold.request_id, exc)
            self.metrics.emit_failures.labels("reservation").inc()
            durable.set_result(False)
            return durable
        durable.set_result(True)
        hold.reservation = event
        return durable

    def send_reservation(self, hold: Hold) -> bool:
        """Send the journalled reservation event of ``hold`` in the background, unless it was sent already
        (whether it is sent now).

        Called once the provider has answered (a stream as it starts, a whole answer by its settlement, once
        the answer is on its way back), so that producing the event does not delay the call; the settlement
        follows it on the same sink.
        """
        event, hold.reservation = hold.reservation, None
        if event is not None:
            self.spawn(self._send_journalled(event))
            return True
        return False

    async def _send_journalled(self, event: MeteringEvent) -> None:
        # Undelivered, the intent stays in the journal: the expiry loop sends it again later.
        if await self._emit(event):
            self._resolve("reserve", event.request_id)

    async def _record_reservation(self, request_id: uuid.UUID, event: MeteringEvent) -> bool:
        try:
            await self.sink.emit(event)
        except Exception as exc:
            log.error("reservation event for %s not delivered: %s", request_id, exc)
            self.metrics.emit_failures.labels("reservation").inc()
            self.sink_healthy = False
            return False
        self.sink_healthy = True
        return True

    async def refuse_unrecorded(self, hold: Hold, *, forwarded: bool) -> Denied:
        """The reservation event of ``hold`` was not delivered: settle it and return the 503 to answer.

        Not forwarded: the hold is released (nothing was spent, nothing is recorded). Forwarded (the event was
        in flight while the call went out): the provider may have done the work, so the hold is charged and
        its settlement recorded (the safe direction, as for a provider that did not answer in time).
        """
        if forwarded:
            await self.settle(hold, hold.priced.hold, None, {"reservation_undelivered": True})
        else:
            await self.settle(hold, Money.zero(hold.priced.hold.currency), None, {}, record=False)
        return Denied(503, "event_sink_unavailable", "metering is unavailable")

    # -- settlement -----------------------------------------------------------------------------------

    async def settle(
        self, hold: Hold, cost: Money, usage: TokenUsage | None, extra: dict[str, Any], *, record: bool = True
    ) -> None:
        """Settle once (and emit the event, when ``record``); never raises."""
        if hold.settled:
            return
        hold.settled = True
        if self.send_reservation(hold):
            # The sinks take events in the order their sends start: the reservation's goes first.
            await asyncio.sleep(0)
        self.holds_in_flight -= 1
        self.metrics.hold_age.observe(time.monotonic() - hold.admitted_mono)
        if cost > hold.priced.hold:
            self.metrics.hold_exceeded.inc()
            log.warning("request %s cost %s, above its hold %s", hold.request_id, cost, hold.priced.hold)
        settled_at = self.clock()
        draft = None
        if record:
            details = {**hold.extra, **extra, "settled_at": settled_at.isoformat()}
            draft = self._event(hold, LedgerEventType.SETTLEMENT, cost, usage, details)
            if self.journal is not None:  # before the counters change: a crash from here on loses nothing
                try:
                    self.journal.intend("settle", hold.request_id, encode(draft).decode())
                except OSError as exc:  # the settlement goes ahead unprotected: better than a hold left open
                    log.error("settlement of %s not journalled: %s", hold.request_id, exc)
        self._charging.add(hold.request_id)
        try:
            settlement = None
            for delay in (*_SETTLE_RETRIES, None):
                try:
                    settlement = await self.budget.settle(hold.request_id, cost, settled_at)
                    break
                except Exception as exc:
                    if delay is None:
                        log.error(
                            "settlement of %s failed; the hold will expire at its amount%s: %s",
                            hold.request_id,
                            " and the settlement will be retried" if self.journal is not None else "",
                            exc,
                        )
                        self.metrics.settlement_failures.inc()
                        return
                    await asyncio.sleep(delay)
            assert settlement is not None
            if draft is None:
                return
            # A replayed settlement is this one's own earlier try (a retry after a lost answer): its event was
            # not sent yet. Sending it is harmless in any case: the ledger is idempotent by event id.
            if await self._emit(settled_event(draft, settlement)):
                self._resolve("settle", hold.request_id)
        finally:
            self._charging.discard(hold.request_id)

    # -- denials and expiry ---------------------------------------------------------------------------

    def deny(self, request_id: uuid.UUID, agent: Agent, reason: str, currency: str, resource: str) -> None:
        """Record a refusal in the background."""
        event = MeteringEvent(
            kind=LedgerEventType.DENIAL,
            request_id=request_id,
            agent_id=agent.agent_id,
            occurred_at=self.clock(),
            cost=Money.zero(currency),
            resource=resource,
            deny_reason=reason,
        )
        self.spawn(self._emit(event))

    async def expire_once(self) -> int:
        now = self.clock()
        expired = await self.budget.expire_due(now, before=self._journal_due)
        if self.journal is not None:  # found due but not expired (settled meanwhile): nothing is owed
            for request_id in self._due - {item.request_id for item in expired}:
                self.journal.resolve("expire", request_id)
        self._due.clear()
        for item in expired:
            self.metrics.expired_holds.inc()
            if await self._emit(expiry_event(item, now)):
                self._resolve("expire", item.request_id)
        return len(expired)

    def _journal_due(self, request_ids: Sequence[uuid.UUID]) -> None:
        if self.journal is not None:
            for request_id in request_ids:
                self.journal.intend("expire", request_id)
            self._due.update(request_ids)

    async def recover(self, older_than: float = 0.0) -> int:
        """Run again the charges of the journal left unresolved ``older_than`` seconds or more (all of them at
        start: a previous process died with them); the number resolved."""
        if self.journal is None:
            return 0
        intents = [i for i in self.journal.pending(older_than) if i.request_id not in self._charging]
        resolved = 0
        for intent in intents:
            if intent.kind == "reserve" and await self._emit(decode(intent.payload.encode())):
                self._resolve("reserve", intent.request_id)
                resolved += 1
            elif intent.kind == "settle" and await self._recover_settlement(intent):
                resolved += 1
        expiries = [i.request_id for i in intents if i.kind == "expire"]
        if expiries:
            try:
                expired = {item.request_id: item for item in await self.budget.expired(expiries)}
            except Exception as exc:
                log.warning("cannot read the expired holds back yet: %s", exc)
                return resolved
            for request_id in expiries:
                item = expired.get(request_id)
                # not expired: still held (the next sweep finds it again) or settled in time (nothing owed)
                if item is None or await self._emit(expiry_event(item, self.clock())):
                    self._resolve("expire", request_id)
                    resolved += 1
        if resolved:
            log.info("recovered %d journalled charge(s)", resolved)
        return resolved

    async def _recover_settlement(self, intent: Intent) -> bool:
        draft = decode(intent.payload.encode())
        settled_at = datetime.fromisoformat(str(draft.extra["settled_at"]))
        try:
            settlement = await self.budget.settle(draft.request_id, draft.cost, settled_at)
        except NotFoundError:  # the backend forgot the hold (restarted empty): the ledger is the record
            settlement = Settlement(draft.request_id, draft.cost)
        except ConflictError:  # denied: nothing to settle
            self._resolve("settle", draft.request_id)
            return True
        except Exception as exc:
            log.warning("journalled settlement of %s not retried yet: %s", draft.request_id, exc)
            return False
        if await self._emit(settled_event(draft, settlement)):
            self._resolve("settle", draft.request_id)
            return True
        return False

    def _resolve(self, kind: Kind, request_id: uuid.UUID) -> None:
        if self.journal is not None:
            self.journal.resolve(kind, request_id)

    async def expire_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.expire_once()
                await self.recover(older_than=RECOVER_AFTER_SECONDS)
            except Exception as exc:
                log.warning("hold expiry failed: %s", exc)

    # -- plumbing -------------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``coro`` in the background; ``drain`` waits for it at shutdown."""
        task = self._running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        # Remembered: asking asyncio costs a getpid() system call each time, several per request.
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    @property
    def background_tasks(self) -> int:
        return len(self._tasks)

    async def drain(self, wait_seconds: float = 30.0) -> None:
        """Wait for background settlements and events (at shutdown)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=wait_seconds)

    async def _emit(self, event: MeteringEvent) -> bool:
        """Deliver ``event``, retrying a little; whether it was delivered."""
        for delay in (*_SETTLE_RETRIES, None):
            try:
                await self.sink.emit(event)
                return True
            except Exception as exc:
                if delay is None:
                    log.error("%s event %s not delivered: %s", event.kind, event.event_id, exc)
                    self.metrics.emit_failures.labels(str(event.kind)).inc()
                    return False
                await asyncio.sleep(delay)
        return False

    def _event(
        self,
        hold: Hold,
        kind: LedgerEventType,
        cost: Money,
        usage: TokenUsage | None = None,
        extra: dict[str, Any] | None = None,
    ) -> MeteringEvent:
        priced = hold.priced
        details = dict(extra if extra is not None else hold.extra)
        details.setdefault("endpoint", str(priced.kind))
        if kind is LedgerEventType.RESERVATION and priced.token_price is not None:
            details.update(input_token_bound=priced.input_bound, max_output_tokens=priced.max_output_tokens)
        return MeteringEvent(
            kind=kind,
            request_id=hold.request_id,
            agent_id=hold.agent.agent_id,
            occurred_at=hold.admitted_at,
            cost=cost,
            resource=hold.resource,
            model=priced.model,
            hold=priced.hold,
            input_tokens=usage.input_tokens if usage else None,
            output_tokens=usage.output_tokens if usage else None,
            cached_input_tokens=usage.cached_input_tokens if usage else None,
            policy_ids=hold.policy_ids,
            extra=details,
        )


def settled_event(draft: MeteringEvent, settlement: Settlement) -> MeteringEvent:
    """The event that records ``settlement`` of the hold ``draft`` settles: the settlement itself, or the
    adjustment that corrects an expiry which charged the hold first."""
    if settlement.correction is not None:
        return replace(draft, kind=LedgerEventType.ADJUSTMENT, cost=settlement.correction)
    return draft if settlement.charged == draft.cost else replace(draft, cost=settlement.charged)


def expiry_event(item: ExpiredHold, now: datetime) -> MeteringEvent:
    return MeteringEvent(
        kind=LedgerEventType.EXPIRY,
        request_id=item.request_id,
        agent_id=item.agent_id,
        occurred_at=item.reserved_at,
        cost=item.amount,
        hold=item.amount,
        policy_ids=item.policy_ids,
        extra={"expired_at": now.isoformat()},
    )
