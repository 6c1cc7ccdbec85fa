"""Session state in Redis: token history, parent, metadata, timestamps, pins.

Everything a session service replica knows lives here, so restarting a replica (or running
several) loses nothing. All keys of one session share a Redis Cluster hash tag
(``sess:{<ns>:<id>}...``), so each operation on one session is a single-slot Lua script:
- ``get``: reads metadata, tokens and messages as one snapshot (never half a turn);
- ``append``: adds tokens once per request id (a retried Append is not applied twice, even
  after the session was closed);
- ``pin``/``unpin``/``close``: change a field only if the session exists (never recreate a
  partial session that was deleted meanwhile);
- ``request``: leases a request id to one call while it runs, so a retry that overlaps the
  first attempt waits for its result instead of producing a second answer.
``fork`` is not atomic as a whole (the child has its own hash tag, so another slot): it takes
a ``get`` snapshot of the parent and creates the child from it; a turn landing on the parent
meanwhile is either wholly in the fork or not at all.
The per-namespace index (a sorted set by last update) lives in its own key, hence another slot,
and is updated after the scripts: ``create`` adds, ``close`` removes, and an append only
refreshes an entry that is still there (ZADD XX), so it cannot re-add a closed session.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import redis.asyncio as aioredis

from kvstore.hashing import token_bytes
from services.common.errors import REDIS_UNAVAILABLE

logger = logging.getLogger(__name__)

REQUEST_ID_TTL_S = 24 * 3600  # how long a request id is remembered for idempotency
# A running request id is leased to one call; the holder renews the lease while it runs, so
# it lapses this long after a holder that crashed (or lost Redis), letting a retry take over.
LEASE_S = 10.0
_LEASE_POLL_S = 0.05  # how often a retry waiting for the holder checks for its result
_MAX_REQUEST_ID = 128
_ID_BYTES = 12
_ID = re.compile(f"[0-9a-f]{{{2 * _ID_BYTES}}}")


def valid_session_id(session_id: str) -> bool:
    """True for an id as ``create`` makes them (24 lowercase hex digits)."""
    return _ID.fullmatch(session_id) is not None


class SessionError(Exception):
    """Base of the session store's errors (the service maps them to gRPC codes)."""


class SessionNotFound(SessionError):
    pass


class SessionClosed(SessionError):
    pass


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


class SessionChanged(SessionError):
    """The history changed since it was read (a concurrent turn on the same session)."""


# KEYS: meta, tokens, request id, messages. ARGV: token bytes, now, request-id ttl, "1" if a
# request id, expected history length in tokens (-1: any), the result to remember under the
# request id, then message JSONs to push.
# Returns {history length after the call, remembered result, 1 if replayed}: a retried
# request id returns what the first call stored. Length -1: the session is missing, -2: closed, -3: changed.
# The request id is checked before "closed": a retry of an append that succeeded before the
# session was closed gets its result, not an error.
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, '', 0} end
if ARGV[4] == '1' then
  local done = redis.call('GET', KEYS[3])
  if done then
    local sep = string.find(done, '|', 1, true)
    return {tonumber(string.sub(done, 1, sep - 1)), string.sub(done, sep + 1), 1}
  end
end
if redis.call('HGET', KEYS[1], 'closed') == '1' then return {-2, '', 0} end
local expected = tonumber(ARGV[5])
if expected >= 0 and redis.call('STRLEN', KEYS[2]) / 4 ~= expected then return {-3, '', 0} end
local n = redis.call('APPEND', KEYS[2], ARGV[1]) / 4
for i = 7, #ARGV do redis.call('RPUSH', KEYS[4], ARGV[i]) end
redis.call('HSET', KEYS[1], 'updated', ARGV[2])
if ARGV[4] == '1' then redis.call('SET', KEYS[3], n .. '|' .. ARGV[6], 'EX', ARGV[3]) end
return {n, ARGV[6], 0}
"""

# KEYS: request id, its lease. ARGV: owner, lease ms. Returns {0, ''} if the request id is now
# leased to this owner, {1, remembered} if it was applied, {2, ''} if another call holds it.
_CLAIM = """
local done = redis.call('GET', KEYS[1])
if done then return {1, done} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0, ''} end
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

# KEYS: meta. ARGV: field, value. Sets the field only if the session exists; returns 1 if so.
_SET_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


@dataclass(slots=True)
class Appended:
    num_tokens: int  # history length afterwards
    result: str  # what the call stored under its request id (the first call's, for a retry)
    replayed: bool  # True if the request id had been applied before


class SessionStore:
    """Async access to sessions (redis-py asyncio; single Redis or Cluster)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._r = client
        self._append = client.register_script(_APPEND)
        self._get = client.register_script(_GET)
        self._set_if_exists = client.register_script(_SET_IF_EXISTS)
        self._claim = client.register_script(_CLAIM)
        self._lease = client.register_script(_LEASE)

    @staticmethod
    def _keys(namespace: str, session_id: str) -> tuple[str, str]:
        tag = f"sess:{{{namespace}:{session_id}}}"
        return f"{tag}:meta", f"{tag}:tokens"

    @staticmethod
    def _msgs_key(namespace: str, session_id: str) -> str:
        return f"sess:{{{namespace}:{session_id}}}:msgs"

    @staticmethod
    def _req_key(namespace: str, session_id: str, request_id: str) -> str:
        return f"sess:{{{namespace}:{session_id}}}:req:{request_id}"  # same hash tag: one slot

    @staticmethod
    def _lease_key(namespace: str, session_id: str, request_id: str) -> str:
        return f"sess:{{{namespace}:{session_id}}}:lease:{request_id}"

    @staticmethod
    def _index(namespace: str) -> str:
        return f"sessidx:{namespace}"

    async def create(self, namespace: str, model: str, tokens: list[int] | None = None,
                     metadata: dict[str, str] | None = None, parent: str = "",
                     messages: list[dict] | None = None) -> Session:
        """A new session with an optional initial history (e.g. the system prompt's tokens)."""
        session_id = secrets.token_hex(_ID_BYTES)
        now = time.time()
        meta_key, tok_key = self._keys(namespace, session_id)
        data = token_bytes(np.asarray(tokens or [], dtype=np.int64))
        pipe = self._r.pipeline(transaction=False)
        pipe.hset(meta_key, mapping={
            "model": model, "parent": parent, "metadata": json.dumps(metadata or {}),
            "created": now, "updated": now, "pinned_until": 0, "closed": 0,
        })
        pipe.set(tok_key, data)
        if messages:
            pipe.rpush(self._msgs_key(namespace, session_id), *(json.dumps(m) for m in messages))
        pipe.zadd(self._index(namespace), {session_id: now})
        await pipe.execute()
        return Session(session_id, namespace, model, list(tokens or []), parent, dict(metadata or {}), now, now,
                       messages=list(messages or []))

    async def get(self, namespace: str, session_id: str) -> Session:
        meta_key, tok_key = self._keys(namespace, session_id)
        flat, data, msgs = await self._get(keys=[meta_key, tok_key, self._msgs_key(namespace, session_id)])
        if not flat:
            raise SessionNotFound(f"no session {session_id!r} in namespace {namespace!r}")
        session = _session(namespace, session_id, dict(zip(flat[::2], flat[1::2])))
        session.tokens = np.frombuffer(data, dtype="<u4").tolist()  # 4-byte ids: see token_bytes
        session.messages = [json.loads(x) for x in msgs]
        return session

    async def append_turn(self, namespace: str, session_id: str, tokens: list[int], *, request_id: str = "",
                          messages: list[dict] | None = None, expected_len: int | None = None,
                          result: str = "") -> Appended:
        """Atomically append tokens and chat messages.

        ``expected_len``: apply only if the history still has this many tokens (raises
        ``SessionChanged`` otherwise). ``result`` is remembered with the ``request_id`` and
        returned to retries, which change nothing."""
        if len(request_id) > _MAX_REQUEST_ID:
            raise ValueError(f"request_id longer than {_MAX_REQUEST_ID} characters")
        data = token_bytes(np.asarray(tokens, dtype=np.int64))
        meta_key, tok_key = self._keys(namespace, session_id)
        keys = [meta_key, tok_key, self._req_key(namespace, session_id, request_id),
                self._msgs_key(namespace, session_id)]
        args = [data, time.time(), REQUEST_ID_TTL_S, "1" if request_id else "0",
                -1 if expected_len is None else expected_len, result, *(json.dumps(m) for m in messages or ())]
        n, stored, replayed = await self._append(keys=keys, args=args)
        n = int(n)
        if n == -1:
            raise SessionNotFound(f"no session {session_id!r} in namespace {namespace!r}")
        if n == -2:
            raise SessionClosed(f"session {session_id!r} in namespace {namespace!r} is closed: its history is "
                                "readable, but it takes no more turns (fork it to continue)")
        if n == -3:
            raise SessionChanged(f"session {session_id!r} changed while this request ran (a concurrent turn); "
                                 "retry it")
        stored = stored.decode() if isinstance(stored, bytes) else str(stored)
        if not replayed:  # XX: only refresh; a close that ran since the script must stay removed
            await self._r.zadd(self._index(namespace), {session_id: time.time()}, xx=True)
        return Appended(n, stored, bool(replayed))

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
        keys = [self._req_key(namespace, session_id, request_id), self._lease_key(namespace, session_id, request_id)]
        owner = secrets.token_hex(8)
        while True:
            status, done = await self._claim(keys=keys, args=[owner, int(LEASE_S * 1000)])
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

    async def fork(self, namespace: str, session_id: str, metadata: dict[str, str] | None = None) -> Session:
        """A new session whose history starts as a copy of ``session_id``'s (of one snapshot
        of it: a concurrent turn on the parent is wholly in the fork or not at all)."""
        parent = await self.get(namespace, session_id)
        return await self.create(namespace, parent.model, parent.tokens, metadata or parent.metadata,
                                 parent=session_id, messages=parent.messages)

    async def list(self, namespace: str, limit: int = 100) -> list[str]:
        """Session ids of a namespace, most recently updated first."""
        ids = await self._r.zrevrange(self._index(namespace), 0, limit - 1)
        return [i.decode() for i in ids]

    async def list_sessions(self, namespace: str, limit: int = 100) -> list[tuple[Session, int]]:
        """(session, history length) of a namespace's sessions, most recently updated first.
        The histories are not read: these sessions have no tokens or messages."""
        ids = await self.list(namespace, limit)
        pipe = self._r.pipeline(transaction=False)  # one round trip (per node) for all of them
        for session_id in ids:
            meta_key, tok_key = self._keys(namespace, session_id)
            pipe.hgetall(meta_key)
            pipe.strlen(tok_key)
        replies = await pipe.execute() if ids else []
        return [(_session(namespace, session_id, meta), length // 4)  # 4 bytes per token id
                for session_id, meta, length in zip(ids, replies[::2], replies[1::2])
                if meta]  # empty: removed since the index was read

    async def pin(self, namespace: str, session_id: str, ttl_s: float) -> float:
        """Keep the session's blocks preferred until now + ``ttl_s``; returns that time."""
        until = time.time() + ttl_s
        await self._set_field(namespace, session_id, "pinned_until", until)
        return until

    async def unpin(self, namespace: str, session_id: str) -> float:
        """End a pin; returns 0.0 (the new ``pinned_until``)."""
        await self._set_field(namespace, session_id, "pinned_until", 0)
        return 0.0

    async def close(self, namespace: str, session_id: str) -> None:
        """Mark closed: no more appends, the history stays readable; idempotent."""
        await self._set_field(namespace, session_id, "closed", 1)
        await self._r.zrem(self._index(namespace), session_id)

    async def _set_field(self, namespace: str, session_id: str, name: str, value: float) -> None:
        if not await self._set_if_exists(keys=[self._keys(namespace, session_id)[0]], args=[name, value]):
            raise SessionNotFound(f"no session {session_id!r} in namespace {namespace!r}")


def _parse_done(done: bytes) -> tuple[int, str]:
    """(history length, result) from what the append script stores under a request id."""
    n, _, result = done.decode().partition("|")
    return int(n), result


def _session(namespace: str, session_id: str, meta: dict[bytes, bytes]) -> Session:
    """A session from its metadata hash (without tokens and messages)."""
    m = {k.decode(): v.decode() for k, v in meta.items()}
    return Session(session_id, namespace, m["model"], [], m["parent"], json.loads(m["metadata"]),
                   float(m["created"]), float(m["updated"]), float(m["pinned_until"]), m["closed"] == "1")
