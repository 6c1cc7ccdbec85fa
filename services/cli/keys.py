"""The API keys of ``kvstore serve``: from ``--api-keys`` (or KVSTORE_SERVE_API_KEYS) and a file,
and the refusal to serve beyond loopback without them. Light (no torch, no Ray), so that the
command line checks before it imports the rest."""
from __future__ import annotations

from pathlib import Path

from services.common.auth import TokenTable
from services.common.errors import ConfigError
from services.common.net import is_loopback


def api_keys(host: str, spec: str, path: str) -> str:
    """``spec`` plus the entries of the file at ``path`` (one per line) as one spec for
    ``TokenTable``. Raises ConfigError if they are malformed, or if there are none and ``host``
    is not a loopback address."""
    if path:
        try:
            spec = f"{spec}\n{Path(path).expanduser().read_text()}"
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the API keys file: {e}") from e
    if not TokenTable(spec).enabled and not is_loopback(host):
        raise ConfigError(f"refusing to serve on non-loopback host {host!r} without API keys: set --api-keys-file "
                          "(lines 'key=ns1,ns2') or KVSTORE_SERVE_API_KEYS, or listen on 127.0.0.1")
    return spec
