"""The BlockStore gRPC servicer: authentication, validation, status codes, metrics."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import grpc

from kvstore.blockstore_wire import HASH_SIZES, MAX_TOUCH_TTL_S, encode_get_response
from kvstore.v1 import blockstore_pb2 as pb
from kvstore.v1 import blockstore_pb2_grpc as pb_grpc
from services.blockstore.budget import COPIES, CallBudget, MemoryBudget
from services.blockstore.metrics import Metrics
from services.blockstore.removals import Reason, RemovalsBehind, RemovalWatch
from services.blockstore.store import GetCounts, RedisBlockStore, Value, block_problem
from services.common.auth import ANY_NAMESPACE, TokenTable, check_namespace, require_namespace
from services.common.errors import RequestError, StoreError, StoreUnavailableError
from services.common.grpc_server import add_servicer, rpc_status

if TYPE_CHECKING:  # the server module, which builds this servicer, defines it
    from services.blockstore.server import BlockStoreConfig

logger = logging.getLogger(__name__)

_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_DEADLINE_MARGIN_S = 0.05  # a call stops waiting for memory this long before its deadline
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BlockStore"].full_name  # "kvstore.v1.BlockStore"
MAX_WATCHERS = 64  # WatchRemovals calls at once (each holds a queue)
_REASON = {Reason.EVICTED: pb.Removal.EVICTED, Reason.EXPIRED: pb.Removal.EXPIRED, Reason.DELETED: pb.Removal.DELETED}


def add_to_server(servicer: BlockStoreServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` (malformed requests get INVALID_ARGUMENT); Get yields already
    serialized GetResponse messages (see ``wire``)."""
    add_servicer(server, pb.DESCRIPTOR.services_by_name["BlockStore"], servicer, servicer._rpc, raw_responses=("Get",))


class BlockStoreServicer(pb_grpc.BlockStoreServicer):
    """Serves the BlockStore API from a ``RedisBlockStore``.

    ``on_unavailable(error)`` is awaited whenever Redis could not be reached, so health can
    flip to NOT_SERVING before the next periodic ping.
    """

    def __init__(self, store: RedisBlockStore, config: BlockStoreConfig, tokens: TokenTable,
                 metrics: Metrics, on_unavailable: Callable[[Exception], Awaitable[None]],
                 removals: RemovalWatch) -> None:
        self._store = store
        self._removals = removals
        self._config = config
        self._tokens = tokens
        self._metrics = metrics
        self._on_unavailable = on_unavailable
        self._budget = MemoryBudget(config.memory_budget_bytes)
        metrics.budget_used.set_function(lambda: self._budget.used)

    # -- RPCs -------------------------------------------------------------------------------
    async def Put(self, request: pb.PutRequest, context: grpc.aio.ServicerContext) -> pb.PutResponse:
        async with self._rpc("Put", context):
            self._admit(context, request.namespace, len(request.blocks))
            blocks = [self._checked_block(i, b) for i, b in enumerate(request.blocks)]
            nbytes = sum(len(d) for _, d in blocks)
            # The request is in memory already; the budget bounds what Puts add while written
            # (redis-py's copy of the pipeline) and counts them against Gets.
            budget = CallBudget(self._budget, COPIES * nbytes, self._budget_deadline(context))
            await budget.take(nbytes)
            try:
                stored, existed = await self._store.put(request.namespace, blocks)
            finally:
                budget.close()
            self._metrics.put(stored, nbytes)
            return pb.PutResponse(stored=stored, existed=existed)

    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext) -> None:
        """Streams pre-encoded GetResponse messages of about ``get_chunk_bytes``.

        Flow control: ``context.write`` returns only once the transport has taken the message
        (HTTP/2 flow control), so a client that stops reading stops the Redis reads too; each
        block is charged to the call's budget from its Redis reply until then. (Written, not
        yielded: grpc.aio keeps a yielded message referenced until the next one is ready.)"""
        async with self._rpc("Get", context):
            hashes = self._checked_hashes(context, request.namespace, request.hashes)
            counts = GetCounts()
            budget = CallBudget(self._budget, self._config.call_budget_bytes, self._budget_deadline(context))
            sent = 0
            try:
                found = self._store.get(request.namespace, hashes, counts, budget)
                async with contextlib.aclosing(_messages(found, self._config.get_chunk_bytes)) as messages:
                    async for message, nbytes in messages:
                        await _write(context, message)
                        del message  # sent: ours goes before the next is built (gRPC's went already)
                        budget.release(nbytes)
                        sent += nbytes
            finally:
                budget.close()
            self._metrics.get(counts.hits, len(hashes) - counts.hits, counts.corrupt, sent)

    async def Lookup(self, request: pb.LookupRequest, context: grpc.aio.ServicerContext) -> pb.LookupResponse:
        async with self._rpc("Lookup", context):
            hashes = self._checked_hashes(context, request.namespace, request.hashes)
            n = await self._store.lookup(request.namespace, hashes)
            self._metrics.lookup()
            return pb.LookupResponse(prefix_length=n)

    async def Touch(self, request: pb.TouchRequest, context: grpc.aio.ServicerContext) -> pb.TouchResponse:
        async with self._rpc("Touch", context):
            hashes = self._checked_hashes(context, request.namespace, request.hashes)
            if not 0 < request.ttl_seconds <= MAX_TOUCH_TTL_S:
                raise RequestError(_INVALID, f"ttl_seconds must be in 1..{MAX_TOUCH_TTL_S}, got {request.ttl_seconds}")
            return pb.TouchResponse(found=await self._store.touch(request.namespace, hashes, request.ttl_seconds))

    async def Delete(self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext) -> pb.DeleteResponse:
        async with self._rpc("Delete", context):
            if request.whole_namespace:
                self._admit(context, request.namespace, 0)
                deleted = await self._store.delete_namespace(request.namespace)
                logger.warning("deleted every block of namespace %r (%d)", request.namespace, deleted)
                return pb.DeleteResponse(deleted=deleted)
            hashes = self._checked_hashes(context, request.namespace, request.hashes)
            deleted = await self._store.delete(request.namespace, hashes)
            if request.corrupt:  # counted once per block actually removed (no double reports)
                logger.warning("client reported %d corrupt block(s) in namespace %r; %d deleted",
                               len(hashes), request.namespace, deleted)
                self._metrics.corrupt(deleted)
            return pb.DeleteResponse(deleted=deleted)

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        """This replica's counters and the Redis memory and key count; any valid token."""
        async with self._rpc("Stats", context):
            self._tokens.authenticate(context.invocation_metadata())
            memory, keys = await self._store.memory_and_keys()
            t = self._metrics.totals
            return pb.StatsResponse(
                puts=t.puts, blocks_stored=t.blocks_stored, gets=t.gets, hits=t.hits, misses=t.misses,
                corrupt=t.corrupt, lookups=t.lookups, bytes_in=t.bytes_in, bytes_out=t.bytes_out,
                redis_used_memory=memory, redis_keys=keys)

    async def WatchRemovals(self, request: pb.WatchRemovalsRequest, context: grpc.aio.ServicerContext) -> None:
        """Batches of removed blocks of the namespace (or every one), as Redis reports them."""
        async with self._rpc("WatchRemovals", context):
            allowed = self._tokens.authenticate(context.invocation_metadata())
            if request.namespace:
                check_namespace(request.namespace)
                require_namespace(allowed, request.namespace)
            elif ANY_NAMESPACE not in allowed:
                raise RequestError(grpc.StatusCode.PERMISSION_DENIED, "watching every namespace needs a token for "
                                                                      "all of them; name a namespace")
            if self._removals.subscribers >= MAX_WATCHERS:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"{MAX_WATCHERS} watchers already; retry later")
            sub = self._removals.subscribe(request.namespace or None)
            try:
                while True:
                    try:
                        batch = await sub.next_batch()
                    except RemovalsBehind as e:
                        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
                    await _write(context, pb.RemovalBatch(removals=[
                        pb.Removal(namespace=r.namespace, hash=r.block_hash, reason=_REASON[r.reason]) for r in batch]))
            finally:
                sub.close()

    # -- helpers ----------------------------------------------------------------------------
    def _budget_deadline(self, context: grpc.aio.ServicerContext) -> float:
        """Until when a call may wait for memory: ``budget_wait_s``, or less so that its
        RESOURCE_EXHAUSTED reaches the client before its deadline does."""
        wait = self._config.budget_wait_s
        if (remaining := context.time_remaining()) is not None:
            wait = min(wait, remaining - _DEADLINE_MARGIN_S)
        return time.monotonic() + wait

    @contextlib.asynccontextmanager
    async def _rpc(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Map exceptions to status codes (never crash on a request) and record metrics."""
        in_flight = self._metrics.in_flight.labels(method)
        in_flight.inc()

        def observe(method: str, code: grpc.StatusCode, seconds: float) -> None:
            # Called once per call, before an error status goes out: a caller that sees the
            # status also sees the gauge back down.
            in_flight.dec()
            self._metrics.observe(method, code, seconds)

        async with rpc_status(method, context, self._classify, observe):
            yield

    async def _classify(self, e: Exception) -> tuple[grpc.StatusCode, str] | None:
        if isinstance(e, StoreUnavailableError):
            await self._on_unavailable(e)
            logger.debug("Redis is unavailable: %s", e)  # the health change is logged once
            return grpc.StatusCode.UNAVAILABLE, f"Redis is unavailable: {e}"
        if isinstance(e, StoreError):
            logger.error("Redis error: %s", e)
            return grpc.StatusCode.INTERNAL, f"Redis error: {e}"
        return None

    def _admit(self, context: grpc.aio.ServicerContext, namespace: str, count: int) -> None:
        """Authenticate, validate the namespace, authorize it, and check the batch size."""
        allowed = self._tokens.authenticate(context.invocation_metadata())  # before anything else
        check_namespace(namespace)
        require_namespace(allowed, namespace)
        if count > self._config.max_batch_blocks:
            raise RequestError(_INVALID, f"{count} blocks in one request; the limit is "
                                         f"max_batch_blocks={self._config.max_batch_blocks}")

    def _checked_hashes(self, context: grpc.aio.ServicerContext, namespace: str,
                        hashes: Sequence[bytes]) -> list[bytes]:
        self._admit(context, namespace, len(hashes))
        hashes = list(hashes)
        for i, h in enumerate(hashes):
            if len(h) not in HASH_SIZES:
                raise RequestError(_INVALID, f"malformed hash at index {i}: {len(h)} bytes, expected 16 or 32")
        return hashes

    def _checked_block(self, i: int, block: pb.Block) -> tuple[bytes, bytes]:
        h, data = block.hash, block.data  # each access copies out of the message: once only
        if len(h) not in HASH_SIZES:
            raise RequestError(_INVALID, f"malformed hash at index {i}: {len(h)} bytes, expected 16 or 32")
        if len(data) > self._config.max_block_bytes:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"block at index {i} is {len(data)} bytes; the limit is "
                               f"max_block_bytes={self._config.max_block_bytes}")
        if problem := block_problem(data, h):
            raise RequestError(_INVALID, f"invalid block data at index {i}: {problem}")
        return h, data


async def _write(context: grpc.aio.ServicerContext, message: bytes) -> None:
    """``context.write``; a write that fails means the call is over (the client went away or
    the server is stopping): CANCELLED, not an error to log."""
    try:
        await context.write(message)
    except Exception as e:  # noqa: BLE001 - the client went away or the server is stopping
        raise asyncio.CancelledError(f"the call ended while sending: {type(e).__name__}") from e


async def _messages(found: AsyncIterator[list[tuple[int, Value]]], limit: int) -> AsyncIterator[tuple[bytes, int]]:
    """Serialized GetResponse messages of about ``limit`` bytes of blocks, with the block bytes
    in each, from the store's batches. The first block goes alone, at once, so that the client
    starts decoding as early as it can; a block over ``limit`` goes alone; what is held goes
    out when the store is about to wait for budget (an empty batch). No reference to a block
    is kept once its message is out (it would keep a whole receive buffer alive)."""
    pending: collections.deque[tuple[int, Value]] = collections.deque()
    chunk: list[tuple[int, Value]] = []
    size, first = 0, True

    def cut() -> tuple[bytes, int]:
        nonlocal chunk, size
        message, nbytes, chunk, size = encode_get_response(chunk), size, [], 0
        return message, nbytes

    async for batch in found:
        waiting = not batch
        pending.extend(batch)
        batch.clear()
        while pending:
            if chunk and size + len(pending[0][1]) > limit:
                yield cut()
            chunk.append(pending.popleft())
            size += len(chunk[-1][1])
            if first or size >= limit:
                yield cut()
                first = False
        if waiting and chunk:
            yield cut()
    if chunk:
        yield cut()
