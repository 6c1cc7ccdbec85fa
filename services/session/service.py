"""The Sessions gRPC servicer: API keys, validation, limits, turns over the worker pool,
status codes.

A Generate call: authenticate -> read the session from Redis -> render the new input as a
token delta (off the event loop) -> check the limits -> wait for a generation slot (fair
admission) -> route (sticky, else least estimated TTFT) -> stream tokens from the Ray
worker (resuming elsewhere if it dies) -> append input + output to the history atomically
(once per request id) -> final usage.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import ray

from kvstore.blockstore_client import BlockStoreClient, BlockStoreError, BlockStoreUnavailable
from kvstore.blockstore_wire import MAX_TOUCH_TTL_S
from kvstore.cache import Tier
from kvstore.v1 import session_pb2 as pb
from kvstore.v1 import session_pb2_grpc as pb_grpc
from services.common.auth import ANY_NAMESPACE, TokenTable, check_namespace, require_namespace, valid_namespace
from services.common.errors import (
    REDIS_UNAVAILABLE,
    RequestError,
    StoreFullError,
    StoreRefusedError,
    shown,
    write_refusal,
)
from services.common.grpc_server import MAX_STATUS_MESSAGE, rpc_status
from services.session.admission import Admission, AdmissionRejected
from services.session.chat import ChatFormatter
from services.session.events import EventKind, KVEventBatch, SubscriberBehind
from services.session.metrics import SessionMetrics
from services.session.pool import (
    DrainingError,
    GenerationError,
    NoWorkerError,
    UnknownWorkerError,
    WorkerLostError,
    WorkerPool,
)
from services.session.router import Affinity
from services.session.state import (
    HistoryTooLong,
    Session,
    SessionChanged,
    SessionClosed,
    SessionNotFound,
    SessionStore,
    TooManySessions,
    valid_session_id,
)
from workers.actor import GenerateEnd, GenerateRequest, WorkerStats
from workers.sampling import SamplingParams
from workers.tokenizer import ChatFormatError, IncrementalDecoder, Tokenizer, check_messages

if TYPE_CHECKING:  # the server module, which builds this servicer, defines it
    from services.session.server import SessionServiceConfig

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Sessions"].full_name  # "kvstore.v1.Sessions"
DEFAULT_NAMESPACE = "default"  # with authentication off
MAX_LIST = 1000  # sessions per ListSessions
MAX_EVENT_SUBSCRIBERS = 64  # SubscribeKVEvents streams at once (each may queue up to events.MAX_BEHIND)
DEFAULT_DRAIN_TIMEOUT_S = 60.0  # for a drained worker's generations to finish
MAX_DRAIN_TIMEOUT_S = 3600.0
MAX_METADATA_BYTES = 16384  # per session, keys and values
_INVALID = grpc.StatusCode.INVALID_ARGUMENT
# A stored response's id: "resp_<namespace>:<session id>:<request id of its turn>", so the
# tenant is known before anything is read (as with session ids).
RESPONSE_PREFIX = "resp_"
_RESPONSE_RID = re.compile("[0-9a-f]{32}")


@dataclass(slots=True)
class Generated:
    """A finished generation: the output and its usage."""

    ids: list[int]
    text: str
    usage: pb.Usage
    incarnation: str  # of the worker that finished it (``usage.worker_id``)


@dataclass(slots=True)
class StoredResponse:
    """A stored response of the Responses API, as ``SessionServicer.response`` reads it."""

    id: str
    created: float  # unix seconds
    text: str
    usage: pb.Usage
    fields: dict  # what the front end stored with it (``respond``'s ``fields``)


def public_id(namespace: str, session_id: str) -> str:
    """The id clients see, ``<namespace>:<id>``: it names the tenant, so a call can be
    authorised before anything is read. The store and ``Session.id`` use the bare id."""
    return f"{namespace}:{session_id}"


class SessionServicer(pb_grpc.SessionsServicer):
    def __init__(self, store: SessionStore, pool: WorkerPool, tokenizer: Tokenizer, api_keys: TokenTable,
                 metrics: SessionMetrics, config: SessionServiceConfig,
                 blockstore: BlockStoreClient | None = None) -> None:
        self._store = store
        self._pool = pool
        self._tok = tokenizer
        self._chat = ChatFormatter(tokenizer)
        self._keys = api_keys
        self._metrics = metrics
        self._config = config  # its limits (max_tokens, ...)
        self._blockstore = blockstore  # for Pin: keeps a pinned session's blocks in the cold tier
        self._admission = Admission(self._capacity, config.max_queued_generations,
                                    config.max_generations_per_namespace)
        metrics.active.set_function(lambda: self._admission.running)
        metrics.queued.set_function(lambda: self._admission.queued)
        self._background: set[asyncio.Task] = set()  # work done after a reply (re-pins); see stop()

    @property
    def model(self) -> str:
        return self._pool.info.model

    @property
    def max_history(self) -> int:
        """A session's history limit in tokens: the model's context, or less if configured."""
        context = self._pool.info.max_context
        return min(context, self._config.max_history_tokens or context)

    def _capacity(self) -> int:
        """Generations that may run at once: what the live workers batch (capped by config)."""
        cap = self._config.max_concurrent_generations
        return min(self._pool.capacity, cap) if cap else self._pool.capacity

    async def stop(self, timeout: float) -> None:
        """Give the work started after replies ``timeout`` seconds to finish, then cancel it
        (call after the gRPC server stopped, before closing the clients that work uses)."""
        if not self._background:
            return
        _, pending = await asyncio.wait(set(self._background), timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # ---- RPCs -----------------------------------------------------------------------------

    async def CreateSession(self, request: pb.CreateSessionRequest, context) -> pb.SessionInfo:
        async with self.rpc("CreateSession", context):
            allowed = self._keys.authenticate(context.invocation_metadata())
            namespace = self._namespace(allowed, request.namespace)
            if request.model and request.model != self.model:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"model {shown(request.model)} is not served here; "
                                                              f"this service serves {self.model!r}")
            session = await self._create(namespace, request.system_prompt, self._checked_metadata(request.metadata))
            return self._info(session)

    async def Append(self, request: pb.AppendRequest, context) -> pb.AppendResponse:
        async with self.rpc("Append", context):
            # A closed session is refused by the store, after it replays a request id applied before the close.
            session = await self._session(context, request.session_id, include_closed=True)
            self._check_request_id(request.request_id)
            tokens, messages, _ = await self._input(session, request.input if request.HasField("input") else None,
                                                    False)
            if not tokens:
                raise RequestError(_INVALID, "input is empty: send messages or token ids")
            appended = await self._store.append_turn(session.namespace, session.id, tokens,
                                                     request_id=request.request_id, messages=messages,
                                                     max_len=self.max_history)
            if appended.result:  # a Generate's answer
                raise RequestError(_INVALID, f"request_id {shown(request.request_id)} was used by a Generate of this "
                                             "session; a new Append needs a new request_id")
            return pb.AppendResponse(num_tokens=appended.num_tokens)

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        arrival = time.perf_counter()
        async with self.rpc("Generate", context):
            namespace, raw = self._locate(context, request.session_id)
            self._check_request_id(request.request_id)
            # Calls with one request id run one at a time: a retry that overlaps the first
            # attempt waits for it and replays its result, so every caller gets the turn that
            # is in the history (not tokens of a generation that was never recorded).
            async with self._store.request(namespace, raw, request.request_id) as done:
                if done:
                    # A retry of a finished turn: the same answer, no new turn.
                    for response in _replay(*done, request.request_id):
                        yield response
                    return
                # Read with the request id held: after a failed attempt, the history as it is now.
                session = await self._read(namespace, raw)
                async with contextlib.aclosing(self._turn(session, request, arrival, context)) as responses:
                    async for response in responses:
                        yield response

    # ---- the OpenAI-compatible HTTP API's calls (services/session/http.py) ----------------------

    async def complete(self, request: pb.GenerateRequest, namespace: str, context) -> AsyncIterator[pb.GenerateResponse]:
        """A stateless generation (Chat Completions): ``request.input``'s messages are the whole
        conversation, rendered into a prompt each time; reuse comes from prefix hashing alone.
        Token chunks, then usage; nothing is recorded (``session_id`` and ``request_id`` unused)."""
        arrival = time.perf_counter()
        async with self.rpc("Complete", context):
            namespace = self.namespace(context, namespace)
            sampling = self._sampling(request.sampling if request.HasField("sampling") else None)
            prompt, _, _ = await self._input(Session("", namespace, self.model, []), request.input, True)
            async with contextlib.aclosing(self._generate(namespace, prompt, sampling, request, None, arrival,
                                                          context)) as items:
                async for item in items:
                    if isinstance(item, Generated):
                        self._metrics.turn(item.usage)
                        item = pb.GenerateResponse(usage=item.usage)
                    yield item

    async def respond(self, request: pb.GenerateRequest, context, *, namespace: str = "", previous: str = "",
                      instructions: str = "", fields: dict | None = None) -> AsyncIterator[str | pb.GenerateResponse]:
        """A Responses API turn, stored: yields the new response's id, then Generate's responses.

        A response is a point in a session's history (its turn's record, kept with the session,
        holds the history length and message count after it). A new conversation is a new
        session whose system prompt is ``instructions``; continuing the latest response of a
        session appends to it (a concurrent continuation gets ABORTED), continuing an older
        one (or one of a closed session) forks the session at that point. ``instructions``
        that differ from the conversation's are added as a system message. ``fields`` are
        stored with the response and returned by ``response``."""
        arrival = time.perf_counter()
        async with self.rpc("Respond", context):
            created = None
            if previous:
                namespace, raw, rid = self._response_key(context, previous)
                n, record = await self._response_record(namespace, raw, rid, previous)
                session = await self._read(namespace, raw, include_closed=True)
                if len(session.tokens) != n or session.closed:
                    session = created = await self._store.fork(namespace, raw, at=(n, record["messages"]))
            else:
                namespace = self.namespace(context, namespace)
                session = created = await self._create(namespace, instructions, {})
            system = {"role": "system", "content": instructions}
            if instructions and previous and session.messages[:1] != [system]:
                request.input.CopyFrom(pb.Input(messages=pb.Messages(items=[pb.Message(**system),
                                                                            *request.input.messages.items])))
            request.request_id = secrets.token_hex(16)
            yield _response_id(namespace, session.id, request.request_id)
            try:
                async with contextlib.aclosing(self._turn(session, request, arrival, context,
                                                          dict(fields or {}))) as responses:
                    async for response in responses:
                        yield response
            except BaseException:
                if created is not None:  # nothing half-made counts against the namespace's sessions
                    with contextlib.suppress(Exception):  # shielded: also when the caller went away
                        await asyncio.shield(self._store.close(namespace, created.id))
                raise

    async def response(self, response_id: str, context) -> StoredResponse:
        """A stored response (NOT_FOUND for an unknown, deleted or other tenant's id)."""
        async with self.rpc("GetResponse", context):
            namespace, raw, rid = self._response_key(context, response_id)
            _, record = await self._response_record(namespace, raw, rid, response_id)
            return StoredResponse(response_id, record["created"], record["text"],
                                  pb.Usage(**record["usage"]), record["response"])
        raise AssertionError("unreachable: rpc() aborts the call")

    async def delete_response(self, response_id: str, context) -> None:
        """Forget a stored response: it can no longer be read or continued (its session, and
        responses that continued it, stay)."""
        async with self.rpc("DeleteResponse", context):
            namespace, raw, rid = self._response_key(context, response_id)
            await self._response_record(namespace, raw, rid, response_id)
            await self._store.drop_record(namespace, raw, rid)

    @property
    def worker_ids(self) -> list[str]:
        return self._pool.worker_ids

    def authenticate(self, context) -> frozenset[str]:
        """The namespaces the caller's API key reaches (raises ``RequestError`` UNAUTHENTICATED)."""
        return self._keys.authenticate(context.invocation_metadata())

    def namespace(self, context, requested: str) -> str:
        """The namespace a call works in: ``requested``, or the API key's only one (raises
        ``RequestError``: UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT)."""
        return self._namespace(self.authenticate(context), requested)

    async def models(self, context) -> list[str]:
        """The models served (one)."""
        async with self.rpc("ListModels", context):
            self._keys.authenticate(context.invocation_metadata())
            return [self.model]
        raise AssertionError("unreachable: rpc() aborts the call")

    def _response_key(self, context, response_id: str) -> tuple[str, str, str]:
        """(namespace, session id, request id) of a response id the caller may use; NOT_FOUND
        otherwise, also for another tenant's (its existence is not revealed)."""
        allowed = self._keys.authenticate(context.invocation_metadata())
        namespace, session_id, rid = response_id.removeprefix(RESPONSE_PREFIX).rsplit(":", 2) \
            if response_id.startswith(RESPONSE_PREFIX) and response_id.count(":") >= 2 else ("", "", "")
        if not (valid_namespace(namespace) and valid_session_id(session_id) and _RESPONSE_RID.fullmatch(rid)) or (
                ANY_NAMESPACE not in allowed and namespace not in allowed):
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no response {shown(response_id, 96)}")
        return namespace, session_id, rid

    async def _response_record(self, namespace: str, session_id: str, rid: str, response_id: str) -> tuple[int, dict]:
        found = await self._store.record(namespace, session_id, rid)
        record = json.loads(found[1]) if found and found[1].startswith("{") else {}
        if "response" not in record:  # a Generate's request id is no response
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no response {shown(response_id, 96)}")
        return found[0], record

    # ---- turns ----------------------------------------------------------------------------

    async def _turn(self, session: Session, request: pb.GenerateRequest, arrival: float, context,
                    response: dict | None = None) -> AsyncIterator[pb.GenerateResponse]:
        """Generate's new turn: generate from the history and the input, record the turn (kept
        with the session as a stored response when ``response`` is given), send its usage."""
        sampling = self._sampling(request.sampling if request.HasField("sampling") else None)
        tokens, messages, chat = await self._input(session, request.input if request.HasField("input") else None,
                                                   True)
        prompt = session.tokens + tokens
        generated = None
        async with contextlib.aclosing(self._generate(session.namespace, prompt, sampling, request,
                                                      session.affinity, arrival, context)) as items:
            async for item in items:
                if isinstance(item, Generated):
                    generated = item
                else:
                    yield item
        output, text, usage = generated.ids, generated.text, generated.usage
        turn_msgs = messages
        if chat:
            closing = await asyncio.to_thread(self._chat.close_assistant, session.messages + messages, output, text)
            tokens_after = output + closing
            turn_msgs = messages + [{"role": "assistant", "content": text}]
        else:
            tokens_after = output
        n = len(output)
        record = {"ids": output, "text": text, "usage": _usage_dict(usage)}
        if response is not None:
            record.update(response=response, created=time.time(), messages=len(session.messages) + len(turn_msgs))
        # The limit was checked with max_tokens; the template's end-of-turn tokens may follow.
        # The worker that ran it holds the turn's KV hottest: every replica routes the next turn there.
        affinity = Affinity(usage.worker_id, generated.incarnation, len(session.tokens) + len(tokens + tokens_after))
        appended = await self._store.append_turn(
            session.namespace, session.id, tokens + tokens_after, request_id=request.request_id, messages=turn_msgs,
            expected_len=len(session.tokens), result=json.dumps(record), max_len=self.max_history + len(tokens_after) - n,
            keep_record=response is not None, affinity=affinity)
        if appended.replayed:
            # Another call with this request id recorded its turn first (this call's lease had
            # lapsed, e.g. Redis was unreachable for a while): only its answer is in the history.
            recorded, recorded_usage = _replay(appended.num_tokens, appended.result, request.request_id)
            if list(recorded.chunk.ids) != output:
                raise RequestError(grpc.StatusCode.ABORTED,
                                   f"request_id {shown(request.request_id)} was completed by a concurrent call with a "
                                   "different answer than the one streamed here; retry with the same request_id "
                                   "to receive the recorded answer")
            yield recorded_usage
            return
        usage.num_tokens = appended.num_tokens
        self._metrics.turn(usage)
        if session.pinned_until > time.time():
            # The pin covers the history as it grows: re-apply it to the new blocks, without
            # holding the reply (a slow or unreachable block store must not delay turns).
            self._in_background(self._pin_blocks(session.namespace, prompt + tokens_after,
                                                 session.pinned_until - time.time()), "session-repin")
        yield pb.GenerateResponse(usage=usage)

    async def _generate(self, namespace: str, prompt: list[int], sampling: SamplingParams,
                        request: pb.GenerateRequest, affinity: Affinity | None, arrival: float,
                        context) -> AsyncIterator[pb.GenerateResponse | Generated]:
        """Generate from ``prompt`` (within the limits) in a generation slot, on the worker the
        router picks (``request.worker_id`` if set): token chunks, then a ``Generated``. Records nothing."""
        if not prompt:
            raise RequestError(_INVALID, "nothing to generate from: the session is empty and so is the input")
        if len(prompt) + sampling.max_tokens > self.max_history:
            raise HistoryTooLong(f"the prompt ({len(prompt)} tokens with this input) plus max_tokens "
                                 f"({sampling.max_tokens}) exceeds the limit of {self.max_history} tokens (the "
                                 "model's context, or max_history_tokens)")
        if request.worker_id and request.worker_id not in self._pool.worker_ids:
            raise RequestError(_INVALID, f"unknown worker_id {shown(request.worker_id)}; workers: "
                                         f"{', '.join(self._pool.worker_ids)}")
        if not self._pool.live_worker_ids:
            raise NoWorkerError("no decode worker is available; retry later")
        queued_at = time.perf_counter()
        async with self._admission.slot(namespace, self._queue_timeout(context)):
            self._metrics.queue_wait.observe(time.perf_counter() - queued_at)
            decoder = IncrementalDecoder(self._tok.decode)
            first_at = None
            result: GenerateEnd | None = None
            generation = GenerateRequest(prompt, sampling, namespace, request.skip_cache)
            async for item in self._pool.generate(generation, affinity, request.worker_id or None):
                if isinstance(item, GenerateEnd):
                    result = item
                    break
                if first_at is None:
                    first_at = time.perf_counter()
                yield pb.GenerateResponse(chunk=pb.TokenChunk(ids=[item], text=decoder.push(item)))
            end = time.perf_counter()
            if tail := decoder.flush():
                yield pb.GenerateResponse(chunk=pb.TokenChunk(text=tail))
        output, u = decoder.ids, result.usage
        n = len(output)
        yield Generated(output, self._tok.decode(output), pb.Usage(
            prompt_tokens=len(prompt), completion_tokens=n, cached_tokens_t0=u.cached_tokens[0],
            cached_tokens_t1=u.cached_tokens[1], cached_tokens_t2=u.cached_tokens[2],
            recomputed_tokens_t0=u.recomputed_tokens[0], recomputed_tokens_t1=u.recomputed_tokens[1],
            recomputed_tokens_t2=u.recomputed_tokens[2], load_seconds=u.load_s,
            ttft_seconds=(first_at or end) - arrival,
            tokens_per_second=(n - 1) / (end - first_at) if n > 1 and end > first_at else 0.0,
            finish_reason=result.finish_reason.value, worker_id=result.worker_id, failovers=result.failovers),
            result.incarnation)

    async def Fork(self, request: pb.ForkRequest, context) -> pb.SessionInfo:
        async with self.rpc("Fork", context):
            session = await self._session(context, request.session_id, include_closed=True)
            metadata = self._checked_metadata(request.metadata) if request.metadata else None
            child = await self._store.fork(session.namespace, session.id, metadata)
            return self._info(child)

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.SessionInfo:
        async with self.rpc("GetSession", context):
            session = await self._session(context, request.session_id, include_closed=True)
            if request.include_tokens:  # a long history: serialized off the event loop
                return await asyncio.to_thread(self._info, session, include_tokens=True)
            return self._info(session)

    async def ListSessions(self, request: pb.ListSessionsRequest, context) -> pb.ListSessionsResponse:
        async with self.rpc("ListSessions", context):
            allowed = self._keys.authenticate(context.invocation_metadata())
            namespace = self._namespace(allowed, request.namespace)
            limit = request.limit or 100
            if limit > MAX_LIST:
                raise RequestError(_INVALID, f"limit {limit} is over the maximum of {MAX_LIST}")
            listed = await self._store.list_sessions(namespace, limit)
            return pb.ListSessionsResponse(sessions=[self._info(s, num_tokens=n) for s, n in listed])

    async def CloseSession(self, request: pb.CloseSessionRequest, context) -> pb.SessionInfo:
        async with self.rpc("CloseSession", context):
            session = await self._session(context, request.session_id, include_closed=True)
            await self._store.close(session.namespace, session.id)
            session.closed = True
            return self._info(session)

    async def Pin(self, request: pb.PinRequest, context) -> pb.SessionInfo:
        async with self.rpc("Pin", context):
            session = await self._session(context, request.session_id, include_closed=True)
            ttl = request.ttl_seconds
            if ttl > MAX_TOUCH_TTL_S:  # the block store's limit for keeping blocks
                raise RequestError(_INVALID, f"ttl_seconds {ttl} is over the maximum of {MAX_TOUCH_TTL_S} (30 days)")
            session.pinned_until = await self._store.pin(session.namespace, session.id, ttl) if ttl else \
                await self._store.unpin(session.namespace, session.id)
            if ttl:
                try:
                    await self._pin_blocks(session.namespace, session.tokens, ttl, strict=True)
                except (BlockStoreError, BlockStoreUnavailable) as e:
                    raise RequestError(grpc.StatusCode.UNAVAILABLE, f"the pin is recorded (until "
                                       f"{session.pinned_until:.0f}), but the block store did not keep the "
                                       f"session's blocks ({e}); retry Pin") from None
            return self._info(session)

    async def Prefetch(self, request: pb.PrefetchRequest, context) -> pb.PrefetchResponse:
        async with self.rpc("Prefetch", context):
            session = await self._session(context, request.session_id)
            if not session.tokens:
                return pb.PrefetchResponse()
            affinity = await self._pool.prefetch(session.tokens, session.namespace, session.affinity)
            await self._store.set_affinity(session.namespace, session.id, affinity)  # the next turn goes there
            return pb.PrefetchResponse(worker_id=affinity.worker_id, cached_tokens=affinity.num_tokens)

    async def GetStats(self, request: pb.GetStatsRequest, context) -> pb.ServiceStats:
        async with self.rpc("GetStats", context):
            self._require_admin(context, "GetStats")
            stats = pb.ServiceStats()
            self._metrics.fill(stats)
            replies = await asyncio.to_thread(read_worker_stats, self._pool)
            stats.workers.extend(_worker_stats(w, r) for w, r in replies.items())
            stats.sessions, stats.session_redis_used_memory = await asyncio.gather(self._store.count(),
                                                                                   self._store.used_memory())
            if self._blockstore is not None:
                try:
                    blocks = await asyncio.to_thread(self._blockstore.stats)
                    stats.blocks_redis_used_memory, stats.blocks_stored = blocks.redis_used_memory, blocks.redis_keys
                except (BlockStoreError, BlockStoreUnavailable) as e:  # the rest is still worth showing
                    logger.warning("GetStats: the block store did not answer: %s", e)
            return stats

    async def DrainWorker(self, request: pb.DrainWorkerRequest, context) -> pb.DrainWorkerResponse:
        async with self.rpc("DrainWorker", context):
            self._require_admin(context, "DrainWorker")
            timeout = request.timeout_seconds or DEFAULT_DRAIN_TIMEOUT_S
            if not 0 < timeout <= MAX_DRAIN_TIMEOUT_S:
                raise RequestError(_INVALID, f"timeout_seconds must be in (0, {MAX_DRAIN_TIMEOUT_S:g}], got "
                                             f"{request.timeout_seconds:g}")
            drained = await self._pool.drain(request.worker_id, timeout)
            return pb.DrainWorkerResponse(worker_id=drained.worker_id, seconds=drained.seconds,
                                          moved_generations=drained.moved_streams)

    async def FlushNamespace(self, request: pb.FlushNamespaceRequest, context) -> pb.FlushNamespaceResponse:
        async with self.rpc("FlushNamespace", context):
            self._require_admin(context, "FlushNamespace")
            check_namespace(request.namespace)
            dropped = await self._pool.drop_namespace(request.namespace)
            t2 = 0
            if self._blockstore is not None:  # after the workers: none of their copies in flight is left to land
                try:
                    t2 = await asyncio.to_thread(self._blockstore.delete_namespace, request.namespace)
                except (BlockStoreError, BlockStoreUnavailable) as e:
                    raise RequestError(grpc.StatusCode.UNAVAILABLE, f"the workers forgot the namespace's blocks, "
                                       f"but the block store did not delete them ({e}); retry") from None
            counts = [sum(d.t0 for d in dropped), sum(d.t1 for d in dropped), t2]
            logger.warning("flushed namespace %r: %d T0, %d T1, %d T2 blocks", request.namespace, *counts)
            return pb.FlushNamespaceResponse(blocks_dropped=counts)

    async def SubscribeKVEvents(self, request: pb.SubscribeKVEventsRequest, context) -> AsyncIterator[pb.KVEventBatch]:
        async with self.rpc("SubscribeKVEvents", context):
            allowed = self.authenticate(context)
            every = not request.namespace and (not self._keys.enabled or ANY_NAMESPACE in allowed)
            namespace = None if every else self._namespace(allowed, request.namespace)
            events = self._pool.events
            if events.subscribers >= MAX_EVENT_SUBSCRIBERS:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{MAX_EVENT_SUBSCRIBERS} KV event "
                                                                      "subscribers already; retry later")
            subscription = events.subscribe(namespace)
            try:
                while True:
                    yield _kv_event_batch(await subscription.next_batch())
            finally:
                subscription.close()

    # ---- helpers --------------------------------------------------------------------------

    def _require_admin(self, context, method: str) -> None:
        if self._keys.enabled and ANY_NAMESPACE not in self._keys.authenticate(context.invocation_metadata()):
            raise RequestError(grpc.StatusCode.PERMISSION_DENIED, f"{method} needs an admin API key (one with "
                                                                  "namespace '*')")

    def rpc(self, method: str, context):
        """Map exceptions to status codes (never crash on a request) and record metrics."""
        return rpc_status(method, context, _classify, self._metrics.observe)

    async def _create(self, namespace: str, system_prompt: str, metadata: dict[str, str]) -> Session:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        limit = (self.max_history, "a session's history limit")
        tokens = await self._delta([], messages, False, "the system prompt", limit) if messages else []
        return await self._store.create(namespace, self.model, tokens, metadata, messages=messages)

    def _namespace(self, allowed: frozenset[str], requested: str) -> str:
        if not self._keys.enabled:
            namespace = requested or DEFAULT_NAMESPACE
        elif requested:
            namespace = requested
        elif ANY_NAMESPACE not in allowed and len(allowed) == 1:
            (namespace,) = allowed
        else:
            raise RequestError(_INVALID, "this API key reaches several namespaces: set namespace")
        check_namespace(namespace)
        require_namespace(allowed, namespace)
        return namespace

    def _locate(self, context, session_id: str) -> tuple[str, str]:
        """(namespace, bare id) of a public session id, if the caller may use that namespace."""
        allowed = self._keys.authenticate(context.invocation_metadata())
        namespace, _, raw = session_id.rpartition(":")
        if not valid_namespace(namespace) or not valid_session_id(raw):
            raise RequestError(_INVALID, f"malformed session_id {shown(session_id, 96)}: expected "
                                         "'<namespace>:<24 hex digits>'")
        require_namespace(allowed, namespace)
        return namespace, raw

    async def _session(self, context, session_id: str, include_closed: bool = False) -> Session:
        namespace, raw = self._locate(context, session_id)
        return await self._read(namespace, raw, include_closed)

    async def _read(self, namespace: str, session_id: str, include_closed: bool = False) -> Session:
        session = await self._store.get(namespace, session_id)
        if session.closed and not include_closed:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"session {public_id(namespace, session_id)!r} is closed")
        return session

    def _queue_timeout(self, context) -> float:
        """How long a Generate may wait for a slot: the queue timeout, or less to answer
        RESOURCE_EXHAUSTED before the caller's deadline."""
        timeout = self._config.queue_timeout_s
        if (remaining := context.time_remaining()) is not None:
            timeout = min(timeout, remaining - min(0.5, remaining / 5))  # time for the answer to get back
        return timeout

    async def _input(self, session: Session, inp: pb.Input | None,
                     generate: bool) -> tuple[list[int], list[dict], bool]:
        """(token delta, messages to remember, chat?) for a turn's input."""
        kind = inp.WhichOneof("kind") if inp is not None else None
        if kind == "tokens":
            ids = list(inp.tokens.ids)
            self._check_size(len(ids))
            vocab = self._pool.info.vocab_size
            if bad := [t for t in ids if t >= vocab]:
                raise RequestError(_INVALID, f"token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
            return ids, [], False
        if kind == "messages":
            messages = [{"role": m.role, "content": m.content} for m in inp.messages.items]
            if not messages:
                raise RequestError(_INVALID, "input.messages is empty")
            tokens = await self._delta(session.messages, messages, generate, "the input",
                                       (self._config.max_input_tokens, "max_input_tokens"))
            return tokens, messages, True
        # No input: a chat session still needs the generation prompt before generating.
        chat = generate and bool(session.messages)
        return (await self._delta(session.messages, [], True) if chat else []), [], chat

    async def _delta(self, history: list[dict], new: list[dict], generate: bool, what: str = "",
                     limit: tuple[int, str] | None = None) -> list[int]:
        """The tokens ``new`` messages add; ``what`` is refused over ``limit`` (tokens, its name).

        Text over the limit however it tokenizes is refused without tokenizing it; the rest
        is rendered and tokenized in a thread, so that a large input does not stall the
        event loop (health checks, other calls)."""
        if limit is not None:
            check_messages(new)
            chars = sum(len(m["content"]) for m in new)
            if (floor := -(-chars // self._chat.tokenizer.max_chars_per_token)) > limit[0]:
                raise RequestError(_INVALID, f"{what} is at least {floor} tokens ({chars} characters), over "
                                             f"{limit[1]} ({limit[0]})")
        tokens = await asyncio.to_thread(self._chat.delta, history, new, add_generation_prompt=generate)
        if limit is not None:
            self._check_size(len(tokens), what, limit)
        return tokens

    def _check_size(self, n: int, what: str = "the input", limit: tuple[int, str] | None = None) -> None:
        most, name = limit or (self._config.max_input_tokens, "max_input_tokens")
        if n > most:
            raise RequestError(_INVALID, f"{what} is {n} tokens, over {name} ({most})")

    def _sampling(self, s: pb.SamplingParams | None) -> SamplingParams:
        lim = self._config
        if s is None:
            return SamplingParams(max_tokens=lim.default_max_tokens)
        max_tokens = s.max_tokens or lim.default_max_tokens
        if max_tokens > lim.max_tokens:
            raise RequestError(_INVALID, f"max_tokens {max_tokens} is over the limit of {lim.max_tokens}")
        if not (math.isfinite(s.temperature) and math.isfinite(s.top_p)):
            raise RequestError(_INVALID, f"temperature ({s.temperature}) and top_p ({s.top_p}) must be finite")
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=s.temperature, top_k=s.top_k,
                                  top_p=s.top_p or 1.0, seed=s.seed if s.HasField("seed") else None,
                                  stop_token_ids=tuple(s.stop_token_ids), stop=tuple(s.stop), ignore_eos=s.ignore_eos)
        except ValueError as e:
            raise RequestError(_INVALID, str(e)) from None

    def _checked_metadata(self, metadata) -> dict[str, str]:
        out = dict(metadata)
        if sum(len(k) + len(v) for k, v in out.items()) > MAX_METADATA_BYTES:
            raise RequestError(_INVALID, f"metadata is over {MAX_METADATA_BYTES} bytes")
        return out

    @staticmethod
    def _check_request_id(request_id: str) -> None:
        if len(request_id) > 128 or "|" in request_id:
            raise RequestError(_INVALID, "request_id must be at most 128 characters, without '|'")

    def _in_background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._background.add(task)  # a reference, so the task is not collected while it runs
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s failed", task.get_name(), exc_info=task.exception())

    async def _pin_blocks(self, namespace: str, tokens: list[int], ttl_s: float, strict: bool = False) -> None:
        """Evicted last from the workers' T0/T1; kept at least ``ttl_s`` in T2. ``strict``:
        raise the block store's error (else logged: the pin is re-applied after each turn)."""
        try:
            await self._pool.prefer(tokens, namespace, ttl_s)
            if self._blockstore is not None and ttl_s >= 1:
                hashes = self._pool.block_hashes(tokens, namespace)
                await asyncio.to_thread(self._blockstore.touch, namespace, hashes, int(ttl_s))
        except Exception:  # noqa: BLE001 - best effort: the pin is recorded and re-applied after each turn
            if strict:
                raise
            logger.warning("could not apply a session pin to the cache tiers", exc_info=True)

    @staticmethod
    def _info(s: Session, include_tokens: bool = False, num_tokens: int | None = None) -> pb.SessionInfo:
        """``num_tokens``: the history length when ``s`` was read without its tokens."""
        return pb.SessionInfo(session_id=public_id(s.namespace, s.id), namespace=s.namespace, model=s.model,
                              parent_id=public_id(s.namespace, s.parent) if s.parent else "",
                              num_tokens=len(s.tokens) if num_tokens is None else num_tokens, metadata=s.metadata,
                              created=s.created, updated=s.updated, pinned_until=s.pinned_until, closed=s.closed,
                              token_ids=s.tokens if include_tokens else ())


_KIND_OF = {EventKind.STORED: pb.KVEvent.BLOCK_STORED, EventKind.REMOVED: pb.KVEvent.BLOCK_REMOVED,
            EventKind.CLEARED: pb.KVEvent.ALL_BLOCKS_CLEARED}
_MEDIUM_OF = {Tier.T0: pb.MEDIUM_T0, Tier.T1: pb.MEDIUM_T1, Tier.T2: pb.MEDIUM_T2}


def _kv_event_batch(batch: KVEventBatch) -> pb.KVEventBatch:
    out = pb.KVEventBatch(snapshot=batch.snapshot, timestamp=batch.timestamp)
    for e in batch.events:
        b = e.block
        out.events.append(pb.KVEvent(kind=_KIND_OF[e.kind], worker_id=e.worker_id) if b is None else pb.KVEvent(
            kind=_KIND_OF[e.kind], medium=_MEDIUM_OF[b.tier], worker_id=e.worker_id, namespace=b.namespace,
            block_hash=b.block_hash, parent_block_hash=b.parent_hash, token_ids=b.token_ids))
    return out


_STATUS_OF = {  # the service's errors, by the status code they mean (the first match counts)
    SessionNotFound: grpc.StatusCode.NOT_FOUND,
    SessionClosed: grpc.StatusCode.FAILED_PRECONDITION,
    SessionChanged: grpc.StatusCode.ABORTED,
    HistoryTooLong: _INVALID,
    TooManySessions: grpc.StatusCode.RESOURCE_EXHAUSTED,
    AdmissionRejected: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ChatFormatError: _INVALID,
    GenerationError: _INVALID,
    UnknownWorkerError: grpc.StatusCode.NOT_FOUND,
    NoWorkerError: grpc.StatusCode.UNAVAILABLE,
    DrainingError: grpc.StatusCode.FAILED_PRECONDITION,
    SubscriberBehind: grpc.StatusCode.RESOURCE_EXHAUSTED,
    WorkerLostError: grpc.StatusCode.UNAVAILABLE,
    StoreFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,  # Redis at maxmemory: retry later
    StoreRefusedError: grpc.StatusCode.UNAVAILABLE,  # read-only replica, failing persistence: retry later
}


async def _classify(e: Exception) -> tuple[grpc.StatusCode, str] | None:
    if refused := write_refusal(e):  # Redis errors that mean "not now", also from inside a script
        logger.warning("session state (Redis) refuses writes: %s", refused)
        e = refused
    for cls, code in _STATUS_OF.items():
        if isinstance(e, cls):
            return code, str(e)
    if isinstance(e, REDIS_UNAVAILABLE):  # incl. a cluster that is down or resharding: retry later
        reason = str(e) or type(e).__name__
        logger.warning("session state (Redis) is unavailable: %s", reason)
        return grpc.StatusCode.UNAVAILABLE, f"session state (Redis) is unavailable, retry later: {reason}"
    return None


def _response_id(namespace: str, session_id: str, request_id: str) -> str:
    return f"{RESPONSE_PREFIX}{public_id(namespace, session_id)}:{request_id}"


def _usage_dict(u: pb.Usage) -> dict:
    return {f.name: getattr(u, f.name) for f in pb.Usage.DESCRIPTOR.fields}


def _replay(num_tokens: int, record: str, request_id: str) -> list[pb.GenerateResponse]:
    """The responses of the Generate that recorded ``record`` under ``request_id``."""
    if not record.startswith("{"):  # an Append's (it records no answer)
        raise RequestError(_INVALID, f"request_id {shown(request_id)} was used by an Append of this session; "
                                     "a new Generate needs a new request_id")
    r = json.loads(record)
    return [pb.GenerateResponse(chunk=pb.TokenChunk(ids=r["ids"], text=r["text"])),
            pb.GenerateResponse(usage=pb.Usage(**dict(r["usage"], num_tokens=num_tokens)))]


def read_worker_stats(pool: WorkerPool, timeout_s: float = 10.0) -> dict[str, WorkerStats | Exception]:
    """Every worker's stats, or why it did not answer within ``timeout_s`` (blocking: for a
    thread, e.g. the metrics endpoint's)."""
    refs = {w: pool.handle(w).stats.remote() for w in pool.worker_ids}
    if not refs:
        return {}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    out: dict[str, WorkerStats | Exception] = {}
    for w, ref in refs.items():
        try:
            out[w] = ray.get(ref) if ref in ready else TimeoutError(f"no answer within {timeout_s:.0f} s")
        except ray.exceptions.RayError as e:
            out[w] = e
    return out


def _worker_stats(worker_id: str, s: WorkerStats | Exception) -> pb.WorkerStats:
    if isinstance(s, Exception):
        return pb.WorkerStats(worker_id=worker_id, error=f"{type(s).__name__}: {s}"[:MAX_STATUS_MESSAGE])
    c = s.cache
    return pb.WorkerStats(worker_id=worker_id, alive=s.alive, running=s.running, waiting=s.waiting,
                          loading=s.loading, t0_blocks=c.t0_blocks, t0_in_use=c.t0_in_use, t0_cached=c.t0_cached,
                          t1_blocks=c.t1_blocks, t1_cached=c.t1_cached, t1_in_use=c.t1_in_use,
                          loaded_tokens=c.loaded_tokens, lookup_tokens=c.lookup_tokens, evicted_t0=c.evicted_t0,
                          evicted_t1=c.evicted_t1, t2_put_bytes=c.t2_put_bytes, t2_get_bytes=c.t2_get_bytes,
                          preempted=s.engine.preempted, bytes_per_block=c.bytes_per_block)
