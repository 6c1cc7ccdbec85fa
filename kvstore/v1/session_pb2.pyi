from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Medium(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEDIUM_UNSPECIFIED: _ClassVar[Medium]
    MEDIUM_T0: _ClassVar[Medium]
    MEDIUM_T1: _ClassVar[Medium]
    MEDIUM_T2: _ClassVar[Medium]
MEDIUM_UNSPECIFIED: Medium
MEDIUM_T0: Medium
MEDIUM_T1: Medium
MEDIUM_T2: Medium

class Message(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Input(_message.Message):
    __slots__ = ("messages", "tokens")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    messages: Messages
    tokens: TokenIds
    def __init__(self, messages: _Optional[_Union[Messages, _Mapping]] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class Messages(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Message]
    def __init__(self, items: _Optional[_Iterable[_Union[Message, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "namespace", "model", "parent_id", "num_tokens", "metadata", "created", "updated", "pinned_until", "closed", "token_ids")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    PINNED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    namespace: str
    model: str
    parent_id: str
    num_tokens: int
    metadata: _containers.ScalarMap[str, str]
    created: float
    updated: float
    pinned_until: float
    closed: bool
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., namespace: _Optional[str] = ..., model: _Optional[str] = ..., parent_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., created: _Optional[float] = ..., updated: _Optional[float] = ..., pinned_until: _Optional[float] = ..., closed: _Optional[bool] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("namespace", "model", "system_prompt", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    model: str
    system_prompt: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, namespace: _Optional[str] = ..., model: _Optional[str] = ..., system_prompt: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AppendRequest(_message.Message):
    __slots__ = ("session_id", "input", "request_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    input: Input
    request_id: str
    def __init__(self, session_id: _Optional[str] = ..., input: _Optional[_Union[Input, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class AppendResponse(_message.Message):
    __slots__ = ("num_tokens",)
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    def __init__(self, num_tokens: _Optional[int] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop_token_ids", "stop", "ignore_eos")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "input", "sampling", "request_id", "worker_id", "skip_cache")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SKIP_CACHE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    input: Input
    sampling: SamplingParams
    request_id: str
    worker_id: str
    skip_cache: bool
    def __init__(self, session_id: _Optional[str] = ..., input: _Optional[_Union[Input, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., request_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., skip_cache: _Optional[bool] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cached_tokens_t0", "cached_tokens_t1", "cached_tokens_t2", "ttft_seconds", "tokens_per_second", "finish_reason", "worker_id", "num_tokens", "failovers", "recomputed_tokens_t0", "recomputed_tokens_t1", "recomputed_tokens_t2", "load_seconds")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_T0_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_T1_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_T2_FIELD_NUMBER: _ClassVar[int]
    TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTED_TOKENS_T0_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTED_TOKENS_T1_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTED_TOKENS_T2_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens_t0: int
    cached_tokens_t1: int
    cached_tokens_t2: int
    ttft_seconds: float
    tokens_per_second: float
    finish_reason: str
    worker_id: str
    num_tokens: int
    failovers: int
    recomputed_tokens_t0: int
    recomputed_tokens_t1: int
    recomputed_tokens_t2: int
    load_seconds: float
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_tokens_t0: _Optional[int] = ..., cached_tokens_t1: _Optional[int] = ..., cached_tokens_t2: _Optional[int] = ..., ttft_seconds: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., finish_reason: _Optional[str] = ..., worker_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., failovers: _Optional[int] = ..., recomputed_tokens_t0: _Optional[int] = ..., recomputed_tokens_t1: _Optional[int] = ..., recomputed_tokens_t2: _Optional[int] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("ids", "text")
    IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("chunk", "usage")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    chunk: TokenChunk
    usage: Usage
    def __init__(self, chunk: _Optional[_Union[TokenChunk, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class ForkRequest(_message.Message):
    __slots__ = ("session_id", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id", "include_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    include_tokens: bool
    def __init__(self, session_id: _Optional[str] = ..., include_tokens: _Optional[bool] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("namespace", "limit")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    limit: int
    def __init__(self, namespace: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("session_id", "ttl_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    ttl_seconds: int
    def __init__(self, session_id: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("worker_id", "cached_tokens")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    cached_tokens: int
    def __init__(self, worker_id: _Optional[str] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("worker_id", "alive", "running", "waiting", "loading", "t0_blocks", "t0_in_use", "t0_cached", "t1_blocks", "t1_cached", "t1_in_use", "loaded_tokens", "lookup_tokens", "evicted_t0", "evicted_t1", "t2_put_bytes", "t2_get_bytes", "preempted", "error", "bytes_per_block")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    LOADING_FIELD_NUMBER: _ClassVar[int]
    T0_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    T0_IN_USE_FIELD_NUMBER: _ClassVar[int]
    T0_CACHED_FIELD_NUMBER: _ClassVar[int]
    T1_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    T1_CACHED_FIELD_NUMBER: _ClassVar[int]
    T1_IN_USE_FIELD_NUMBER: _ClassVar[int]
    LOADED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_T0_FIELD_NUMBER: _ClassVar[int]
    EVICTED_T1_FIELD_NUMBER: _ClassVar[int]
    T2_PUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    T2_GET_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    alive: bool
    running: int
    waiting: int
    loading: int
    t0_blocks: int
    t0_in_use: int
    t0_cached: int
    t1_blocks: int
    t1_cached: int
    t1_in_use: int
    loaded_tokens: _containers.RepeatedScalarFieldContainer[int]
    lookup_tokens: int
    evicted_t0: int
    evicted_t1: int
    t2_put_bytes: int
    t2_get_bytes: int
    preempted: int
    error: str
    bytes_per_block: int
    def __init__(self, worker_id: _Optional[str] = ..., alive: _Optional[bool] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., loading: _Optional[int] = ..., t0_blocks: _Optional[int] = ..., t0_in_use: _Optional[int] = ..., t0_cached: _Optional[int] = ..., t1_blocks: _Optional[int] = ..., t1_cached: _Optional[int] = ..., t1_in_use: _Optional[int] = ..., loaded_tokens: _Optional[_Iterable[int]] = ..., lookup_tokens: _Optional[int] = ..., evicted_t0: _Optional[int] = ..., evicted_t1: _Optional[int] = ..., t2_put_bytes: _Optional[int] = ..., t2_get_bytes: _Optional[int] = ..., preempted: _Optional[int] = ..., error: _Optional[str] = ..., bytes_per_block: _Optional[int] = ...) -> None: ...

class ServiceStats(_message.Message):
    __slots__ = ("workers", "sessions", "turns", "prompt_tokens", "cached_tokens", "completion_tokens", "ttft_p50_seconds", "ttft_p90_seconds", "ttft_p99_seconds", "active_generations", "queued_generations", "session_redis_used_memory", "blocks_redis_used_memory", "blocks_stored")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TTFT_P90_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TTFT_P99_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    SESSION_REDIS_USED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_REDIS_USED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_STORED_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStats]
    sessions: int
    turns: int
    prompt_tokens: int
    cached_tokens: _containers.RepeatedScalarFieldContainer[int]
    completion_tokens: int
    ttft_p50_seconds: float
    ttft_p90_seconds: float
    ttft_p99_seconds: float
    active_generations: int
    queued_generations: int
    session_redis_used_memory: int
    blocks_redis_used_memory: int
    blocks_stored: int
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerStats, _Mapping]]] = ..., sessions: _Optional[int] = ..., turns: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[_Iterable[int]] = ..., completion_tokens: _Optional[int] = ..., ttft_p50_seconds: _Optional[float] = ..., ttft_p90_seconds: _Optional[float] = ..., ttft_p99_seconds: _Optional[float] = ..., active_generations: _Optional[int] = ..., queued_generations: _Optional[int] = ..., session_redis_used_memory: _Optional[int] = ..., blocks_redis_used_memory: _Optional[int] = ..., blocks_stored: _Optional[int] = ...) -> None: ...

class DrainWorkerRequest(_message.Message):
    __slots__ = ("worker_id", "timeout_seconds")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    timeout_seconds: float
    def __init__(self, worker_id: _Optional[str] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class DrainWorkerResponse(_message.Message):
    __slots__ = ("worker_id", "seconds", "moved_generations")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    MOVED_GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    seconds: float
    moved_generations: int
    def __init__(self, worker_id: _Optional[str] = ..., seconds: _Optional[float] = ..., moved_generations: _Optional[int] = ...) -> None: ...

class FlushNamespaceRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class FlushNamespaceResponse(_message.Message):
    __slots__ = ("blocks_dropped",)
    BLOCKS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    blocks_dropped: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, blocks_dropped: _Optional[_Iterable[int]] = ...) -> None: ...

class SubscribeKVEventsRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class KVEvent(_message.Message):
    __slots__ = ("kind", "medium", "worker_id", "namespace", "block_hash", "parent_block_hash", "token_ids")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[KVEvent.Kind]
        BLOCK_STORED: _ClassVar[KVEvent.Kind]
        BLOCK_REMOVED: _ClassVar[KVEvent.Kind]
        ALL_BLOCKS_CLEARED: _ClassVar[KVEvent.Kind]
    KIND_UNSPECIFIED: KVEvent.Kind
    BLOCK_STORED: KVEvent.Kind
    BLOCK_REMOVED: KVEvent.Kind
    ALL_BLOCKS_CLEARED: KVEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEDIUM_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    PARENT_BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    kind: KVEvent.Kind
    medium: Medium
    worker_id: str
    namespace: str
    block_hash: bytes
    parent_block_hash: bytes
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, kind: _Optional[_Union[KVEvent.Kind, str]] = ..., medium: _Optional[_Union[Medium, str]] = ..., worker_id: _Optional[str] = ..., namespace: _Optional[str] = ..., block_hash: _Optional[bytes] = ..., parent_block_hash: _Optional[bytes] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class KVEventBatch(_message.Message):
    __slots__ = ("events", "snapshot", "timestamp")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[KVEvent]
    snapshot: bool
    timestamp: float
    def __init__(self, events: _Optional[_Iterable[_Union[KVEvent, _Mapping]]] = ..., snapshot: _Optional[bool] = ..., timestamp: _Optional[float] = ...) -> None: ...
