"""What every kvstore gRPC server shares: binding (TLS or not), the loopback check that
guards running without credentials, the Prometheus endpoint, and the mapping of a handler's
exceptions to status codes (a request never takes a server down)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, start_http_server

from services.common.errors import ConfigError, RequestError, ServerStartError
from services.common.net import host_port

logger = logging.getLogger(__name__)

# An exception -> (status code, message), or None for an unexpected one (INTERNAL, logged).
Classify = Callable[[Exception], Awaitable[tuple[grpc.StatusCode, str] | None]]


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
        await context.abort(code, message)
