"""Shared by the benchmarks: a block store process on an embedded Redis, and timing."""
from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from services.embedded_redis import EmbeddedRedis, EmbeddedRedisConfig


@contextlib.contextmanager
def blockstore_process(maxmemory: str = "4gb", pids: dict[str, int] | None = None) -> Iterator[tuple[str, str]]:
    """An embedded redis-server and ``kvstore blockstore serve`` as its own process (as in
    production); yields (block store address, redis url). ``pids``, if given, receives the
    process ids as "block store" and "redis" (for ``cpu_seconds``)."""
    with EmbeddedRedis(EmbeddedRedisConfig(maxmemory=maxmemory)) as red:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvstore.cli", "blockstore", "serve", "--port", "0", "--redis-url", red.url],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        if pids is not None:
            pids.update({"block store": proc.pid, "redis": red.pid})
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if "listening on" in line:
                    yield line.split("listening on", 1)[1].split()[0], red.url
                    break
            else:
                raise RuntimeError(f"block store exited with {proc.wait()} before listening")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def median_time(fn: Callable[[], object], reps: int, before: Callable[[], object] = lambda: None) -> float:
    """Median seconds of ``reps`` calls of ``fn`` after one warm-up call (``before`` runs untimed)."""
    times = []
    for rep in range(reps + 1):
        before()
        t = time.perf_counter()
        fn()
        if rep:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds used so far by process ``pid`` (all its threads); None where
    /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
