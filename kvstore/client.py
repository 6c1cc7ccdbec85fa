"""A small Python client of the session service, for agent runtimes.

    from kvstore.client import SessionClient

    with SessionClient("127.0.0.1:50052", api_key="...") as kv:
        s = kv.create_session(system_prompt="You are a planner.")
        reply = kv.generate(s.session_id, messages=[{"role": "user", "content": "Plan a trip"}])
        for chunk in reply:               # streamed text as it is generated
            print(chunk.text, end="")
        print(reply.usage.cached_tokens_t0, reply.usage.ttft_seconds)
        branch = kv.fork(s.session_id)    # explores from the same prefix; its KV is reused

Every Append and Generate carries a request id (a fresh one unless you pass yours), so
re-sending the same call after a network error is applied once.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc

from kvstore.v1 import session_pb2 as pb
from kvstore.v1 import session_pb2_grpc as pb_grpc

_MAX_MESSAGE = 64 << 20


class SessionAPIError(Exception):
    """A call failed; ``code`` is the gRPC status code, ``message`` says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def _input(messages: Iterable[dict] | None, tokens: Iterable[int] | None) -> pb.Input | None:
    if messages is not None and tokens is not None:
        raise ValueError("pass messages or tokens, not both")
    if messages is not None:
        return pb.Input(messages=pb.Messages(items=[pb.Message(role=m["role"], content=m["content"]) for m in messages]))
    if tokens is not None:
        return pb.Input(tokens=pb.TokenIds(ids=list(tokens)))
    return None


class Generation:
    """A Generate stream: iterate for ``TokenChunk``s; ``usage`` is set once it ends.
    ``text`` and ``ids`` collect everything received; ``result()`` drains the stream."""

    def __init__(self, call) -> None:
        self._call = call
        self.ids: list[int] = []
        self.text = ""
        self.usage: pb.Usage | None = None

    def __iter__(self) -> Iterator[pb.TokenChunk]:
        try:
            for response in self._call:
                if response.HasField("usage"):
                    self.usage = response.usage
                    continue
                self.ids.extend(response.chunk.ids)
                self.text += response.chunk.text
                yield response.chunk
        except grpc.RpcError as e:
            raise SessionAPIError(e.code(), e.details()) from None

    def result(self) -> Generation:
        for _ in self:
            pass
        return self

    def cancel(self) -> None:
        """Stop generating (the worker frees the request's slot); the turn is not recorded."""
        self._call.cancel()


class _EventStream:
    """SubscribeKVEvents as an iterator of ``KVEventBatch``; ``cancel()`` ends it."""

    def __init__(self, call) -> None:
        self._call = call

    def __iter__(self) -> Iterator[pb.KVEventBatch]:
        try:
            yield from self._call
        except grpc.RpcError as e:
            if e.code() is not grpc.StatusCode.CANCELLED:
                raise SessionAPIError(e.code(), e.details()) from None

    def cancel(self) -> None:
        self._call.cancel()


class SessionClient:
    def __init__(self, address: str, api_key: str = "", tls_ca: str | None = None,
                 timeout_s: float | None = 60.0) -> None:
        options = [("grpc.max_receive_message_length", _MAX_MESSAGE), ("grpc.max_send_message_length", _MAX_MESSAGE)]
        if tls_ca:
            creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.SessionsStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout_s = timeout_s

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SessionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request, timeout_s: float | None = None):
        try:
            return getattr(self._stub, method)(request, metadata=self._metadata, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as e:
            raise SessionAPIError(e.code(), e.details()) from None

    # ---- the API ---------------------------------------------------------------------------

    def create_session(self, system_prompt: str = "", metadata: dict[str, str] | None = None,
                       namespace: str = "", model: str = "") -> pb.SessionInfo:
        return self._call("CreateSession", pb.CreateSessionRequest(
            namespace=namespace, model=model, system_prompt=system_prompt, metadata=metadata or {}))

    def append(self, session_id: str, messages: Iterable[dict] | None = None, tokens: Iterable[int] | None = None,
               request_id: str | None = None) -> int:
        """Add messages (e.g. a tool result) or token ids without generating; returns the history length."""
        request = pb.AppendRequest(session_id=session_id, input=_input(messages, tokens),
                                   request_id=request_id or uuid.uuid4().hex)
        return self._call("Append", request).num_tokens

    def generate(self, session_id: str, messages: Iterable[dict] | None = None, tokens: Iterable[int] | None = None,
                 *, max_tokens: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 0.0,
                 seed: int | None = None, stop: Iterable[str] = (), stop_token_ids: Iterable[int] = (),
                 ignore_eos: bool = False, request_id: str | None = None, worker_id: str = "",
                 skip_cache: bool = False) -> Generation:
        """Start a turn; returns a ``Generation`` to iterate (``.result()`` waits for all of it)."""
        sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                     stop=list(stop), stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos)
        if seed is not None:
            sampling.seed = seed
        request = pb.GenerateRequest(session_id=session_id, input=_input(messages, tokens), sampling=sampling,
                                     request_id=request_id or uuid.uuid4().hex, worker_id=worker_id,
                                     skip_cache=skip_cache)
        return Generation(self._stub.Generate(request, metadata=self._metadata, timeout=self.timeout_s))

    def fork(self, session_id: str, metadata: dict[str, str] | None = None) -> pb.SessionInfo:
        return self._call("Fork", pb.ForkRequest(session_id=session_id, metadata=metadata or {}))

    def get_session(self, session_id: str, include_tokens: bool = False) -> pb.SessionInfo:
        return self._call("GetSession", pb.GetSessionRequest(session_id=session_id, include_tokens=include_tokens))

    def list_sessions(self, namespace: str = "", limit: int = 0) -> list[pb.SessionInfo]:
        return list(self._call("ListSessions", pb.ListSessionsRequest(namespace=namespace, limit=limit)).sessions)

    def close_session(self, session_id: str) -> pb.SessionInfo:
        return self._call("CloseSession", pb.CloseSessionRequest(session_id=session_id))

    def pin(self, session_id: str, ttl_seconds: int) -> pb.SessionInfo:
        """Keep the session's KV in the cold tier for ``ttl_seconds`` (0 unpins)."""
        return self._call("Pin", pb.PinRequest(session_id=session_id, ttl_seconds=ttl_seconds))

    def prefetch(self, session_id: str) -> pb.PrefetchResponse:
        """Warm the session's KV into the worker its next turn will use."""
        return self._call("Prefetch", pb.PrefetchRequest(session_id=session_id))

    def get_stats(self) -> pb.ServiceStats:
        """The whole service: workers and their tiers, turns and reuse, Redis memory (an admin key)."""
        return self._call("GetStats", pb.GetStatsRequest())

    def drain_worker(self, worker_id: str, timeout_s: float = 60.0) -> pb.DrainWorkerResponse:
        """Stop a worker once its generations finish (within ``timeout_s``; the rest resume
        elsewhere), routing nothing new to it meanwhile (an admin key)."""
        return self._call("DrainWorker", pb.DrainWorkerRequest(worker_id=worker_id, timeout_seconds=timeout_s),
                          timeout_s=self.timeout_s + timeout_s)

    def subscribe_kv_events(self, namespace: str = "") -> Iterator[pb.KVEventBatch]:
        """The workers' block events: a snapshot of T0/T1 first, then changes as they happen;
        iterate it until ``.cancel()`` (or this client closes)."""
        call = self._stub.SubscribeKVEvents(pb.SubscribeKVEventsRequest(namespace=namespace), metadata=self._metadata)
        return _EventStream(call)

    def flush_namespace(self, namespace: str) -> pb.FlushNamespaceResponse:
        """Forget a namespace's blocks in every tier (an admin key)."""
        return self._call("FlushNamespace", pb.FlushNamespaceRequest(namespace=namespace))
