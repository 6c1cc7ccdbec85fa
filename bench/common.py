"""Shared by the benchmarks: the line that says what ran where, the whole service on embedded
defaults, a block store process on an embedded Redis, a slow network to it, and timing."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

from services.blockstore.server import start_blockstore_process
from services.common.embedded_redis import EmbeddedRedis, EmbeddedRedisConfig


def header(*details: str) -> str:
    """The line a benchmark prints first: its command, the machine (and torch, when loaded),
    then ``details`` of what it measures."""
    machine = [platform.platform(), f"{os.cpu_count()} CPUs"]
    if (torch := sys.modules.get("torch")) is not None:
        machine.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    return f"$ {shlex.join(sys.orig_argv)} | " + ", ".join(machine + list(details))


@contextlib.contextmanager
def embedded_service(config, console) -> Iterator:
    """``kvstore serve`` with ``config`` (a ``ServeConfig``) in this process, its session data in
    a temporary directory removed afterwards; yields the running ``BackgroundService``."""
    from services.cli.serve import BackgroundService  # Ray: only the benchmarks that run the service load it

    with tempfile.TemporaryDirectory(prefix="kvstore-bench-") as data_dir:
        with console.status("starting the service: embedded Redis, block store, Ray and decode workers..."):
            service = BackgroundService(dataclasses.replace(config, data_dir=data_dir)).start()
        try:
            yield service
        finally:
            with console.status("stopping the service..."):
                service.stop()


@contextlib.contextmanager
def blockstore_process(maxmemory: str = "4gb", pids: dict[str, int] | None = None) -> Iterator[tuple[str, str]]:
    """An embedded redis-server and ``kvstore blockstore serve`` as its own process (as in
    production); yields (block store address, redis url). ``pids``, if given, receives the
    process ids as "block store" and "redis" (for ``cpu_seconds``)."""
    with EmbeddedRedis(EmbeddedRedisConfig(maxmemory=maxmemory)) as red:
        proc, address = start_blockstore_process(red.url)
        if pids is not None:
            pids.update({"block store": proc.pid, "redis": red.pid})
        try:
            yield address, red.url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@contextlib.contextmanager
def throttled_proxy(target: str, bytes_per_s: float) -> Iterator[str]:
    """A TCP proxy on loopback to ``target`` (host:port) passing replies at ``bytes_per_s`` at
    most: a deliberately slow network between a client and the block store. Yields its address."""
    host, port = target.rsplit(":", 1)
    loop = asyncio.new_event_loop()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float | None) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
                if rate:
                    await asyncio.sleep(len(data) / rate)
        finally:
            writer.close()

    async def connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pump(reader, up_writer, None), pump(up_reader, writer, bytes_per_s),
                             return_exceptions=True)

    server = loop.run_until_complete(asyncio.start_server(connect, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, name="throttled-proxy", daemon=True)
    thread.start()

    async def shutdown() -> None:  # connections still open end here, not with the loop closed under them
        server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


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
