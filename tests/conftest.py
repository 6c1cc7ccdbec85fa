"""Shared fixtures: real embedded Redis servers (no Docker, no system Redis needed)."""
import pytest

from services.common.embedded_redis import EmbeddedRedis, EmbeddedRedisCluster


@pytest.fixture(scope="module")
def redis_server():
    """A private redis-server (512mb, allkeys-lru) for the test module."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster():
    """A 3-master Redis Cluster with all slots assigned, for the test module."""
    with EmbeddedRedisCluster(nodes=3) as cluster:
        yield cluster
