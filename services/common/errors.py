"""Typed errors of the services, which Redis exceptions mean "unreachable now" or "refusing
writes for now", and how user strings are shown in error messages."""
from __future__ import annotations

import grpc
import redis.exceptions as rex


class ConfigError(ValueError):
    """The service configuration is unusable (bad value, unsafe combination, unreadable file)."""


class ServerStartError(RuntimeError):
    """The server could not start (e.g. its port is taken)."""


class StoreError(RuntimeError):
    """Redis answered with an error (not a connectivity problem)."""


class StoreUnavailableError(StoreError):
    """Redis cannot be reached in time (connection refused, timeout, cluster down)."""


class StoreRefusedError(StoreError):
    """Redis refuses writes for now (a read-only replica, failing persistence, ...): retry later."""


class StoreFullError(StoreRefusedError):
    """Redis is at ``maxmemory`` and refuses writes (OOM): retry later or free memory."""


class RequestError(Exception):
    """A request the servicer rejects with a specific gRPC status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# Retry later (UNAVAILABLE), not a bad command (INTERNAL). ClusterDownError / TryAgainError are
# ResponseErrors, but a cluster that heals answers again.
REDIS_UNAVAILABLE = (rex.ConnectionError, rex.TimeoutError, rex.ClusterDownError, rex.TryAgainError,
                     rex.RedisClusterException, OSError, TimeoutError)

# Error codes with which Redis refuses a write for a while. Inside a Lua script Redis 6 wraps
# them ("Error running script ...: -OOM command not allowed ..."), so they are looked for there too.
_REFUSALS = {"OOM": StoreFullError, "READONLY": StoreRefusedError, "MISCONF": StoreRefusedError,
             "NOREPLICAS": StoreRefusedError, "MASTERDOWN": StoreRefusedError}


def write_refusal(e: BaseException) -> StoreRefusedError | None:
    """``e`` as a ``StoreRefusedError`` if it is Redis refusing a write for now, else None."""
    if not isinstance(e, rex.ResponseError):
        return None
    text = str(e)
    code = getattr(e, "status_code", None) or text.split(" ", 1)[0]
    for name, cls in _REFUSALS.items():
        if code == name or f"-{name} " in text:
            what = "is out of memory (maxmemory)" if cls is StoreFullError else f"refuses writes now ({name})"
            return cls(f"Redis {what}, so nothing was written; retry later ({text})")
    return None


SHOWN_CHARS = 64  # of a user string echoed in an error message


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """``value`` quoted for an error message, cut to ``limit`` characters: an echoed string
    must not make the status larger than gRPC's metadata limit."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"
