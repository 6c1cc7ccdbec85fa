"""A lean Redis client for the block store's hot path: pipelined GETEX on one Redis server.

An ``asyncio.BufferedProtocol`` reads replies into ~4 MiB buffers, parses them in place and
hands values over as memoryviews in batches while the rest arrives; commands go out as a
sliding window of ``window_bytes`` of replies in flight (redis-py copied each ~200 KB reply
several times, and a fully queued pipeline cost Redis twice the CPU per byte; numbers in
docs/architecture.md). Memory is bounded: commands are sent only while the consumer takes
the replies (it takes them as its own client reads), every value is charged to a budget as
soon as its length is read, and reading pauses while the budget is short. Only what the block
store needs is implemented: RESP2 bulk strings, simple strings, integers and errors (no
arrays), AUTH and SELECT from the URL, TCP or unix sockets without TLS (``rediss://`` stays
on redis-py, see ``LeanRedis.supports``).

Failure semantics mirror the redis-py setup in ``store``: no reply progress for
``timeout_s`` or a refused / broken connection raise ``StoreUnavailableError``; a broken
pooled connection is retried once on a new socket before any reply was handed out, and the
other idle ones are dropped (pooled sockets die with a restarted Redis); an error reply raises ``StoreError``. A connection left
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

from services.blockstore.budget import CallBudget
from services.common.errors import StoreError, StoreUnavailableError

Reply = memoryview | bytes | int | None  # bulk string, simple string, integer, nil
_EMPTY = np.empty(0, np.uint8)
_MIN_FREE = 64 << 10  # a buffer with less room left is replaced (its unparsed tail is copied)
_BUF_BYTES = 4 << 20  # receive buffers hold about this much (a larger reply gets one of its own)
_MAX_LINE = 64 << 10  # a status / integer / error line longer than this is a protocol error
_POOL_SIZE = 16  # idle connections kept
WINDOW_BYTES = 256 << 10  # GETEX replies kept in flight per pipeline (see LeanRedis.getex)
_WAKE_BYTES = 512 << 10  # hand replies over in batches of about this much (fewer task switches)
_BACKLOG_BYTES = 2 * _WAKE_BYTES  # replies parsed but not taken past which no command is sent


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
    """Reads the replies of one pipeline at a time into uninitialised buffers of ~4 MiB.

    Bulk strings become memoryviews of the buffer they arrived in; a buffer that fills up is
    replaced by a fresh one holding only the unparsed tail, and views taken earlier keep the
    old one alive while they are in use, so memory follows what the consumer still holds.
    With a budget, every bulk reply's bytes are taken from it once its length is read; when
    the budget has no room, reading pauses until the consumer got it (``blocked``, ``grant``).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf, self._mv = _EMPTY, memoryview(_EMPTY)
        self._end = 0  # bytes received into _buf
        self._pos = 0  # bytes of _buf parsed
        self._pending = 0  # size of the reply at _pos once its header is read (0: unknown)
        self._charged = 0  # budget taken for the reply at _pos
        self.blocked = 0  # budget the reply at _pos waits for (reading is paused meanwhile)
        self._budget: CallBudget | None = None
        self._expected = self._parsed = self._taken = 0  # replies of the pipeline
        self._ready: list[Reply | _ErrorReply] = []  # parsed, not taken yet
        self._ready_bytes = 0  # of bulk strings in _ready
        self._unwoken = 0  # bytes parsed since the consumer was last woken
        self._held: list[bytes] = []  # commands not sent yet (see LeanRedis.getex)
        self._sent = 0  # commands of this pipeline sent so far
        self._window = 0  # bytes of replies to keep in flight (0: send every command at once)
        self._estimate = 0  # bytes per reply: the hint, or the largest seen in this pipeline
        self._wakeup: asyncio.Future[None] | None = None
        self.progress = 0  # bytes received so far, for the inactivity timeout
        self.closed: Exception | None = None

    # -- asyncio.BufferedProtocol -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        need = self._pending - (self._end - self._pos) if self._pending else 0  # of the reply at _pos
        if len(self._buf) - self._end < max(_MIN_FREE, need):
            self._rebuffer()
        return self._mv[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        self.progress += nbytes
        self._advance()

    def eof_received(self) -> bool:
        self.fail(ConnectionError("Redis closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(exc if isinstance(exc, Exception) else ConnectionError("connection lost"))

    # -- one pipeline ----------------------------------------------------------------------
    def start(self, commands: Sequence[bytes], *, window: int = 0, value_hint: int = 0,
              budget: CallBudget | None = None) -> None:
        """Send ``commands`` (encoded): all at once, or with ``window`` > 0 about that many
        bytes of replies in flight (at least two commands), and only while the consumer keeps
        up (``take``); replies are charged to ``budget`` if given."""
        if self.closed is not None:
            raise ConnectionError(f"connection unusable: {self.closed}")
        if self._end != self._pos or self._taken != self._expected:
            raise ProtocolError("previous pipeline not fully read")
        self._expected, self._parsed, self._taken = len(commands), 0, 0
        self._ready, self._ready_bytes, self._unwoken = [], 0, 0
        self._pending = self._charged = self.blocked = 0
        self._budget, self._window, self._estimate = budget, window, value_hint
        self._held, self._sent = list(commands), 0
        assert self.transport is not None  # set by connection_made before the first pipeline
        self._send_more()

    @property
    def finished(self) -> bool:
        """Every reply of the pipeline was taken."""
        return self._taken == self._expected

    def take(self) -> list[Reply | _ErrorReply]:
        """The replies parsed since the last call (bulk strings as memoryviews); raises the
        connection's error once nothing is left to hand out. Their budget is the caller's."""
        replies, self._ready, self._ready_bytes = self._ready, [], 0
        if not replies and self.closed is not None:
            raise self.closed
        self._taken += len(replies)
        if self._end == self._pos and (self.finished or len(self._buf) - self._end < _MIN_FREE):
            # A spent buffer: only the views handed out may keep it alive now.
            self._buf, self._mv, self._end, self._pos = _EMPTY, memoryview(_EMPTY), 0, 0
        self._send_more()
        return replies

    def grant(self, n: int) -> None:
        """The consumer took the ``n`` bytes the reply at hand was blocked on: read on."""
        self._charged, self.blocked = n, 0
        if self.transport is not None:
            self.transport.resume_reading()
        self._advance()  # part of the reply may be in the buffer already

    def discard(self) -> None:
        """Give back the budget of replies not handed out (the pipeline is abandoned)."""
        if self._budget is not None:
            self._budget.release(self._ready_bytes + self._charged)
        self._ready, self._ready_bytes, self._charged = [], 0, 0

    def wait(self) -> asyncio.Future[None]:
        """A future done when the next batch of replies is parsed, the pipeline is blocked on
        the budget, or the connection fails."""
        self._wakeup = asyncio.get_running_loop().create_future()
        if self._ready or self.blocked or self.closed is not None:
            self._wakeup.set_result(None)
        return self._wakeup

    def _advance(self) -> None:
        """Parse what arrived, send what the window allows, wake the consumer if due."""
        try:
            self._parse()
            self._send_more()
        except ProtocolError as e:
            self.fail(e)
            if self.transport is not None:
                self.transport.abort()
            return
        # The first reply goes out at once; then batches, unless nothing more is on its way.
        if self.blocked or self._ready and (
                self._taken == 0 or self._unwoken >= _WAKE_BYTES or self._parsed == self._sent):
            self._unwoken = 0
            self._wake()

    def _send_more(self) -> None:
        if not self._held or self.transport is None or self.closed is not None:
            return
        n = len(self._held)
        if self._window:
            # In flight: a window's worth of replies as sized so far, and nothing new while
            # the consumer is behind (it takes replies as its own client reads).
            ahead = max(2, self._window // max(1, self._estimate))
            n = min(n, self._parsed + ahead - self._sent) if self._ready_bytes < _BACKLOG_BYTES else 0
        if n > 0:
            self.transport.write(b"".join(self._held[:n]))
            del self._held[:n]
            self._sent += n

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _rebuffer(self) -> None:
        # Only between recv calls: the loop has released the view it wrote through.
        tail = self._end - self._pos
        if self._pending > _BUF_BYTES:
            size = self._pending  # exactly: nothing after it may keep this buffer alive
        else:
            rest = (self._expected - self._parsed) * (self._estimate + 16)  # expected bytes to come
            size = max(min(rest, _BUF_BYTES), self._pending, tail) + _MIN_FREE
        fresh = np.empty(size, np.uint8)
        fresh[:tail] = self._buf[self._pos:self._end]
        self._buf, self._mv, self._pos, self._end = fresh, memoryview(fresh), 0, tail

    def _parse(self) -> None:
        mv, end, ready = self._mv, self._end, self._ready
        pos = self._pos
        while pos < end and not self.blocked:
            if self._parsed >= self._expected:
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
            reply: Reply | _ErrorReply
            if kind == b"$":
                n = _int(line)
                if n >= 0:
                    start = pos + nl + 2
                    self._estimate = max(self._estimate, n)
                    if self._budget is not None and n and not self._charged:
                        if not self._budget.try_take(n):
                            self.blocked = n
                            if self.transport is not None:
                                self.transport.pause_reading()
                            break
                        self._charged = n
                    if end < start + n + 2:
                        self._pending = start + n + 2 - pos
                        break  # the value is still arriving
                    if bytes(mv[start + n:start + n + 2]) != b"\r\n":
                        raise ProtocolError("bulk string not terminated by CRLF")
                    reply, pos = mv[start:start + n], start + n + 2
                    self._ready_bytes += n
                    self._unwoken += n
                    self._pending = self._charged = 0
                else:
                    reply, pos = None, pos + nl + 2
            elif kind == b"+":
                reply, pos = line, pos + nl + 2
            elif kind == b":":
                reply, pos = _int(line), pos + nl + 2
            elif kind == b"-":
                reply, pos = _ErrorReply(line.decode("utf-8", "replace")), pos + nl + 2
            else:
                raise ProtocolError(f"unsupported reply type {kind!r}")
            ready.append(reply)
            self._parsed += 1
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

    async def stream(self, commands: Sequence[bytes], *, window: int = 0, value_hint: int = 0,
                     budget: CallBudget | None = None) -> AsyncIterator[list[Reply | _ErrorReply]]:
        """Batches of replies, in order, as they are parsed (see ``_Protocol.start``). An
        empty batch means the next reply waits for ``budget``: the consumer should give back
        what it can first. ConnectionError / TimeoutError, or the consumer stopping early,
        leave the connection closed (it is mid-reply)."""
        protocol = self._protocol
        try:
            protocol.start(commands, window=window, value_hint=value_hint, budget=budget)
            while not protocol.finished:
                if replies := protocol.take():
                    yield replies
                elif need := protocol.blocked:
                    yield []
                    await budget.take(need)  # type: ignore[union-attr]  # blocked only with a budget
                    protocol.grant(need)
                else:
                    # Like a socket timeout: fail only after timeout_s without any data.
                    seen = protocol.progress
                    done, _ = await asyncio.wait((protocol.wait(),), timeout=self._timeout_s)
                    if not done and protocol.progress == seen:
                        raise TimeoutError(f"no reply from Redis within {self._timeout_s} s")
        finally:
            if not protocol.finished:
                protocol.discard()
                self.close()
        self.used = True

    async def execute(self, commands: Sequence[bytes]) -> list[Reply | _ErrorReply]:
        """All replies of a pipeline."""
        return [r async for batch in self.stream(commands) for r in batch]

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

    async def getex(self, keys: Sequence[bytes], ttl_seconds: int,
                    budget: CallBudget) -> AsyncIterator[list[memoryview | None]]:
        """``GETEX key EX ttl`` for every key in one pipeline, sent as a sliding window.
        Yields the values in key order, in batches as they arrive (None: missing); values
        are memoryviews of the receive buffers, each charged to ``budget`` for its length
        (the caller releases it). An empty batch: the next value waits for budget."""
        if not keys:
            return
        ex = str(int(ttl_seconds)).encode()
        commands = [encode_command(b"GETEX", key, b"EX", ex) for key in keys]
        # A window of about ``window_bytes`` of replies, not the whole pipeline: Redis runs
        # every command it has read before it writes a reply, so with all 64 of a prefix
        # load at once the first ~200 KB reply waited for ~12 MB of output, and Redis spent
        # twice the CPU per byte or more than with two in flight (bench/remote_ab.py).
        largest = 0
        async with contextlib.aclosing(self._stream(commands, window=self._window_bytes,
                                                    value_hint=self._value_hint, budget=budget)) as replies:
            async for batch in replies:  # (no loop variable left holding a value while it is out)
                if wrong := [type(r).__name__ for r in batch if r is not None and not isinstance(r, memoryview)]:
                    raise ProtocolError(f"GETEX answered {wrong[0]}")
                largest = max([largest, *(len(r) for r in batch if r is not None)])  # type: ignore[arg-type]
                yield batch  # type: ignore[misc]
        if largest:
            self._value_hint = largest

    async def _stream(self, commands: Sequence[bytes], **options) -> AsyncIterator[list[Reply]]:
        """Replies of one pipeline in batches (see ``_Connection.stream``); an error reply
        raises StoreError."""
        for attempt in range(2):
            # A retry gets a new socket: the idle ones may be as stale as the one that failed.
            conn = await (self._acquire() if attempt == 0 else self._connect())
            started = False
            try:
                async with contextlib.aclosing(conn.stream(commands, **options)) as replies:
                    async for batch in replies:
                        if errors := [r for r in batch if isinstance(r, _ErrorReply)]:
                            raise StoreError(f"ResponseError: {errors[0].message}")
                        started = started or bool(batch)
                        yield batch  # type: ignore[misc]
            except TimeoutError as e:  # (before OSError: TimeoutError is one)
                raise StoreUnavailableError(f"TimeoutError: {e}") from e
            except (ConnectionError, OSError) as e:
                # Once more on a fresh socket, as redis-py's Retry does: a pooled connection
                # may belong to a Redis that has since restarted (and so may the other idle ones).
                if attempt == 0 and conn.used and not started:
                    await self.close()
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
                replies = await conn.execute([encode_command(*c) for c in self._setup])
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
