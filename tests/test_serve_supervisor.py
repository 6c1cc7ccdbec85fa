"""The supervisor of `kvstore serve` alone, with a fake child (the real processes are in
test_serve_processes.py)."""
import asyncio
import time

from prometheus_client import CollectorRegistry

from services.cli.supervisor import FIRST_DELAY_S, Supervisor


def test_a_dead_child_is_restarted_after_doubling_delays_and_counted():
    registry, attempts, up = CollectorRegistry(), [], []

    def restart() -> None:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise RuntimeError("port taken")
        up.append(True)

    async def run() -> None:
        supervisor = Supervisor(registry)
        supervisor.watch("thing", lambda: bool(up), restart)
        supervisor.start()
        while not up:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # alive now: no more restarts
        await supervisor.stop()

    asyncio.run(asyncio.wait_for(run(), 10))
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert len(attempts) == 3 and gaps[0] >= 2 * FIRST_DELAY_S * 0.9 and gaps[1] >= 1.8 * gaps[0], gaps
    assert registry.get_sample_value("kvstore_serve_restarts_total", {"process": "thing"}) == 1
