"""Typed errors of the services, and which Redis exceptions mean "unreachable now"."""
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
