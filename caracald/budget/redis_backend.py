"""The distributed budget backend: counters in Redis, shared by every gateway replica.

Each step is one Lua script, so it is atomic on the server whatever the number of replicas:
``admit`` checks every scope and holds on all of them or on none; ``settle`` replaces a hold by the
actual cost; ``expire`` charges an expired hold at its reserved amount. The scripts are registered
once and run by ``EVALSHA`` (redis-py loads them again after a server restart).

Key layout (``ns`` is the namespace, ``caracal`` by default; Redis 7.0 or later)::

    {ns}:ctr:<policy_id>:<counter_id>   hash, one per policy and window (see caracald.core.budget):
                                          held      sum of the holds in flight, in ledger units
                                          holds     how many holds are in flight
                                          settled   settled spend (calendar windows), or
                                          <bucket>  settled spend per time bucket, and
                                          c<block>  per block of buckets (rolling windows)
                                        counter_id is the calendar window key, e.g.
                                        daily@Europe/Paris:2024-03-31T00:00:00+01:00, or <window>@rolling.
                                        Expires (EXPIREAT, only ever extended) a day after the last
                                        instant that reads it plus the hold's time to live.
    {ns}:req:<request_id>               hash, the decision on one request id: state (held | denied |
                                        expired | settled), amount, currency, agent, at and expires
                                        (epoch microseconds), keys and fields (the counters and fields
                                        the hold sits on), policies, indexes, denied, actual, from.
                                        No expiry while held; ``decision_ttl`` (a day) once decided,
                                        so replays and late settlements are recognised that long.
    {ns}:holds                          sorted set: request ids of holds in flight, by expiry (epoch us).
    {ns}:loaded                         set by ``rebuild``; with ``require_loaded`` admission refuses to
                                        run without it (a Redis that lost its data must be rebuilt
                                        from the ledger first, or it would admit against empty counters).

Every key carries the same hash tag ``{ns}``, so all of them live in one hash slot and a Redis
Cluster accepts the multi-key scripts (each script declares every key it touches in KEYS). That puts
one namespace on one shard; to spread load, give independent deployments (or agent trees, which never
share a policy) their own namespaces.

Amounts are integers at the currency's ledger scale, passed to Redis as decimal strings and added
with ``HINCRBY`` (64-bit, exact); Lua compares them as doubles, exact below 2**53, which is why no single
amount or limit may exceed ``MAX_SAFE_UNITS`` (about 90 million USD at 8 decimals).

``settle`` takes one round trip when this instance admitted the hold (it remembers the hold's
counters), two otherwise. The admissions and settlements a process starts in the same turn of its event
loop share their round trip: they go out as one pipeline (one write on one connection; each script still
runs atomically on its own), on a connection that redis-py opens and hiredis reads
(:mod:`caracald.budget.redis_link`), without waiting for the replies of earlier turns. ``expire_due``
must run periodically (every few seconds) somewhere: until it does, an abandoned hold keeps counting
against its budgets (the safe side), and its record stays.

Any Redis failure (connection refused or lost, timeout, read-only replica, out of memory, script error)
raises ``BudgetUnavailableError``: the gateway fails closed with a 503. A script call whose connection
fails is sent again on a new one (redis-py retries its other commands twice); a retried admission whose
first attempt did run answers ``replayed=True`` with the same decision.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

from hiredis import pack_command
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from caracald.budget.base import (
    Admission,
    AdmissionRequest,
    BudgetUnavailableError,
    DueHook,
    ExpiredHold,
    Scope,
    ScopeStatus,
    Settlement,
    denied_scope_of,
    least_remaining,
)
from caracald.budget.redis_link import RedisLink
from caracald.core.budget import (
    COUNTER_GRACE,
    DEFAULT_DECISION_TTL,
    HELD_FIELD,
    HOLDS_FIELD,
    CounterRef,
    ScopeCheck,
    block_buckets,
    counter_keep_until,
    counter_ref,
    epoch_micros,
    epoch_seconds_ceil,
    from_epoch_micros,
    from_units,
    parse_slot,
    plan_checks,
    to_units,
)
from caracald.core.errors import ConflictError, CurrencyMismatchError, NotFoundError, ValidationError
from caracald.core.money import Money

T = TypeVar("T")

#: Redis 7.0 brought EXPIRETIME, which the scripts use to only ever extend a counter's expiry.
MIN_REDIS_VERSION: Final = (7, 0)

# KEYS: 1 request record, 2 holds zset, 3 loaded marker, 4.. counters.
# ARGV: 1 request id, 2 amount, 3 currency, 4 agent, 5 at (us), 6 expires (us), 7 decision ttl (s),
#       8 require loaded (1/0), 9 policy ids, 10 scope indexes (both space-separated, one per counter),
#       then 5 per counter from 11: limit, expire-at (epoch s), first and last bucket to sum and
#       buckets per block (rolling windows; all empty for calendar ones). The fields summed are
#       caracald.core.budget.rolling_sum_fields; a rolling hold charges its last bucket and that
#       bucket's block; pruning follows caracald.core.budget.rolling_prune_rule and prunable.
ADMIT_LUA: Final = """
local rec = KEYS[1]
local prior = redis.call('HMGET', rec, 'state', 'amount', 'currency', 'denied', 'policies', 'indexes')
if prior[1] then
  return {'replay', prior[1], prior[2] or '', prior[3] or '', prior[4] or '', prior[5] or '', prior[6] or ''}
end
if ARGV[8] == '1' and redis.call('EXISTS', KEYS[3]) == 0 then
  return {'unloaded'}
end
local amount = tonumber(ARGV[2])
local n = #KEYS - 3
for i = 1, n do
  local key = KEYS[3 + i]
  local o = 11 + (i - 1) * 5
  local used = 0
  if ARGV[o + 2] == '' then
    local v = redis.call('HMGET', key, 'settled', 'held')
    used = (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0)
  else
    local first, last, per = tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3]), tonumber(ARGV[o + 4])
    local first_block, end_block = math.ceil(first / per), math.floor((last + 1) / per)
    local fields = {'held'}
    if first_block >= end_block then
      for b = first, last do
        fields[#fields + 1] = tostring(b)
      end
    else
      for b = first, first_block * per - 1 do
        fields[#fields + 1] = tostring(b)
      end
      for c = first_block, end_block - 1 do
        fields[#fields + 1] = 'c' .. tostring(c)
      end
      for b = end_block * per, last do
        fields[#fields + 1] = tostring(b)
      end
    end
    local v = redis.call('HMGET', key, unpack(fields))
    for j = 1, #v do
      used = used + (tonumber(v[j]) or 0)
    end
  end
  if used + amount > tonumber(ARGV[o]) then
    redis.call('HSET', rec, 'state', 'denied', 'amount', ARGV[2], 'currency', ARGV[3], 'agent', ARGV[4],
      'at', ARGV[5], 'denied', tostring(i), 'policies', ARGV[9], 'indexes', ARGV[10])
    redis.call('EXPIRE', rec, ARGV[7])
    return {'denied', tostring(i)}
  end
end
local settle_fields = {}
for i = 1, n do
  local key = KEYS[3 + i]
  local o = 11 + (i - 1) * 5
  redis.call('HINCRBY', key, 'held', ARGV[2])
  redis.call('HINCRBY', key, 'holds', 1)
  if redis.call('EXPIRETIME', key) < tonumber(ARGV[o + 1]) then
    redis.call('EXPIREAT', key, ARGV[o + 1])
  end
  if ARGV[o + 2] == '' then
    settle_fields[i] = 'settled'
  else
    local first, last, per = tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3]), tonumber(ARGV[o + 4])
    settle_fields[i] = ARGV[o + 3] .. ',c' .. tostring(math.floor(last / per))
    local span = last - first + 1
    local below = first - span
    if redis.call('HLEN', key) > 3 * span + 8 then
      for _, name in ipairs(redis.call('HKEYS', key)) do
        local b = tonumber(name)
        if b and b < below then
          redis.call('HDEL', key, name)
        elseif string.sub(name, 1, 1) == 'c' then
          local c = tonumber(string.sub(name, 2))
          if c and (c + 1) * per <= below then
            redis.call('HDEL', key, name)
          end
        end
      end
    end
  end
end
redis.call('HSET', rec, 'state', 'held', 'amount', ARGV[2], 'currency', ARGV[3], 'agent', ARGV[4],
  'at', ARGV[5], 'expires', ARGV[6], 'keys', table.concat(KEYS, ' ', 4),
  'fields', table.concat(settle_fields, ' '), 'policies', ARGV[9], 'indexes', ARGV[10])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
return {'held'}
"""

# KEYS: 1 request record, 2 holds zset, 3.. the hold's counters (as recorded; a mismatch answers them).
# ARGV: 1 request id, 2 actual, 3 currency, 4 decision ttl (s), 5 fallback counter ttl (s).
SETTLE_LUA: Final = """
local rec = KEYS[1]
local r = redis.call('HMGET', rec, 'state', 'amount', 'currency', 'keys', 'fields', 'actual', 'from')
local state = r[1]
if not state then
  return {'missing'}
end
if state == 'denied' then
  return {'denied'}
end
if r[3] ~= ARGV[3] then
  return {'currency', r[3] or ''}
end
if state == 'settled' then
  return {'replay', r[2] or '', r[6] or '', r[7] or ''}
end
if table.concat(KEYS, ' ', 3) ~= (r[4] or '') then
  return {'keys', r[4] or ''}
end
local amount = r[2]
local negative = '-' .. amount
if amount == '0' then
  negative = '0'
end
local i = 2
for group in string.gmatch(r[5] or '', '%S+') do
  i = i + 1
  local key = KEYS[i]
  if state == 'held' then
    redis.call('HINCRBY', key, 'held', negative)
    redis.call('HINCRBY', key, 'holds', -1)
  end
  for f in string.gmatch(group, '[^,]+') do
    if state == 'held' then
      redis.call('HINCRBY', key, f, ARGV[2])
    elseif ARGV[2] ~= amount then
      redis.call('HINCRBY', key, f, ARGV[2])
      redis.call('HINCRBY', key, f, negative)
    end
  end
  if redis.call('TTL', key) == -1 then
    redis.call('EXPIRE', key, ARGV[5])
  end
end
if state == 'held' then
  redis.call('ZREM', KEYS[2], ARGV[1])
end
redis.call('HSET', rec, 'state', 'settled', 'actual', ARGV[2], 'from', state)
redis.call('EXPIRE', rec, ARGV[4])
return {'settled', amount, state}
"""

# KEYS: 1 request record, 2 holds zset, 3.. the hold's counters.
# ARGV: 1 request id, 2 now (us), 3 decision ttl (s), 4 fallback counter ttl (s).
EXPIRE_LUA: Final = """
local rec = KEYS[1]
local r = redis.call('HMGET', rec, 'state', 'amount', 'keys', 'fields', 'expires')
if r[1] ~= 'held' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {'gone'}
end
if tonumber(r[5]) > tonumber(ARGV[2]) then
  return {'later'}
end
if table.concat(KEYS, ' ', 3) ~= (r[3] or '') then
  return {'keys', r[3] or ''}
end
local amount = r[2]
local negative = '-' .. amount
if amount == '0' then
  negative = '0'
end
local i = 2
for group in string.gmatch(r[4] or '', '%S+') do
  i = i + 1
  local key = KEYS[i]
  redis.call('HINCRBY', key, 'held', negative)
  redis.call('HINCRBY', key, 'holds', -1)
  for f in string.gmatch(group, '[^,]+') do
    redis.call('HINCRBY', key, f, amount)
  end
  if redis.call('TTL', key) == -1 then
    redis.call('EXPIRE', key, ARGV[4])
  end
end
redis.call('HSET', rec, 'state', 'expired')
redis.call('EXPIRE', rec, ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
return {'expired'}
"""

# KEYS: 1 counter. ARGV: 1 expire-at (epoch s), 2 buckets per block (rolling; empty for calendar),
# then field, value pairs to set. A rolling counter's blocks are summed again from their buckets.
REBUILD_LUA: Final = """
local per = tonumber(ARGV[2])
local blocks = {}
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  if per then
    blocks[math.floor(tonumber(ARGV[i]) / per)] = true
  end
end
for block in pairs(blocks) do
  local fields = {}
  for b = block * per, block * per + per - 1 do
    fields[#fields + 1] = tostring(b)
  end
  local sum = 0
  for _, v in ipairs(redis.call('HMGET', KEYS[1], unpack(fields))) do
    sum = sum + (tonumber(v) or 0)
  end
  redis.call('HSET', KEYS[1], 'c' .. tostring(block), string.format('%d', sum))
end
if redis.call('EXPIRETIME', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('EXPIREAT', KEYS[1], ARGV[1])
end
return 1
"""

_RECORD_FIELDS: Final = ("state", "amount", "currency", "agent", "at", "keys", "policies")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)


# KEYS: 1 a lock; ARGV: 1 its owner. Deletes the lock only if that owner still holds it.
UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _expired_hold(request_id: str, record: list[str]) -> ExpiredHold:
    """An expired hold from its request record (the fields of ``_RECORD_FIELDS``)."""
    _state, amount, currency, agent, at, _keys, policies = record
    return ExpiredHold(
        request_id=uuid.UUID(request_id),
        agent_id=uuid.UUID(agent),
        amount=from_units(int(amount), currency),
        policy_ids=tuple(uuid.UUID(p) for p in policies.split()),
        reserved_at=from_epoch_micros(int(at)),
    )


def _int(value: object) -> int:
    text = _text(value)
    return int(text) if text else 0


def _seconds(span: timedelta) -> int:
    return max(1, -(-span // timedelta(seconds=1)))


_Call = tuple[AsyncScript, list[str], list[str], "asyncio.Future[Any]"]


class _ScriptBatcher:
    """Script calls made in the same turn of the event loop, sent together as one pipeline (``EVALSHA`` each,
    not a transaction): one write on one shared connection (:class:`~caracald.budget.redis_link.RedisLink`)
    however many there are, and batches from later turns go out without waiting for earlier replies. A script
    Redis no longer knows (it restarted) is loaded again and run on its own."""

    def __init__(self, client: Redis, *, max_batch: int = 512) -> None:
        self._client = client
        self._max_batch = max_batch
        self._pending: list[_Call] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._link: RedisLink | None = None
        self._opening = asyncio.Lock()

    def call(self, script: AsyncScript, keys: list[str], args: list[str]) -> asyncio.Future[Any]:
        link = self._link
        # An open link's loop is the running one (asking asyncio costs a getpid() system call).
        loop = link.loop if link is not None and link.usable else asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending and link is not None and link.idle:
            # Nothing in flight: a quiet gateway's call goes out now, not a turn of the loop later. Under load
            # replies are always outstanding, and calls gather into batches.
            self._write(link, [(script, keys, args, future)])
            return future
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((script, keys, args, future))
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        for start in range(0, len(batch), self._max_batch):
            chunk = batch[start : start + self._max_batch]
            link = self._link
            if link is not None and link.usable:
                self._write(link, chunk)
            else:
                self._spawn(self._send(chunk))

    def _write(self, link: RedisLink, batch: list[_Call]) -> None:
        """The usual case, without a task: the replies come back through a callback."""
        replies = link.call(_pack(_commands(batch)), len(batch))
        replies.add_done_callback(functools.partial(self._answered, batch))

    def _answered(self, batch: list[_Call], replies: asyncio.Future[list[Any]]) -> None:
        if replies.exception() is not None:  # the link failed: send again on a new one
            self._spawn(self._send(batch))
        else:
            self._deliver(batch, replies.result())

    async def _send(self, batch: list[_Call]) -> None:
        try:
            replies = await self._execute(_commands(batch))
        except asyncio.CancelledError:
            for *_, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        self._deliver(batch, replies)

    def _deliver(self, batch: list[_Call], replies: list[Any]) -> None:
        for (script, keys, args, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, NoScriptError):
                self._spawn(self._run_loading(script, keys, args, future))
            elif isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    @staticmethod
    async def _run_loading(
        script: AsyncScript, keys: list[str], args: list[str], future: asyncio.Future[Any]
    ) -> None:
        """Run a script Redis did not know through redis-py, which loads it first."""
        try:
            reply = await script(keys=keys, args=args)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(reply)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write on the shared link and read every reply (an error reply in its
        place). A link that fails is dropped and the batch sent again on a new one, twice at most: the
        scripts are idempotent by request id, so a batch that did run answers the same the second time."""
        packed = _pack(commands)
        for attempt in range(3):
            link = None
            try:
                link = await self._open_link()
                return await link.call(packed, len(commands))
            except (RedisConnectionError, TimeoutError, OSError):
                if link is not None:
                    link.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _open_link(self) -> RedisLink:
        """The shared link, opened by one caller at a time when there is none (or it broke)."""
        link = self._link
        if link is not None and link.usable:
            return link
        async with self._opening:
            link = self._link
            if link is None or not link.usable:
                link = self._link = await RedisLink.open(self._client.connection_pool)
            return link

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None


def _commands(batch: list[_Call]) -> list[tuple[Any, ...]]:
    return [("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args, _ in batch]


def _pack(commands: list[tuple[Any, ...]]) -> bytes:
    """The commands in Redis's protocol (hiredis packs them, in C)."""
    return b"".join([pack_command(command) for command in commands])


class RedisBudget:
    """``BudgetBackend`` over ``redis.asyncio``: atomic Lua scripts shared by every gateway replica."""

    def __init__(
        self,
        client: Redis,
        *,
        namespace: str = "caracal",
        decision_ttl: timedelta = DEFAULT_DECISION_TTL,
        require_loaded: bool = False,
        clock: Callable[[], datetime] = _utcnow,
        owns_client: bool = False,
        settle_cache_size: int = 10_000,
        pipelining: bool = True,
    ) -> None:
        if not namespace or any(c in namespace for c in "{} "):
            raise ValidationError(
                f"budget namespace {namespace!r} must be non-empty, without braces or spaces"
            )
        if decision_ttl <= timedelta(0):
            raise ValidationError("the decision time to live must be positive")
        self._client = client
        self._owns_client = owns_client
        self.namespace = namespace
        self._tag = f"{{{namespace}}}"
        self.decision_ttl = decision_ttl
        self.require_loaded = require_loaded
        self._clock = clock
        self._decision_seconds = str(_seconds(decision_ttl))
        self._fallback_seconds = str(_seconds(COUNTER_GRACE))
        self._admit_script = client.register_script(ADMIT_LUA)
        self._settle_script = client.register_script(SETTLE_LUA)
        self._expire_script = client.register_script(EXPIRE_LUA)
        self._rebuild_script = client.register_script(REBUILD_LUA)
        # Admissions and settlements started in one turn of the event loop share a pipeline (not through a
        # cluster client, whose pipelines work differently).
        self._batcher = _ScriptBatcher(client) if pipelining and type(client) is Redis else None
        # The counters each hold admitted here sits on, so settling it takes one round trip.
        self._settle_keys: dict[uuid.UUID, list[str]] = {}
        self._settle_cache_size = settle_cache_size

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        socket_timeout: float = 1.0,
        max_connections: int = 64,
        pool_timeout: float = 2.0,
        **options: Any,
    ) -> RedisBudget:
        """A backend with its own connection pool (closed by ``close``); ``options`` go to ``__init__``."""
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=pool_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=2),
            decode_responses=True,
        )
        return cls(Redis(connection_pool=pool), owns_client=True, **options)

    # -- keys ---------------------------------------------------------------------------------------

    def counter_key(self, policy_id: uuid.UUID, counter_id: str) -> str:
        return f"{self._tag}:ctr:{policy_id}:{counter_id}"

    def request_key(self, request_id: uuid.UUID) -> str:
        return f"{self._tag}:req:{request_id}"

    @property
    def holds_key(self) -> str:
        return f"{self._tag}:holds"

    @property
    def loaded_key(self) -> str:
        return f"{self._tag}:loaded"

    # -- plumbing -----------------------------------------------------------------------------------

    async def _run(self, step: Awaitable[T]) -> T:
        try:
            return await step
        except (TimeoutError, RedisError, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise BudgetUnavailableError(f"the budget counters (Redis) are unavailable: {detail}") from exc

    def _script(self, script: AsyncScript, keys: list[str], args: list[str]) -> Awaitable[Any]:
        if self._batcher is None:
            return script(keys=keys, args=args)
        return self._batcher.call(script, keys, args)

    def _remember(self, request_id: uuid.UUID, keys: list[str]) -> None:
        if len(self._settle_keys) >= self._settle_cache_size:
            self._settle_keys.pop(next(iter(self._settle_keys)))
        self._settle_keys[request_id] = keys

    async def ping(self) -> None:
        """Check that Redis answers and is recent enough; ``BudgetUnavailableError`` if not."""
        info = await self._run(self._client.info("server"))
        version = tuple(int(part) for part in _text(info.get("redis_version", "0.0")).split(".")[:2])
        if version < MIN_REDIS_VERSION:
            raise BudgetUnavailableError(
                f"Redis {info.get('redis_version')} is too old for the budget scripts: use 7.0 or later"
            )

    # -- the contract -------------------------------------------------------------------------------

    async def admit(self, request: AdmissionRequest) -> Admission:
        units, checks = plan_checks(
            request.amount, ((s.policy_id, s.limit, s.window) for s in request.scopes), request.at
        )
        if request.hold_ttl <= timedelta(0):
            raise ValidationError("a hold needs a positive time to live")
        now = self._clock()
        at_us = epoch_micros(request.at)
        expires_us = epoch_micros(request.at + request.hold_ttl)
        counters = [self.counter_key(c.ref.policy_id, c.ref.counter_id) for c in checks]
        args: list[str] = [
            str(request.request_id),
            str(units),
            request.amount.currency,
            str(request.agent_id),
            str(at_us),
            str(expires_us),
            self._decision_seconds,
            "1" if self.require_loaded else "0",
            " ".join(str(c.ref.policy_id) for c in checks),
            " ".join(str(c.index) for c in checks),
        ]
        for check in checks:
            args.extend(self._check_args(check, now, request.hold_ttl))
        keys = [self.request_key(request.request_id), self.holds_key, self.loaded_key, *counters]
        reply = [_text(part) for part in await self._run(self._script(self._admit_script, keys, args))]
        amount = request.amount
        match reply:
            case ["held"]:
                self._remember(request.request_id, counters)
                return Admission(request.request_id, True, amount)
            case ["denied", position]:
                check = checks[int(position) - 1]
                return Admission(request.request_id, False, amount, request.scopes[check.index])
            case ["replay", state, held, currency, denied, policies, indexes]:
                amount = from_units(int(held), currency)
                if state != "denied":
                    return Admission(request.request_id, True, amount, replayed=True)
                which = int(denied) - 1
                policy = uuid.UUID(policies.split()[which])
                index = int(indexes.split()[which])
                denied_scope = denied_scope_of(request.scopes, index, policy)
                return Admission(request.request_id, False, amount, denied_scope, replayed=True)
            case ["unloaded"]:
                raise BudgetUnavailableError(
                    "the budget counters hold no data (Redis lost it?): rebuild them from the ledger first"
                )
        raise BudgetUnavailableError(f"unexpected answer from the admission script: {reply!r}")

    @staticmethod
    def _check_args(check: ScopeCheck, now: datetime, hold_ttl: timedelta) -> list[str]:
        ref = check.ref
        expire_at = str(epoch_seconds_ceil(counter_keep_until(ref.needed_until, now, hold_ttl)))
        if ref.buckets is None:
            return [str(check.limit), expire_at, "", "", ""]
        assert ref.settle_field == str(ref.buckets[-1])
        per_block = str(block_buckets(ref.window))
        return [str(check.limit), expire_at, str(ref.buckets.start), ref.settle_field, per_block]

    async def settle(self, request_id: uuid.UUID, actual: Money, at: datetime) -> Settlement:
        units = to_units(actual)
        if units < 0:
            raise ValidationError(f"cannot settle a negative cost ({actual.format(exact=True)})")
        counters = self._settle_keys.pop(request_id, None)
        if counters is None:
            recorded = await self._run(self._client.hget(self.request_key(request_id), "keys"))
            counters = _text(recorded).split()
        args = [str(request_id), str(units), actual.currency, self._decision_seconds, self._fallback_seconds]
        for _attempt in range(2):
            keys = [self.request_key(request_id), self.holds_key, *counters]
            reply = [_text(part) for part in await self._run(self._script(self._settle_script, keys, args))]
            match reply:
                case ["settled", held, state]:
                    correction = (
                        actual - from_units(int(held), actual.currency) if state == "expired" else None
                    )
                    return Settlement(request_id, actual, correction)
                case ["replay", held, charged, state]:
                    first = from_units(int(charged), actual.currency)
                    correction = (
                        first - from_units(int(held), actual.currency) if state == "expired" else None
                    )
                    return Settlement(request_id, first, correction, replayed=True)
                case ["keys", recorded_keys]:
                    counters = recorded_keys.split()
                    continue
                case ["missing"]:
                    raise NotFoundError(f"no hold for request {request_id} (never admitted, or forgotten)")
                case ["denied"]:
                    raise ConflictError(f"request {request_id} was denied: there is nothing to settle")
                case ["currency", currency]:
                    raise CurrencyMismatchError(
                        f"request {request_id} was held in {currency}; cannot settle it in {actual.currency}"
                    )
            raise BudgetUnavailableError(f"unexpected answer from the settlement script: {reply!r}")
        raise BudgetUnavailableError(f"the counters of request {request_id} changed while settling it")

    async def expire_due(
        self, now: datetime, limit: int = 1000, *, before: DueHook | None = None
    ) -> list[ExpiredHold]:
        now_us = epoch_micros(now)
        due = await self._run(self._client.zrangebyscore(self.holds_key, "-inf", now_us, start=0, num=limit))
        ids = [_text(member) for member in due]
        if not ids:
            return []
        if before is not None:
            before([uuid.UUID(request_id) for request_id in ids])
        pipe = self._client.pipeline(transaction=False)
        for request_id in ids:
            pipe.hmget(f"{self._tag}:req:{request_id}", list(_RECORD_FIELDS))
        records = [[_text(v) for v in row] for row in await self._run(pipe.execute())]
        pipe = self._client.pipeline(transaction=False)
        for request_id, record in zip(ids, records, strict=True):
            keys = [f"{self._tag}:req:{request_id}", self.holds_key, *record[5].split()]
            args = [request_id, str(now_us), self._decision_seconds, self._fallback_seconds]
            await self._expire_script(keys=keys, args=args, client=pipe)
        replies = await self._run(pipe.execute())
        expired = []
        for request_id, record, reply in zip(ids, records, replies, strict=True):
            if _text(reply[0]) != "expired":
                continue
            self._settle_keys.pop(uuid.UUID(request_id), None)
            expired.append(_expired_hold(request_id, record))
        return expired

    async def expired(self, request_ids: Sequence[uuid.UUID]) -> list[ExpiredHold]:
        if not request_ids:
            return []
        pipe = self._client.pipeline(transaction=False)
        for request_id in request_ids:
            pipe.hmget(self.request_key(request_id), [*_RECORD_FIELDS, "from"])
        records = [[_text(v) for v in row] for row in await self._run(pipe.execute())]
        # expired, or expired and then settled late (the expiry charged the hold: its event is still owed)
        return [
            _expired_hold(str(request_id), record[:-1])
            for request_id, record in zip(request_ids, records, strict=True)
            if record[0] == "expired" or (record[0] == "settled" and record[-1] == "expired")
        ]

    async def status(self, scopes: Sequence[Scope], at: datetime) -> list[ScopeStatus]:
        refs = [counter_ref(scope.policy_id, scope.window, at) for scope in scopes]
        if not refs:
            return []
        pipe = self._client.pipeline(transaction=False)
        for ref in refs:
            pipe.hmget(self.counter_key(ref.policy_id, ref.counter_id), self._status_fields(ref))
        rows = await self._run(pipe.execute())
        statuses = []
        for scope, ref, row in zip(scopes, refs, rows, strict=True):
            held, holds, *settled = (_int(value) for value in row)
            currency = scope.limit.currency
            statuses.append(
                ScopeStatus(
                    scope=scope,
                    bounds=ref.bounds,
                    settled=from_units(sum(settled), currency),
                    held=from_units(held, currency),
                    holds=holds,
                )
            )
        return statuses

    @staticmethod
    def _status_fields(ref: CounterRef) -> list[str]:
        return [HELD_FIELD, HOLDS_FIELD, *ref.settled_fields]

    async def remaining(self, scopes: Sequence[Scope], at: datetime) -> Money | None:
        return least_remaining(await self.status(scopes, at))

    async def holds_in_flight(self) -> int:
        return int(await self._run(self._client.zcard(self.holds_key)))

    async def loaded(self) -> bool:
        """Whether the counters hold data: ``rebuild`` ran since Redis last started empty."""
        return bool(await self._run(self._client.exists(self.loaded_key)))

    @property
    def rebuild_lock_key(self) -> str:
        return f"{self._tag}:rebuild-lock"

    async def lock_rebuild(self, owner: str, seconds: float) -> bool:
        """Take the lock that lets one process at a time rebuild the counters (it expires by itself)."""
        taken = self._client.set(self.rebuild_lock_key, owner, nx=True, px=int(seconds * 1000))
        return bool(await self._run(taken))

    async def unlock_rebuild(self, owner: str) -> None:
        """Release the rebuild lock if ``owner`` still holds it."""
        await self._run(self._client.eval(UNLOCK_LUA, 1, self.rebuild_lock_key, owner))

    async def rebuild(self, totals: Mapping[tuple[uuid.UUID, str], Money]) -> None:
        """Set counters' settled spend from ledger totals per ``(policy_id, spend_slot)``, then mark
        the counters loaded. Only the named slots change; holds in flight are left as they are. Run
        it before admitting traffic (a settlement landing in between would be overwritten)."""
        now = self._clock()
        by_counter: dict[str, list[str]] = {}
        expiry: dict[str, int] = {}
        per_block: dict[str, str] = {}
        for (policy_id, slot), money in totals.items():
            where = parse_slot(slot)
            key = self.counter_key(policy_id, where.counter_id)
            by_counter.setdefault(key, []).extend([where.field, str(to_units(money))])
            expire_at = epoch_seconds_ceil(counter_keep_until(where.needed_until, now))
            expiry[key] = max(expiry.get(key, 0), expire_at)
            per_block[key] = "" if where.per_block is None else str(where.per_block)
        pipe = self._client.pipeline(transaction=False)
        for key, pairs in by_counter.items():
            args = [str(expiry[key]), per_block[key], *pairs]
            await self._rebuild_script(keys=[key], args=args, client=pipe)
        pipe.set(self.loaded_key, now.isoformat())
        await self._run(pipe.execute())

    async def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
        if self._owns_client:
            await self._client.aclose()
