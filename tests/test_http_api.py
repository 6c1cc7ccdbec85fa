"""The OpenAI-compatible HTTP API with the official ``openai`` client (sync and async, stream
and not) against a session server over a real Ray pool (two decode workers), a real block
store and real Redis: greedy outputs equal the engine computing everything; reuse shows in
``cached_tokens``; ``previous_response_id`` chains, forks on another worker and survives a
restart; every error by status code and OpenAI error body; disconnects; 16 concurrent streams;
and chat histories that keep the template's end of turn with a byte-level BPE tokenizer."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest
import ray
from servicehelpers import LoopThread, reference, serving, start_pool, wait_for, worker_config
from test_tokenizer import _build_tokenizer_dir

from kvstore.client import SessionClient
from services.blockstore.server import BlockStoreConfig, BlockStoreThread
from services.common.embedded_redis import EmbeddedRedis, EmbeddedRedisConfig
from services.session.pool import PoolConfig
from services.session.server import SessionServer, SessionServiceConfig
from workers.tokenizer import ByteTokenizer, load_tokenizer

SYSTEM = "You are a careful planning agent. Think step by step. " * 2
MODEL = "tiny"
EOS = {"kvstore": {"ignore_eos": True}}  # random weights: generate max_tokens tokens


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    blocks = EmbeddedRedis().start()
    blockstore = BlockStoreThread(BlockStoreConfig(port=0, redis_url=blocks.url))
    blockstore.start()
    sessions = EmbeddedRedis(EmbeddedRedisConfig(maxmemory="0", maxmemory_policy="noeviction")).start()
    loop = LoopThread()
    pool = start_pool(loop, PoolConfig(num_workers=2, worker=worker_config(blockstore.address, cost_aware=False),
                                       poll_interval_s=0.05, name_prefix="http-test"))
    state = {"loop": loop, "pool": pool, "redis_url": sessions.url, "blockstore": blockstore.address,
             "tok": ByteTokenizer(pool.info.vocab_size), "tmp": tmp_path_factory.mktemp("http")}
    with serving(loop, pool, sessions.url, blockstore_address=blockstore.address, http_port=0) as server:
        state["server"] = server
        yield state
    loop.run(pool.close())
    loop.close()
    sessions.stop()
    blockstore.stop()
    blocks.stop()
    ray.shutdown()


def base_url(server: SessionServer) -> str:
    return f"http://127.0.0.1:{server.http.port}/v1"


def client(server: SessionServer, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url(server), api_key=key, max_retries=0, timeout=60)


def session_of(response_id: str) -> str:
    """The session a stored response is a point of (its id names it)."""
    return response_id.removeprefix("resp_").rsplit(":", 1)[0]


def grpc_history(env, session_id: str) -> list[int]:
    with SessionClient(env["server"].address, api_key="key-a") as kv:
        return list(kv.get_session(session_id, include_tokens=True).token_ids)


def check_turn(env, response) -> list[int]:
    """The stored turn of ``response`` equals the engine's greedy output for the prompt the
    model saw; returns that prompt and output."""
    tokens = grpc_history(env, session_of(response.id))
    u = response.usage
    prompt, output = tokens[:u.input_tokens], tokens[u.input_tokens:u.input_tokens + u.output_tokens]
    assert output == reference(prompt, u.output_tokens)
    assert response.output_text == env["tok"].decode(output)
    return prompt + output


def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    assert set(e.value.body) == {"message", "type", "param", "code"}, e.value.body  # OpenAI's error shape
    return e.value


def test_health_models_and_auth(env):
    server = env["server"]
    assert httpx.get(f"http://127.0.0.1:{server.http.port}/health").json() == {"status": "ok"}
    assert [m.id for m in client(server).models.list()] == [MODEL]
    e = error_of(lambda: client(server, "wrong").models.list())
    assert e.status_code == 401 and e.body["type"] == "authentication_error"
    e = error_of(lambda: client(server, "wrong").chat.completions.create(model="gpt-9", messages=[]))
    assert e.status_code == 400 and e.param == "messages"  # the body first (its shape), ...
    e = error_of(lambda: client(server, "wrong").responses.create(model="gpt-9", input="x", previous_response_id="r"))
    assert e.status_code == 401  # ... then the caller, then the model
    r = httpx.get(f"{base_url(server)}/models")  # no key at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    assert httpx.get(f"{base_url(server)}/nowhere").status_code == 404


def test_chat_completions_match_the_engine_sync_and_async_stream_or_not(env):
    c = client(env["server"])
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Plan a trip to Kyoto."}]
    prompt = env["tok"].apply_chat_template(messages, add_generation_prompt=True)
    expected = env["tok"].decode(reference(prompt, 8))
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, extra_body=EOS)
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 8)
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=8, stream=True,
                                            stream_options={"include_usage": True}, extra_body=EOS))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 8
    # The second request found the prompt cached (all but its last token's block).
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0

    async def run_async():
        ac = openai.AsyncOpenAI(base_url=base_url(env["server"]), api_key="key-a", max_retries=0)
        whole = await ac.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, extra_body=EOS)
        stream = await ac.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True,
                                                  extra_body=EOS)
        streamed = "".join([ch.choices[0].delta.content or "" async for ch in stream])
        await ac.close()
        return whole.choices[0].message.content, streamed
    assert asyncio.run(run_async()) == (expected, expected)


def test_resending_the_history_reuses_it(env):
    c = client(env["server"])
    messages = [{"role": "system", "content": "(resend) " + SYSTEM}, {"role": "user", "content": "First question?"}]
    cached = []
    for question in ("Second question?", "Third question?"):
        r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, extra_body=EOS)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        extra = r.usage.model_extra["kvstore"]  # the per-tier split and the rest of the engine's usage
        assert sum(extra[f"cached_tokens_t{t}"] for t in range(3)) == cached[-1]
        assert {"recomputed_tokens_t0", "load_seconds", "ttft_seconds", "worker_id"} <= set(extra)
        messages += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": question}]
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, extra_body=EOS)
    cached.append(r.usage.prompt_tokens_details.cached_tokens)
    assert cached[0] == 0 and 0 < cached[1] < cached[2], cached


def test_responses_chain_fork_on_another_worker_and_restart(env):
    c = client(env["server"])
    r = c.responses.create(model=MODEL, instructions=SYSTEM, input="Plan a marathon.", max_output_tokens=8,
                           extra_body=EOS)
    assert r.status == "incomplete" and r.usage.output_tokens == 8  # stopped at max_output_tokens
    chain = [r]
    for i in range(3):
        if i == 1:  # sessions and responses live in Redis: a new server continues them
            env["loop"].run(env["server"].stop(grace=0))
            env["server"] = SessionServer(env["server"].config, env["pool"], env["tok"])
            env["loop"].run(env["server"].start())
            c = client(env["server"])
        stream = c.responses.create(model=MODEL, previous_response_id=chain[-1].id, input=f"Step {i + 2}?",
                                    max_output_tokens=8, stream=True, extra_body=EOS)
        events = list(stream)
        assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
        assert events[-1].type == "response.incomplete"
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        done = events[-1].response
        assert deltas == done.output_text and done.usage.input_tokens_details.cached_tokens > 0
        chain.append(done)
    histories = [check_turn(env, x) for x in chain]
    assert len({session_of(x.id) for x in chain}) == 1  # each continued the latest: appended
    for before, after in zip(histories, histories[1:]):
        assert after[:len(before)] == before
    got = c.responses.retrieve(chain[1].id)
    assert (got.output_text, got.previous_response_id, got.instructions) == (chain[1].output_text, chain[0].id, None)
    # Continuing an older response forks the conversation there, here on the other worker,
    # which finds the history in T2.
    other = next(w for w in env["pool"].worker_ids if w != chain[1].usage.model_extra["kvstore"]["worker_id"])
    fork = c.responses.create(model=MODEL, previous_response_id=chain[1].id, input="Another way?",
                              max_output_tokens=8, extra_body={"kvstore": {"ignore_eos": True, "worker_id": other}})
    extra = fork.usage.model_extra["kvstore"]
    assert session_of(fork.id) != session_of(chain[1].id) and extra["worker_id"] == other
    assert extra["cached_tokens_t2"] > 0 and extra["load_seconds"] > 0  # it waited for the blocks from T2
    assert env["server"].metrics.registry.get_sample_value("kvstore_session_load_seconds_count") > 0
    fork_history = check_turn(env, fork)
    assert fork_history[:len(histories[1])] == histories[1] and fork_history[:len(histories[2])] != histories[2]
    n = chain[-1].usage.model_extra["kvstore"]["num_tokens"]  # the session's length after its last turn
    assert len(grpc_history(env, session_of(chain[-1].id))) == n  # the original is untouched
    # Deleted: neither readable nor continuable.
    c.responses.delete(chain[-1].id)
    assert error_of(lambda: c.responses.retrieve(chain[-1].id)).status_code == 404
    e = error_of(lambda: c.responses.create(model=MODEL, previous_response_id=chain[-1].id, input="x"))
    assert e.status_code == 404 and e.param == "previous_response_id"


def test_async_responses_and_function_call_output(env):
    async def run():
        ac = openai.AsyncOpenAI(base_url=base_url(env["server"]), api_key="key-a", max_retries=0)
        first = await ac.responses.create(model=MODEL, input=[{"role": "developer", "content": SYSTEM},
                                                              {"role": "user", "content": "Weather?"}],
                                          max_output_tokens=4, extra_body=EOS, metadata={"run": "7"})
        stream = await ac.responses.create(model=MODEL, previous_response_id=first.id, stream=True,
                                           max_output_tokens=4, extra_body=EOS,
                                           input=[{"type": "function_call_output", "call_id": "c1",
                                                   "output": '{"weather": "sunny"}'}])
        events = [e async for e in stream]
        await ac.close()
        return first, events[-1].response
    first, second = asyncio.run(run())
    assert first.metadata == {"run": "7"}
    history = check_turn(env, second)
    tok = env["tok"]
    rendered = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Weather?"}],
                                       add_generation_prompt=True)
    assert history[:len(rendered)] == rendered
    assert tok.decode(history, skip_special_tokens=False).count('<|tool|>{"weather": "sunny"}<|end|><|assistant|>') == 1


def test_stateless_responses_are_not_stored(env):
    c = client(env["server"])
    r = c.responses.create(model=MODEL, input="Hi", instructions=SYSTEM, store=False, max_output_tokens=4,
                           extra_body=EOS)
    prompt = env["tok"].apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}],
                                            add_generation_prompt=True)
    assert r.output_text == env["tok"].decode(reference(prompt, 4))
    assert error_of(lambda: c.responses.retrieve(r.id)).status_code == 404


def test_errors_by_status_and_body(env):
    server = env["server"]
    a, b = client(server), client(server, "key-b")
    msgs = [{"role": "user", "content": "hi"}]

    def chat(**kw):
        return lambda: a.chat.completions.create(**{"model": MODEL, "messages": msgs, "max_tokens": 2, **kw})
    cases = [
        (chat(n=2), 400, "n"),
        (chat(logprobs=True), 400, "logprobs"),
        (chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required"), 400, "tool_choice"),
        (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
         "messages[0].content[0].type"),
        (chat(extra_body={"frobnicate": 1}), 400, "frobnicate"),
        (chat(temperature=5), 400, "temperature"),
        (chat(max_tokens=10**6), 400, "max_tokens"),
        (chat(messages=[{"role": "user", "content": "x" * 5000}]), 400, "messages"),  # over the model's context
        (chat(model="gpt-9"), 404, "model"),
        (chat(extra_body={"kvstore": {"namespace": "tenant-b"}}), 403, None),
        (chat(extra_body={"kvstore": {"worker_id": "nobody"}}), 400, "kvstore.worker_id"),
        (lambda: a.responses.create(model=MODEL, input="x", store=False, previous_response_id="resp_x"), 400, "store"),
        (lambda: a.responses.create(model=MODEL, input="x", max_output_tokens=0), 400, "max_output_tokens"),
        (lambda: a.responses.retrieve("resp_nope"), 404, None),
    ]
    for call, status, param in cases:
        e = error_of(call)
        assert (e.status_code, e.param) == (status, param), (e.status_code, e.body)
    r = a.responses.create(model=MODEL, input="mine", max_output_tokens=2)
    for call in (lambda: b.responses.retrieve(r.id), lambda: b.responses.delete(r.id),
                 lambda: b.responses.create(model=MODEL, previous_response_id=r.id, input="x")):
        assert error_of(call).status_code == 404  # another tenant's id: not found, not forbidden
    big = httpx.post(f"{base_url(server)}/chat/completions", content=b"x" * (9 << 20),
                     headers={"authorization": "Bearer key-a", "content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "http_413"
    bad = httpx.post(f"{base_url(server)}/chat/completions", content=b"{nope",
                     headers={"authorization": "Bearer key-a", "content-type": "application/json"})
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}


def test_concurrent_continuation_is_a_conflict(env):
    """Two turns continuing the latest response at once: the one that records second gets 409
    (a continuation that starts after the other recorded forks instead)."""
    c = client(env["server"])
    r = c.responses.create(model=MODEL, input="Start.", max_output_tokens=2, extra_body=EOS)
    with ThreadPoolExecutor(1) as executor:
        slow = executor.submit(error_of, lambda: c.responses.create(
            model=MODEL, previous_response_id=r.id, input="One", max_output_tokens=300, extra_body=EOS))
        assert wait_for(lambda: active(env["server"]) == 1, timeout=30)  # it runs from the conversation at r
        fast = c.responses.create(model=MODEL, previous_response_id=r.id, input="Two", max_output_tokens=2,
                                  extra_body=EOS)
        e = slow.result()
    assert session_of(fast.id) == session_of(r.id)  # appended
    assert e.status_code == 409 and e.code == "aborted"


def test_queue_limit_is_429_and_redis_down_is_503(env):
    with serving(env["loop"], env["pool"], env["redis_url"], http_port=0, max_concurrent_generations=1,
                 max_queued_generations=0) as server:
        c = client(server)
        stream = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "long"}],
                                           max_tokens=200, stream=True, extra_body=EOS)
        next(iter(stream))
        e = error_of(lambda: c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                       max_tokens=2))
        assert e.status_code == 429 and e.code == "resource_exhausted"
        stream.close()
    redis_ = EmbeddedRedis(EmbeddedRedisConfig(maxmemory="0", maxmemory_policy="noeviction")).start()
    with serving(env["loop"], env["pool"], redis_.url, http_port=0) as server:
        redis_.stop()
        e = error_of(lambda: client(server).responses.create(model=MODEL, input="x", max_output_tokens=2))
        assert e.status_code == 503 and e.code == "unavailable"


def active(server: SessionServer) -> float:
    return server.metrics.registry.get_sample_value("kvstore_session_active_generations")


def test_disconnect_mid_stream_frees_the_slot_and_records_nothing(env):
    server = env["server"]
    c = client(server)
    r = c.responses.create(model=MODEL, input="Begin.", max_output_tokens=2, extra_body=EOS)
    before = grpc_history(env, session_of(r.id))
    for call in (lambda: c.responses.create(model=MODEL, previous_response_id=r.id, input="Go on", stream=True,
                                            max_output_tokens=400, extra_body=EOS),
                 lambda: c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Go"}],
                                                   stream=True, max_tokens=400, extra_body=EOS)):
        stream = call()
        events = iter(stream)
        for _ in range(6):
            next(events)
        assert active(server) == 1
        stream.close()
        assert wait_for(lambda: active(server) == 0, timeout=10)
    assert grpc_history(env, session_of(r.id)) == before
    # A new conversation cancelled mid-stream leaves its session closed (not counted as open).
    stream = c.responses.create(model=MODEL, input="New", stream=True, max_output_tokens=400, extra_body=EOS)
    created = next(iter(stream)).response.id
    stream.close()
    with SessionClient(server.address, api_key="key-a") as kv:
        assert wait_for(lambda: kv.get_session(session_of(created)).closed, timeout=10)
    # The conversation goes on as if the cancelled turn never ran.
    again = c.responses.create(model=MODEL, previous_response_id=r.id, input="Go on", max_output_tokens=4,
                               extra_body=EOS)
    assert session_of(again.id) == session_of(r.id)


def test_sixteen_concurrent_streams(env):
    async def one(ac, i):
        stream = await ac.chat.completions.create(model=MODEL, max_tokens=8, stream=True, extra_body=EOS,
                                                  messages=[{"role": "user", "content": f"Question {i}?"}])
        return "".join([ch.choices[0].delta.content or "" async for ch in stream])

    async def run():
        ac = openai.AsyncOpenAI(base_url=base_url(env["server"]), api_key="key-a", max_retries=0, timeout=120)
        texts = await asyncio.gather(*(one(ac, i) for i in range(16)))
        await ac.close()
        return texts
    texts = asyncio.run(run())
    for i in (0, 15):
        prompt = env["tok"].apply_chat_template([{"role": "user", "content": f"Question {i}?"}], True)
        assert texts[i] == env["tok"].decode(reference(prompt, 8))


def test_chat_turns_keep_the_end_of_turn_with_a_byte_level_bpe(env):
    """A reply whose decode/encode round trip fails keeps its generated ids, then the
    template's end of turn, over gRPC and over HTTP."""
    tok = load_tokenizer(_build_tokenizer_dir(env["tmp"] / "tok"))
    end_of_turn = tok.encode("<|im_end|>\n")
    server = SessionServer(SessionServiceConfig(port=0, http_port=0, redis_url=env["redis_url"],
                                                api_keys="key-a=tenant-a"), env["pool"], tok)
    env["loop"].run(server.start())
    try:
        with SessionClient(server.address, api_key="key-a") as kv:
            s = kv.create_session(system_prompt="You are helpful.").session_id
            g = kv.generate(s, [{"role": "user", "content": "hello world"}], max_tokens=8, ignore_eos=True).result()
            history = list(kv.get_session(s, include_tokens=True).token_ids)
            assert tok.encode(tok.decode(g.ids)) != g.ids  # the case that lost the end of turn
            assert history[g.usage.prompt_tokens:] == g.ids + end_of_turn
            g2 = kv.generate(s, [{"role": "user", "content": "how are you today?"}], max_tokens=2).result()
            prompt = list(kv.get_session(s, include_tokens=True).token_ids)[:g2.usage.prompt_tokens]
            assert "<|im_end|>\n<|im_start|>user\nhow are you today?" in tok.decode(prompt, skip_special_tokens=False)
            c = openai.OpenAI(base_url=base_url(server), api_key="key-a", max_retries=0)
            r1 = c.responses.create(model=MODEL, input="hello world", max_output_tokens=8, extra_body=EOS)
            r2 = c.responses.create(model=MODEL, input="how are you today?", previous_response_id=r1.id,
                                    max_output_tokens=2)
            tokens = list(kv.get_session(session_of(r2.id), include_tokens=True).token_ids)
            output = tokens[r1.usage.input_tokens:r1.usage.input_tokens + 8]
            assert tok.encode(tok.decode(output)) != output
            assert tokens[r1.usage.input_tokens + 8:r1.usage.input_tokens + 8 + len(end_of_turn)] == end_of_turn
            assert "<|im_end|>\n<|im_start|>user\nhow are you today?" in tok.decode(
                tokens[:r2.usage.input_tokens], skip_special_tokens=False)
    finally:
        env["loop"].run(server.stop(grace=0))


def test_sse_error_event_mid_stream(env):
    """An error after the first token arrives as an error event (the status was sent)."""
    with serving(env["loop"], env["pool"], env["redis_url"], http_port=0) as server:
        c = client(server)
        r = c.responses.create(model=MODEL, input="Start.", max_output_tokens=2, extra_body=EOS)
        # Long enough that the append below lands before it ends, on any machine (30 tokens did not always).
        stream = c.responses.create(model=MODEL, previous_response_id=r.id, input="x", max_output_tokens=600,
                                    stream=True, extra_body=EOS)
        events = iter(stream)
        next(events)
        # A turn lands on the conversation meanwhile (over gRPC): this one can no longer be recorded.
        with SessionClient(server.address, api_key="key-a") as kv:
            kv.append(session_of(r.id), [{"role": "user", "content": "interleaved"}])
        with pytest.raises(openai.APIError) as e:
            list(events)
        assert e.value.body["code"] == "aborted"
