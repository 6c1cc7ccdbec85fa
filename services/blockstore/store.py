"""Blocks in Redis or Redis Cluster: one key per block, one pipeline per batch.

Key: ``kv:<namespace>:<hash hex>``. Hex keeps binary hashes from forming ``{...}`` hash tags,
so a batch spreads over all cluster slots; the cluster pipeline groups its commands per node
and sends the groups concurrently. Stored values are never trusted: a hit whose header does
not verify, names another hash, or whose length disagrees with its header is deleted and
reported as a miss.
"""
from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry  # (redis.retry.Retry would silently never retry here)
from redis.backoff import NoBackoff

from kvstore.codec import peek_block, read_header
from services.blockstore.budget import COPIES, CallBudget
from services.blockstore.resp import LeanRedis
from services.common.errors import REDIS_UNAVAILABLE, StoreError, StoreUnavailableError

logger = logging.getLogger(__name__)

_SCAN_COUNT = 1000  # keys per SCAN step and per DEL pipeline of a namespace flush
_SOCKET_READ_SIZE = 1 << 20  # redis-py reads 32 KiB at a time by default; blocks are ~200 KB


def _glob_escape(pattern: bytes) -> bytes:
    """``pattern`` matched literally by SCAN MATCH (namespaces may hold ``*?[]\\``)."""
    return bytes(b for c in pattern for b in ((0x5C, c) if c in b"*?[]\\" else (c,)))


def block_problem(data: bytes | memoryview, block_hash: bytes) -> str | None:
    """Why ``data`` is not a well-formed encoded block for ``block_hash`` (None if it is).

    Checks the header (magic, version, CRC, lengths), the hash it names and the total length;
    the payload checksum is left to the client, which decodes.
    """
    try:
        header = read_header(data)
    except (ValueError, IndexError, struct.error) as e:  # BlockCodecError is a ValueError
        return f"bad header: {e}"
    if header.block_hash != block_hash:
        return f"header names hash {header.block_hash.hex()}, not {block_hash.hex()}"
    if header.header_len + header.payload_len != len(data):
        return (f"length {len(data)} != header {header.header_len} + payload "
                f"{header.payload_len} bytes")
    return None


def stored_block_problem(data: bytes | memoryview, block_hash: bytes) -> str | None:
    """``block_problem`` for values read back: every stored block passed ``block_problem``
    on Put, so the header CRC, the hash and the length are enough to catch damage or a
    value under the wrong key (``peek_block``: ~4 us instead of ~18 per 192 KiB block)."""
    try:
        stored_hash, length = peek_block(data)
    except (ValueError, IndexError, struct.error) as e:
        return f"bad header: {e}"
    if stored_hash != block_hash:
        return f"header names hash {stored_hash.hex()}, not {block_hash.hex()}"
    if length != len(data):
        return f"length {len(data)} != {length} bytes named by its header"
    return None


Value = bytes | memoryview  # a stored block as read: memoryviews on the lean path


@dataclass(slots=True)
class GetCounts:
    """What a ``get`` found: blocks returned, and stored values that were corrupt."""

    hits: int = 0
    corrupt: int = 0


@contextlib.contextmanager
def _redis_errors() -> Iterator[None]:
    """Translate redis-py exceptions into the service's typed errors."""
    try:
        yield
    except REDIS_UNAVAILABLE as e:
        raise StoreUnavailableError(f"{type(e).__name__}: {e}") from e
    except rex.RedisError as e:
        raise StoreError(f"{type(e).__name__}: {e}") from e


class RedisBlockStore:
    """Async access to the blocks of every namespace in one Redis or Redis Cluster.

    Every batch operation is one pipeline (one per node in cluster mode). Redis problems
    raise ``StoreUnavailableError`` (cannot reach it within ``timeout_s``) or ``StoreError``.
    """

    def __init__(self, url: str, *, cluster: bool, ttl_seconds: int, timeout_s: float,
                 window_bytes: int) -> None:
        self.cluster = cluster
        self.ttl = ttl_seconds
        # One immediate retry on a broken connection, which redis-py makes on a new socket:
        # redis-py 8 hands out pooled connections unchecked (maintenance notifications
        # "auto"), so after a Redis restart each stale one fails once ("Connection closed by
        # server") and without this retry that reaches the caller. None on timeouts: callers
        # must learn of an outage within ~timeout_s (health_check_interval would only add a
        # PING per reuse).
        options = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                       socket_read_size=_SOCKET_READ_SIZE,
                       retry=Retry(NoBackoff(), 1, supported_errors=(rex.ConnectionError,)))
        if cluster:
            self._client: aioredis.Redis | RedisCluster = RedisCluster.from_url(url, **options)
        else:
            self._client = aioredis.Redis.from_url(url, **options)
        # Restores read GETEX replies through the lean client (a third of redis-py's CPU);
        # Redis Cluster and TLS keep redis-py for them (routing, redirections, certificates).
        self._lean = (LeanRedis(url, timeout_s=timeout_s, window_bytes=window_bytes)
                      if not cluster and LeanRedis.supports(url) else None)

    @staticmethod
    def key_prefix(namespace: str) -> bytes:
        """``kv:<namespace>:``; a block's key is this plus its hash in hex."""
        return b"kv:" + namespace.encode() + b":"

    def _keys(self, namespace: str, hashes: Sequence[bytes]) -> list[bytes]:
        prefix = self.key_prefix(namespace)
        return [prefix + h.hex().encode() for h in hashes]

    def _pipeline(self):
        return self._client.pipeline(transaction=False)

    async def put(self, namespace: str, blocks: Sequence[tuple[bytes, bytes]]) -> tuple[int, int]:
        """Store (hash, data) pairs if absent, with the TTL. Returns (stored, existed).

        Existing blocks keep their value and get their TTL refreshed.
        """
        if not blocks:
            return 0, 0
        keys = self._keys(namespace, [h for h, _ in blocks])
        with _redis_errors():
            pipe = self._pipeline()
            for key, (_, data) in zip(keys, blocks):
                pipe.set(key, data, nx=True, ex=self.ttl)
                pipe.expire(key, self.ttl)  # refreshes an existing block; a no-op for a new one
            replies = await pipe.execute()
        stored = sum(1 for ok in replies[::2] if ok)
        return stored, len(keys) - stored

    async def get(self, namespace: str, hashes: Sequence[bytes], counts: GetCounts,
                  budget: CallBudget) -> AsyncIterator[list[tuple[int, Value]]]:
        """Batches of (index, value) of the stored blocks, in index order, refreshing the TTL
        of each hit; corrupt values are deleted and count as misses (``counts`` is filled in).

        Every value is charged to ``budget`` for its length, which the caller releases once
        done with it; an empty batch means the next value waits for budget, so the caller
        should first release what it can (send what it holds). On the lean path values are
        memoryviews, yielded while later replies still arrive."""
        if not hashes:
            return
        keys = self._keys(namespace, hashes)
        bad: list[bytes] = []
        with _redis_errors():
            async with contextlib.aclosing(self._get_values(keys, budget)) as batches:
                start = 0
                async for batch in batches:
                    found = self._checked(batch, start, hashes, keys, counts, budget, bad)
                    start, waiting = start + len(batch), not batch
                    batch.clear()  # only the caller refers to the values now (see _messages)
                    if found or waiting:
                        yield found
            if bad:
                counts.corrupt += len(bad)
                await self._delete_keys(bad)

    @staticmethod
    def _checked(batch: Sequence[Value | None], start: int, hashes: Sequence[bytes], keys: Sequence[bytes],
                 counts: GetCounts, budget: CallBudget, bad: list[bytes]) -> list[tuple[int, Value]]:
        """(index, value) of the well-formed values of a batch whose first key is ``start``;
        corrupt ones are released from ``budget`` and their keys added to ``bad``."""
        found = []
        for i, value in enumerate(batch, start):
            if value is None:
                continue
            if problem := stored_block_problem(value, hashes[i]):
                logger.warning("corrupt block %s deleted: %s", keys[i].decode(), problem)
                bad.append(keys[i])
                budget.release(len(value))
            else:
                counts.hits += 1
                found.append((i, value))
        return found

    async def _get_values(self, keys: list[bytes], budget: CallBudget) -> AsyncIterator[Sequence[Value | None]]:
        """GETEX replies in key order, in batches, each value charged to ``budget``."""
        if self._lean is not None:
            async with contextlib.aclosing(self._lean.getex(keys, self.ttl, budget)) as batches:
                async for batch in batches:
                    yield batch
            return
        # redis-py reads a pipeline's replies whole: sizes first, then pipelines of GETEX of
        # at most half of what the call's budget holds (one key at least: the next pipeline
        # can be read while the last is sent), each charged before it is sent.
        pipe = self._pipeline()
        for key in keys:
            pipe.strlen(key)
        sizes = await pipe.execute()
        start = 0
        while start < len(keys):
            end, size = start + 1, sizes[start]
            while end < len(keys) and size + sizes[end] <= budget.limit // (2 * COPIES):
                size, end = size + sizes[end], end + 1
            if not budget.try_take(size):
                yield []
                await budget.take(size)
            pipe = self._pipeline()
            for key in keys[start:end]:
                pipe.getex(key, ex=self.ttl)
            values = await pipe.execute()
            # A value may have changed since STRLEN (expired, or rewritten with another codec).
            got = sum(len(v) for v in values if v is not None)
            if got < size:
                budget.release(size - got)
            elif got > size and not budget.try_take(got - size):
                yield []
                await budget.take(got - size)
            yield values
            start = end

    async def lookup(self, namespace: str, hashes: Sequence[bytes]) -> int:
        """How many of the leading ``hashes`` are stored (a gap ends the prefix)."""
        if not hashes:
            return 0
        with _redis_errors():
            pipe = self._pipeline()
            for key in self._keys(namespace, hashes):
                pipe.exists(key)
            present = await pipe.execute()
        n = 0
        while n < len(present) and present[n]:
            n += 1
        return n

    async def delete(self, namespace: str, hashes: Sequence[bytes]) -> int:
        """Remove blocks; returns how many existed."""
        if not hashes:
            return 0
        with _redis_errors():
            return await self._delete_keys(self._keys(namespace, hashes))

    async def delete_namespace(self, namespace: str) -> int:
        """Remove every block of ``namespace`` (SCAN over every primary, then DEL in batches);
        returns how many existed. Blocks written meanwhile may survive it."""
        deleted, batch = 0, []
        with _redis_errors():
            async for key in self._client.scan_iter(match=_glob_escape(self.key_prefix(namespace)) + b"*",
                                                    count=_SCAN_COUNT):
                batch.append(key)
                if len(batch) >= _SCAN_COUNT:
                    deleted += await self._delete_keys(batch)
                    batch = []
            if batch:
                deleted += await self._delete_keys(batch)
        return deleted

    async def touch(self, namespace: str, hashes: Sequence[bytes], ttl_seconds: int) -> int:
        """Make stored blocks live at least ``ttl_seconds`` more (a pinned session's); a longer
        TTL is kept. Returns how many of the blocks are stored."""
        if not hashes:
            return 0
        keys = self._keys(namespace, hashes)
        with _redis_errors():
            pipe = self._pipeline()
            for key in keys:
                pipe.ttl(key)
            ttls = await pipe.execute()
            pipe = self._pipeline()
            # TTL -2: missing; -1: no expiry (nothing to extend).
            extend = [key for key, t in zip(keys, ttls) if 0 <= t < ttl_seconds]
            for key in extend:
                pipe.expire(key, ttl_seconds)
            if extend:
                await pipe.execute()
        return sum(t != -2 for t in ttls)

    async def _delete_keys(self, keys: Sequence[bytes]) -> int:
        pipe = self._pipeline()
        for key in keys:  # one DEL per key: keys of one batch live in different cluster slots
            pipe.delete(key)
        return sum(await pipe.execute())

    async def memory_and_keys(self) -> tuple[int, int]:
        """(used_memory in bytes, number of keys), summed over the primaries of a cluster."""
        with _redis_errors():
            if not self.cluster:
                info = await self._client.info("memory")
                return int(info["used_memory"]), int(await self._client.dbsize())
            nodes = RedisCluster.PRIMARIES
            infos = await self._client.info("memory", target_nodes=nodes)
            sizes = await self._client.dbsize(target_nodes=nodes)
        memory = sum(int(info["used_memory"]) for _, info in _per_node_items(infos, "used_memory"))
        keys = sum(map(int, sizes.values())) if isinstance(sizes, dict) else int(sizes)  # redis-py sums
        return memory, keys

    async def ping(self) -> None:
        """Raise unless Redis answers; in cluster mode, unless every primary reports
        ``cluster_state:ok`` (a primary answering PING may still refuse commands)."""
        with _redis_errors():
            if not self.cluster:
                await self._client.ping()
                return
            infos = await self._client.cluster_info(target_nodes=RedisCluster.PRIMARIES)
        if bad := [node for node, info in _per_node_items(infos, "cluster_state")
                   if info.get("cluster_state") != "ok"]:
            raise StoreUnavailableError(f"cluster state is not ok on {', '.join(bad)}")

    async def close(self) -> None:
        """Close all connections."""
        if self._lean is not None:
            await self._lean.close()
        with contextlib.suppress(rex.RedisError, OSError):
            await self._client.aclose()


def _per_node_items(result: object, field: str) -> list[tuple[str, object]]:
    """(node, reply) pairs of a command sent to the primaries. redis-py answers
    {node: reply}, or the bare reply (one primary, or an aggregating command like DBSIZE);
    ``field`` is a key of a bare dict reply, to tell the two apart."""
    if isinstance(result, dict) and field not in result:
        return list(result.items())
    return [("redis", result)]
