"""Bearer tokens and the namespaces they may reach.

``BlockStoreConfig.tokens`` reads ``"tokA=ns1,ns2;tokB=*"``: each token lists the namespaces
it may use, ``*`` meaning all of them. Entries are separated by ``;`` or newlines (lines
starting with ``#`` are comments), and ``sha256:<64 hex digits>=ns1`` gives a token by its
SHA-256 digest, so that a file of keys need not hold them in plaintext. An empty string turns
authentication off.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

import grpc

from services.common.errors import ConfigError, RequestError

NAMESPACE_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
_NAMESPACE_RE = re.compile(NAMESPACE_PATTERN)
ANY_NAMESPACE = "*"
_ALL = frozenset({ANY_NAMESPACE})
_BEARER = "bearer "
_DIGEST = "sha256:"
_HEX_DIGEST_RE = re.compile(r"[0-9a-fA-F]{64}")


def valid_namespace(namespace: str) -> bool:
    """True if ``namespace`` is 1-64 characters of ``[A-Za-z0-9._-]``."""
    return _NAMESPACE_RE.fullmatch(namespace) is not None


def check_namespace(namespace: str) -> None:
    """Raise INVALID_ARGUMENT unless ``namespace`` is well formed."""
    if not valid_namespace(namespace):
        shown = repr(namespace[:70]) + ("..." if len(namespace) > 70 else "")
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"invalid namespace {shown}: it must match {NAMESPACE_PATTERN}")


class TokenTable:
    """Parsed tokens, kept as SHA-256 digests; ``authenticate`` checks a call's metadata against them."""

    def __init__(self, spec: str) -> None:
        self._entries: list[tuple[bytes, frozenset[str]]] = []
        parts = (p.strip() for p in re.split(r"[;\n]", spec))
        for number, part in enumerate((p for p in parts if p and not p.startswith("#")), 1):
            token, sep, namespaces = part.partition("=")
            token = token.strip()
            allowed = frozenset(n.strip() for n in namespaces.split(",") if n.strip())
            if not sep or not token or not allowed:
                raise ConfigError(f"tokens: entry {number} is malformed; expected 'token=ns1,ns2', 'token=*' or "
                                  "'sha256:<64 hex digits>=ns1', entries separated by ';' or newlines")
            if bad := [n for n in allowed if n != ANY_NAMESPACE and not valid_namespace(n)]:
                raise ConfigError(f"tokens: invalid namespace(s) {sorted(bad)}; "
                                  f"namespaces must match {NAMESPACE_PATTERN}")
            if token.startswith(_DIGEST):
                if not _HEX_DIGEST_RE.fullmatch(token[len(_DIGEST):]):
                    raise ConfigError(f"tokens: entry {number}: '{_DIGEST}' must be followed by the 64 hex digits "
                                      "of the token's SHA-256 digest")
                digest = bytes.fromhex(token[len(_DIGEST):])
            else:
                digest = hashlib.sha256(token.encode()).digest()
            if any(hmac.compare_digest(digest, d) for d, _ in self._entries):
                raise ConfigError("tokens: a token is listed twice")
            self._entries.append((digest, allowed))

    @property
    def enabled(self) -> bool:
        """False when no tokens are configured: every caller may use every namespace."""
        return bool(self._entries)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> frozenset[str]:
        """The namespaces a call may use, from its ``authorization: Bearer <token>`` metadata.

        Raises UNAUTHENTICATED for a missing or unknown token. With authentication off,
        every namespace is allowed.
        """
        if not self._entries:
            return _ALL
        token = _bearer_token(metadata)
        if token is None:
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED,
                               "missing credentials: send metadata 'authorization: Bearer <token>'")
        allowed, digest = None, hashlib.sha256(token).digest()
        for candidate, namespaces in self._entries:  # compare with every entry, in constant time
            if hmac.compare_digest(candidate, digest):
                allowed = namespaces
        if allowed is None:
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        return allowed


def require_namespace(allowed: frozenset[str], namespace: str) -> None:
    """Raise PERMISSION_DENIED unless ``allowed`` (from ``authenticate``) covers ``namespace``."""
    if ANY_NAMESPACE not in allowed and namespace not in allowed:
        raise RequestError(grpc.StatusCode.PERMISSION_DENIED,
                           f"this token may not access namespace {namespace!r}")


def _bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            if value[:len(_BEARER)].lower() == _BEARER and value[len(_BEARER):].strip():
                return value[len(_BEARER):].strip().encode()
            return None
    return None
