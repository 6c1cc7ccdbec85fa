"""Time to first token when resuming a conversation: full recompute vs a cache hit per tier.

For each history length H, the prompt is H history tokens + a new user turn. TTFT (request
arrival to first sampled token, through the engine) is measured for:
  recompute      a fresh engine: the whole prompt is prefilled
  T0 / T1 / T2   the history is cached in that tier only (T2: a fresh engine whose T2 is the
                 block store, a separate process, over an embedded Redis)
  T2 slow        the history is in T2, reached through a loopback proxy passing --slow-t2-mbps:
                 an engine that measured that T2 (one small load) and its prefill at this length
                 chooses, per request, what to load and what to recompute (workers.loadcost)
  transformers   Hugging Face's forward over the whole prompt with the same weights and
                 threads (logits of the last token only, as generate's prefill does): what a
                 user would otherwise run
Also decode throughput (tokens/s of 4 sequences decoding together) with write-through to
T1 and T2 on vs off. Saves a PNG plot of TTFT vs H.

Run:  .venv/bin/python bench/ttft.py [--quick] [--model small] [--png PATH] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from common import blockstore_process, header, throttled_proxy
from rich.console import Console
from rich.table import Table

from kvstore.blockstore_client import BlockStoreClient, BlockStoreClientConfig
from kvstore.cache import CacheConfig, TieredKVCache
from workers.engine import Engine, EngineConfig
from workers.loader import builtin_model, kv_spec
from workers.model import ModelConfig, Transformer
from workers.sampling import SamplingParams

TURN = 32  # tokens of the new user turn
FIRST = SamplingParams(max_tokens=1, ignore_eos=True)


def hf_model(config: ModelConfig, model: Transformer):
    """The same weights in transformers' LlamaForCausalLM / Qwen2ForCausalLM."""
    import transformers

    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, max_position_embeddings=config.max_position_embeddings,
    )
    if config.model_type == "qwen2":
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(head_dim=config.head_dim, **common))
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    state = {}
    for name, t in model.state_dict().items():
        if name == "embed.weight":
            state["model.embed_tokens.weight"] = t
        elif name == "norm.weight":
            state["model.norm.weight"] = t
        elif name == "lm_head.weight":
            state["lm_head.weight"] = t
        else:
            _, i, rest = name.split(".", 2)
            pre = f"model.layers.{i}."
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                for part, chunk in zip("qkv", torch.split(t, [q, kv, kv])):
                    state[f"{pre}self_attn.{part}_proj.{kind}"] = chunk
            elif rest == "mlp.gate_up.weight":
                gate, up = t.chunk(2)
                state[pre + "mlp.gate_proj.weight"], state[pre + "mlp.up_proj.weight"] = gate, up
            else:
                state[pre + {"attn_norm.weight": "input_layernorm.weight",
                             "mlp_norm.weight": "post_attention_layernorm.weight",
                             "attn.o.weight": "self_attn.o_proj.weight",
                             "mlp.down.weight": "mlp.down_proj.weight"}[rest]] = t
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf.to(config.dtype).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="H in 256, 1024; 1 rep")
    parser.add_argument("--model", default="small", help="built-in model (small, qwen2.5-0.5b-shape, tiny)")
    parser.add_argument("--dtype", default=None, help="model dtype (default: the built-in's)")
    parser.add_argument("--hist", default="256,512,1024,2048,4096", help="history lengths")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--slow-t2-mbps", type=float, default=5.0, help="MB/s of the slowed T2 (replies)")
    parser.add_argument("--png", default="bench/results/ttft.png")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    hists = [256, 1024] if args.quick else [int(h) for h in args.hist.split(",")]
    reps = 1 if args.quick else args.reps

    config, model, digest = builtin_model(args.model, dtype=args.dtype)
    spec = kv_spec(config, f"builtin-{args.model}", digest, block_size=16)
    blocks = 2 * (-(-(max(hists) + TURN + 8) // spec.block_size)) + 8
    hf = hf_model(config, model)
    console = Console() if sys.stdout.isatty() else Console(width=130)
    title = header(f"model {args.model} ({config.num_params / 1e6:.0f}M params, {config.dtype})",
                   f"KV {spec.bytes_per_token} B/token", f"median of {reps}")
    console.print(title, highlight=False)

    def engine(remote=None, **kw) -> Engine:
        cache = TieredKVCache(spec, CacheConfig(t0_blocks=blocks, t1_blocks=blocks, **kw), remote=remote)
        return Engine(model, cache, EngineConfig(max_num_batched_tokens=1 << 20))  # TTFT: no chunks

    def ttft(e: Engine, prompt: list[int]) -> tuple[float, list[int]]:
        (seq,) = e.generate([prompt], FIRST)
        return seq.usage.ttft_s, seq.usage.cached_tokens

    def measure(h: int, reps: int, client: BlockStoreClient, slow_client: BlockStoreClient) -> dict[str, float]:
        g = torch.Generator().manual_seed(h)
        rand = lambda n: torch.randint(0, config.vocab_size, (n,), generator=g).tolist()  # noqa: E731
        hist, small_hist = rand(h), rand(256)
        times: dict[str, list[float]] = {k: [] for k in ("recompute", "T0", "T1", "T2", "T2 slow", "transformers")}
        for _ in range(reps):
            prompt = hist + rand(TURN)
            e = engine()
            times["recompute"].append(ttft(e, prompt)[0])
            e.cache.close()
            e = engine()  # T0: the history was just computed here
            ttft(e, hist)
            t, cached = ttft(e, prompt)
            assert cached[0] >= h - spec.block_size, cached
            times["T0"].append(t)
            e.cache.close()
            e = engine()  # T1: computed here, then pushed out of T0
            ttft(e, hist)
            e.cache.flush()
            e.cache.release(e.cache.allocate(blocks))
            t, cached = ttft(e, prompt)
            assert cached[1] >= h - spec.block_size, cached
            times["T1"].append(t)
            e.cache.close()
            w = engine(remote=client)  # T2: computed by another worker
            ttft(w, hist)
            ttft(w, small_hist)
            w.cache.close()
            e = engine(remote=client)
            t, cached = ttft(e, prompt)
            assert cached[2] >= h - spec.block_size, cached
            times["T2"].append(t)
            e.cache.close()
            e = engine(remote=slow_client, t1_t2_policy="write_back")  # T2 slow; writes stay local
            ttft(e, rand(h + TURN))  # measures its prefill at this length
            ttft(e, small_hist + rand(TURN))  # a load through the slow link measures T2
            t, cached = ttft(e, prompt)
            times["T2 slow"].append(t)
            choices[h] = (cached[2], e.stats().recomputed_tokens[2])
            e.cache.close()
            ids = torch.tensor([prompt])
            with torch.inference_mode():
                start = time.perf_counter()
                int(hf(ids, logits_to_keep=1).logits[0, -1].argmax())
                times["transformers"].append(time.perf_counter() - start)
        return {k: statistics.median(v) for k, v in times.items()}

    def decode_tps(remote, **kw) -> float:
        e = engine(remote=remote, **kw)
        g = torch.Generator().manual_seed(7)
        prompts = [torch.randint(0, config.vocab_size, (256,), generator=g).tolist() for _ in range(4)]
        seqs = e.generate(prompts, SamplingParams(max_tokens=128 if not args.quick else 32, ignore_eos=True))
        e.cache.close()
        return sum(s.usage.completion_tokens - 1 for s in seqs) / max(s.usage.decode_s for s in seqs)

    rows: dict[int, dict[str, float]] = {}
    choices: dict[int, tuple[int, int]] = {}  # H -> T2 slow: tokens loaded from T2, recomputed by choice
    with blockstore_process() as (address, _), BlockStoreClient(BlockStoreClientConfig(address=address, timeout_s=60)) as client, \
            throttled_proxy(address, args.slow_t2_mbps * 1e6) as slow_address, \
            BlockStoreClient(BlockStoreClientConfig(address=slow_address, timeout_s=600)) as slow_client:
        measure(min(hists), 1, client, slow_client)  # warm-up: first-call costs out of the figures
        for h in hists:
            rows[h] = measure(h, reps, client, slow_client)
            console.print(f"H={h}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in rows[h].items()), highlight=False)
        on, off = [], []
        for _ in range(max(reps, 3)):  # interleaved, so drifting machine load hits both alike
            on.append(decode_tps(client))
            off.append(decode_tps(None, t0_t1_policy="write_back"))
        tps_on, tps_off = statistics.median(on), statistics.median(off)

    table = Table(title=f"TTFT resuming a conversation of H history tokens + {TURN} new (ms)", title_justify="left")
    for col in ("H", "recompute", "T0 hit", "T1 hit", "T2 hit", f"T2 at {args.slow_t2_mbps:g} MB/s",
                "T2 slow: loaded / recomputed", "transformers", "recompute / transformers", "recompute / T0",
                "recompute / T2", "T2 slow / recompute"):
        table.add_column(col, justify="right")
    for h, r in rows.items():
        table.add_row(str(h), *(f"{r[k] * 1e3:.1f}" for k in ("recompute", "T0", "T1", "T2", "T2 slow")),
                      "{} / {}".format(*choices[h]), f"{r['transformers'] * 1e3:.1f}",
                      f"{r['recompute'] / r['transformers']:.2f}", f"{r['recompute'] / r['T0']:.1f}x",
                      f"{r['recompute'] / r['T2']:.1f}x", f"{r['T2 slow'] / r['recompute']:.2f}")
    console.print(table)
    console.print(f"decode, 4 sequences: {tps_on:.1f} tokens/s with write-through to T1+T2, "
                  f"{tps_off:.1f} without ({tps_on / tps_off:.0%})", highlight=False)
    at = 2048 if 2048 in rows else max(rows)
    r = rows[at]
    checks = [
        (r["recompute"] <= 1.25 * r["transformers"], f"recompute prefill at H={at} is {r['recompute'] / r['transformers']:.2f}x transformers (target <= 1.25x)"),
        (r["recompute"] >= 5 * r["T2"], f"T2 hit at H={at} gives {r['recompute'] / r['T2']:.1f}x lower TTFT than recompute (target >= 5x)"),
        (r["recompute"] >= 10 * r["T0"], f"T0 hit at H={at} gives {r['recompute'] / r['T0']:.1f}x lower TTFT than recompute (target >= 10x)"),
        (tps_on >= 0.9 * tps_off, f"decode with write-through reaches {tps_on / tps_off:.0%} of without (target >= 90%)"),
        (r["T2 slow"] <= 1.1 * r["recompute"], f"with T2 at {args.slow_t2_mbps:g} MB/s, TTFT at H={at} is "
                                                f"{r['T2 slow'] / r['recompute']:.2f}x recompute (target <= 1.1x)"),
    ]
    for ok, text in checks:
        console.print(f"verdict: {'[green]PASS' if ok else '[red]FAIL'}[/] {text}", highlight=False)

    try:
        import matplotlib
        import matplotlib.ticker
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("matplotlib not installed (pip install -e '.[bench]'): no plot")
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, label in (("transformers", "transformers (recompute)"), ("recompute", "kvstore recompute"),
                           ("T2", "T2 hit (Redis)"), ("T2 slow", f"T2 at {args.slow_t2_mbps:g} MB/s (cost-aware)"),
                           ("T1", "T1 hit (host)"), ("T0", "T0 hit (device)")):
            ax.plot(list(rows), [rows[h][key] * 1e3 for h in rows], marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="history tokens H", ylabel="TTFT (ms)",
               title=f"TTFT resuming a conversation, model {args.model}, {os.cpu_count()} CPU cores")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(list(rows), [str(h) for h in rows])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=120, bbox_inches="tight")
        console.print(f"plot: {args.png}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": title, "ttft_s": rows, "decode_tps": {"on": tps_on, "off": tps_off}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
