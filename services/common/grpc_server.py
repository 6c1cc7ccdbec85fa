"""What every kvstore gRPC server shares: binding (TLS or not), the loopback check that
guards running without credentials, the Prometheus endpoint, registering a servicer so that
a malformed request is INVALID_ARGUMENT, and the mapping of a handler's exceptions to status
codes (a request never takes a server down)."""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, start_http_server

from services.common.errors import ConfigError, RequestError, ServerStartError
from services.common.net import host_port

logger = logging.getLogger(__name__)

# An exception -> (status code, message), or None for an unexpected one (INTERNAL, logged).
Classify = Callable[[Exception], Awaitable[tuple[grpc.StatusCode, str] | None]]
# A servicer's status mapping for one call: (method name, context) -> ``async with`` block.
Rpc = Callable[[str, grpc.aio.ServicerContext], AbstractAsyncContextManager[None]]
# Status messages are cut to this many characters: gRPC sends them as metadata (8 KiB limit,
# percent-encoded), and a larger one reaches the caller as "Stream removed".
MAX_STATUS_MESSAGE = 512


def bind(server: grpc.aio.Server, host: str, port: int, tls_cert: str = "", tls_key: str = "") -> int:
    """Listen on ``host:port`` (IPv6 hosts bracketed; port 0: a free one), with TLS when a
    certificate is given; returns the bound port."""
    target = host_port(host, port)
    try:
        if tls_cert:
            try:
                key, cert = Path(tls_key).read_bytes(), Path(tls_cert).read_bytes()
            except OSError as e:
                raise ConfigError(f"cannot read TLS key/cert: {e}") from e
            bound = server.add_secure_port(target, grpc.ssl_server_credentials([(key, cert)]))
        else:
            bound = server.add_insecure_port(target)
    except RuntimeError as e:
        raise ServerStartError(f"cannot listen on {target}: {e}") from e
    if not bound:
        raise ServerStartError(f"cannot listen on {target}")
    return bound


class MetricsEndpoint:
    """Prometheus metrics of one registry over HTTP, stopped with the server."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            raise ServerStartError(f"cannot serve metrics on {host}:{port}: {e}") from e

    async def stop(self) -> None:
        await asyncio.to_thread(self._httpd.shutdown)
        self._httpd.server_close()
        self._thread.join()


class RateLimitedLog:
    """At most one warning per ``interval_s``; the next one says how many were left out
    (requests anyone can send must not flood the log)."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self._interval_s = interval_s
        self._next = 0.0
        self._skipped = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        if self._skipped:
            message, args = message + " (and %d more since the last report)", (*args, self._skipped)
        logger.warning(message, *args)
        self._next, self._skipped = now + self._interval_s, 0


_malformed_log = RateLimitedLog()


def add_servicer(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object, rpc: Rpc,
                 raw_responses: Collection[str] = ()) -> None:
    """Register ``servicer``'s methods for ``service`` (unary and server-streaming ones).

    Requests reach the server as bytes and are parsed here: a malformed one gets
    INVALID_ARGUMENT through ``rpc`` (the servicer's status mapping and metrics) and a
    rate-limited log line, never a traceback. Methods named in ``raw_responses`` return, yield
    or ``context.write`` already serialized messages (bytes)."""
    handlers = {}
    for method in service.methods:
        assert not method.client_streaming, f"{method.name}: client streaming is not supported"
        parse = _parser(method.name, message_factory.GetMessageClass(method.input_type), rpc)
        serialize = bytes if method.name in raw_responses else \
            message_factory.GetMessageClass(method.output_type).SerializeToString
        impl = getattr(servicer, method.name)
        if method.server_streaming and inspect.iscoroutinefunction(impl):
            # It writes with context.write: so must the handler, which grpc.aio tells by its kind.
            async def writer(data: bytes, context, impl=impl, parse=parse) -> None:
                await impl(await parse(data, context), context)
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(writer, response_serializer=serialize)
        elif method.server_streaming:
            async def stream(data: bytes, context, impl=impl, parse=parse) -> AsyncIterator[object]:
                request = await parse(data, context)
                async with contextlib.aclosing(impl(request, context)) as responses:
                    async for response in responses:
                        yield response
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(stream, response_serializer=serialize)
        else:
            async def unary(data: bytes, context, impl=impl, parse=parse) -> object:
                return await impl(await parse(data, context), context)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(unary, response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _parser(method: str, message: type, rpc: Rpc) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[object]]:
    async def parse(data: bytes, context: grpc.aio.ServicerContext) -> object:
        try:
            return message.FromString(data)
        except DecodeError as e:
            _malformed_log.warning("malformed %s request from %s: %s", method, context.peer(), e)
            async with rpc(method, context):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"malformed request: not a valid {message.DESCRIPTOR.full_name} ({e})") from None
            raise AssertionError("unreachable: rpc() aborts the call")
    return parse


@contextlib.asynccontextmanager
async def rpc_status(method: str, context: grpc.aio.ServicerContext, classify: Classify,
                     observe: Callable[[str, grpc.StatusCode, float], None]) -> AsyncIterator[None]:
    """Run a handler's body: ``RequestError`` and what ``classify`` recognises become their
    status codes, anything else INTERNAL (logged); cancellation is recorded as CANCELLED.
    ``observe(method, code, seconds)`` records every call."""
    start = time.perf_counter()
    code, message = grpc.StatusCode.OK, ""
    try:
        yield
    except RequestError as e:
        code, message = e.code, e.message
    except Exception as e:  # noqa: BLE001 - a request must never take the server down
        mapped = await classify(e)
        if mapped is None:
            code, message = grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(e).__name__}: {e}"
            logger.exception("%s failed", method)
        else:
            code, message = mapped
    except BaseException:  # cancelled by the client, its deadline or shutdown
        code = grpc.StatusCode.CANCELLED
        raise
    finally:
        observe(method, code, time.perf_counter() - start)
    if code is not grpc.StatusCode.OK:
        if len(message) > MAX_STATUS_MESSAGE:
            message = message[:MAX_STATUS_MESSAGE] + f"... ({len(message)} characters)"
        await context.abort(code, message)
