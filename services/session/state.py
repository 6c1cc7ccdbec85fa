"""Session state in Redis: token history, parent, metadata, timestamps, pins.

Everything a session service replica knows lives here, so restarting a replica (or running
several) loses nothing. All keys of one session share a Redis Cluster hash tag
(``sess:{<ns>:<id>}...``), so each operation on one session is a single-slot Lua script, and
each script is all or nothing: its first write is one Redis refuses under ``maxmemory``
(then nothing is written), after which Redis runs it to the end.
- ``create``: the session's keys in one script;
- ``get``: reads metadata, tokens and messages as one snapshot (never half a turn);
- ``append_turn``: a whole turn (tokens, messages, updated time, the request-id record) in one
  script, once per request id (a retry is recognised, even after the session was closed);
- ``pin``/``unpin``/``close``: change a field only if the session exists (never recreate a
  partial session that was deleted meanwhile);
- ``request``: leases a request id to one call while it runs, so a retry that overlaps the
  first attempt waits for its result instead of producing a second answer.

Request-id records live in a hash of the session (``:reqs``, with their times in ``:reqt``),
not in keys of their own with a TTL: an eviction policy that removes keys with a TTL first
(``volatile-*``) could drop a record while its session stays, and a retry would apply the
turn again. They are bounded explicitly: each turn drops the records beyond the session's
last ``MAX_REQUEST_IDS`` and those older than ``REQUEST_ID_TTL_S``. A turn may keep its record
instead (``keep_record``: a stored OpenAI response, read back by ``record``): it is not timed, so
it lives as long as the session (its size is bounded by the history's).

Idle sessions expire: every write sets the TTL of all the session's keys to ``idle_ttl_s``
(0: no TTL), or to the end of its pin if that is later. Session state must therefore never
be evicted (``SessionServer`` refuses a Redis whose ``maxmemory-policy`` could).

``fork`` is not atomic as a whole (the child has its own hash tag, so another slot): it takes
a ``get`` snapshot of the parent and creates the child from it; a turn landing on the parent
meanwhile is either wholly in the fork or not at all.
The per-namespace index (a sorted set by last update) lives in its own key, hence another
slot. ``create`` first adds the new id to it, if the namespace is under its session limit,
then writes the session; if that fails it removes the id again (ZREM is allowed under
``maxmemory``), so a failed create leaves nothing. After a turn the index entry is refreshed
best effort (ZADD XX: a close that ran meanwhile stays removed); ids of sessions that expired
are pruned when a namespace reaches its limit, and listing skips them.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import redis.asyncio as aioredis
import redis.exceptions as rex

from kvstore.hashing import token_bytes
from services.common.errors import REDIS_UNAVAILABLE
from services.session.router import Affinity

logger = logging.getLogger(__name__)

REQUEST_ID_TTL_S = 24 * 3600  # a request id is remembered this long (for retries) ...
MAX_REQUEST_IDS = 32  # ... among the session's last this many
# A running request id is leased to one call; the holder renews the lease while it runs, so
# it lapses this long after a holder that crashed (or lost Redis), letting a retry take over.
LEASE_S = 10.0
_LEASE_POLL_S = 0.05  # how often a retry waiting for the holder checks for its result
_PRUNE_BATCH = 256  # index entries checked per pass when a namespace reaches its limit
_MAX_REQUEST_ID = 128
_ID_BYTES = 12
_ID = re.compile(f"[0-9a-f]{{{2 * _ID_BYTES}}}")
_BEST_EFFORT = (rex.RedisError, *REDIS_UNAVAILABLE)


def valid_session_id(session_id: str) -> bool:
    """True for an id as ``create`` makes them (24 lowercase hex digits)."""
    return _ID.fullmatch(session_id) is not None


class SessionError(Exception):
    """Base of the session store's errors (the service maps them to gRPC codes)."""


class SessionNotFound(SessionError):
    pass


class SessionClosed(SessionError):
    pass


class HistoryTooLong(SessionError):
    """A turn would take the history past its limit (the model's context or the configured one)."""


class TooManySessions(SessionError):
    """The namespace has as many open sessions as it may."""


@dataclass(slots=True)
class Session:
    id: str
    namespace: str
    model: str
    tokens: list[int]
    parent: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0
    pinned_until: float = 0.0
    closed: bool = False
    messages: list[dict] = field(default_factory=list)  # chat messages, for the template's context
    affinity: Affinity | None = None  # the worker that ran its last turn (None: route by prefix)


class SessionChanged(SessionError):
    """The history changed since it was read (a concurrent turn on the same session)."""


# Every script that writes a session takes its five keys in this order:
# meta (hash), tokens (string), messages (list), request-id records (hash), their times (zset).
# keep(now, idle ms): refresh the idle TTL of all of them; a pin keeps them at least until it
# ends. Returns the TTL set, in ms (0: none).
_KEEP = """
local function keep(now, idle_ms)
  if idle_ms <= 0 then
    for i = 1, 5 do redis.call('PERSIST', KEYS[i]) end
    return 0
  end
  local pin = tonumber(redis.call('HGET', KEYS[1], 'pinned_until') or '0')
  local ms = math.max(idle_ms, math.ceil((pin - now) * 1000))
  for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], ms) end
  return ms
end
"""

# ARGV: model, parent, metadata JSON, now, token bytes, idle ms, then message JSONs.
# Returns the TTL set. A retry of a create that was applied (same random id) changes nothing.
_CREATE = _KEEP + """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('PTTL', KEYS[1]) end
redis.call('HSET', KEYS[1], 'model', ARGV[1], 'parent', ARGV[2], 'metadata', ARGV[3], 'created', ARGV[4],
           'updated', ARGV[4], 'pinned_until', 0, 'closed', 0)
redis.call('SET', KEYS[2], ARGV[5])
for i = 7, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
return keep(tonumber(ARGV[4]), tonumber(ARGV[6]))
"""

# ARGV: 1 token bytes, 2 now, 3 request id ('' for none), 4 expected history length in tokens
# (-1: any), 5 the result to remember under the request id, 6 the history limit in tokens,
# 7 idle ms, 8 request ids kept (-1: keep this record as long as the session, untimed), 9 their
# maximum age in s, 10 the session's new worker affinity ('' keeps it), then message JSONs to push.
# Returns {history length after the call, remembered result, 1 if replayed, TTL set}: a
# retried request id returns what the first call stored. Length -1: the session is missing,
# -2: closed, -3: changed, -4: over the limit (the result is the history length).
# The request id is checked before "closed": a retry of an append that succeeded before the
# session was closed gets its result, not an error.
_APPEND = _KEEP + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, '', 0, 0} end
if ARGV[3] ~= '' then
  local done = redis.call('HGET', KEYS[4], ARGV[3])
  if done then
    local sep = string.find(done, '|', 1, true)
    return {tonumber(string.sub(done, 1, sep - 1)), string.sub(done, sep + 1), 1, 0}
  end
end
if redis.call('HGET', KEYS[1], 'closed') == '1' then return {-2, '', 0, 0} end
local len = redis.call('STRLEN', KEYS[2]) / 4
local expected = tonumber(ARGV[4])
if expected >= 0 and len ~= expected then return {-3, '', 0, 0} end
if len + #ARGV[1] / 4 > tonumber(ARGV[6]) then return {-4, tostring(len), 0, 0} end
local n = redis.call('APPEND', KEYS[2], ARGV[1]) / 4
for i = 11, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
local now = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'updated', ARGV[2])
if ARGV[10] ~= '' then redis.call('HSET', KEYS[1], 'affinity', ARGV[10]) end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[3], n .. '|' .. ARGV[5])
end
if ARGV[3] ~= '' and tonumber(ARGV[8]) >= 0 then
  redis.call('ZADD', KEYS[5], now, ARGV[3])
  local old = math.max(redis.call('ZCOUNT', KEYS[5], '-inf', now - tonumber(ARGV[9])),
                       redis.call('ZCARD', KEYS[5]) - tonumber(ARGV[8]))
  if old > 0 then
    redis.call('HDEL', KEYS[4], unpack(redis.call('ZRANGE', KEYS[5], 0, old - 1)))
    redis.call('ZREMRANGEBYRANK', KEYS[5], 0, old - 1)
  end
end
return {n, ARGV[5], 0, keep(now, tonumber(ARGV[7]))}
"""

# ARGV: field, value, now, idle ms. Sets the field only if the session exists; returns the
# TTL set (-1 if the session is missing).
_SET_IF_EXISTS = _KEEP + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return keep(tonumber(ARGV[3]), tonumber(ARGV[4]))
"""

# KEYS: request-id records, the lease. ARGV: request id, owner, lease ms. Returns {0, ''} if
# the request id is now leased to this owner, {1, remembered} if it was applied, {2, ''} if
# another call holds it.
_CLAIM = """
local done = redis.call('HGET', KEYS[1], ARGV[1])
if done then return {1, done} end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return {0, ''} end
return {2, ''}
"""

# KEYS: lease. ARGV: owner, then lease ms to renew it, or none to release it. Acts only while
# the owner holds the lease (a lapsed lease may belong to another call by now).
_LEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('DEL', KEYS[1])
"""

# KEYS: meta, tokens, messages. Returns {meta as HGETALL's flat list, token bytes, messages}.
_GET = """
return {redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[2]) or '', redis.call('LRANGE', KEYS[3], 0, -1)}
"""

# The namespace index keeps at least as long as its longest-lived session: extend(ms).
_EXTEND = """
local function extend(ms)
  if ms <= 0 then redis.call('PERSIST', KEYS[1]) elseif redis.call('PTTL', KEYS[1]) < ms then
    redis.call('PEXPIRE', KEYS[1], ms) end
end
"""

# KEYS: index. ARGV: id, now, session limit (0: none), TTL ms. Adds the id if the namespace
# is under its limit; returns 1 if it is listed now, 0 if the namespace is full.
_RESERVE = _EXTEND + """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local limit = tonumber(ARGV[3])
  if limit > 0 and redis.call('ZCARD', KEYS[1]) >= limit then return 0 end
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
end
extend(tonumber(ARGV[4]))
return 1
"""

# KEYS: index. ARGV: id, now, TTL ms. Refreshes the id's entry if it is still listed (a close
# that ran since stays removed).
_REFRESH = _EXTEND + """
if redis.call('ZADD', KEYS[1], 'XX', 'CH', ARGV[2], ARGV[1]) == 1 then extend(tonumber(ARGV[3])) end
return 0
"""


@dataclass(slots=True)
class Appended:
    num_tokens: int  # history length afterwards
    result: str  # what the call stored under its request id (the first call's, for a retry)
    replayed: bool  # True if the request id had been applied before


class SessionStore:
    """Async access to sessions (redis-py asyncio; single Redis or Cluster).

    ``idle_ttl_s``: a session not written for this long is removed (0: kept forever; a pin
    keeps it at least until the pin ends). ``max_sessions``: open sessions per namespace
    (0: no limit)."""

    def __init__(self, client: aioredis.Redis, idle_ttl_s: float = 0.0, max_sessions: int = 0) -> None:
        self._r = client
        self._idle_ms = math.ceil(idle_ttl_s * 1000)
        self._max_sessions = max_sessions
        self._create = client.register_script(_CREATE)
        self._append = client.register_script(_APPEND)
        self._get = client.register_script(_GET)
        self._set_if_exists = client.register_script(_SET_IF_EXISTS)
        self._claim = client.register_script(_CLAIM)
        self._lease = client.register_script(_LEASE)
        self._reserve = client.register_script(_RESERVE)
        self._refresh = client.register_script(_REFRESH)

    @staticmethod
    def _keys(namespace: str, session_id: str) -> list[str]:
        """The session's keys, in the order the writing scripts take them."""
        tag = f"sess:{{{namespace}:{session_id}}}"
        return [f"{tag}:meta", f"{tag}:tokens", f"{tag}:msgs", f"{tag}:reqs", f"{tag}:reqt"]

    @staticmethod
    def _lease_key(namespace: str, session_id: str, request_id: str) -> str:
        return f"sess:{{{namespace}:{session_id}}}:lease:{request_id}"  # same hash tag: one slot

    @staticmethod
    def _index(namespace: str) -> str:
        return f"sessidx:{namespace}"

    async def create(self, namespace: str, model: str, tokens: list[int] | None = None,
                     metadata: dict[str, str] | None = None, parent: str = "",
                     messages: list[dict] | None = None) -> Session:
        """A new session with an optional initial history (e.g. the system prompt's tokens).
        Raises ``TooManySessions`` when the namespace has ``max_sessions`` open sessions."""
        session_id = secrets.token_hex(_ID_BYTES)
        now = time.time()
        data = token_bytes(np.asarray(tokens or [], dtype=np.int64))
        index = self._index(namespace)
        reserve = [session_id, now, self._max_sessions, self._idle_ms]
        if not await self._reserve(keys=[index], args=reserve):
            await self._prune(namespace)
            if not await self._reserve(keys=[index], args=reserve):
                raise TooManySessions(f"namespace {namespace!r} has {self._max_sessions} open sessions, its limit; "
                                      "close some (or wait for idle ones to expire) and retry")
        try:
            await self._create(keys=self._keys(namespace, session_id), args=[
                model, parent, json.dumps(metadata or {}), now, data, self._idle_ms,
                *(json.dumps(m) for m in messages or ())])
        except BaseException:
            await self._unlist(namespace, session_id)  # nothing half-made stays behind
            raise
        return Session(session_id, namespace, model, list(tokens or []), parent, dict(metadata or {}), now, now,
                       messages=list(messages or []))

    async def _prune(self, namespace: str) -> None:
        """Drop the oldest index entries whose session expired."""
        index = self._index(namespace)
        ids = [i.decode() for i in await self._r.zrange(index, 0, _PRUNE_BATCH - 1)]
        pipe = self._r.pipeline(transaction=False)
        for session_id in ids:
            pipe.exists(self._keys(namespace, session_id)[0])
        gone = [i for i, exists in zip(ids, await pipe.execute() if ids else []) if not exists]
        if gone:
            await self._r.zrem(index, *gone)

    async def _unlist(self, namespace: str, session_id: str) -> None:
        try:
            await self._r.zrem(self._index(namespace), session_id)
        except _BEST_EFFORT as e:  # listing skips ids without a session; pruning removes them
            logger.warning("could not remove session %r from the index of %r: %s", session_id, namespace, e)

    async def get(self, namespace: str, session_id: str) -> Session:
        flat, data, msgs = await self._get(keys=self._keys(namespace, session_id)[:3])
        if not flat:
            raise SessionNotFound(f"no session {session_id!r} in namespace {namespace!r}")
        session = _session(namespace, session_id, dict(zip(flat[::2], flat[1::2])))
        session.tokens = np.frombuffer(data, dtype="<u4").tolist()  # 4-byte ids: see token_bytes
        session.messages = [json.loads(x) for x in msgs]
        return session

    async def append_turn(self, namespace: str, session_id: str, tokens: list[int], *, request_id: str = "",
                          messages: list[dict] | None = None, expected_len: int | None = None,
                          result: str = "", max_len: int = 1 << 31, keep_record: bool = False,
                          affinity: Affinity | None = None) -> Appended:
        """Atomically append tokens and chat messages (one script: the turn, its request-id
        record and the updated time are all written, or none of them).

        ``expected_len``: apply only if the history still has this many tokens (raises
        ``SessionChanged`` otherwise). ``max_len``: the history limit in tokens (raises
        ``HistoryTooLong``). ``result`` is remembered with the ``request_id`` and returned to
        retries, which change nothing; with ``keep_record`` it is kept as long as the session
        (not among the last ``MAX_REQUEST_IDS``). ``affinity``: the worker that ran the turn."""
        if len(request_id) > _MAX_REQUEST_ID:
            raise ValueError(f"request_id longer than {_MAX_REQUEST_ID} characters")
        data = token_bytes(np.asarray(tokens, dtype=np.int64))
        now = time.time()
        args = [data, now, request_id, -1 if expected_len is None else expected_len, result, max_len,
                self._idle_ms, -1 if keep_record else MAX_REQUEST_IDS, REQUEST_ID_TTL_S,
                affinity.encode() if affinity else "", *(json.dumps(m) for m in messages or ())]
        n, stored, replayed, ttl_ms = await self._append(keys=self._keys(namespace, session_id), args=args)
        n = int(n)
        if n == -1:
            raise SessionNotFound(f"no session {session_id!r} in namespace {namespace!r}")
        if n == -2:
            raise SessionClosed(f"session {session_id!r} in namespace {namespace!r} is closed: its history is "
                                "readable, but it takes no more turns (fork it to continue)")
        if n == -3:
            raise SessionChanged(f"session {session_id!r} changed while this request ran (a concurrent turn); "
                                 "retry it")
        if n == -4:
            raise HistoryTooLong(f"session {session_id!r} has {int(stored)} tokens; {len(tokens)} more would exceed "
                                 f"its limit of {max_len} tokens")
        stored = stored.decode() if isinstance(stored, bytes) else str(stored)
        if not replayed:
            await self._touch_index(namespace, session_id, now, int(ttl_ms))
        return Appended(n, stored, bool(replayed))

    async def _touch_index(self, namespace: str, session_id: str, now: float, ttl_ms: int) -> None:
        """Best effort: the session's change is applied whether or not its index entry follows."""
        try:
            await self._refresh(keys=[self._index(namespace)], args=[session_id, now, ttl_ms])
        except _BEST_EFFORT as e:
            logger.warning("could not refresh session %r in the index of %r (the change is applied): %s",
                           session_id, namespace, e)

    @contextlib.asynccontextmanager
    async def request(self, namespace: str, session_id: str, request_id: str) -> AsyncIterator[tuple[int, str] | None]:
        """Run the calls carrying one request id one at a time.

        Yields (history length, result) if ``request_id`` was applied already, by an earlier
        call or by a concurrent one this call waited for. Otherwise yields None with the
        request id leased to this call until the block exits: a concurrent retry waits for
        its result, or takes over if this call fails. Without a request id: None at once."""
        if not request_id:
            yield None
            return
        keys = [self._keys(namespace, session_id)[3], self._lease_key(namespace, session_id, request_id)]
        owner = secrets.token_hex(8)
        while True:
            status, done = await self._claim(keys=keys, args=[request_id, owner, int(LEASE_S * 1000)])
            if status == 1:
                yield _parse_done(done)
                return
            if status == 0:
                break
            await asyncio.sleep(_LEASE_POLL_S)
        renewer = asyncio.create_task(self._keep_lease(keys[1], owner), name="session-request-lease")
        try:
            yield None
        finally:
            renewer.cancel()
            try:
                await self._lease(keys=[keys[1]], args=[owner])
            except REDIS_UNAVAILABLE as e:  # the lease lapses by itself after LEASE_S
                logger.warning("could not release the lease of request %r: %s", request_id, e)

    async def _keep_lease(self, key: str, owner: str) -> None:
        while True:
            await asyncio.sleep(LEASE_S / 3)
            try:
                await self._lease(keys=[key], args=[owner, int(LEASE_S * 1000)])
            except REDIS_UNAVAILABLE as e:  # the next renewal may still come in time
                logger.warning("could not renew a request lease: %s", e)

    async def fork(self, namespace: str, session_id: str, metadata: dict[str, str] | None = None,
                   at: tuple[int, int] | None = None) -> Session:
        """A new session whose history starts as a copy of ``session_id``'s (of one snapshot
        of it: a concurrent turn on the parent is wholly in the fork or not at all), or of its
        first (tokens, messages) ``at`` (an earlier point of its history)."""
        parent = await self.get(namespace, session_id)
        tokens, messages = (parent.tokens[:at[0]], parent.messages[:at[1]]) if at else (parent.tokens, parent.messages)
        return await self.create(namespace, parent.model, tokens, metadata or parent.metadata,
                                 parent=session_id, messages=messages)

    async def record(self, namespace: str, session_id: str, request_id: str) -> tuple[int, str] | None:
        """(history length after the turn, result) recorded under ``request_id``, or None."""
        done = await self._r.hget(self._keys(namespace, session_id)[3], request_id)
        return _parse_done(done) if done else None

    async def drop_record(self, namespace: str, session_id: str, request_id: str) -> bool:
        """Forget what ``request_id`` recorded (its turn stays in the history); False if nothing was."""
        return bool(await self._r.hdel(self._keys(namespace, session_id)[3], request_id))

    async def list(self, namespace: str, limit: int = 100) -> list[str]:
        """Session ids of a namespace, most recently updated first."""
        ids = await self._r.zrevrange(self._index(namespace), 0, limit - 1)
        return [i.decode() for i in ids]

    async def count(self) -> int:
        """Sessions of every namespace written within the idle TTL (a pinned session idle for
        longer is left out)."""
        since = time.time() - self._idle_ms / 1000 if self._idle_ms else "-inf"
        total = 0
        async for index in self._r.scan_iter(match=self._index("*"), count=1000):
            total += await self._r.zcount(index, since, "+inf")
        return total

    async def used_memory(self) -> int:
        """Bytes Redis uses (summed over the nodes of a cluster)."""
        info = await self._r.info("memory")
        return int(info["used_memory"]) if "used_memory" in info else sum(int(n["used_memory"]) for n in info.values())

    async def list_sessions(self, namespace: str, limit: int = 100) -> list[tuple[Session, int]]:
        """(session, history length) of a namespace's sessions, most recently updated first.
        The histories are not read: these sessions have no tokens or messages."""
        ids = await self.list(namespace, limit)
        pipe = self._r.pipeline(transaction=False)  # one round trip (per node) for all of them
        for session_id in ids:
            meta_key, tok_key = self._keys(namespace, session_id)[:2]
            pipe.hgetall(meta_key)
            pipe.strlen(tok_key)
        replies = await pipe.execute() if ids else []
        return [(_session(namespace, session_id, meta), length // 4)  # 4 bytes per token id
                for session_id, meta, length in zip(ids, replies[::2], replies[1::2])
                if meta]  # empty: expired or removed since the index was read

    async def pin(self, namespace: str, session_id: str, ttl_s: float) -> float:
        """Keep the session's blocks preferred, and the session itself, until now + ``ttl_s``;
        returns that time."""
        until = time.time() + ttl_s
        await self._set_field(namespace, session_id, "pinned_until", until)
        return until

    async def unpin(self, namespace: str, session_id: str) -> float:
        """End a pin; returns 0.0 (the new ``pinned_until``)."""
        await self._set_field(namespace, session_id, "pinned_until", 0)
        return 0.0

    async def close(self, namespace: str, session_id: str) -> None:
        """Mark closed: no more appends, the history stays readable (until it expires);
        idempotent. A closed session does not count against the namespace's limit."""
        await self._set_field(namespace, session_id, "closed", 1)
        await self._unlist(namespace, session_id)

    async def set_affinity(self, namespace: str, session_id: str, affinity: Affinity) -> None:
        """Route the session's next turn to this worker (it just warmed the session's prefix)."""
        await self._set_field(namespace, session_id, "affinity", affinity.encode())

    async def _set_field(self, namespace: str, session_id: str, name: str, value: float | str) -> None:
        now = time.time()
        ttl_ms = await self._set_if_exists(keys=self._keys(namespace, session_id), args=[name, value, now, self._idle_ms])
        if ttl_ms == -1:
            raise SessionNotFound(f"no session {session_id!r} in namespace {namespace!r}")
        if name == "pinned_until":  # the index must list a pinned session as long as it lives
            await self._touch_index(namespace, session_id, now, int(ttl_ms))


def _parse_done(done: bytes) -> tuple[int, str]:
    """(history length, result) from what the append script stores under a request id."""
    n, _, result = done.decode().partition("|")
    return int(n), result


def _session(namespace: str, session_id: str, meta: dict[bytes, bytes]) -> Session:
    """A session from its metadata hash (without tokens and messages)."""
    m = {k.decode(): v.decode() for k, v in meta.items()}
    return Session(session_id, namespace, m["model"], [], m["parent"], json.loads(m["metadata"]),
                   float(m["created"]), float(m["updated"]), float(m["pinned_until"]), m["closed"] == "1",
                   affinity=Affinity.decode(m.get("affinity", "")))
