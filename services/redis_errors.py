"""Which redis-py exceptions mean "Redis cannot be reached now" (retry later, UNAVAILABLE)
rather than a bad command (INTERNAL); shared by the block store and the session service."""
from __future__ import annotations

import redis.exceptions as rex

# ClusterDownError / TryAgainError are ResponseErrors, but a cluster that heals answers again.
UNAVAILABLE = (rex.ConnectionError, rex.TimeoutError, rex.ClusterDownError, rex.TryAgainError,
               rex.RedisClusterException, OSError, TimeoutError)
