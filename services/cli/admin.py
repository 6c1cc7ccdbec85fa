"""``kvstore admin``: operate a running service with an admin key (namespace '*').

    kvstore admin drain w1 [--timeout 60]   # finish w1's generations, route nothing new to it, stop it
    kvstore admin flush NAMESPACE           # forget the namespace's blocks in every tier
    kvstore admin sessions NAMESPACE [--close]  # list (and close) the namespace's sessions
"""
from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from kvstore.client import SessionClient
from services.cli.stats import TIERS


def run_admin(address: str, api_key: str, action: str, target: str, timeout_s: float = 60.0,
              close: bool = False, limit: int = 1000) -> int:
    console = Console()
    with SessionClient(address, api_key=api_key) as kv:
        if action == "drain":
            with console.status(f"draining {target}: its generations finish, nothing new goes to it"):
                done = kv.drain_worker(target, timeout_s)
            console.print(f"worker {done.worker_id} stopped after {done.seconds:.1f} s; "
                          f"{done.moved_generations} generations still running at the deadline resumed elsewhere")
        elif action == "flush":
            dropped = kv.flush_namespace(target).blocks_dropped
            console.print(f"namespace {target!r}: dropped " + ", ".join(f"{n} {t}" for t, n in zip(TIERS, dropped))
                          + " blocks")
        elif action == "sessions":
            sessions = kv.list_sessions(target, limit)
            table = Table(title=f"{len(sessions)} sessions of {target!r}" + (" (closing them)" if close else ""))
            for col in ("session", "tokens", "updated", "pinned", "closed"):
                table.add_column(col)
            for s in sessions:
                closed = s.closed or (close and kv.close_session(s.session_id).closed)
                table.add_row(s.session_id, str(s.num_tokens), time.strftime("%F %T", time.localtime(s.updated)),
                              "yes" if s.pinned_until > time.time() else "", "yes" if closed else "")
            console.print(table)
    return 0
