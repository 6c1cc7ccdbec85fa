"""The BlockStore gRPC servicer: authentication, validation, status codes, metrics."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import grpc

from kvstore.blockstore_wire import HASH_SIZES, MAX_TOUCH_TTL_S, encode_get_response
from kvstore.v1 import blockstore_pb2 as pb
from kvstore.v1 import blockstore_pb2_grpc as pb_grpc
from services.blockstore.metrics import Metrics
from services.blockstore.store import GetCounts, RedisBlockStore, block_problem
from services.common.auth import TokenTable, check_namespace, require_namespace
from services.common.errors import RequestError, StoreError, StoreUnavailableError
from services.common.grpc_server import add_servicer, rpc_status

if TYPE_CHECKING:  # the server module, which builds this servicer, defines it
    from services.blockstore.server import BlockStoreConfig

logger = logging.getLogger(__name__)

_INVALID = grpc.StatusCode.INVALID_ARGUMENT
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BlockStore"].full_name  # "kvstore.v1.BlockStore"


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
                 metrics: Metrics, on_unavailable: Callable[[Exception], Awaitable[None]]) -> None:
        self._store = store
        self._config = config
        self._tokens = tokens
        self._metrics = metrics
        self._on_unavailable = on_unavailable

    # -- RPCs -------------------------------------------------------------------------------
    async def Put(self, request: pb.PutRequest, context: grpc.aio.ServicerContext) -> pb.PutResponse:
        async with self._rpc("Put", context):
            self._admit(context, request.namespace, len(request.blocks))
            blocks = [self._checked_block(i, b) for i, b in enumerate(request.blocks)]
            stored, existed = await self._store.put(request.namespace, blocks)
            self._metrics.put(stored, sum(len(d) for _, d in blocks))
            return pb.PutResponse(stored=stored, existed=existed)

    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Streams pre-encoded GetResponse messages of about ``get_chunk_bytes``."""
        async with self._rpc("Get", context):
            hashes = self._checked_hashes(context, request.namespace, request.hashes)
            counts = GetCounts()
            limit, chunk, size, sent, first = self._config.get_chunk_bytes, [], 0, 0, True
            # Messages go out while later blocks are still arriving from Redis; the first block
            # goes alone, at once, so that the client starts decoding as early as it can.
            async with contextlib.aclosing(self._store.get(request.namespace, hashes, counts)) as found:
                async for i, value in found:
                    if chunk and size + len(value) > limit:  # a single larger block goes alone
                        yield encode_get_response(chunk)
                        sent, chunk, size = sent + size, [], 0
                    chunk.append((i, value))
                    size += len(value)
                    if first:
                        yield encode_get_response(chunk)
                        sent, chunk, size, first = sent + size, [], 0, False
            if chunk:
                yield encode_get_response(chunk)
            self._metrics.get(counts.hits, len(hashes) - counts.hits, counts.corrupt, sent + size)

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

    # -- helpers ----------------------------------------------------------------------------
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
