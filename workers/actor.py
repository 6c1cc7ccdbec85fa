"""``DecodeWorker``: a Ray actor serving one engine (one GPU, or a slot of CPU cores).

The engine is synchronous and batches every running request, so it runs in one thread of
the actor; the actor's asyncio loop takes requests and streams each one's tokens back as
they are produced (Ray streaming generators). Cancelling a stream aborts its sequence and
frees its blocks.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections import deque
from dataclasses import asdict, dataclass

import ray

from kvstore.blockstore_client import BlockStoreClient
from kvstore.cache import BlockEvent, TieredKVCache
from kvstore.config import BlockStoreClientConfig, CacheConfig
from workers.engine import Engine, EngineConfig, Sequence, Status
from workers.loader import builtin_model, kv_spec, load_checkpoint
from workers.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerConfig:
    """What a worker serves and where its cold tier is."""

    model: str = "tiny"  # a built-in model name, or a Hugging Face checkpoint directory
    dtype: str | None = None
    block_size: int = 16
    cache: CacheConfig | None = None
    blockstore: BlockStoreClientConfig | None = None  # None: no T2
    engine: EngineConfig | None = None
    threads: int = 0  # torch threads; 0 = torch's default


class DecodeWorker:
    """Wraps an ``Engine``; create with ``DecodeWorker.options(...).remote(worker_id, config)``
    through ``ray.remote`` (see ``remote_worker_class``)."""

    def __init__(self, worker_id: str, config: WorkerConfig) -> None:
        import torch

        if config.threads:
            torch.set_num_threads(config.threads)
        self.worker_id = worker_id
        if os.path.isdir(config.model):
            model_config, model, digest = load_checkpoint(config.model, dtype=config.dtype)
        else:
            model_config, model, digest = builtin_model(config.model, dtype=config.dtype)
        spec = kv_spec(model_config, config.model, digest, config.block_size)
        remote = BlockStoreClient(config.blockstore) if config.blockstore else None
        # Bounded: a router that stops draining loses old events, not the worker's memory.
        self._events: deque[BlockEvent] = deque(maxlen=1 << 20)
        self.cache = TieredKVCache(spec, config.cache or CacheConfig(), remote=remote,
                                   on_block_event=self._events.append)
        self.engine = Engine(model, self.cache, config.engine, eos_token_ids=model_config.eos_token_ids)
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stopping = False
        self.aborted = 0  # streams cancelled by their callers
        self._thread = threading.Thread(target=self._run, name=f"engine-{worker_id}", daemon=True)
        self._thread.start()

    # ---- API ------------------------------------------------------------------------------

    async def generate(self, prompt: list[int], params: dict | None = None, namespace: str = "default"):
        """Stream the tokens of one request, then a final dict with usage and finish reason."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        sampling = SamplingParams(**(params or {}))
        box: dict = {}
        self._inbox.put(("add", prompt, sampling, namespace, loop, tokens, box))
        self._wake.set()
        try:
            while True:
                item = await tokens.get()
                if isinstance(item, dict):
                    yield item
                    return
                yield item
        finally:
            if "seq" in box and box["seq"].status is not Status.FINISHED:
                self._inbox.put(("abort", box["seq"]))  # the caller went away: free its blocks
                self._wake.set()

    def shutdown(self) -> None:
        """Stop the engine thread and flush background copies (blocks reach T2)."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.cache.close()

    def block_events(self) -> list[tuple[int, bool, bytes]]:
        """Drain (tier, stored?, block hash) events since the last call, for the router."""
        out = []
        while self._events:
            e = self._events.popleft()
            out.append((int(e.tier), e.stored, e.block_hash))
        return out

    def health(self) -> dict:
        return {"worker_id": self.worker_id, "alive": self._thread.is_alive(), "pid": os.getpid()}

    def stats(self) -> dict:
        return {"worker_id": self.worker_id, "running": len(self.engine.running),
                "waiting": len(self.engine.waiting), "aborted": self.aborted,
                "cache": asdict(self.cache.stats())}

    # ---- engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue, Sequence]] = {}
        while not self._stopping:
            self._drain_inbox(streams)
            if not self.engine.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception:  # keep serving the other requests
                log.exception("engine step failed")
                continue
            for out in outputs:
                loop, q, seq = streams[out.seq.id]
                loop.call_soon_threadsafe(q.put_nowait, out.token)
            for sid, (loop, q, seq) in list(streams.items()):
                if seq.status is Status.FINISHED:
                    usage = asdict(seq.usage)
                    final = {"finish_reason": seq.finish_reason, "error": seq.error, "usage": usage,
                             "worker_id": self.worker_id}
                    loop.call_soon_threadsafe(q.put_nowait, final)
                    del streams[sid]

    def _drain_inbox(self, streams: dict) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "abort":
                self.engine.abort(msg[1])
                self.aborted += 1
                continue
            _, prompt, sampling, namespace, loop, q, box = msg
            try:
                seq = self.engine.add_request(prompt, sampling, namespace)
            except ValueError as e:
                loop.call_soon_threadsafe(q.put_nowait, {"finish_reason": "error", "error": str(e), "usage": None,
                                                         "worker_id": self.worker_id})
                continue
            box["seq"] = seq
            streams[seq.id] = (loop, q, seq)


def remote_worker_class(num_gpus: float = 0, num_cpus: float = 1, max_restarts: int = 3):
    """``DecodeWorker`` as a Ray actor class: one per GPU when ``num_gpus``, else a CPU slot."""
    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts,
                      max_task_retries=0)(DecodeWorker)
