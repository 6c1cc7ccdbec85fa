"""``DecodeWorker``: a Ray actor serving one engine (one GPU, or a slot of CPU cores).

The engine is synchronous and batches every running request, so it runs in one thread of
the actor; the actor's asyncio loop takes requests and streams each one's tokens back as
they are produced (Ray streaming generators). Cancelling a stream aborts its sequence and
frees its blocks. What crosses the Ray boundary and the thread boundary is a dataclass.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import secrets
import threading
from dataclasses import dataclass, field

import ray

from kvstore.blockstore_client import BlockStoreClient, BlockStoreClientConfig
from kvstore.cache import BlockEvent, CacheConfig, CacheStats, TieredKVCache
from kvstore.hashing import PrefixHasher
from workers.block_events import BlockEventLog, EventCursor
from workers.engine import Engine, EngineConfig, EngineStats, FinishReason, Sequence, Status, Usage
from workers.loadcost import LoadRates
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


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """One generation for a worker: the whole prompt (history + new input) as token ids."""

    prompt: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    namespace: str = "default"
    skip_cache: bool = False  # compute the whole prompt (measures what reuse saves)


@dataclass(slots=True)
class GenerateEnd:
    """The record that ends a generation's stream, after its tokens."""

    finish_reason: FinishReason
    worker_id: str
    usage: Usage = field(default_factory=Usage)  # of the attempt that finished it
    error: str = ""  # with FinishReason.ERROR: why the engine refused or failed the request
    failovers: int = 0  # workers lost on the way (counted by the session service's pool)
    incarnation: str = ""  # of the worker that finished it (a session's next turn is best routed there)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What the session service needs to name a worker's blocks and check its limits."""

    worker_id: str
    incarnation: str
    model: str
    fingerprint: bytes
    block_size: int
    vocab_size: int
    max_context: int
    eos_token_ids: tuple[int, ...]
    max_num_seqs: int  # sequences its engine runs at once (more wait in its queue)
    bytes_per_block: int  # raw KV bytes of one block (what a load moves, at the rates' bytes/s)


@dataclass(slots=True)
class BlockEvents:
    """A worker's block events from a reader's cursor on, stamped with its incarnation (a
    worker Ray restarted has a new one, and an empty cache), with its current load/prefill
    rates and load (the router's cost estimate; carried by this poll so that it needs no other)."""

    incarnation: str
    events: list[BlockEvent]
    rates: LoadRates
    cursor: EventCursor  # where the reader's next call starts
    snapshot: bool  # ``events`` are every block its T0/T1 hold: the reader replaces what it knew
    load: int  # sequences running, waiting or loading in its engine (from every replica)


@dataclass(slots=True)
class DroppedBlocks:
    """A worker's blocks of one namespace forgotten by an admin flush, per tier."""

    worker_id: str
    t0: int
    t1: int


@dataclass(slots=True)
class WorkerStats:
    worker_id: str
    alive: bool  # the engine thread runs
    running: int
    waiting: int
    aborted: int  # streams cancelled by their callers
    loading: int  # requests whose cached prefix is on the way into T0
    engine: EngineStats  # preemptions, loads, step/batch/load histograms, tokens, the load-or-recompute rates
    cache: CacheStats


@dataclass(slots=True)
class _Stream:
    """A generation between the actor's event loop and the engine thread."""

    request: GenerateRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue  # token ids, then one GenerateEnd
    seq: Sequence | None = None  # set by the engine thread once it took the request

    def send(self, item: int | GenerateEnd) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


@dataclass(slots=True)
class _Abort:
    stream: _Stream


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
        cache_config = config.cache or CacheConfig()
        self.spec = kv_spec(model_config, config.model, digest, config.block_size, cache_config.codec)
        self.model_config = model_config
        remote = BlockStoreClient(config.blockstore) if config.blockstore else None
        self._events = BlockEventLog()
        self.cache = TieredKVCache(self.spec, cache_config, remote=remote, on_block_event=self._events.append)
        self._wake = threading.Event()  # a message came in, or a prefix load completed
        self.engine = Engine(model, self.cache, config.engine, eos_token_ids=model_config.eos_token_ids,
                             detokenize=tokenizer.decode, wakeup=self._wake)
        self._inbox: queue.Queue[_Stream | _Abort] = queue.Queue()
        self._stopping = False
        self.aborted = 0
        self._thread = threading.Thread(target=self._run, name=f"engine-{worker_id}", daemon=True)
        self._thread.start()

    # ---- API ------------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest):
        """Stream the token ids of one request, then a ``GenerateEnd``."""
        stream = _Stream(request, asyncio.get_running_loop(), asyncio.Queue())
        self._post(stream)
        ended = False
        try:
            while True:
                item = await stream.out.get()
                ended = isinstance(item, GenerateEnd)
                yield item
                if ended:
                    return
        finally:
            if not ended:
                # The caller went away: free the request's slot and blocks. Sent even if the
                # engine thread has not taken the request yet: the inbox is FIFO, so the abort
                # finds ``stream.seq`` set once the request was taken.
                self._post(_Abort(stream))

    def shutdown(self) -> None:
        """Stop the engine thread and flush background copies (blocks reach T2)."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.cache.close()

    async def prefetch(self, prompt: list[int], namespace: str = "default") -> int:
        """Warm the cached prefix of ``prompt`` into this worker (from T1/T2 into T0, released after,
        so it is also in T1); returns the tokens of it now held here. Runs beside the engine
        thread (the cache is thread-safe), so decoding goes on meanwhile."""
        return await asyncio.to_thread(self._prefetch, self._prefix(prompt, namespace))

    def prefer(self, prompt: list[int], namespace: str, ttl_s: float) -> None:
        """Keep the blocks of ``prompt`` (a pinned session's history) in T0/T1 longest."""
        self.cache.prefer(self._prefix(prompt, namespace).hashes, ttl_s)

    def flush(self) -> None:
        """Wait until blocks committed so far reached the lower tiers (T1, T2)."""
        self.cache.flush()

    async def drop_namespace(self, namespace: str) -> DroppedBlocks:
        """Forget ``namespace``'s blocks in T0 and T1, after the copies in flight land (so
        that its T2 blocks can be deleted next without one being written back)."""
        def drop() -> DroppedBlocks:
            self.cache.flush()
            return DroppedBlocks(self.worker_id, *self.cache.drop_namespace(namespace))
        return await asyncio.to_thread(drop)

    def block_events(self, cursor: EventCursor | None = None) -> BlockEvents:
        """The events from ``cursor`` (the last call's ``BlockEvents.cursor``) on, or a
        snapshot when they are no longer all kept, or ``cursor`` is None or of another
        incarnation: for a router."""
        events, end = self._events.read(cursor.position if cursor and cursor.incarnation == self.incarnation else None)
        snapshot = events is None
        if snapshot:
            events = self.cache.held_blocks()  # after taking ``end``: events from there replay over it safely
        e = self.engine
        return BlockEvents(self.incarnation, events, e.rates.snapshot(), EventCursor(self.incarnation, end), snapshot,
                           len(e.running) + len(e.waiting) + len(e.loading))

    def info(self) -> WorkerInfo:
        c = self.model_config
        return WorkerInfo(self.worker_id, self.incarnation, self.spec.model_id, self.spec.fingerprint,
                          self.spec.block_size, c.vocab_size, c.max_position_embeddings, tuple(c.eos_token_ids),
                          self.engine.config.max_num_seqs, self.spec.bytes_per_block)

    def stats(self) -> WorkerStats:
        e = self.engine
        return WorkerStats(self.worker_id, self._thread.is_alive(), len(e.running), len(e.waiting), self.aborted,
                           len(e.loading), e.stats(), self.cache.stats())

    def _prefix(self, tokens: list[int], namespace: str) -> PrefixHasher:
        return PrefixHasher.for_namespace(self.spec.fingerprint, namespace, self.spec.block_size, tokens)

    def _post(self, message: _Stream | _Abort) -> None:
        self._inbox.put(message)
        self._wake.set()

    # ---- engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        streams: dict[int, _Stream] = {}  # by sequence id
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
                streams[out.seq.id].send(out.token)
            for sid, stream in list(streams.items()):
                seq = stream.seq
                if seq.status is Status.FINISHED:
                    stream.send(GenerateEnd(seq.finish_reason, self.worker_id, seq.usage, seq.error or "",
                                            incarnation=self.incarnation))
                    del streams[sid]

    def _drain_inbox(self, streams: dict[int, _Stream]) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, _Abort):
                seq = msg.stream.seq  # None: the request was refused (its caller had the error)
                if seq is not None and seq.status is not Status.FINISHED:
                    self.engine.abort(seq)
                    self.aborted += 1
            else:
                r = msg.request
                try:
                    msg.seq = self.engine.add_request(r.prompt, r.sampling, r.namespace, r.skip_cache)
                except ValueError as e:
                    msg.send(GenerateEnd(FinishReason.ERROR, self.worker_id, error=str(e)))
                    continue
                streams[msg.seq.id] = msg

    def _prefetch(self, prefix: PrefixHasher) -> int:
        loaded = self.cache.load(prefix, self.cache.lookup(prefix))
        self.cache.release(loaded.block_table)
        return loaded.num_tokens


def remote_worker_class(num_gpus: float = 0, num_cpus: float = 1, max_restarts: int = 3):
    """``DecodeWorker`` as a Ray actor class: one per GPU when ``num_gpus``, else a CPU slot."""
    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts,
                      max_task_retries=0)(DecodeWorker)
