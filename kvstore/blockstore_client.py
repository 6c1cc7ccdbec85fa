"""Client of the block store service: the T2 tier of ``TieredKVCache`` over gRPC.

Built so that decoding never waits on, or fails because of, the cold tier:
- every call has one deadline (``timeout_s``) shared by its retries;
- retries (with exponential backoff) only for UNAVAILABLE and DEADLINE_EXCEEDED, which are
  safe because every block-store call is idempotent (Put is set-if-absent);
- a circuit breaker: after ``breaker_failures`` consecutive failed calls the store is treated
  as down for ``breaker_reset_s``; meanwhile lookups and gets report misses at once and puts
  are dropped, counted and raised (so nothing is taken as stored), then a single probe call
  decides whether to close it again.
Errors that retrying cannot fix (bad token, namespace not allowed, invalid request) raise
``BlockStoreError``; the cache counts them as T2 errors and carries on.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

import grpc
import grpc.experimental

from kvstore.allocator import keep_freed_memory
from kvstore.blockstore_wire import MAX_BATCH_BLOCKS, WireError, decode_get_response
from kvstore.v1 import blockstore_pb2 as pb
from kvstore.v1 import blockstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _open_channel(address: str, creds: grpc.ChannelCredentials | None, options: list[tuple[str, int]]) -> grpc.Channel:
    if creds is not None:
        return grpc.secure_channel(address, creds, options=options)
    return grpc.insecure_channel(address, options=options)


def _chunks(hashes: Sequence[bytes]) -> list[list[bytes]]:
    """Requests of at most MAX_BATCH_BLOCKS hashes."""
    return [list(hashes[i:i + MAX_BATCH_BLOCKS]) for i in range(0, len(hashes), MAX_BATCH_BLOCKS)]


@dataclass(slots=True)
class BlockStoreClientConfig:
    """How a worker reaches the block store."""

    address: str = "127.0.0.1:50051"
    token: str = ""
    tls_ca: str = ""  # PEM path: use TLS and trust this CA
    timeout_s: float = 2.0  # deadline of each call
    retries: int = 2  # extra attempts (all block-store calls are idempotent)
    backoff_s: float = 0.05  # first retry delay; doubles per attempt
    breaker_failures: int = 3  # consecutive failed calls that open the circuit
    breaker_reset_s: float = 2.0  # while open, calls fail at once; then one probe is let through
    max_request_bytes: int = 32 << 20  # puts are split to stay under this
    max_message_bytes: int = 64 << 20
    tune_malloc: bool = True  # process-wide: keep freed message buffers for reuse (kvstore.allocator)


class BlockStoreError(RuntimeError):
    """The block store rejected a call for a reason retrying cannot fix."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"block store {method}: {code.name}: {details}")
        self.code = code


class BlockStoreUnavailable(ConnectionError):
    """The block store could not be reached within the deadline (or the circuit is open)."""


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive failures; open means "do not even try" until ``reset_s`` passed."""

    def __init__(self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic):
        self._threshold = failures
        self._reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        with self._lock:
            if self._opened_at is None:
                return BreakerState.CLOSED
            if self._probing or self._clock() - self._opened_at >= self._reset_s:
                return BreakerState.HALF_OPEN
            return BreakerState.OPEN

    def allow(self) -> bool:
        """Whether a call may go out now (in half-open state: one probe at a time)."""
        with self._lock:
            if self._opened_at is None:
                return True
            if self._probing or self._clock() - self._opened_at < self._reset_s:
                return False
            self._probing = True
            return True

    def record_success(self) -> None:
        with self._lock:
            if self._opened_at is not None:
                log.info("block store reachable again; circuit closed")
            self._failures, self._opened_at, self._probing = 0, None, False

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            self._probing = False
            if self._opened_at is not None or self._failures >= self._threshold:
                if self._opened_at is None:
                    log.warning("block store unreachable after %d failed calls; circuit open", self._failures)
                self._opened_at = self._clock()


@dataclass(slots=True)
class ClientCounters:
    failures: int = 0  # calls that ended unavailable after retries
    retries: int = 0
    short_circuited: int = 0  # calls not attempted because the circuit was open
    dropped_puts: int = 0  # blocks not written because the store was unavailable


class RemovalStream:
    """WatchRemovals as an iterator of ``RemovalBatch``; ``cancel()`` ends it. Raises
    ``BlockStoreUnavailable`` when the store goes away, ``BlockStoreError`` when it refuses."""

    def __init__(self, call) -> None:
        self._call = call

    def __iter__(self) -> Iterator[pb.RemovalBatch]:
        try:
            yield from self._call
        except grpc.RpcError as e:
            if e.code() is grpc.StatusCode.CANCELLED:
                return
            if e.code() in _TRANSIENT:
                raise BlockStoreUnavailable(f"block store WatchRemovals: {e.code().name}: {e.details()}") from None
            raise BlockStoreError("WatchRemovals", e.code(), e.details() or "") from None

    def cancel(self) -> None:
        self._call.cancel()


class BlockStoreClient:
    """Thread-safe, synchronous client; implements ``kvstore.remote.RemoteTier``."""

    def __init__(self, config: BlockStoreClientConfig | None = None) -> None:
        self.config = config = config or BlockStoreClientConfig()
        if config.tune_malloc:
            keep_freed_memory()  # received messages page-faulted through fresh buffers without it
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.enable_retries", 0),  # retries are ours, bounded by the call's deadline
            # HTTP/2 receive window per stream (default 64 KiB): blocks are ~200 KB each.
            ("grpc.http2.lookahead_bytes", 16 << 20),
            # Reconnect quickly after the store comes back (gRPC's default backoff reaches 120 s).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        creds = None
        if config.tls_ca:
            with open(config.tls_ca, "rb") as f:
                creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        self._channel = _open_channel(config.address, creds, options)
        self._stub = pb_grpc.BlockStoreStub(self._channel)
        # Get streams are read on the calling thread: without the channel's spin thread handing
        # each message over, restores took ~15% less client CPU (README, cold tier). A channel
        # of its own keeps WatchRemovals (cancelled from other threads) on the default path;
        # with the same core options it shares the connection (gRPC's global subchannel pool).
        self._get_channel = _open_channel(
            config.address, creds, [*options, (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)])
        # Get messages arrive as bytes and are decoded by hand: blocks are views, not copies.
        self._get_stream = self._get_channel.unary_stream(
            "/kvstore.v1.BlockStore/Get", request_serializer=pb.GetRequest.SerializeToString,
            response_deserializer=None, _registered_method=True)
        self._metadata = (("authorization", f"Bearer {config.token}"),) if config.token else ()
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_reset_s)
        self.counters = ClientCounters()
        self._lock = threading.Lock()

    # ---- RemoteTier -------------------------------------------------------------------

    def lookup(self, namespace: str, hashes: Sequence[bytes]) -> int:
        """Leading stored blocks among ``hashes``; 0 while the store is unavailable."""
        found = 0
        for chunk in _chunks(hashes):
            req = pb.LookupRequest(namespace=namespace, hashes=chunk)
            try:
                n = self._call("Lookup", lambda t, r=req: self._stub.Lookup(r, timeout=t, metadata=self._metadata).prefix_length)
            except BlockStoreUnavailable:
                return 0
            found += n
            if n < len(chunk):
                break
        return found

    def get(self, namespace: str, hashes: Sequence[bytes]) -> list[memoryview | None]:
        """Stored bytes per hash (None: miss, or the store became unavailable), as views of
        the received messages."""
        found: list[memoryview | None] = [None] * len(hashes)
        for i, data in self.get_iter(namespace, hashes):
            found[i] = data
        return found

    def get_iter(self, namespace: str, hashes: Sequence[bytes]) -> Iterator[tuple[int, memoryview]]:
        """(index in ``hashes``, stored bytes) of each found block, in index order, as the
        messages arrive, so that callers decode while the rest is still on the way.

        Absent indexes are misses; if the store becomes unavailable the iteration just ends
        early (the rest are misses). A retry asks only for the blocks not yet received.
        Stopping early (``close()`` or ``break``) cancels the call.
        """
        for start in range(0, len(hashes), MAX_BATCH_BLOCKS):
            chunk = list(hashes[start:start + MAX_BATCH_BLOCKS])
            received: set[int] = set()  # positions in chunk already yielded

            def fetch(timeout: float, chunk: list[bytes] = chunk, received: set[int] = received
                      ) -> Iterator[tuple[int, memoryview]]:
                asked = [i for i in range(len(chunk)) if i not in received]  # a retry resumes
                req = pb.GetRequest(namespace=namespace, hashes=[chunk[i] for i in asked])
                call = self._get_stream(req, timeout=timeout, metadata=self._metadata)
                try:
                    for msg in call:
                        try:
                            blocks = decode_get_response(msg)
                        except WireError as e:
                            raise BlockStoreError("Get", grpc.StatusCode.INTERNAL, f"malformed message: {e}") from None
                        for index, data in blocks:
                            if index >= len(asked):
                                raise BlockStoreError("Get", grpc.StatusCode.INTERNAL, f"index {index} out of range")
                            if asked[index] not in received:
                                received.add(asked[index])
                                yield asked[index], data
                finally:
                    call.cancel()  # no-op once finished; stops the stream if abandoned

            try:
                for pos, data in self._stream("Get", fetch):
                    yield start + pos, data
            except BlockStoreUnavailable:
                return

    def put(self, namespace: str, blocks: Sequence[tuple[bytes, bytes]]) -> None:
        """Store blocks (set-if-absent), split into requests under the size limit.

        Raises ``BlockStoreUnavailable`` if the store cannot be reached (or the circuit is
        open): the blocks not yet written are dropped and counted, and the caller must not
        take any of them as stored."""
        batches = self._batches(blocks)
        for n, batch in enumerate(batches):
            req = pb.PutRequest(namespace=namespace, blocks=[pb.Block(hash=h, data=d) for h, d in batch])
            try:
                self._call("Put", lambda t, r=req: self._stub.Put(r, timeout=t, metadata=self._metadata))
            except BlockStoreUnavailable:
                with self._lock:
                    self.counters.dropped_puts += sum(map(len, batches[n:]))
                raise

    def delete(self, namespace: str, hashes: Sequence[bytes], corrupt: bool = False) -> int:
        """Remove blocks (``corrupt``: this client found them damaged). 0 if unavailable."""
        deleted = 0
        for chunk in _chunks(hashes):
            req = pb.DeleteRequest(namespace=namespace, hashes=chunk, corrupt=corrupt)
            try:
                deleted += self._call("Delete", lambda t, r=req: self._stub.Delete(r, timeout=t, metadata=self._metadata).deleted)
            except BlockStoreUnavailable:
                pass
        return deleted

    def delete_namespace(self, namespace: str) -> int:
        """Remove every block of ``namespace`` (an admin flush); returns how many existed.
        Raises ``BlockStoreUnavailable`` if the store cannot be reached."""
        req = pb.DeleteRequest(namespace=namespace, whole_namespace=True)
        return self._call("Delete", lambda t: self._stub.Delete(req, timeout=t, metadata=self._metadata).deleted)

    def touch(self, namespace: str, hashes: Sequence[bytes], ttl_seconds: int) -> int:
        """Keep stored blocks at least ``ttl_seconds`` more; returns how many are stored.
        Raises ``BlockStoreUnavailable`` if the store cannot be reached."""
        found = 0
        for chunk in _chunks(hashes):
            req = pb.TouchRequest(namespace=namespace, hashes=chunk, ttl_seconds=int(ttl_seconds))
            found += self._call("Touch", lambda t, r=req: self._stub.Touch(r, timeout=t, metadata=self._metadata).found)
        return found

    def watch_removals(self, namespace: str = "") -> RemovalStream:
        """Blocks removed from T2 from now on (evicted, expired, deleted), as the store's Redis
        reports them, until ``cancel()``; empty ``namespace``: every namespace (a token for all)."""
        call = self._stub.WatchRemovals(pb.WatchRemovalsRequest(namespace=namespace), metadata=self._metadata)
        return RemovalStream(call)

    def stats(self) -> pb.StatsResponse:
        """Server-side counters; raises ``BlockStoreUnavailable`` if it cannot be reached."""
        return self._call("Stats", lambda t: self._stub.Stats(pb.StatsRequest(), timeout=t, metadata=self._metadata))

    def close(self) -> None:
        self._get_channel.close()
        self._channel.close()

    def __enter__(self) -> BlockStoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals --------------------------------------------------------------------

    def _batches(self, blocks: Sequence[tuple[bytes, bytes]]) -> list[list[tuple[bytes, bytes]]]:
        limit = self.config.max_request_bytes
        batches: list[list[tuple[bytes, bytes]]] = [[]]
        size = 0
        for h, d in blocks:
            n = len(h) + len(d) + 16
            if batches[-1] and (size + n > limit or len(batches[-1]) >= MAX_BATCH_BLOCKS):
                batches.append([])
                size = 0
            batches[-1].append((h, d))
            size += n
        return [b for b in batches if b]

    def _call(self, method: str, attempt: Callable[[float], T]) -> T:
        """Run ``attempt(timeout)`` with retries inside one deadline, through the breaker."""
        (result,) = self._stream(method, lambda timeout: (attempt(timeout),))
        return result

    def _stream(self, method: str, attempt: Callable[[float], Iterable[T]]) -> Iterator[T]:
        """Yield the items of ``attempt(timeout)``, retried inside one deadline through the
        breaker. A retry calls ``attempt`` again: it must not repeat items already yielded."""
        if not self.breaker.allow():
            with self._lock:
                self.counters.short_circuited += 1
            raise BlockStoreUnavailable(f"block store {method}: circuit open")
        deadline = time.monotonic() + self.config.timeout_s
        delay = self.config.backoff_s
        detail = "deadline exceeded"
        for n in range(self.config.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                yield from attempt(remaining)
            except grpc.RpcError as e:
                if e.code() not in _TRANSIENT:
                    self.breaker.record_success()  # it answered, so it is reachable
                    raise BlockStoreError(method, e.code(), e.details() or "") from None
                detail = f"{e.code().name}: {e.details()}"
                if n == self.config.retries or deadline - time.monotonic() <= delay:
                    break
                with self._lock:
                    self.counters.retries += 1
                time.sleep(delay)
                delay *= 2
                continue
            except BaseException:
                # The caller stopped reading (GeneratorExit) or the answer was malformed: the
                # store answered either way, and a half-open probe must not stay pending
                # (the breaker would never let another call through).
                self.breaker.record_success()
                raise
            self.breaker.record_success()
            return
        self.breaker.record_failure()
        with self._lock:
            self.counters.failures += 1
        log.warning("block store %s failed: %s", method, detail)
        raise BlockStoreUnavailable(f"block store {method}: {detail}")
