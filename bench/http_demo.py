"""``kvstore demo``'s agent turns over the OpenAI-compatible HTTP API (``/v1/chat/completions``,
streamed, through the official ``openai`` client).

Chat Completions is stateless: every turn resends the session's whole conversation, and reuse
comes from prefix hashing alone. The same turns as ``kvstore demo``: sessions share a long
system prompt and take interleaved turns (a question; a tool result plus a follow-up; another
question); after the first round a branch of session 0 runs on the other worker. Every turn
runs twice on the same worker: reusing cached KV, and with ``kvstore: {"skip_cache": true}``
(computing the whole prompt). TTFT is measured by the client, from the request to the first
streamed chunk (sent once the first token exists). Outputs must be identical.

Run:  .venv/bin/python bench/http_demo.py [--quick] [--base-url http://127.0.0.1:8000/v1 --api-key K]
"""
from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass

from common import embedded_service
from openai import OpenAI
from rich.console import Console

from kvstore.cache import CacheConfig
from services.cli.demo import Row, round_messages, summarize, system_prompt, turns_table
from services.cli.serve import ServeConfig
from services.session.server import SessionServiceConfig


@dataclass(slots=True)
class Run:
    text: str
    ttft: float
    usage: object  # the openai client's CompletionUsage (with the "kvstore" extra field)


class Workload:
    def __init__(self, client: OpenAI, args: argparse.Namespace, console: Console, workers: list[str]) -> None:
        self.client, self.args, self.console, self.workers = client, args, console, workers
        self.model = client.models.list().data[0].id
        self.rows: list[Row] = []

    def run_once(self, messages: list[dict], worker: str, skip_cache: bool) -> Run:
        start, first, text, usage = time.perf_counter(), None, "", None
        for chunk in self.client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=self.args.max_tokens, stream=True,
                stream_options={"include_usage": True},
                extra_body={"kvstore": {"ignore_eos": True, "worker_id": worker, "skip_cache": skip_cache}}):
            first = first or time.perf_counter()
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
            usage = chunk.usage or usage
        return Run(text, first - start, usage)

    def turn(self, label: str, messages: list[dict], worker: str = "") -> str:
        g = self.run_once(messages, worker, False)
        extra = g.usage.model_extra["kvstore"]
        b = self.run_once(messages, extra["worker_id"], True)
        if extra["worker_id"] not in self.workers:
            self.workers.append(extra["worker_id"])
        row = Row(label, extra["worker_id"], g.usage.prompt_tokens,
                  tuple(extra[f"cached_tokens_t{t}"] for t in range(3)), g.ttft, b.ttft, g.text == b.text)
        self.rows.append(row)
        self.console.log(f"{label}: {row.prompt} prompt tokens, cached T0/T1/T2 {row.cached}, "
                         f"TTFT {1e3 * row.ttft:.0f} ms vs {1e3 * row.ttft_recompute:.0f} ms")
        messages.append({"role": "assistant", "content": g.text})
        return row.worker

    def run(self) -> None:
        a = self.args
        conversations = [[{"role": "system", "content": system_prompt(a.system_prompt_repeat)}]
                         for _ in range(a.sessions)]
        last_worker: dict[int, str] = {}
        for r in range(a.rounds):
            for i, messages in enumerate(conversations):
                tool, user = round_messages(i, r)
                messages += tool + user  # stateless: the tool result goes with the next request
                last_worker[i] = self.turn(f"agent {i} round {r + 1}", messages)
            if r == 0:  # a branch of session 0 on the other worker: the history comes from T2
                branch = conversations[0] + [{"role": "user", "content": "Try a cheaper alternative."}]
                other = next((w for w in self.workers if w != last_worker[0]), "")
                self.turn("fork of agent 0", branch, other)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 sessions, 2 rounds, the tiny model (a sanity run)")
    p.add_argument("--base-url", default="", help="a running service's HTTP API; empty: start one (embedded)")
    p.add_argument("--api-key", default="unused")
    p.add_argument("--sessions", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--system-prompt-repeat", type=int, default=12)
    p.add_argument("--model", default="small")
    p.add_argument("--t0-blocks", type=int, default=160)
    a = p.parse_args()
    if a.quick:
        a.sessions, a.rounds, a.model, a.system_prompt_repeat = 2, 2, "tiny", 4
    console = Console(width=max(Console().width, 120))
    config = ServeConfig(SessionServiceConfig(port=0, http_port=0), CacheConfig(t0_blocks=a.t0_blocks, t1_blocks=4096),
                         model=a.model)
    with contextlib.nullcontext() if a.base_url else embedded_service(config, console) as service:
        base_url = a.base_url or f"http://{service.service.server.http.address}/v1"
        workers = list(service.service.pool.worker_ids) if service else []
        with OpenAI(base_url=base_url, api_key=a.api_key, max_retries=0, timeout=600) as client:
            workload = Workload(client, a, console, workers)
            workload.run()
    console.print(turns_table(workload.rows))
    t = summarize(workload.rows)
    console.print(f"over HTTP: {t['turns']} turns, {t['prompt']} prompt tokens: reused {t['t0']} from T0, {t['t1']} "
                  f"from T1, {t['t2']} from T2; median TTFT speedup {t['median_speedup']:.1f}x; outputs with and "
                  f"without reuse {'identical' if t['same'] else 'DIFFERENT'}")
    return 0 if t["same"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
