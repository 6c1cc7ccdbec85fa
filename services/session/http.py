"""The OpenAI-compatible HTTP API (FastAPI on uvicorn, in the session service's process and
event loop): Chat Completions, Responses, models, health.

Every call goes through the Sessions servicer (``SessionServicer.complete``, ``respond``,
``response``, ``delete_response``, ``models``) with an ``HTTPContext`` in place of the gRPC
context: the same authentication, limits, admission, turns and status table; a status code
that would abort a gRPC call raises ``APIError`` here, mapped once (``_HTTP_OF``) to an HTTP
status and OpenAI's error body. Streams are server-sent events; a stream's status is decided
by its first token (errors before it get their HTTP status, later ones an error event), and a
client that goes away mid-stream cancels the generation (its worker slot is freed and nothing
is recorded), as cancelling a gRPC Generate does.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvstore.v1 import session_pb2 as pb
from services.common.errors import RequestError, ServerStartError
from services.common.net import host_port
from services.session.service import SessionServicer

if TYPE_CHECKING:
    from services.session.server import SessionServiceConfig

logger = logging.getLogger(__name__)

C = grpc.StatusCode
# The service's status codes as HTTP statuses and OpenAI error types (anything else: 500).
_HTTP_OF = {
    C.INVALID_ARGUMENT: (400, "invalid_request_error"), C.FAILED_PRECONDITION: (400, "invalid_request_error"),
    C.UNAUTHENTICATED: (401, "authentication_error"), C.PERMISSION_DENIED: (403, "permission_error"),
    C.NOT_FOUND: (404, "not_found_error"), C.ABORTED: (409, "conflict_error"),
    C.RESOURCE_EXHAUSTED: (429, "rate_limit_error"), C.UNAVAILABLE: (503, "service_unavailable_error"),
    C.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
_TOO_LARGE = 413
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}  # in pydantic's locations of union errors


class APIError(Exception):
    """A call's failure: a status code of the service's table (or an HTTP status), a message,
    and the request parameter it concerns (OpenAI's ``param``)."""

    def __init__(self, code: grpc.StatusCode | int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param

    @property
    def status(self) -> int:
        return self.code if isinstance(self.code, int) else _HTTP_OF.get(self.code, (500, ""))[0]

    def body(self) -> dict:
        kind = "invalid_request_error" if isinstance(self.code, int) else _HTTP_OF.get(self.code, (0, "server_error"))[1]
        code = f"http_{self.code}" if isinstance(self.code, int) else self.code.name.lower()
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": code}}


class HTTPContext:
    """What the servicer uses of a gRPC context, for an HTTP request."""

    def __init__(self, request: Request) -> None:
        self._auth = request.headers.get("authorization")

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", self._auth)] if self._auth is not None else []

    def time_remaining(self) -> float | None:
        return None  # HTTP requests carry no deadline

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise APIError(code, message)


# ---- requests (OpenAI's fields; the others are refused with a 400 naming them) --------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KVStoreOptions(_Strict):
    """This service's own fields: ``extra_body={"kvstore": {...}}`` in the ``openai`` client."""

    namespace: str = ""  # empty: the API key's (when it has one)
    worker_id: str = ""  # run on this worker (tests, benchmarks)
    skip_cache: bool = False  # compute the whole prompt (measures what reuse saves)
    ignore_eos: bool = False  # generate max_tokens tokens


class TextPart(_Strict):
    type: Literal["text", "input_text", "output_text"]
    text: str
    annotations: list | None = None


Content = str | list[TextPart] | None
Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
MaxTokens = Annotated[int, Field(ge=1, lt=1 << 32)]


class _Generation(_Strict):
    model: str
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool = False
    user: str | None = None
    # Accepted where they ask for nothing this service lacks: tools are not rendered into the
    # prompt and no tool call is ever made (a forced tool choice is refused).
    tools: list[dict] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    kvstore: KVStoreOptions = KVStoreOptions()


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    name: str | None = None
    tool_call_id: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    seed: int | None = Field(None, ge=0, lt=1 << 64)
    stop: str | list[str] | None = None
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    logprobs: Literal[False] | None = None


class InputItem(_Strict):
    type: Literal["message", "function_call_output"] = "message"
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: Content = None
    call_id: str | None = None  # function_call_output: rendered as a tool message
    output: str | None = None
    id: str | None = None
    status: str | None = None


class ResponseRequest(_Generation):
    input: str | list[InputItem]
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: MaxTokens | None = None
    store: bool = True
    metadata: dict[str, str] | None = None


class ErrorBody(BaseModel):
    error: dict[str, Any]


_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 403, 404, 409, 413, 429, 503)}


def _text(content: Content) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content or ())


def _message(role: str, content: Content) -> pb.Message:
    return pb.Message(role="system" if role == "developer" else role, content=_text(content))


def _request(body: _Generation, messages: list[pb.Message], max_tokens: int | None,
             config: SessionServiceConfig, param: str, seed: int | None = None,
             stop: str | list[str] | None = None) -> pb.GenerateRequest:
    if max_tokens is not None and max_tokens > config.max_tokens:
        raise APIError(C.INVALID_ARGUMENT, f"{param} {max_tokens} is over this service's limit of {config.max_tokens}",
                       param)
    sampling = pb.SamplingParams(max_tokens=max_tokens or 0, temperature=body.temperature or 0.0,
                                 top_p=body.top_p or 0.0, stop=[stop] if isinstance(stop, str) else stop or [],
                                 ignore_eos=body.kvstore.ignore_eos)
    if seed is not None:
        sampling.seed = seed
    return pb.GenerateRequest(input=pb.Input(messages=pb.Messages(items=messages)), sampling=sampling,
                              worker_id=body.kvstore.worker_id, skip_cache=body.kvstore.skip_cache)


def _extra(u: pb.Usage) -> dict:
    """The usage fields OpenAI has no name for (per-tier cached and recomputed tokens, ...)."""
    return {f.name: getattr(u, f.name) for f in pb.Usage.DESCRIPTOR.fields
            if f.name not in ("prompt_tokens", "completion_tokens", "finish_reason")}


def _chat_usage(u: pb.Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens_t0 + u.cached_tokens_t1 + u.cached_tokens_t2},
            "kvstore": _extra(u)}


def _response_usage(u: pb.Usage) -> dict:
    return {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens_t0 + u.cached_tokens_t1 + u.cached_tokens_t2},
            "output_tokens_details": {"reasoning_tokens": 0}, "kvstore": _extra(u)}


def _response(rid: str, created: float, text: str, usage: pb.Usage | None, fields: dict) -> dict:
    """A Responses API response object (``usage`` None: still in progress)."""
    done = usage is not None
    item = {"type": "message", "id": "msg_" + rid.rsplit(":", 1)[-1], "status": "completed" if done else "in_progress",
            "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}] if done else []}
    incomplete = done and usage.finish_reason == "length"
    return {"id": rid, "object": "response", "created_at": int(created), "model": fields.get("model"),
            "status": "incomplete" if incomplete else "completed" if done else "in_progress",
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None, "error": None,
            "output": [item] if done else [], "usage": _response_usage(usage) if done else None,
            "instructions": fields.get("instructions"), "metadata": fields.get("metadata") or {},
            "previous_response_id": fields.get("previous_response_id"), "temperature": fields.get("temperature"),
            "top_p": fields.get("top_p"), "max_output_tokens": fields.get("max_output_tokens"),
            "user": fields.get("user"), "store": fields.get("store", True), "tools": [], "tool_choice": "none",
            "parallel_tool_calls": False, "text": {"format": {"type": "text"}}, "truncation": "disabled"}


async def _until_first_token(items: AsyncIterator, params: dict[grpc.StatusCode, str]) -> list:
    """The items up to the first token chunk (or all of them): a failure before it is the
    call's HTTP status. Errors without a param get the one ``params`` names for their code."""
    head = []
    try:
        async for item in items:
            head.append(item)
            if isinstance(item, pb.GenerateResponse):
                break
    except APIError as e:
        e.param = e.param or params.get(e.code)
        raise
    return head


async def _collect(items: AsyncIterator, params: dict[grpc.StatusCode, str]) -> tuple[list, str, pb.Usage]:
    """(items before the tokens, text, usage) of a whole generation."""
    async with contextlib.aclosing(items):
        head = await _until_first_token(items, params)
        text, usage = "", None
        for r in head[-1:] + [r async for r in items]:
            if r.HasField("usage"):
                usage = r.usage
            else:
                text += r.chunk.text
    return head[:-1], text, usage


def _sse(data: dict, event: str | None = None) -> str:
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data)}\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events; the generator is closed however the response ends (a client gone
    away cancels the generation)."""

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"cache-control": "no-cache"})

    async def stream_response(self, send) -> None:
        async with contextlib.aclosing(self.body_iterator):
            await super().stream_response(send)


def create_app(servicer: SessionServicer, config: SessionServiceConfig, healthy: Callable[[], bool]) -> FastAPI:
    app = FastAPI(title="kvstore OpenAI-compatible API", version="1", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        err = max(e.errors(), key=lambda x: len(x.get("loc", ())))  # the deepest: most specific
        loc = [] if err.get("type") == "json_invalid" else [  # after "body", without union members' tags
            p for p in err.get("loc", ())[1:] if isinstance(p, int) or not ("[" in p or p in _TYPE_TAGS)]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
        message = f"unrecognized request argument supplied: {param}" if err.get("type") == "extra_forbidden" \
            else f"invalid {param or 'request body'}: {err.get('msg')}"
        return JSONResponse(APIError(C.INVALID_ARGUMENT, message, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:  # unknown route, bad method, ...
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code, headers=e.headers)

    def check(body: _Generation, ctx: HTTPContext, stateless: bool) -> None:
        """The caller, then what the servicer would refuse without naming the parameter."""
        try:
            servicer.namespace(ctx, body.kvstore.namespace) if stateless else servicer.authenticate(ctx)
        except RequestError as e:
            raise APIError(e.code, e.message, "kvstore.namespace" if e.code is C.INVALID_ARGUMENT else None) from None
        if body.model != servicer.model:
            raise APIError(C.NOT_FOUND, f"model {body.model[:64]!r} is not served here; this service serves "
                                        f"{servicer.model!r}", "model")
        if body.kvstore.worker_id and body.kvstore.worker_id not in servicer.worker_ids:
            raise APIError(C.INVALID_ARGUMENT, f"unknown worker {body.kvstore.worker_id[:64]!r}; workers: "
                                               f"{', '.join(servicer.worker_ids)}", "kvstore.worker_id")

    @app.get("/health", responses={503: {"model": ErrorBody}})
    async def health() -> JSONResponse:
        if healthy():
            return JSONResponse({"status": "ok"})
        return JSONResponse(APIError(C.UNAVAILABLE, "not serving: Redis, a decode worker or the block store is "
                                                    "missing").body(), status_code=503)

    @app.get("/v1/models", responses=_ERRORS)
    async def models(request: Request) -> dict:
        names = await servicer.models(HTTPContext(request))
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "kvstore"}
                                           for m in names]}

    @app.post("/v1/chat/completions", responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        ctx = HTTPContext(request)
        check(body, ctx, True)
        if body.tool_choice is not None and body.tool_choice != "none" and not body.tools:
            raise APIError(C.INVALID_ARGUMENT, "tool_choice needs tools", "tool_choice")
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        req = _request(body, [_message(m.role, m.content) for m in body.messages],
                       body.max_completion_tokens or body.max_tokens, config, param, body.seed, body.stop)
        items = servicer.complete(req, body.kvstore.namespace, ctx)
        cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        base = {"id": cid, "created": created, "model": servicer.model, "system_fingerprint": None}
        params = {C.INVALID_ARGUMENT: "messages"}
        if not body.stream:
            _, text, usage = await _collect(items, params)
            return {**base, "object": "chat.completion", "usage": _chat_usage(usage), "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": usage.finish_reason}]}
        head = await _until_first_token(items, params)

        def chunk(delta: dict, finish: str | None = None) -> str:
            return _sse({**base, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        async def events() -> AsyncIterator[str]:
            async with contextlib.aclosing(items):
                yield chunk({"role": "assistant", "content": ""})
                try:
                    async for r in _chain(head, items):
                        if r.HasField("chunk"):
                            if r.chunk.text:
                                yield chunk({"content": r.chunk.text})
                            continue
                        yield chunk({}, r.usage.finish_reason)
                        if body.stream_options and body.stream_options.include_usage:
                            yield _sse({**base, "object": "chat.completion.chunk", "choices": [],
                                        "usage": _chat_usage(r.usage)})
                except APIError as e:
                    yield _sse(e.body())
                yield "data: [DONE]\n\n"
        return _EventStream(events())

    @app.post("/v1/responses", responses=_ERRORS)
    async def create_response(body: ResponseRequest, request: Request):
        ctx = HTTPContext(request)
        check(body, ctx, not body.previous_response_id)
        messages = [pb.Message(role="user", content=body.input)] if isinstance(body.input, str) else []
        for i, item in enumerate(body.input if isinstance(body.input, list) else ()):
            if item.type == "function_call_output":
                messages.append(pb.Message(role="tool", content=item.output or ""))
            elif item.role is None:
                raise APIError(C.INVALID_ARGUMENT, f"input[{i}] is a message without a role", f"input[{i}].role")
            else:
                messages.append(_message(item.role, item.content))
        if not body.store and body.previous_response_id:
            raise APIError(C.INVALID_ARGUMENT, "previous_response_id needs store=true here: a continuation is "
                                               "stored as a turn of the conversation", "store")
        if not body.store and body.instructions:  # stateless: the instructions lead the conversation
            messages.insert(0, pb.Message(role="system", content=body.instructions))
        req = _request(body, messages, body.max_output_tokens, config, "max_output_tokens")
        fields = {"model": servicer.model, "store": body.store, **body.model_dump(include={
            "instructions", "metadata", "previous_response_id", "max_output_tokens", "temperature", "top_p", "user"})}
        if body.store:
            items = servicer.respond(req, ctx, namespace=body.kvstore.namespace,
                                     previous=body.previous_response_id or "", instructions=body.instructions or "",
                                     fields=fields)
        else:  # nothing stored: a stateless generation
            items = _with_id(servicer.complete(req, body.kvstore.namespace, ctx))
        params = {C.INVALID_ARGUMENT: "input", C.NOT_FOUND: "previous_response_id"}
        created = time.time()
        if not body.stream:
            (rid,), text, usage = await _collect(items, params)
            return _response(rid, created, text, usage, fields)
        head = await _until_first_token(items, params)
        rid = head.pop(0)
        return _EventStream(_response_events(rid, created, fields, head, items))

    @app.get("/v1/responses/{response_id}", responses=_ERRORS)
    async def get_response(response_id: str, request: Request) -> dict:
        r = await servicer.response(response_id, HTTPContext(request))
        return _response(r.id, r.created, r.text, r.usage, r.fields)

    @app.delete("/v1/responses/{response_id}", responses=_ERRORS)
    async def delete_response(response_id: str, request: Request) -> dict:
        await servicer.delete_response(response_id, HTTPContext(request))
        return {"id": response_id, "object": "response", "deleted": True}

    return app


async def _chain(head: list, rest: AsyncIterator) -> AsyncIterator:
    for item in head:
        yield item
    async for item in rest:
        yield item


async def _with_id(items: AsyncIterator) -> AsyncIterator:
    """A stateless generation's items after an id, as ``respond`` yields them (its response is not stored)."""
    yield "resp_" + secrets.token_hex(16)
    async with contextlib.aclosing(items):
        async for item in items:
            yield item


async def _response_events(rid: str, created: float, fields: dict, head: list,
                           items: AsyncIterator) -> AsyncIterator[str]:
    """The Responses API's event sequence for one streamed response."""
    n = 0
    msg_id = "msg_" + rid.rsplit(":", 1)[-1]
    where = {"item_id": msg_id, "output_index": 0, "content_index": 0}

    def event(kind: str, **data) -> str:
        nonlocal n
        n += 1
        return _sse({"type": kind, "sequence_number": n - 1, **data}, kind)

    async with contextlib.aclosing(items):
        start = _response(rid, created, "", None, fields)
        yield event("response.created", response=start)
        yield event("response.in_progress", response=start)
        item = {"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []}
        yield event("response.output_item.added", output_index=0, item=item)
        yield event("response.content_part.added", **where, part={"type": "output_text", "text": "", "annotations": []})
        text = ""
        try:
            async for r in _chain(head, items):
                if r.HasField("chunk"):
                    if r.chunk.text:
                        text += r.chunk.text
                        yield event("response.output_text.delta", **where, delta=r.chunk.text, logprobs=[])
                    continue
                done = _response(rid, created, text, r.usage, fields)
                part = done["output"][0]["content"][0]
                yield event("response.output_text.done", **where, text=text, logprobs=[])
                yield event("response.content_part.done", **where, part=part)
                yield event("response.output_item.done", output_index=0, item=done["output"][0])
                yield event(f"response.{done['status']}", response=done)
        except APIError as e:
            yield event("error", code=e.body()["error"]["code"], message=e.message, param=e.param, error=e.body()["error"])


class _BodyLimit:
    """Refuses a request whose declared length is over ``limit`` bytes (413) before reading
    it, and stops reading a body sent without a length once it passes ``limit`` (400)."""

    def __init__(self, app: FastAPI, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            error = APIError(_TOO_LARGE, f"the request is over {self.limit} bytes")
            return await JSONResponse(error.body(), status_code=_TOO_LARGE)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ValueError(f"the request is over {self.limit} bytes")
            return message
        return await self.app(scope, limited, send)


class HTTPServer:
    """uvicorn serving the app on the running event loop; ``await start()`` / ``await stop()``."""

    def __init__(self, app: FastAPI, config: SessionServiceConfig) -> None:
        self._config = config
        tls = dict(ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key) if config.tls_cert else {}
        self._server = _Uvicorn(uvicorn.Config(_BodyLimit(app, config.max_message_bytes), log_level="warning",
                                               access_log=False, lifespan="off", **tls))
        self._task: asyncio.Task | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return host_port(self._config.host, self.port)

    async def start(self) -> int:
        host = self._config.host.strip("[]")
        try:
            sock = socket.create_server((host, max(self._config.http_port, 0)),
                                        family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError as e:
            raise ServerStartError(f"cannot listen on {host_port(host, self._config.http_port)}: {e}") from e
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="session-http")
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()  # raises why it did not start
            raise ServerStartError(f"the HTTP API did not start on {self.address}")
        return self.port

    async def stop(self, grace: float) -> None:
        """Refuse new connections, let open requests finish within ``grace`` seconds (then cancel them)."""
        if self._task is not None:
            self._server.config.timeout_graceful_shutdown = max(grace, 0.1)
            self._server.should_exit = True
            await self._task
            self._task = None


class _Uvicorn(uvicorn.Server):
    def capture_signals(self):  # the process's owner (kvstore serve) handles signals
        return contextlib.nullcontext()
