"""Configuration, in one place: dataclasses with defaults, overridable by environment
variables (``KVSTORE_<FIELD>``) and, in the CLI, by flags of the same names."""
from __future__ import annotations

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
    t0_t1_policy: WritePolicy = WritePolicy.WRITE_BACK
    t1_t2_policy: WritePolicy = WritePolicy.WRITE_THROUGH
    selective_hits: int = 2
    codec: str = "lz4"
    codec_min_saving: float = 0.03
    # Background T2 writes waiting at most; past this, new writes are dropped and counted
    # rather than stalling decode or growing memory.
    t2_write_queue: int = 1024
    t2_write_batch: int = 32
    device: str = "auto"

    def __post_init__(self) -> None:
        self.t0_t1_policy = WritePolicy(self.t0_t1_policy)
        self.t1_t2_policy = WritePolicy(self.t1_t2_policy)
        for name in ("t0_blocks", "t1_blocks", "selective_hits", "t2_write_queue", "t2_write_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CacheConfig.{name} must be positive, got {getattr(self, name)}")
        if self.codec not in ("raw", "lz4"):
            raise ValueError(f"CacheConfig.codec must be 'raw' or 'lz4', got {self.codec!r}")


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
