"""``WorkerPool``: the session service's view of its Ray decode workers.

It starts (or re-attaches to) the ``DecodeWorker`` actors, keeps the ``Router``'s picture of
what each worker caches fresh by reading their block events (each pool with its own cursor:
``shared`` workers serve several session-service replicas, each with the same picture), and
runs generations on the worker the router picks. When a worker dies mid-generation, the generation resumes on
another worker from the tokens already streamed (its prompt's KV comes back from T2), so the
caller sees one uninterrupted stream; a worker that comes back (Ray restarts it) rejoins
from a snapshot of its (empty) tiers.

Everything here runs on the session service's event loop (the router is not thread-safe).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from kvstore.hashing import PrefixHasher
from services.session.events import KVEventHub
from services.session.router import Affinity, NoWorkerError, Route, Router, RouterConfig
from workers.actor import DroppedBlocks, GenerateEnd, GenerateRequest, WorkerConfig, WorkerInfo, remote_worker_class
from workers.block_events import EventCursor
from workers.engine import FinishReason, Usage

log = logging.getLogger(__name__)

RAY_NAMESPACE = "kvstore"


class WorkerLostError(RuntimeError):
    """A generation lost its worker more times than ``PoolConfig.max_failovers`` allows."""


class UnknownWorkerError(LookupError):
    """No worker of that id in this pool."""


class DrainingError(ValueError):
    """A worker cannot be drained now (already draining, or the last one)."""


class GenerationError(ValueError):
    """The worker refused the request (bad sampling parameters, prompt too long, ...)."""


@dataclass(slots=True)
class PoolConfig:
    """How many decode workers, what they serve, and how they are placed."""

    num_workers: int = 2
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    cpus_per_worker: float = 1.0  # CPU slots per worker without GPUs (also its torch threads)
    use_gpus: bool | None = None  # None: one GPU per worker when the cluster has GPUs
    # Extra Ray resources per worker (e.g. {"node:10.0.0.2": 0.01}) to place them on nodes;
    # one dict per worker, or empty for Ray's default (spread) placement.
    worker_resources: list[dict[str, float]] = field(default_factory=list)
    max_restarts: int = 3  # Ray restarts a crashed worker this many times
    max_failovers: int = 2  # workers a generation may lose before it fails
    poll_interval_s: float = 0.1  # block-event and health polling period
    call_timeout_s: float = 10.0  # a worker not answering a poll within this is taken out
    name_prefix: str = "kvstore-worker"
    # Detached workers that outlive this process, for several session-service replicas on one
    # Ray cluster: each attaches to them by name and none stops them on exit (drain does).
    shared: bool = False
    router: RouterConfig = field(default_factory=RouterConfig)


@dataclass(slots=True)
class _Worker:
    worker_id: str
    handle: ray.actor.ActorHandle
    max_seqs: int = 0  # sequences it runs at once (WorkerInfo.max_num_seqs)
    incarnation: str = ""
    cursor: EventCursor | None = None  # where the next poll reads its block events (None: a snapshot)
    live: bool = False
    draining: bool = False  # routed nothing new; stopped once its streams end
    streams: int = 0  # generations running on it
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while streams == 0


@dataclass(slots=True)
class DrainResult:
    """What draining a worker did."""

    worker_id: str
    seconds: float  # until it stopped
    moved_streams: int  # still running at the deadline: they resumed on other workers


class WorkerPool:
    """Start with ``await pool.start()``; ``await pool.close()`` stops polling and the workers."""

    def __init__(self, config: PoolConfig | None = None) -> None:
        self.config = config or PoolConfig()
        if self.config.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.config.num_workers}")
        if self.config.worker_resources and len(self.config.worker_resources) != self.config.num_workers:
            raise ValueError(f"worker_resources has {len(self.config.worker_resources)} entries for "
                             f"{self.config.num_workers} workers")
        self.router = Router(self.config.router)
        self.events = KVEventHub()  # the workers' block events, for SubscribeKVEvents
        self.info: WorkerInfo | None = None  # the model's facts (fingerprint, block size, vocab, context)
        self._workers: dict[str, _Worker] = {}
        self._poller: asyncio.Task | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the workers (or re-attach to live ones of the same names) and wait until each answers."""
        cfg = self.config
        gpus = cfg.use_gpus if cfg.use_gpus is not None else ray.cluster_resources().get("GPU", 0) >= 1
        worker_cfg = cfg.worker
        if not gpus and not worker_cfg.threads:
            worker_cfg = dataclasses.replace(worker_cfg, threads=max(1, int(cfg.cpus_per_worker)))
        cls = remote_worker_class(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else cfg.cpus_per_worker,
                                  max_restarts=cfg.max_restarts)
        for i in range(cfg.num_workers):
            worker_id = f"w{i}"
            options = {"name": f"{cfg.name_prefix}-{i}", "namespace": RAY_NAMESPACE, "get_if_exists": True}
            if cfg.shared:
                options["lifetime"] = "detached"
            if cfg.worker_resources:
                options["resources"] = cfg.worker_resources[i]
            handle = cls.options(**options).remote(worker_id, worker_cfg)
            self._workers[worker_id] = _Worker(worker_id, handle)
        infos = await asyncio.gather(*(w.handle.info.remote() for w in self._workers.values()))
        fingerprints = {i.fingerprint for i in infos}
        if len(fingerprints) != 1:
            raise RuntimeError("the workers serve different models (fingerprints differ)")
        self.info = infos[0]
        self.router.block_size, self.router.bytes_per_block = self.info.block_size, self.info.bytes_per_block
        for w, info in zip(self._workers.values(), infos):
            w.max_seqs = info.max_num_seqs
            self._join(w, info.incarnation)
        self._poller = asyncio.create_task(self._poll_loop(), name="worker-pool-poll")
        log.info("%d %sdecode workers ready (%s, %s)", len(self._workers), "shared " if cfg.shared else "",
                 self.info.model, "GPU" if gpus else f"{cfg.cpus_per_worker:g} CPU each")

    async def close(self) -> None:
        """Stop polling; flush and stop the workers too, unless they are shared."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if not self.config.shared:  # all at once: each may spend call_timeout_s flushing to T2
            await asyncio.gather(*(self._stop_worker(w) for w in self._workers.values()))
            self._workers.clear()

    async def _stop_worker(self, w: _Worker) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(w.handle.shutdown.remote(), self.config.call_timeout_s)
        ray.kill(w.handle, no_restart=True)

    @property
    def worker_ids(self) -> list[str]:
        return sorted(self._workers)

    @property
    def live_worker_ids(self) -> list[str]:
        return sorted(w.worker_id for w in self._workers.values() if w.live)

    @property
    def capacity(self) -> int:
        """Sequences the live workers run at once: more generations than this would wait
        inside a worker without producing tokens."""
        return sum(w.max_seqs for w in self._workers.values() if w.live)

    def handle(self, worker_id: str) -> ray.actor.ActorHandle:
        return self._workers[worker_id].handle

    # ---- requests -------------------------------------------------------------------------

    def block_hashes(self, tokens: list[int], namespace: str) -> list[bytes]:
        return PrefixHasher.for_namespace(self.info.fingerprint, namespace, self.info.block_size, tokens).hashes

    def _route(self, tokens: list[int], namespace: str, affinity: Affinity | None,
               worker_id: str | None = None) -> Route:
        if worker_id is not None and self._workers[worker_id].live and not self._workers[worker_id].draining:
            return self.router.estimate(worker_id, self.block_hashes(tokens, namespace), len(tokens))
        # A session's affinity may decide without the prefix: then its history is not hashed.
        return self.router.route(len(tokens), lambda: self.block_hashes(tokens, namespace), affinity)

    async def generate(self, request: GenerateRequest, affinity: Affinity | None = None,
                       worker_id: str | None = None) -> AsyncIterator[int | GenerateEnd]:
        """Yield the generated token ids, then a ``GenerateEnd`` (its worker and incarnation:
        where the session's next turn is best routed). Resumes on another worker when the one
        running it dies (at most ``max_failovers`` times)."""
        if worker_id is not None and worker_id not in self._workers:
            raise NoWorkerError(f"unknown worker {worker_id!r}; workers: {', '.join(self.worker_ids)}")
        output: list[int] = []
        failovers = 0
        max_tokens = request.sampling.max_tokens
        while True:
            tokens = request.prompt + output
            route = self._route(tokens, request.namespace, affinity, worker_id)
            wid = route.worker_id
            attempt = dataclasses.replace(request, prompt=tokens, sampling=dataclasses.replace(
                request.sampling, max_tokens=max_tokens - len(output)))
            self.router.started(route)
            worker = self._workers[wid]
            stream = worker.handle.generate.remote(attempt)
            worker.streams += 1
            worker.idle.clear()
            try:
                async for ref in stream:
                    item = await ref
                    if isinstance(item, GenerateEnd):
                        break
                    if not route.prefilled:  # its first token: its prefill no longer queues others
                        self.router.prefilled(route)
                    output.append(item)
                    yield item
                else:
                    raise RayActorError()  # the stream ended without its final record
            except RayActorError as e:
                failovers += 1
                log.warning("worker %s lost during a generation (%d tokens streamed): %s", wid, len(output),
                            type(e).__name__)
                self._lose(wid)
                worker_id = None
                if len(output) >= max_tokens:
                    # It died after streaming the last token, before its final record: the
                    # generation is complete (a retry would ask for 0 tokens and be refused).
                    yield GenerateEnd(FinishReason.LENGTH, wid, Usage(len(request.prompt), len(output)),
                                      failovers=failovers)
                    return
                if failovers > self.config.max_failovers:
                    raise WorkerLostError(f"generation lost {failovers} workers; giving up") from e
                continue
            except (asyncio.CancelledError, GeneratorExit):
                ray.cancel(stream)  # the caller went away: free the worker's slot and blocks
                raise
            finally:
                self.router.finished(route)
                worker.streams -= 1
                if not worker.streams:
                    worker.idle.set()
            if item.finish_reason is FinishReason.ERROR:
                raise GenerationError(item.error)
            item.failovers = failovers  # its usage is the attempt's that finished (after a failover: the resumed one)
            yield item
            return

    async def prefetch(self, tokens: list[int], namespace: str, affinity: Affinity | None) -> Affinity:
        """Warm ``tokens``' cached prefix into the worker the session's next turn would use;
        returns that worker, as the session's new affinity (with the tokens it now holds)."""
        wid = self._route(tokens, namespace, affinity).worker_id
        worker = self._workers[wid]
        try:
            held = await asyncio.wait_for(worker.handle.prefetch.remote(tokens, namespace), self.config.call_timeout_s)
        except RayActorError:
            self._lose(wid)
            raise
        return Affinity(wid, worker.incarnation, held)

    async def prefer(self, tokens: list[int], namespace: str, ttl_s: float) -> None:
        """Ask every live worker to evict ``tokens``' blocks last (a pinned session's)."""
        calls = [w.handle.prefer.remote(tokens, namespace, ttl_s) for w in self._workers.values() if w.live]
        await asyncio.gather(*(asyncio.wait_for(c, self.config.call_timeout_s) for c in calls), return_exceptions=True)

    async def drop_namespace(self, namespace: str) -> list[DroppedBlocks]:
        """Every live worker forgets ``namespace``'s blocks in T0 and T1 (after its copies in
        flight land, so T2 can be flushed next)."""
        calls = [w.handle.drop_namespace.remote(namespace) for w in self._workers.values() if w.live]
        try:
            return list(await asyncio.gather(*(asyncio.wait_for(c, self.config.call_timeout_s) for c in calls)))
        except (asyncio.TimeoutError, RayActorError) as e:
            raise WorkerLostError(f"a worker did not drop the namespace's blocks within "
                                  f"{self.config.call_timeout_s:g} s ({type(e).__name__}); retry") from e

    async def drain(self, worker_id: str, timeout_s: float) -> DrainResult:
        """Route nothing new to ``worker_id``, let its generations finish (those still running
        after ``timeout_s`` resume on other workers), flush its blocks to T2 and stop it."""
        w = self._workers.get(worker_id)
        if w is None:
            raise UnknownWorkerError(f"unknown worker {worker_id!r}; workers: {', '.join(self.worker_ids) or 'none'}")
        if w.draining:
            raise DrainingError(f"worker {worker_id} is already being drained")
        if len(self.live_worker_ids) <= 1 and w.live:
            raise DrainingError(f"worker {worker_id} is the last live worker: nothing could serve after it")
        start = time.monotonic()
        w.draining = True
        self._lose(worker_id)
        if w.streams:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(w.idle.wait(), timeout_s)
        moved = w.streams
        await self._stop_worker(w)  # its running streams see RayActorError and fail over
        self._workers.pop(worker_id, None)
        log.warning("worker %s drained and stopped (%d generations moved)", worker_id, moved)
        return DrainResult(worker_id, time.monotonic() - start, moved)

    # ---- membership -----------------------------------------------------------------------

    def _join(self, w: _Worker, incarnation: str) -> None:
        """The worker answers (again): it is routed to; its next poll brings a snapshot of its
        blocks (``block_events`` returns one for a cursor of another incarnation)."""
        if w.incarnation and incarnation != w.incarnation:
            log.warning("worker %s restarted: dropping what it cached", w.worker_id)
            self.router.remove_worker(w.worker_id)
        self.router.add_worker(w.worker_id, w.max_seqs, incarnation)
        w.incarnation, w.live = incarnation, True

    def _lose(self, worker_id: str) -> None:
        w = self._workers.get(worker_id)
        if w is None or not w.live:
            return
        w.live, w.cursor = False, None  # back in service, it starts from a snapshot
        self.events.cleared(worker_id)
        self.router.remove_worker(worker_id)
        log.warning("worker %s out of service; its sessions move to other workers", worker_id)

    async def _poll_loop(self) -> None:
        while True:
            start = time.monotonic()
            await asyncio.gather(*(self._poll(w) for w in list(self._workers.values())))
            await asyncio.sleep(max(0.0, self.config.poll_interval_s - (time.monotonic() - start)))

    async def _poll(self, w: _Worker) -> None:
        """Drain a worker's block events; notice deaths, restarts and recoveries."""
        try:
            batch = await asyncio.wait_for(w.handle.block_events.remote(w.cursor), self.config.call_timeout_s)
        except (RayActorError, GetTimeoutError, asyncio.TimeoutError) as e:
            if w.live:
                log.warning("worker %s does not answer (%s)", w.worker_id, type(e).__name__)
            self._lose(w.worker_id)
            return
        except Exception:  # noqa: BLE001 - polling must go on
            log.exception("polling worker %s failed", w.worker_id)
            return
        if w.draining:
            return
        if not w.live and not batch.snapshot:  # lost while this poll ran: rejoin from a snapshot
            w.cursor = None
            return
        if not w.live or batch.incarnation != w.incarnation:
            self._join(w, batch.incarnation)
        w.cursor = batch.cursor
        self.router.apply_events(w.worker_id, batch.events, batch.rates, batch.snapshot, batch.load)
        if batch.snapshot:
            self.events.cleared(w.worker_id)  # what subscribers knew of it is replaced (no-op if nothing)
        self.events.publish(w.worker_id, batch.events)


__all__ = ["DrainResult", "DrainingError", "GenerationError", "NoWorkerError", "PoolConfig", "UnknownWorkerError",
           "WorkerLostError", "WorkerPool"]
