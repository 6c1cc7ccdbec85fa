"""A lean Redis client for the block store's hot path: pipelined GETEX on one Redis server.

An ``asyncio.BufferedProtocol`` reads each pipeline's replies into one buffer, parses them in
place and hands values over as memoryviews in batches while the rest arrives; commands go out
as a sliding window of ``window_bytes`` of replies in flight (redis-py copied each ~200 KB
reply several times, and a fully queued pipeline cost Redis twice the CPU per byte; numbers
in docs/architecture.md). Only what the block store needs is implemented: RESP2 bulk strings,
simple strings, integers and errors (no arrays), AUTH and SELECT from the URL, TCP or unix
sockets without TLS (``rediss://`` stays on redis-py, see ``LeanRedis.supports``).

Failure semantics mirror the redis-py setup in ``store``: no reply progress for
``timeout_s`` or a refused / broken connection raise ``StoreUnavailableError``; a broken
pooled connection is retried once on a fresh one before any reply was handed out (pooled
sockets die with a restarted Redis); an error reply raises ``StoreError``. A connection left
mid-pipeline (error reply, timeout, cancellation, consumer stopping early) is closed, never
reused.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from urllib.parse import urlsplit

import numpy as np
from redis.connection import parse_url

from services.common.errors import StoreError, StoreUnavailableError

Reply = memoryview | bytes | int | None  # bulk string, simple string, integer, nil
_MIN_FREE = 64 << 10  # a buffer with less room left grows (and is copied)
_SLACK = 256 << 10  # room beyond the expected size of a pipeline's replies (never touched: free)
_MAX_LINE = 64 << 10  # a status / integer / error line longer than this is a protocol error
_POOL_SIZE = 16  # idle connections kept
WINDOW_BYTES = 256 << 10  # GETEX replies kept in flight per pipeline (see LeanRedis.getex)
_WAKE_BYTES = 512 << 10  # hand replies over in batches of about this much (fewer task switches)


class ProtocolError(StoreError):
    """Redis sent something this client does not parse (or more than was asked for)."""


class _ErrorReply:
    """An error reply (``-ERR ...``), kept in place so the rest of the pipeline is read."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def encode_command(*args: bytes) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return b"".join(parts)


class _Protocol(asyncio.BufferedProtocol):
    """Reads the replies of one pipeline at a time into a single uninitialised buffer.

    Bulk strings are recorded as (offset, length) and become memoryviews when taken; a
    buffer that fills up is replaced by a larger copy, and views taken earlier keep the old
    one alive, so they stay valid.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = np.empty(0, np.uint8)
        self._mv = memoryview(self._buf)
        self._end = 0  # bytes received
        self._pos = 0  # bytes parsed
        self._expected = 0
        self._replies: list[object] = []  # tuple (offset, length) for bulk strings
        self._taken = 0  # replies handed out by take()
        self._woken_at = 0  # parse position at the last wake-up
        self._held: list[bytes] = []  # commands not sent yet (see LeanRedis.getex)
        self._sent = 0  # commands of this pipeline sent so far
        self._ahead = 0  # commands kept sent beyond the replies parsed
        self._wakeup: asyncio.Future[None] | None = None
        self.progress = 0  # bytes received so far, for the inactivity timeout
        self.closed: Exception | None = None

    # -- asyncio.BufferedProtocol -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._buf) - self._end < _MIN_FREE:
            self._grow(self._end + _MIN_FREE)
        return self._mv[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        self.progress += nbytes
        try:
            self._parse()
            if self._held:
                self._send_more()
        except ProtocolError as e:
            self.fail(e)
            if self.transport is not None:
                self.transport.abort()
            return
        if len(self._replies) > self._taken and (
                self._taken == 0 or self._pos - self._woken_at >= _WAKE_BYTES
                or len(self._replies) == self._expected):  # the first reply goes out at once
            self._woken_at = self._pos
            self._wake()

    def eof_received(self) -> bool:
        self.fail(ConnectionError("Redis closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(exc if isinstance(exc, Exception) else ConnectionError("connection lost"))

    # -- one pipeline ----------------------------------------------------------------------
    def start(self, commands: Sequence[bytes], size_hint: int, ahead: int = 0) -> None:
        """Send ``commands`` (encoded), all at once or, with ``ahead`` > 0, that many at
        first and then one more per reply parsed; ``take`` hands out their replies."""
        if self.closed is not None:
            raise ConnectionError(f"connection unusable: {self.closed}")
        if self._end != self._pos or self._taken != self._expected:
            raise ProtocolError("previous pipeline not fully read")
        # A fresh buffer per pipeline: the previous one is referenced by its results.
        self._buf = np.empty(size_hint + _SLACK, np.uint8)  # not zeroed: written by recv
        self._mv = memoryview(self._buf)
        self._end = self._pos = self._taken = self._woken_at = 0
        self._expected = len(commands)
        self._replies = []
        self._held, self._sent, self._ahead = list(commands), 0, ahead or len(commands)
        assert self.transport is not None  # set by connection_made before the first pipeline
        self._send_more()

    @property
    def finished(self) -> bool:
        """Every reply of the pipeline was taken."""
        return self._taken == self._expected

    def take(self) -> list[Reply | _ErrorReply]:
        """The replies parsed since the last call (bulk strings as memoryviews); raises the
        connection's error once nothing is left to hand out."""
        replies = self._replies[self._taken:]
        if not replies and self.closed is not None:
            raise self.closed
        self._taken += len(replies)
        view = memoryview(self._buf)
        return [view[r[0]:r[0] + r[1]] if isinstance(r, tuple) else r for r in replies]  # type: ignore[misc]

    def wait(self) -> asyncio.Future[None]:
        """A future done when the next batch of replies is parsed, or the connection fails."""
        self._wakeup = asyncio.get_running_loop().create_future()
        if len(self._replies) > self._taken or self.closed is not None:
            self._wakeup.set_result(None)
        return self._wakeup

    def _send_more(self) -> None:
        n = min(len(self._replies) + self._ahead - self._sent, len(self._held))
        if n > 0 and self.transport is not None:
            self.transport.write(b"".join(self._held[:n]))
            del self._held[:n]
            self._sent += n

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _grow(self, need: int) -> None:
        # Only between recv calls: the loop has released the view it wrote through.
        bigger = np.empty(max(need, 2 * len(self._buf)), np.uint8)
        bigger[:self._end] = self._buf[:self._end]
        self._buf, self._mv = bigger, memoryview(bigger)

    def _parse(self) -> None:
        mv, end, replies = self._mv, self._end, self._replies
        pos = self._pos
        while pos < end:
            if len(replies) >= self._expected:
                raise ProtocolError("unsolicited data from Redis")
            head = bytes(mv[pos:min(end, pos + 32)])  # a bulk header fits: "$<len>\r\n"
            nl = head.find(b"\r\n")
            if nl < 0:
                if end - pos < 32:
                    break  # the line is still arriving
                nl = bytes(mv[pos:min(end, pos + _MAX_LINE)]).find(b"\r\n")
                if nl < 0:
                    if end - pos >= _MAX_LINE:
                        raise ProtocolError("reply line too long")
                    break
                head = bytes(mv[pos:pos + nl + 2])
            kind, line = head[:1], head[1:nl]
            if kind == b"$":
                n = _int(line)
                if n < 0:
                    replies.append(None)
                    pos += nl + 2
                    continue
                start = pos + nl + 2
                if end < start + n + 2:
                    break  # the value is still arriving
                if bytes(mv[start + n:start + n + 2]) != b"\r\n":
                    raise ProtocolError("bulk string not terminated by CRLF")
                replies.append((start, n))
                pos = start + n + 2
                continue
            if kind == b"+":
                replies.append(line)
            elif kind == b":":
                replies.append(_int(line))
            elif kind == b"-":
                replies.append(_ErrorReply(line.decode("utf-8", "replace")))
            else:
                raise ProtocolError(f"unsupported reply type {kind!r}")
            pos += nl + 2
        self._pos = pos

    def fail(self, exc: Exception) -> None:
        if self.closed is None:
            self.closed = exc
        self._wake()


def _int(line: bytes) -> int:
    try:
        return int(line)
    except ValueError:
        raise ProtocolError(f"malformed integer {line[:32]!r}") from None


class _Connection:
    """One socket to Redis; one pipeline at a time, its replies streamed as they arrive."""

    def __init__(self, protocol: _Protocol, timeout_s: float) -> None:
        self._protocol = protocol
        self._timeout_s = timeout_s
        self.used = False  # has completed a pipeline (a pooled socket that may have gone stale)

    @property
    def usable(self) -> bool:
        return self._protocol.closed is None

    async def stream(self, commands: Sequence[bytes], size_hint: int,
                     ahead: int = 0) -> AsyncIterator[list[Reply | _ErrorReply]]:
        """Batches of replies, in order, as they are parsed. ConnectionError / TimeoutError,
        or the consumer stopping early, leave the connection closed (it is mid-reply)."""
        protocol = self._protocol
        try:
            protocol.start(commands, size_hint, ahead)
            while not protocol.finished:
                # Like a socket timeout: fail only after timeout_s without any data.
                seen = protocol.progress
                done, _ = await asyncio.wait((protocol.wait(),), timeout=self._timeout_s)
                if not done and protocol.progress == seen:
                    raise TimeoutError(f"no reply from Redis within {self._timeout_s} s")
                if replies := protocol.take():
                    yield replies
        finally:
            if not protocol.finished:
                self.close()
        self.used = True

    async def execute(self, commands: Sequence[bytes], size_hint: int) -> list[Reply | _ErrorReply]:
        """All replies of a pipeline."""
        return [r async for batch in self.stream(commands, size_hint) for r in batch]

    def close(self) -> None:
        self._protocol.fail(ConnectionError("closed by the client"))
        if self._protocol.transport is not None:
            self._protocol.transport.abort()


class LeanRedis:
    """A small pool of lean connections to one Redis server (see the module docstring)."""

    def __init__(self, url: str, *, timeout_s: float, window_bytes: int = WINDOW_BYTES) -> None:
        if not self.supports(url):
            raise ValueError(f"LeanRedis needs a redis:// or unix:// URL, got {urlsplit(url).scheme}://")
        params = parse_url(url)
        self._path: str | None = params.get("path")
        self._host: str = params.get("host", "localhost")
        self._port: int = int(params.get("port", 6379))
        self._timeout_s = timeout_s
        self._window_bytes = window_bytes
        self._setup: list[tuple[bytes, ...]] = []  # sent on every new connection
        if params.get("password") is not None:
            user = params.get("username")
            self._setup.append((b"AUTH", *((user.encode(),) if user else ()), params["password"].encode()))
        if int(params.get("db", 0) or 0):
            self._setup.append((b"SELECT", str(int(params["db"])).encode()))
        self._idle: list[_Connection] = []
        self._value_hint = 256 << 10  # bytes per GETEX reply, learnt from the last pipeline

    @staticmethod
    def supports(url: str) -> bool:
        """Whether ``url`` is one this client can serve (plain TCP or unix socket)."""
        return urlsplit(url).scheme in ("redis", "unix")

    async def getex(self, keys: Sequence[bytes], ttl_seconds: int) -> AsyncIterator[list[memoryview | None]]:
        """``GETEX key EX ttl`` for every key in one pipeline, sent as a sliding window.
        Yields the values in key order, in batches as they arrive (None: missing); values
        are memoryviews of the receive buffer."""
        if not keys:
            return
        ex = str(int(ttl_seconds)).encode()
        commands = [encode_command(b"GETEX", key, b"EX", ex) for key in keys]
        # A window of about ``window_bytes`` of replies, not the whole pipeline: Redis runs
        # every command it has read before it writes a reply, so with all 64 of a prefix
        # load at once the first ~200 KB reply waited for ~12 MB of output, and Redis spent
        # twice the CPU per byte or more than with two in flight (bench/remote_ab.py).
        ahead = max(2, self._window_bytes // max(1, self._value_hint))
        size_hint = len(keys) * (self._value_hint + 16)
        largest = 0
        async with contextlib.aclosing(self._stream(commands, size_hint, ahead)) as replies:
            async for batch in replies:
                for reply in batch:
                    if reply is not None and not isinstance(reply, memoryview):
                        raise ProtocolError(f"GETEX answered {type(reply).__name__}")
                    if reply is not None and len(reply) > largest:
                        largest = len(reply)
                yield batch  # type: ignore[misc]
        if largest:
            self._value_hint = largest

    async def _stream(self, commands: Sequence[bytes], size_hint: int, ahead: int = 0) -> AsyncIterator[list[Reply]]:
        """Replies of one pipeline in batches; an error reply raises StoreError."""
        for attempt in range(2):
            conn = await self._acquire()
            started = False
            try:
                async with contextlib.aclosing(conn.stream(commands, size_hint, ahead)) as replies:
                    async for batch in replies:
                        if errors := [r for r in batch if isinstance(r, _ErrorReply)]:
                            raise StoreError(f"ResponseError: {errors[0].message}")
                        started = True
                        yield batch  # type: ignore[misc]
            except TimeoutError as e:  # (before OSError: TimeoutError is one)
                raise StoreUnavailableError(f"TimeoutError: {e}") from e
            except (ConnectionError, OSError) as e:
                # Once more on a fresh socket, as redis-py's Retry does: a pooled connection
                # may belong to a Redis that has since restarted.
                if attempt == 0 and conn.used and not started:
                    continue
                raise StoreUnavailableError(f"ConnectionError: {e}") from e
            self._release(conn)
            return

    async def _acquire(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                return conn
        return await self._connect()

    def _release(self, conn: _Connection) -> None:
        if conn.usable and len(self._idle) < _POOL_SIZE:
            self._idle.append(conn)
        else:
            conn.close()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._path:
                    _, protocol = await loop.create_unix_connection(_Protocol, self._path)
                else:
                    _, protocol = await loop.create_connection(_Protocol, self._host, self._port)
        except (OSError, TimeoutError) as e:
            raise StoreUnavailableError(f"ConnectionError: cannot connect to Redis: {e}") from e
        conn = _Connection(protocol, self._timeout_s)
        if self._setup:
            try:
                replies = await conn.execute([encode_command(*c) for c in self._setup], 0)
            except (ConnectionError, OSError) as e:  # (TimeoutError is an OSError)
                raise StoreUnavailableError(f"{type(e).__name__}: {e}") from e
            if errors := [r for r in replies if isinstance(r, _ErrorReply)]:
                conn.close()  # as redis-py's AuthenticationError: a connection problem
                raise StoreUnavailableError(f"AuthenticationError: {errors[0].message}")
            conn.used = False
        return conn

    async def close(self) -> None:
        """Close the idle connections (busy ones close when their pipeline ends)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()
