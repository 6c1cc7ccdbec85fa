"""Session state in Redis: token history, parent, metadata, timestamps, pins.

Everything a session service replica knows lives here, so restarting a replica (or running
several) loses nothing. All keys of one session share a Redis Cluster hash tag
(``sess:{<ns>:<id>}...``), so the atomic operations below are single-slot Lua scripts:
- ``append``: adds tokens once per request id (a retried Append is not applied twice);
- ``fork``: a new session starts with the parent's history (the KV of that prefix is shared
  through the prefix hashes, not copied).
The per-namespace index (a sorted set by last update) lives in its own key.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field

import numpy as np
import redis.asyncio as aioredis

from kvstore.hashing import token_bytes

REQUEST_ID_TTL_S = 24 * 3600  # how long a request id is remembered for idempotency
_MAX_REQUEST_ID = 128


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


# KEYS: meta, tokens, request id. ARGV: token bytes, now, request-id ttl, "1" if a request id.
# Returns the history length in tokens after the call, or -1 if the session is missing, -2 if closed.
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'closed') == '1' then return -2 end
if ARGV[4] == '1' then
  local done = redis.call('GET', KEYS[3])
  if done then return tonumber(done) end
end
local n = redis.call('APPEND', KEYS[2], ARGV[1]) / 4
redis.call('HSET', KEYS[1], 'updated', ARGV[2])
if ARGV[4] == '1' then redis.call('SET', KEYS[3], n, 'EX', ARGV[3]) end
return n
"""


class SessionStore:
    """Async access to sessions (redis-py asyncio; single Redis or Cluster)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._r = client
        self._append = client.register_script(_APPEND)

    @staticmethod
    def _keys(namespace: str, session_id: str) -> tuple[str, str]:
        tag = f"sess:{{{namespace}:{session_id}}}"
        return f"{tag}:meta", f"{tag}:tokens"

    @staticmethod
    def _index(namespace: str) -> str:
        return f"sessidx:{namespace}"

    async def create(self, namespace: str, model: str, tokens: list[int] | None = None,
                     metadata: dict[str, str] | None = None, parent: str = "") -> Session:
        """A new session with an optional initial history (e.g. the system prompt's tokens)."""
        session_id = secrets.token_hex(12)
        now = time.time()
        meta_key, tok_key = self._keys(namespace, session_id)
        data = token_bytes(np.asarray(tokens or [], dtype=np.int64))
        pipe = self._r.pipeline(transaction=False)
        pipe.hset(meta_key, mapping={
            "model": model, "parent": parent, "metadata": json.dumps(metadata or {}),
            "created": now, "updated": now, "pinned_until": 0, "closed": 0,
        })
        pipe.set(tok_key, data)
        pipe.zadd(self._index(namespace), {session_id: now})
        await pipe.execute()
        return Session(session_id, namespace, model, list(tokens or []), parent, dict(metadata or {}), now, now)

    async def get(self, namespace: str, session_id: str) -> Session:
        meta_key, tok_key = self._keys(namespace, session_id)
        pipe = self._r.pipeline(transaction=False)
        pipe.hgetall(meta_key)
        pipe.get(tok_key)
        meta, data = await pipe.execute()
        if not meta:
            raise SessionNotFound(f"no session {session_id!r} in namespace {namespace!r}")
        m = {k.decode(): v.decode() for k, v in meta.items()}
        return Session(
            session_id, namespace, m["model"], np.frombuffer(data or b"", dtype="<u4").tolist(),
            m["parent"], json.loads(m["metadata"]), float(m["created"]), float(m["updated"]),
            float(m["pinned_until"]), m["closed"] == "1",
        )

    async def append(self, namespace: str, session_id: str, tokens: list[int], request_id: str = "") -> int:
        """Append tokens; with a ``request_id``, a retry of the same request is a no-op.

        Returns the history length afterwards (for a retry: as after the first attempt)."""
        if len(request_id) > _MAX_REQUEST_ID:
            raise ValueError(f"request_id longer than {_MAX_REQUEST_ID} characters")
        data = token_bytes(np.asarray(tokens, dtype=np.int64))
        meta_key, tok_key = self._keys(namespace, session_id)
        req_key = f"{meta_key.removesuffix(':meta')}:req:{request_id}"  # same hash tag: one slot
        n = await self._append(keys=[meta_key, tok_key, req_key],
                               args=[data, time.time(), REQUEST_ID_TTL_S, "1" if request_id else "0"])
        if n == -1:
            raise SessionNotFound(f"no session {session_id!r} in namespace {namespace!r}")
        if n == -2:
            raise SessionClosed(f"session {session_id!r} is closed")
        await self._r.zadd(self._index(namespace), {session_id: time.time()})
        return int(n)

    async def fork(self, namespace: str, session_id: str, metadata: dict[str, str] | None = None) -> Session:
        """A new session whose history starts as a copy of ``session_id``'s."""
        parent = await self.get(namespace, session_id)
        return await self.create(namespace, parent.model, parent.tokens, metadata or parent.metadata, parent=session_id)

    async def list(self, namespace: str, limit: int = 100) -> list[str]:
        """Session ids of a namespace, most recently updated first."""
        ids = await self._r.zrevrange(self._index(namespace), 0, limit - 1)
        return [i.decode() for i in ids]

    async def pin(self, namespace: str, session_id: str, ttl_s: float) -> float:
        """Keep the session's blocks preferred until now + ``ttl_s``; returns that time."""
        await self.get(namespace, session_id)  # NotFound first
        until = time.time() + ttl_s
        await self._r.hset(self._keys(namespace, session_id)[0], "pinned_until", until)
        return until

    async def close(self, namespace: str, session_id: str) -> None:
        """Mark closed: no more appends, the history stays readable; idempotent."""
        meta_key, _ = self._keys(namespace, session_id)
        if not await self._r.exists(meta_key):
            raise SessionNotFound(f"no session {session_id!r} in namespace {namespace!r}")
        await self._r.hset(meta_key, "closed", 1)
        await self._r.zrem(self._index(namespace), session_id)
