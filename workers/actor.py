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
import secrets
import threading
from collections import deque
from dataclasses import asdict, dataclass

import ray

from kvstore.blockstore_client import BlockStoreClient
from kvstore.cache import BlockEvent, TieredKVCache
from kvstore.config import BlockStoreClientConfig, CacheConfig
from kvstore.hashing import PrefixHasher
from workers.engine import Engine, EngineConfig, Sequence, Status, hashed_prefix
from workers.loader import builtin_model, kv_spec, load_checkpoint
from workers.sampling import SamplingParams
from workers.tokenizer import load_tokenizer

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
        # A fresh id per incarnation: after a restart (max_restarts) the router sees a new one
        # and drops what it believed this worker held.
        self.incarnation = secrets.token_hex(8)
        if os.path.isdir(config.model):
            model_config, model, digest = load_checkpoint(config.model, dtype=config.dtype)
            tokenizer = load_tokenizer(config.model)
        else:
            model_config, model, digest = builtin_model(config.model, dtype=config.dtype)
            tokenizer = load_tokenizer(None, model_config.vocab_size)
        spec = kv_spec(model_config, config.model, digest, config.block_size)
        self.spec = spec
        self.model_config = model_config
        remote = BlockStoreClient(config.blockstore) if config.blockstore else None
        # Bounded: a router that stops draining loses old events, not the worker's memory.
        self._events: deque[BlockEvent] = deque(maxlen=1 << 20)
        self.cache = TieredKVCache(spec, config.cache or CacheConfig(), remote=remote,
                                   on_block_event=self._events.append)
        self.engine = Engine(model, self.cache, config.engine, eos_token_ids=model_config.eos_token_ids,
                             detokenize=tokenizer.decode)
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stopping = False
        self.aborted = 0  # streams cancelled by their callers
        self._thread = threading.Thread(target=self._run, name=f"engine-{worker_id}", daemon=True)
        self._thread.start()

    # ---- API ------------------------------------------------------------------------------

    async def generate(self, prompt: list[int], params: dict | None = None, namespace: str = "default",
                       skip_cache: bool = False):
        """Stream the tokens of one request, then a final dict with usage and finish reason
        (``finish_reason == "error"`` and ``error`` for a request the engine refused)."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        try:
            sampling = SamplingParams(**(params or {}))
        except (TypeError, ValueError) as e:
            yield {"finish_reason": "error", "error": str(e), "usage": None, "worker_id": self.worker_id}
            return
        box: dict = {}  # the engine thread puts the request's Sequence here
        self._inbox.put(("add", prompt, sampling, namespace, loop, tokens, box, skip_cache))
        self._wake.set()
        ended = False
        try:
            while True:
                item = await tokens.get()
                if isinstance(item, dict):
                    ended = True
                    yield item
                    return
                yield item
        finally:
            if not ended:
                # The caller went away: free the request's slot and blocks. Sent even if the
                # engine thread has not added the request yet: the inbox is FIFO, so the abort
                # finds the sequence in ``box`` once the add ran.
                self._inbox.put(("abort", box))
                self._wake.set()

    def shutdown(self) -> None:
        """Stop the engine thread and flush background copies (blocks reach T2)."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.cache.close()

    async def prefetch(self, prompt: list[int], namespace: str = "default") -> int:
        """Warm the cached prefix of ``prompt`` into this worker (from T1/T2 into T0, unpinned,
        so it is also in T1); returns the tokens of it now held here."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        self._inbox.put(("prefetch", prompt, namespace, loop, done))
        self._wake.set()
        return await done

    def prefer(self, prompt: list[int], namespace: str, ttl_s: float) -> None:
        """Keep the blocks of ``prompt`` (a pinned session's history) in T0/T1 longest."""
        self.cache.prefer(self._prefix(prompt, namespace).hashes, ttl_s)

    def _prefix(self, tokens: list[int], namespace: str) -> PrefixHasher:
        return hashed_prefix(self.spec.fingerprint, namespace, self.spec.block_size, tokens)

    def flush(self) -> None:
        """Wait until blocks committed so far reached the lower tiers (T1, T2)."""
        self.cache.flush()

    def block_events(self) -> tuple[str, list[tuple[int, bool, bytes]]]:
        """This incarnation's id and the (tier, stored?, block hash) events since the last
        call, for the router."""
        out = []
        while self._events:
            e = self._events.popleft()
            out.append((int(e.tier), e.stored, e.block_hash))
        return self.incarnation, out

    def info(self) -> dict:
        """What the session service needs to compute this worker's prefix hashes and limits."""
        return {"worker_id": self.worker_id, "incarnation": self.incarnation, "model": self.spec.model_id,
                "fingerprint": self.spec.fingerprint, "block_size": self.spec.block_size,
                "vocab_size": self.model_config.vocab_size,
                "max_context": self.model_config.max_position_embeddings,
                "eos_token_ids": list(self.model_config.eos_token_ids)}

    def health(self) -> dict:
        return {"worker_id": self.worker_id, "alive": self._thread.is_alive(), "pid": os.getpid(),
                "incarnation": self.incarnation}

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
                outputs = []  # still send the final records of what it finished (its errors)
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
                seq = msg[1].get("seq")  # None: the add was refused (its caller had the error)
                if seq is not None and seq.status is not Status.FINISHED:
                    self.engine.abort(seq)
                    self.aborted += 1
                continue
            if msg[0] == "prefetch":
                self._prefetch(*msg[1:])
                continue
            _, prompt, sampling, namespace, loop, q, box, skip_cache = msg
            try:
                seq = self.engine.add_request(prompt, sampling, namespace, skip_cache)
            except ValueError as e:
                loop.call_soon_threadsafe(q.put_nowait, {"finish_reason": "error", "error": str(e), "usage": None,
                                                         "worker_id": self.worker_id})
                continue
            box["seq"] = seq
            streams[seq.id] = (loop, q, seq)

    def _prefetch(self, prompt: list[int], namespace: str, loop: asyncio.AbstractEventLoop,
                  done: asyncio.Future) -> None:
        try:
            prefix = self._prefix(prompt, namespace)
            loaded = self.cache.load(prefix, self.cache.lookup(prefix))
            self.cache.release(loaded.block_table)
            result: int | BaseException = loaded.num_tokens
        except Exception as e:  # noqa: BLE001 - reported to the caller, the engine goes on
            log.exception("prefetch failed")
            result = e
        loop.call_soon_threadsafe(_settle, done, result)


def _settle(future: asyncio.Future, result) -> None:
    if future.done():  # the caller gave up
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def remote_worker_class(num_gpus: float = 0, num_cpus: float = 1, max_restarts: int = 3):
    """``DecodeWorker`` as a Ray actor class: one per GPU when ``num_gpus``, else a CPU slot."""
    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts,
                      max_task_retries=0)(DecodeWorker)
