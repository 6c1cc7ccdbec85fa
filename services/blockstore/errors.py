"""Typed errors of the block store service."""
from __future__ import annotations

import grpc


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
