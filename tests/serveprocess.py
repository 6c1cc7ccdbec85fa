"""`kvstore serve` as a real process for tests: started, its address read from what it
prints, its process tree, and a clean stop."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Served:
    """One `kvstore serve` process and what it printed."""
    proc: subprocess.Popen
    address: str
    blockstore: str
    data_dir: Path
    log: Path  # its stderr
    banner: str  # the line saying where it serves
    output: list[str] = field(default_factory=list)  # its stdout after the banner
    _reader: threading.Thread | None = None

    def tree(self) -> dict[int, str]:
        """pid -> command line of serve and every process under it."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
                children.setdefault(ppid, []).append(int(entry))
        found, todo = {}, [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            todo += children.get(pid, [])
        return found

    def pid_of(self, match) -> int:
        (pid,) = [pid for pid, cmd in self.tree().items() if match(pid, cmd)]
        return pid

    def session_redis(self) -> int:
        return self.pid_of(lambda pid, cmd: "redis-server" in cmd and _cwd(pid) == self.data_dir / "session-redis")

    def blocks_redis(self) -> int:
        return self.pid_of(lambda pid, cmd: "redis-server" in cmd and _cwd(pid) != self.data_dir / "session-redis")

    def blockstore_pid(self) -> int:
        return self.pid_of(lambda pid, cmd: "-m services.blockstore" in cmd)

    def health(self) -> int | None:
        with grpc.insecure_channel(self.address) as ch:
            try:
                return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
            except grpc.RpcError:
                return None


def _cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None




def start_serve(tmp: Path, *flags: str, env: dict[str, str] | None = None, api_keys: str = "",
                always_load: bool = False) -> Served:
    """``kvstore serve`` with the tiny model, one worker, a free port and its data in ``tmp``.
    ``always_load``: workers load every cached block, for tests of the T2 path (by cost, the
    tiny model may recompute a short T2 prefix faster than it loads)."""
    env = {**(env or {}), **({"KVSTORE_SERVE_API_KEYS": api_keys} if api_keys else {}),
           **({"KVSTORE_SERVE_COST_AWARE": "false"} if always_load else {})}
    log = tmp / "serve.log"
    cmd = [sys.executable, "-m", "services.cli.main", "--log-level", "info", "serve", "--model", "tiny",
           "--workers", "1", "--port", "0",
           "--data-dir", str(tmp / "data"), *flags]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, **env})
    for line in proc.stdout:
        if "serving sessions on" in line:
            served = Served(proc, line.split("serving sessions on", 1)[1].split()[0],
                            line.split("block store", 1)[1].split(";")[0].strip(), tmp / "data", log, line)
            # Keep reading its stdout so the pipe never fills up and blocks it.
            served._reader = threading.Thread(target=served.output.extend, args=(proc.stdout,), daemon=True)
            served._reader.start()
            return served
    proc.wait()
    raise AssertionError(f"kvstore serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")


def stop_serve(served: Served, sig: signal.Signals = signal.SIGTERM) -> str:
    """Stop it with ``sig``; it must exit 0. Returns what it printed after its banner."""
    served.proc.send_signal(sig)
    try:
        try:
            code = served.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"kvstore serve did not stop within 60 s:\n{served.log.read_text()[-3000:]}") from None
        assert code == 0, served.log.read_text()[-3000:]
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait()
    served._reader.join(timeout=10)
    return "".join(served.output)
