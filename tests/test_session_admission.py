"""Fair admission of generations (one event loop, no servers): capacity, the bounded queue,
fewest-running-first between namespaces, FIFO within one, per-namespace limits, a full queue
making room for a namespace holding less, timeouts and cancellation."""
import asyncio

import pytest

from services.session.admission import Admission, AdmissionRejected


class Run:
    """Generations holding slots until released; records the order they started in."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.started: list[str] = []
        self._release: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task] = {}

    def start(self, name: str, namespace: str, timeout_s: float = 30.0) -> asyncio.Task:
        self._release[name] = asyncio.Event()

        async def generation():
            async with self.admission.slot(namespace, timeout_s):
                self.started.append(name)
                await self._release[name].wait()
        self.tasks[name] = asyncio.create_task(generation())
        return self.tasks[name]

    async def finish(self, name: str) -> None:
        self._release[name].set()
        await self.tasks[name]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_slots_go_to_the_namespace_running_the_fewest_fifo_within_one():
    async def scenario():
        run = Run(Admission(lambda: 2, max_queued=10))
        for i in range(4):
            run.start(f"a{i}", "a")
        await settle()
        assert run.started == ["a0", "a1"] and run.admission.queued == 2
        run.start("b0", "b")
        run.start("b1", "b")
        run.start("c0", "c")
        await settle()
        await run.finish("a0")  # a runs 1, b and c none: b's first (it came before c)
        await settle()
        assert run.started[2:] == ["b0"]
        await run.finish("a1")  # a, c none, b 1: a's next (it waited longer than c)
        await settle()
        assert run.started[3:] == ["a2"]
        await run.finish("b0")  # a 1, b and c none: b1 (before c0)
        await settle()
        assert run.started[4:] == ["b1"]
        assert (run.admission.running, run.admission.queued) == (2, 2)
    asyncio.run(scenario())


def test_a_namespace_limit_leaves_slots_to_the_others():
    async def scenario():
        run = Run(Admission(lambda: 4, max_queued=10, per_namespace=2))
        for i in range(3):
            run.start(f"a{i}", "a")
        run.start("b0", "b")
        await settle()
        assert run.started == ["a0", "a1", "b0"] and run.admission.queued == 1  # a2 waits for a's own slot
        await run.finish("b0")
        await settle()
        assert run.started == ["a0", "a1", "b0"]
        await run.finish("a0")
        await settle()
        assert run.started[-1] == "a2"
    asyncio.run(scenario())


def test_a_full_queue_refuses_or_makes_room_for_a_namespace_holding_less():
    async def scenario():
        run = Run(Admission(lambda: 2, max_queued=3))
        for i in range(5):
            run.start(f"a{i}", "a")
        await settle()
        refused = run.start("a5", "a")  # a holds everything already: no room for more of it
        await settle()
        with pytest.raises(AdmissionRejected, match="max_queued_generations=3"):
            await refused
        run.start("b0", "b")  # b holds nothing: a's newest waiter gives its place
        await settle()
        with pytest.raises(AdmissionRejected, match="gave its place"):
            await run.tasks["a4"]
        await run.finish("a0")
        await settle()
        assert run.started == ["a0", "a1", "b0"]  # b runs next (a still runs one), before a's waiters
    asyncio.run(scenario())


def test_a_waiter_times_out_or_leaves_when_cancelled_and_capacity_is_reread():
    async def scenario():
        capacity = [1]
        run = Run(Admission(lambda: capacity[0], max_queued=1))
        run.start("a0", "a")
        late = run.start("a1", "a", timeout_s=0.2)
        with pytest.raises(AdmissionRejected, match="freed within"):
            await late
        assert run.admission.queued == 0
        cancelled = run.start("a2", "a")
        await settle()
        cancelled.cancel()
        await settle()
        assert run.admission.queued == 0  # its place is free again
        run.start("a3", "a")
        await settle()
        capacity[0] = 2  # e.g. a worker joined: the waiter notices within its recheck period
        await asyncio.wait_for(asyncio.shield(_started(run, "a3")), 2)
        await run.finish("a0")
        await run.finish("a3")
        assert (run.admission.running, run.admission.queued) == (0, 0)
    asyncio.run(scenario())


async def _started(run: Run, name: str) -> None:
    while name not in run.started:
        await asyncio.sleep(0.01)
