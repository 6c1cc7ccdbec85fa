"""The decode engine: continuous batching over the tiered KV cache.

A request's prompt is looked up in the ``TieredKVCache``; the cost model
(``workers.loadcost``) decides how much of the cached prefix to load; T0 slots for the whole
prompt are reserved and the prefix is loaded in the background (T2 -> T1 -> T0) while the
other sequences keep running; only the tokens after it are prefilled. Every block whose K/V
is complete is committed, so it becomes shareable (and is written down to T1/T2 per policy)
while the sequence is still running. Finished sequences release their blocks; cached blocks
stay for the next turn.

Scheduling (vLLM's chunked prefill): each step has a token budget; every decoding sequence's
next token comes first, then chunks of the prompts being prefilled fill the rest, so a long
prompt never stalls the decodes for longer than one step. When T0 is full, the newest
running sequence is preempted: it releases its blocks and goes back to the waiting queue,
from where it resumes by reloading its committed blocks instead of recomputing them.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from enum import Enum

import torch

from kvstore.cache import CacheFullError, PrefixLoad, Tier, TieredKVCache
from kvstore.hashing import PrefixHasher
from workers.histogram import Histogram
from workers.loadcost import LoadCostConfig, LoadRates
from workers.model import ForwardBatch, Transformer
from workers.sampling import SamplingParams, sample
from workers.tokenizer import IncrementalDecoder

log = logging.getLogger(__name__)
MIN_CHUNK_TOKENS = 16  # a prompt chunk beside decodes is never cut below this: it always advances
CHUNK_COST_SPAN = 256  # positions per measured chunk cost: attention makes a token dearer deeper in a prompt
_SMOOTHING = 0.2  # weight of a new step in the moving averages of step times
# Histogram bounds: from a small model's step on a GPU (~1 ms) to a long prefix's T2 load (seconds).
_SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
_SEQUENCES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


def _nearest(measured: dict[int, float], key: int) -> float:
    """The value measured at ``key``, or at the nearest key measured."""
    return measured[key if key in measured else min(measured, key=lambda k: abs(k - key))]


def _average(old: float, new: float) -> float:
    return new if not old else (1 - _SMOOTHING) * old + _SMOOTHING * new


class Status(Enum):
    WAITING = "waiting"
    LOADING = "loading"  # its cached prefix is on the way into T0 (other sequences keep running)
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, Enum):
    STOP = "stop"  # an end-of-sequence token, a stop token or a stop string
    LENGTH = "length"  # max_tokens
    ABORT = "abort"  # the caller went away
    ERROR = "error"  # the engine could not serve it (the sequence's ``error`` says why)


@dataclass(slots=True)
class Usage:
    """What a request cost: the answer to "did the cache help?"."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: list[int] = field(default_factory=lambda: [0, 0, 0])  # loaded, by tier T0, T1, T2
    ttft_s: float = 0.0  # arrival to first token
    decode_s: float = 0.0
    # Cached, by tier, but recomputed: the cost model estimated recomputing them faster.
    recomputed_tokens: list[int] = field(default_factory=lambda: [0, 0, 0])
    load_s: float = 0.0  # in the loading state, while its prefix came in from T1/T2

    @property
    def computed_prompt_tokens(self) -> int:
        return self.prompt_tokens - sum(self.cached_tokens)


class Sequence:
    """One request: its tokens (prompt + output), block table and progress."""

    _ids = itertools.count()

    def __init__(self, params: SamplingParams, prefix: PrefixHasher) -> None:
        self.id = next(Sequence._ids)
        self.params = params
        self.prefix = prefix  # all tokens so far (the prompt, then the output), with hashes of the full blocks
        self.prompt_len = prefix.num_tokens
        self.block_table: list[int] = []
        self.num_computed = 0  # tokens whose K/V is in T0 (loaded or computed)
        self.num_scheduled = 0  # tokens fed to the model in the current step
        self.num_committed_blocks = 0
        self.status = Status.WAITING
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self.usage = Usage(prompt_tokens=prefix.num_tokens)
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.decoder: IncrementalDecoder | None = None  # the output's text, for stop strings
        self.stop_tail = ""  # the text's end, where a stop string completed by new text starts
        self.logits: list[torch.Tensor] = []  # per generated token, with EngineConfig.keep_logits
        self.skip_cache = False  # compute the whole prompt (measures what reuse saves)
        self.load_started = 0.0

    @property
    def tokens(self) -> list[int]:
        return self.prefix.tokens

    @property
    def output(self) -> list[int]:
        """A copy: per token, use ``num_output_tokens``."""
        return self.prefix.tokens[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return self.prefix.num_tokens - self.prompt_len

    def __len__(self) -> int:
        return self.prefix.num_tokens


@dataclass(slots=True)
class EngineConfig:
    max_num_seqs: int = 16  # running or loading at once
    # Tokens per step: decodes (one each) first, then prompt chunks fill the rest. Smaller
    # stalls decodes less behind a long prompt; larger prefills it faster (docs/architecture.md).
    max_num_batched_tokens: int = 64
    max_prefill_tokens_alone: int = 4096  # the budget of a step that has no decode to delay
    # With sequences decoding, prompt chunks are also cut so that a step is estimated to take at
    # most 1/min_decode_share of a decode-only step (measured): the decoders keep about this
    # share of their speed on any hardware. 0: the token budget alone.
    min_decode_share: float = 0.5
    # The share cuts only chunks of prompts with more than this many tokens left to prefill: a
    # short one (an agent's next turn over its cached history) is done in a step or two anyway,
    # and cutting it only delays its first token (bench/agents.py).
    long_prompt_tokens: int = 256
    keep_logits: bool = False  # keep each step's logits on the sequence (tests, debugging)
    load_cost: LoadCostConfig = field(default_factory=LoadCostConfig)

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"need 0 < max_num_seqs <= max_num_batched_tokens, got {self.max_num_seqs} and "
                             f"{self.max_num_batched_tokens}")
        if not 0 <= self.min_decode_share < 1:
            raise ValueError(f"min_decode_share must be in [0, 1), got {self.min_decode_share}")
        if self.long_prompt_tokens < 0:
            raise ValueError(f"long_prompt_tokens must be >= 0, got {self.long_prompt_tokens}")


@dataclass(slots=True)
class EngineStats:
    """Counters since start, and the rates the load-or-recompute choice uses."""

    preempted: int = 0  # times T0 ran full and a running sequence went back to waiting
    loads: int = 0  # prefix loads from T1/T2 (requests in the loading state)
    failed_loads: int = 0  # cut short by a missing or corrupt T2 block: the rest was recomputed
    loaded_tokens: list[int] = field(default_factory=lambda: [0, 0, 0])  # by source tier
    recomputed_tokens: list[int] = field(default_factory=lambda: [0, 0, 0])  # cached, recomputed by choice
    prefill_chunks: int = 0  # prompt pieces fed to steps (a prompt over the token budget takes several)
    prefill_tokens: int = 0  # prompt tokens the model computed (not reused from a tier)
    generated_tokens: int = 0  # tokens sampled
    step_seconds: Histogram = field(default_factory=lambda: Histogram(_SECONDS))  # steps that ran the model
    batch_size: Histogram = field(default_factory=lambda: Histogram(_SEQUENCES))  # sequences per such step
    # Time in the loading state (start to running) of prefix loads, by the coldest tier they came from:
    t1_load_seconds: Histogram = field(default_factory=lambda: Histogram(_SECONDS))
    t2_load_seconds: Histogram = field(default_factory=lambda: Histogram(_SECONDS))
    rates: LoadRates | None = None


@dataclass(slots=True)
class StepOutput:
    seq: Sequence
    token: int


class RequestFailed(RuntimeError):
    """``Engine.stream``'s request ended with finish reason "error" (the message says why)."""


class Engine:
    """Continuous-batching generation over a ``Transformer`` and a ``TieredKVCache``."""

    def __init__(self, model: Transformer, cache: TieredKVCache, config: EngineConfig | None = None,
                 eos_token_ids: Seq[int] = (), detokenize=None, wakeup: threading.Event | None = None) -> None:
        """``wakeup`` is set whenever a prefix load completes (a caller waiting for work can
        share it); ``step`` waits on it when only loads are in flight."""
        self.model = model
        self.cache = cache
        self.config = config or EngineConfig()
        self.block_size = cache.spec.block_size
        self.eos = frozenset(eos_token_ids)
        self.detokenize = detokenize  # ids -> str, for stop strings
        self.wakeup = wakeup or threading.Event()
        self.waiting: deque[Sequence] = deque()
        self.loading: dict[Sequence, PrefixLoad] = {}  # in admission order
        self.running: list[Sequence] = []
        self.rates = LoadRates.seeded(self.config.load_cost)
        # Moving averages for min_decode_share: a decode-only step by its number of sequences,
        # and what each prompt token adds to a step that also decodes, by its position (per
        # CHUNK_COST_SPAN).
        self._decode_step_s: dict[int, float] = {}
        self._chunk_token_s: dict[int, float] = {}
        self._stats = EngineStats()

    # ---- requests -----------------------------------------------------------------------

    def add_request(self, prompt: list[int], params: SamplingParams | None = None, namespace: str = "default",
                    skip_cache: bool = False) -> Sequence:
        """Queue a prompt (token ids). Returns its ``Sequence`` (tokens appear in ``output``).

        ``skip_cache`` computes the whole prompt instead of loading its cached prefix."""
        if not prompt:
            raise ValueError("prompt must contain at least one token")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            bad = next(t for t in prompt if not 0 <= t < vocab)
            raise ValueError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1})")
        params = params or SamplingParams()
        limit = self.model.config.max_position_embeddings
        if len(prompt) + params.max_tokens > limit:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"model's context of {limit} tokens")
        if params.stop and self.detokenize is None:
            raise ValueError("stop strings need a detokenizer")
        prefix = PrefixHasher.for_namespace(self.cache.spec.fingerprint, namespace, self.block_size, prompt)
        seq = Sequence(params, prefix)
        seq.skip_cache = skip_cache
        if params.stop:
            seq.decoder = IncrementalDecoder(self.detokenize)
        self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence (e.g. its client went away) and free its blocks."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.loading:
            self.cache.cancel_load(self.loading.pop(seq))
        if seq.status is not Status.FINISHED:
            self._finish(seq, FinishReason.ABORT)

    def has_work(self) -> bool:
        return bool(self.waiting or self.loading or self.running)

    @property
    def preempted(self) -> int:
        return self._stats.preempted

    def stats(self) -> EngineStats:
        s = self._stats  # read from the actor's event loop while the engine thread steps: copies
        return dataclasses.replace(s, loaded_tokens=list(s.loaded_tokens), recomputed_tokens=list(s.recomputed_tokens),
                                   step_seconds=s.step_seconds.copy(), batch_size=s.batch_size.copy(),
                                   t1_load_seconds=s.t1_load_seconds.copy(), t2_load_seconds=s.t2_load_seconds.copy(),
                                   rates=self.rates.snapshot())

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None, namespace: str = "default") -> list[Sequence]:
        """Run prompts to completion (batched); returns their sequences in order."""
        seqs = [self.add_request(p, params, namespace) for p in prompts]
        while self.has_work():
            self.step()
        return seqs

    def stream(self, prompt: list[int], params: SamplingParams | None = None, namespace: str = "default") -> Iterator[int]:
        """Yield a prompt's tokens as they are generated (steps other requests too). Raises
        ``RequestFailed`` if the engine could not finish it; closing the iterator aborts it."""
        seq = self.add_request(prompt, params, namespace)
        sent = 0
        try:
            while seq.status is not Status.FINISHED:
                self.step()
                yield from seq.tokens[seq.prompt_len + sent:]
                sent = seq.num_output_tokens
        finally:
            if seq.status is not Status.FINISHED:
                self.abort(seq)
        if seq.finish_reason is FinishReason.ERROR:
            raise RequestFailed(seq.error)

    # ---- one step -----------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Start waiting requests (their prefix loads), then run one batch: every decoding
        sequence's next token and prompt chunks within the token budget. With only loads
        in flight, waits briefly for one to complete."""
        start = time.perf_counter()
        self._admit()
        self._finish_loads()
        batch = self._schedule()
        if not batch:
            if self.loading:
                self.wakeup.wait(0.05)
                self.wakeup.clear()
            return []
        out = self._run(batch)
        self._stats.step_seconds.observe(time.perf_counter() - start)
        self._stats.batch_size.observe(len(batch))
        return out

    def _admit(self) -> None:
        while self.waiting and len(self.running) + len(self.loading) < self.config.max_num_seqs:
            seq = self.waiting[0]
            try:
                if not self._start(seq):
                    break
            except CacheFullError as e:  # can never fit: fail this request, not the engine
                self.waiting.popleft()
                seq.error = f"prompt of {len(seq)} tokens does not fit in T0: {e}"
                self._finish(seq, FinishReason.ERROR)
                continue
            self.waiting.popleft()

    def _start(self, seq: Sequence) -> bool:
        """Choose how much of the cached prefix to load, reserve T0 blocks for the whole
        sequence and start the load. False if T0 is full now (raises ``CacheFullError`` if
        nothing else holds T0, so it would never fit)."""
        hit = self.cache.lookup(seq.prefix, 0 if seq.skip_cache else None)
        keep = hit.num_blocks
        if self.config.load_cost.cost_aware:
            keep = self.rates.best_reuse(hit.tiers, len(seq), self.block_size, self.cache.spec.bytes_per_block)
        n_blocks = -(-len(seq) // self.block_size)
        try:
            load = self.cache.start_load(seq.prefix, hit.truncated(keep), n_blocks, on_done=self.wakeup.set)
        except CacheFullError:
            if not self.running and not self.loading:
                raise
            return False
        if seq.first_token_at is None:  # a preempted sequence keeps its first usage record
            seq.usage.recomputed_tokens = [0, 0, 0]
            for tier in hit.tiers[keep:]:
                seq.usage.recomputed_tokens[tier] += self.block_size
                self._stats.recomputed_tokens[tier] += self.block_size
        seq.status = Status.LOADING
        seq.load_started = time.perf_counter()
        self.loading[seq] = load
        return True

    def _finish_loads(self) -> None:
        """Sequences whose prefix is in T0 start running (a load cut short: from its end)."""
        for seq, load in list(self.loading.items()):
            if not load.done():
                continue
            del self.loading[seq]
            seq.block_table = load.block_table
            if load.error:
                seq.error = f"loading the cached prefix into T0 failed: {load.error}"
                self._finish(seq, FinishReason.ERROR)
                continue
            seq.num_computed = load.num_tokens
            seq.num_committed_blocks = load.num_blocks  # loaded blocks are cached already
            took = time.perf_counter() - seq.load_started
            if seq.first_token_at is None:
                seq.usage.cached_tokens = [n * self.block_size for n in load.from_tier]
                seq.usage.load_s = took
            for tier in Tier:
                self._stats.loaded_tokens[tier] += load.from_tier[tier] * self.block_size
            if load.fetch_bytes or load.restore_bytes or load.failed:
                self._stats.loads += 1
                # Only a T2 transfer fetches or fails; a cut one still went to T2 and waited for it.
                t2 = load.fetch_bytes or load.failed
                (self._stats.t2_load_seconds if t2 else self._stats.t1_load_seconds).observe(took)
                self._stats.failed_loads += load.failed
                self.rates.observe_restore(Tier.T2, load.fetch_bytes, load.fetch_s)
                self.rates.observe_restore(Tier.T1, load.restore_bytes, load.restore_s)
            seq.status = Status.RUNNING
            self.running.append(seq)

    def _schedule(self) -> list[Sequence]:
        """Decodes first (growing their block tables, preempting if T0 is full), then prompt
        chunks in admission order within what is left of the token budget."""
        budget = self.config.max_num_batched_tokens
        batch: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or len(seq) - seq.num_computed != 1 or not budget:
                continue
            while len(seq.block_table) * self.block_size < len(seq):
                try:
                    seq.block_table += self.cache.allocate(1)
                except CacheFullError:
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is seq:
                        break
            if seq.status is Status.RUNNING:
                seq.num_scheduled = 1
                budget -= 1
                batch.append(seq)
        allowance = None  # seconds that prompt chunks may add to this step
        if not batch:
            budget = max(budget, self.config.max_prefill_tokens_alone)
        elif self.config.min_decode_share and self._decode_step_s and self._chunk_token_s:
            allowance = _nearest(self._decode_step_s, len(batch)) * (1 / self.config.min_decode_share - 1)
        chunked = False
        for seq in self.running:
            left = len(seq) - seq.num_computed
            if budget and left > 1:
                n = min(left, budget)
                if allowance is not None and left > self.config.long_prompt_tokens:
                    if allowance <= 0 and chunked:
                        continue
                    cost = self._chunk_cost(seq.num_computed)
                    if cost > 0:  # 0: chunks measured free beside the decodes
                        n = min(n, max(int(allowance / cost), MIN_CHUNK_TOKENS))
                        allowance -= n * cost
                seq.num_scheduled, chunked = n, True
                budget -= n
                batch.append(seq)
        return batch

    def _chunk_cost(self, position: int) -> float:
        """Seconds a prompt token at ``position`` adds to a step that decodes (measured here or
        at the nearest position measured)."""
        return _nearest(self._chunk_token_s, position // CHUNK_COST_SPAN)

    def _preempt(self, seq: Sequence) -> None:
        log.info("T0 full: preempting sequence %d (%d tokens)", seq.id, len(seq))
        self._stats.preempted += 1
        self.running.remove(seq)
        self.cache.release(seq.block_table)
        seq.block_table, seq.num_computed, seq.num_committed_blocks = [], 0, 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _run(self, batch: list[Sequence]) -> list[StepOutput]:
        """Forward and sample one batch. If the forward fails, each sequence is retried alone,
        so that only the ones that fail alone end with an error."""
        start = time.perf_counter()
        try:
            logits = self._forward(batch)
        except Exception as e:  # noqa: BLE001 - fail this batch's requests, keep serving the others
            if len(batch) > 1:
                log.warning("forward pass of %d sequences failed (%s: %s); retrying each alone", len(batch),
                            type(e).__name__, e)
                return [out for seq in batch for out in self._run([seq])]
            log.exception("forward pass failed for sequence %d", batch[0].id)
            batch[0].error = f"the model's forward pass failed: {type(e).__name__}: {e}"
            self._finish(batch[0], FinishReason.ERROR)
            return []
        took = time.perf_counter() - start
        chunks = [seq for seq in batch if seq.num_scheduled > 1]
        if chunks:
            tokens = sum(seq.num_scheduled for seq in chunks)
            middle = sum(seq.num_scheduled * (seq.num_computed + seq.num_scheduled / 2) for seq in chunks) / tokens
            self.rates.observe_prefill(tokens, middle, took)
            self._stats.prefill_chunks += len(chunks)
            if len(chunks) < len(batch) and self._decode_step_s:  # decodes too: the chunks' extra time
                span = int(middle) // CHUNK_COST_SPAN
                decodes = _nearest(self._decode_step_s, len(batch) - len(chunks))
                self._chunk_token_s[span] = _average(self._chunk_token_s.get(span, 0.0),
                                                     max(took - decodes, 0) / tokens)
        else:
            self._decode_step_s[len(batch)] = _average(self._decode_step_s.get(len(batch), 0.0), took)
        return self._postprocess(batch, logits)

    def _forward(self, batch: list[Sequence]) -> torch.Tensor:
        fb = ForwardBatch.build(
            [(seq.tokens[seq.num_computed:seq.num_computed + seq.num_scheduled], seq.num_computed, seq.block_table)
             for seq in batch],
            self.block_size, self.cache.t0.device,
        )
        with torch.inference_mode():
            return self.model(fb, self.cache.t0.kv)

    def _postprocess(self, batch: list[Sequence], logits: torch.Tensor) -> list[StepOutput]:
        now = time.perf_counter()
        out: list[StepOutput] = []
        prefill = 0
        for seq, row in zip(batch, logits):
            prefill += max(min(seq.num_computed + seq.num_scheduled, seq.prompt_len) - seq.num_computed, 0)
            seq.num_computed += seq.num_scheduled
            self._commit_full_blocks(seq)
            if seq.num_computed < len(seq):  # a prompt chunk: no token until its last one
                continue
            if self.config.keep_logits:
                seq.logits.append(row.float().cpu().clone())
            try:
                token = sample(row, seq.params, seq.generator)
            except Exception as e:  # noqa: BLE001 - e.g. NaN logits: fail this request, not the engine
                log.exception("sampling failed for sequence %d", seq.id)
                seq.error = f"sampling failed: {type(e).__name__}: {e}"
                self._finish(seq, FinishReason.ERROR)
                continue
            if seq.first_token_at is None:
                seq.first_token_at = now
                seq.usage.ttft_s = now - seq.arrival
            seq.prefix.extend([token])
            seq.usage.completion_tokens += 1
            reason = self._stop_reason(seq, token)
            if reason:
                self._finish(seq, reason)
            out.append(StepOutput(seq, token))
        self._stats.prefill_tokens += prefill
        self._stats.generated_tokens += len(out)
        return out

    def _commit_full_blocks(self, seq: Sequence) -> None:
        """Blocks whose K/V is complete become shareable."""
        full = min(seq.num_computed // self.block_size, seq.prefix.num_full_blocks)
        for i in range(seq.num_committed_blocks, full):
            self.cache.commit(seq.prefix, i, seq.block_table[i])
        seq.num_committed_blocks = max(seq.num_committed_blocks, full)

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        if token in p.stop_token_ids or (token in self.eos and not p.ignore_eos):
            return FinishReason.STOP
        if seq.decoder is not None and (new := seq.decoder.push(token)):
            # Only new text can complete a stop string, which then starts at most its length
            # minus one characters before it: decoding the whole output per token was quadratic.
            window = seq.stop_tail + new
            if any(s in window for s in p.stop):
                return FinishReason.STOP
            seq.stop_tail = window[max(0, len(window) - max(map(len, p.stop)) + 1):]
        if seq.num_output_tokens >= p.max_tokens:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.usage.decode_s = time.perf_counter() - (seq.first_token_at or seq.arrival)
        if seq in self.running:
            self.running.remove(seq)
        if seq.block_table:
            self.cache.release(seq.block_table)
            seq.block_table = []
