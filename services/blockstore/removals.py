"""``RemovalWatch``: the blocks Redis removes, for WatchRemovals (the KV event stream's T2 removals).

No worker sees a block leave T2: Redis evicts it under ``maxmemory``, its TTL runs out, or a
Delete (a flush, a corrupt block) on any block store replica removes it. Redis says so in
keyspace notifications (``__keyevent@<db>__:evicted|expired|del``), which this subscribes to
on every primary (turning them on with CONFIG SET where they are off and allowed). They are
fire and forget: removals while a connection is down are lost, so each reconnect is logged.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.cluster import RedisCluster

from services.common.errors import REDIS_UNAVAILABLE

logger = logging.getLogger(__name__)

NOTIFY_FLAGS = "Egex"  # keyevent channels; generic (del), expired, evicted
_ALL_CLASSES = "g$lshzxetd"  # what the flag "A" stands for
MAX_BEHIND = 65536  # removals a subscriber may have waiting before it is ended
MAX_BATCH = 4096  # removals per batch handed to a subscriber
_RETRY_S = (0.1, 0.5, 1.0, 2.0, 5.0)


class Reason(Enum):
    EVICTED = "evicted"
    EXPIRED = "expired"
    DELETED = "del"


@dataclass(frozen=True, slots=True)
class Removal:
    namespace: str
    block_hash: bytes
    reason: Reason


def parse_removal(key: bytes, event: bytes) -> Removal | None:
    """The removal a keyevent notification names, or None for a key that is not a block's
    (``kv:<namespace>:<hash hex>``) or an event not watched."""
    try:
        reason = Reason(event.decode())
    except (ValueError, UnicodeDecodeError):
        return None
    if not key.startswith(b"kv:"):
        return None
    namespace, sep, hex_hash = key[3:].rpartition(b":")
    if not sep or len(hex_hash) not in (32, 64):
        return None
    try:
        return Removal(namespace.decode(), bytes.fromhex(hex_hash.decode()), reason)
    except (ValueError, UnicodeDecodeError):
        return None


class RemovalsBehind(Exception):
    """A subscriber fell more than ``MAX_BEHIND`` removals behind."""


class RemovalSubscription:
    """One WatchRemovals call's queue; ``await next_batch()``."""

    def __init__(self, watch: RemovalWatch, namespace: str | None) -> None:
        self.namespace = namespace  # None: every namespace
        self._watch = watch
        self._queue: deque[Removal] = deque()
        self._ready = asyncio.Event()
        self.behind = False

    def offer(self, removal: Removal) -> None:
        if self.behind or self.namespace not in (None, removal.namespace):
            return
        if len(self._queue) >= MAX_BEHIND:
            self.behind = True
        else:
            self._queue.append(removal)
        self._ready.set()

    async def next_batch(self) -> list[Removal]:
        await self._ready.wait()
        if self.behind:
            raise RemovalsBehind(f"this watcher fell more than {MAX_BEHIND} removals behind; watch again")
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
        if not self._queue:
            self._ready.clear()
        return batch

    def close(self) -> None:
        self._watch.unsubscribe(self)


class RemovalWatch:
    """Start with ``await start()``; ``await close()``. Runs on the block store's event loop."""

    def __init__(self, url: str, cluster: bool) -> None:
        self._url = url
        self._cluster = cluster
        self._subscribers: set[RemovalSubscription] = set()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="t2-removals")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def subscribe(self, namespace: str | None) -> RemovalSubscription:
        sub = RemovalSubscription(self, namespace)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: RemovalSubscription) -> None:
        self._subscribers.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def _run(self) -> None:
        """Find the primaries (retrying while Redis is unreachable), then follow each. A cluster's
        primaries are taken once: after a failover, restart the block store to follow the new ones."""
        failures = 0
        while True:
            try:
                urls = await self._primary_urls()
                break
            except (*REDIS_UNAVAILABLE, rex.RedisError) as e:
                if not failures:
                    logger.warning("cannot find the Redis primaries to watch T2 removals (%s); retrying", e)
                await asyncio.sleep(_RETRY_S[min(failures, len(_RETRY_S) - 1)])
                failures += 1
        await asyncio.gather(*(self._follow(url) for url in urls))

    async def _primary_urls(self) -> list[str]:
        """The URL of every primary, with the configured credentials and scheme."""
        if not self._cluster:
            return [self._url]
        client = RedisCluster.from_url(self._url)
        try:
            await client.initialize()
            parts = urlsplit(self._url)
            auth = parts.netloc.rpartition("@")[0]
            return [urlunsplit(parts._replace(netloc=f"{auth + '@' if auth else ''}{n.host}:{n.port}", path=""))
                    for n in client.get_primaries()]
        finally:
            await client.aclose()

    async def _follow(self, url: str) -> None:
        """Subscribe on one primary and fan its removals out; reconnect after a failure."""
        failures = 0
        while True:
            client = aioredis.Redis.from_url(url)
            try:
                await _enable_notifications(client, url)
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.psubscribe(*(f"__keyevent@*__:{r.value}" for r in Reason))
                    if failures:
                        logger.warning("watching T2 removals on %s again; those in between were not seen",
                                       redacted_host(url))
                    failures = 0
                    async for message in pubsub.listen():
                        if message["type"] == "pmessage":
                            self._fan_out(message["channel"], message["data"])
            except (*REDIS_UNAVAILABLE, rex.RedisError) as e:
                if not failures:
                    logger.warning("lost the T2 removal notifications of %s (%s); retrying", redacted_host(url), e)
                await asyncio.sleep(_RETRY_S[min(failures, len(_RETRY_S) - 1)])
                failures += 1
            finally:
                await client.aclose()

    def _fan_out(self, channel: bytes, key: bytes) -> None:
        removal = parse_removal(key, channel.rpartition(b":")[2])
        if removal is not None:
            for sub in list(self._subscribers):
                sub.offer(removal)


async def _enable_notifications(client: aioredis.Redis, url: str) -> None:
    """Add ``NOTIFY_FLAGS`` to the server's keyspace notifications, or warn that removals
    will not be seen (a managed Redis may refuse CONFIG: set them in its configuration)."""
    try:
        current = (await client.config_get("notify-keyspace-events")).get("notify-keyspace-events", "")
        have = set(current.decode() if isinstance(current, bytes) else current)
        classes = have | (set(_ALL_CLASSES) if "A" in have else set())
        if not set(NOTIFY_FLAGS) <= classes:
            await client.config_set("notify-keyspace-events", "".join(sorted(have | set(NOTIFY_FLAGS))))
    except rex.ResponseError as e:
        logger.warning("cannot turn on keyspace notifications on %s (%s): T2 removals will not be reported; set "
                       "notify-keyspace-events %s in its configuration", redacted_host(url), e, NOTIFY_FLAGS)


def redacted_host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"
