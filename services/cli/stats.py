"""``kvstore stats``: a running service at a glance, from its GetStats call."""
from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from kvstore.client import SessionClient
from kvstore.v1 import session_pb2 as pb

TIERS = ("T0", "T1", "T2")


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def render(s: pb.ServiceStats) -> Group:
    """The service's tables: its turns and reuse, then one row per worker."""
    service = Table(title="kvstore service", show_header=False)
    service.add_row("sessions", str(s.sessions))
    service.add_row("generations", f"{s.active_generations} running, {s.queued_generations} queued")
    service.add_row("turns", f"{s.turns}: {s.prompt_tokens} prompt tokens, {s.completion_tokens} generated")
    cached = list(s.cached_tokens) or [0, 0, 0]
    service.add_row("prompt tokens reused", ", ".join(f"{t} {n} ({_share(n, s.prompt_tokens)})"
                                                      for t, n in zip(TIERS, cached))
                    + f"; recomputed {_share(s.prompt_tokens - sum(cached), s.prompt_tokens)}")
    service.add_row("TTFT p50 / p90 / p99", " / ".join(f"{1e3 * v:.0f} ms" for v in
                                                       (s.ttft_p50_seconds, s.ttft_p90_seconds, s.ttft_p99_seconds)))
    service.add_row("Redis memory", f"sessions {_bytes(s.session_redis_used_memory)}, blocks (T2) "
                                    f"{_bytes(s.blocks_redis_used_memory)} in {s.blocks_stored} keys")
    workers = Table(title="workers")
    for col in ("worker", "state", "running", "waiting", "loading", "T0 in use / cached / size", "T1 cached / size",
                "reused T0 / T1 / T2 tokens", "T2 put / get", "evicted T0 / T1"):
        workers.add_column(col, justify="right")
    for w in s.workers:
        if w.error:
            workers.add_row(w.worker_id, f"[red]{w.error}[/]", *[""] * 8)
            continue
        b = w.bytes_per_block
        workers.add_row(
            w.worker_id, "alive" if w.alive else "[red]engine stopped[/]", str(w.running), str(w.waiting),
            str(w.loading), f"{w.t0_in_use} / {w.t0_cached} / {w.t0_blocks} ({_bytes(w.t0_blocks * b)})",
            f"{w.t1_cached} / {w.t1_blocks} ({_bytes(w.t1_blocks * b)})",
            " / ".join(str(n) for n in w.loaded_tokens), f"{_bytes(w.t2_put_bytes)} / {_bytes(w.t2_get_bytes)}",
            f"{w.evicted_t0} / {w.evicted_t1}")
    return Group(service, workers)


def run_stats(address: str, api_key: str = "", watch_s: float = 0.0) -> int:
    """Print the service's stats once, or every ``watch_s`` seconds until Ctrl-C."""
    console = Console()
    with SessionClient(address, api_key=api_key) as kv:
        if not watch_s:
            console.print(render(kv.get_stats()))
            return 0
        with Live(render(kv.get_stats()), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(watch_s)
                live.update(render(kv.get_stats()), refresh=True)
