"""Quality, size and speed of the KV block codecs on a model's own KV.

The model runs directly through ``workers.model.Transformer.forward`` over a kvstore
``DevicePool`` (T0; not through the engine). A "restore" sends blocks the way a T2 hit does,
without the network: T0 -> T1 (``kvstore.pools.spill``, page-first) -> ``encode_block`` ->
``decode_block`` into the T1 slot -> T0 (``kvstore.pools.restore``), with the fingerprint of a
``KVSpec`` of that codec and the blocks' real prefix hashes and token ids. Per model and codec:

1. KV SNR: prefill a long prefix exactly, restore its blocks; per layer, the SNR (dB) of the
   restored K and V against the exact ones (over all the prefix's blocks), and over all layers.
2. Next-token logits after restoring a 1k- and a 4k-token prefix: the next N tokens of the
   text, teacher-forced over the restored KV, against the same over the exact KV: mean
   KL(exact || codec) and top-1 agreement, next to the exact logits' margin (top-1 minus
   top-2 logit) over the positions of both prefixes: agreement below and above the median
   margin, and the largest margin at which top-1 flipped.
3. Greedy continuation: P prompts, their full blocks (all but the one holding the last token,
   as the cache's lookup caps a hit) restored, the rest computed, then G greedy tokens
   decoded together; against the same with an exact (raw) restore: prompts identical, tokens
   before the first divergence, and the exact margin where they diverged.
4. Bytes stored per raw byte (header and scales included), encode and decode GB/s of raw KV
   (one call per block, decoding into the T1 slot as the cache does, median of passes).

Text: this repository's README.md and docs/*.md, tokenized by the model's tokenizer (the
built-in models' byte tokenizer). The built-in models have seeded random weights: their
logit margins are small, so top-1 flips at margins a trained model rarely has; compare
agreement to the margin columns, and measure a real checkpoint with ``--model DIR``.

Run:  .venv/bin/python bench/codec_quality.py [--quick] [--model DIR ...] [--builtin NAME ...]
                                              [--png PATH] [--json PATH] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import header
from rich.console import Console
from rich.table import Table

from kvstore.codec import decode_block, encode_block, parse_codec
from kvstore.hashing import PrefixHasher
from kvstore.pools import DevicePool, HostPool, resolve_device, restore, spill
from kvstore.spec import KVSpec
from workers.loader import builtin_model, kv_spec, load_checkpoint
from workers.model import ForwardBatch, Transformer
from workers.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CODECS = ("raw", "lz4", "int8", "fp8")
LOSSY = ("int8", "fp8")
TARGETS = {"int8": (0.56, 40.0), "fp8": (0.52, 30.0)}  # issue 13: bytes / raw bf16, K and V SNR (dB)
Row = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Sizes:
    prefixes: tuple[int, ...] = (1024, 4096)  # restored prefix lengths for the logits
    next_tokens: int = 64  # teacher-forced tokens after each prefix
    prompts: int = 24  # greedy continuation prompts
    prompt_len: int = 512
    greedy_tokens: int = 64
    reps: int = 3  # timed encode / decode passes


QUICK = Sizes(prefixes=(256, 512), next_tokens=32, prompts=4, prompt_len=128, greedy_tokens=16, reps=1)


class Bench:
    """One model over a T0 pool and a T1 pool, and the codec round trip between them."""

    def __init__(self, model: Transformer, spec: KVSpec, t0_blocks: int, t1_blocks: int):
        self.model, self.spec, self.bs = model, spec, spec.block_size
        self.t0 = DevicePool(spec, t0_blocks, model.device)
        self.t1 = HostPool(spec, t1_blocks)

    def forward(self, seqs: list[tuple[list[int], int, list[int]]], all_logits: bool = False) -> torch.Tensor:
        return self.model(ForwardBatch.build(seqs, self.bs, self.model.device), self.t0.kv, all_logits)

    def spec_for(self, codec: str) -> KVSpec:
        return dataclasses.replace(self.spec, kv_codec=parse_codec(codec).kv_codec)

    def encode(self, codec: str, tokens: list[int], n_blocks: int) -> list[bytes]:
        """Encode the first ``n_blocks`` T1 slots as the blocks of ``tokens``."""
        spec = self.spec_for(codec)
        prefix = PrefixHasher.for_namespace(spec.fingerprint, "bench", self.bs, tokens)
        return [encode_block(self.t1.block_bytes(i), dtype=spec.dtype, shape=spec.block_shape,
                             fingerprint=spec.fingerprint, block_hash=prefix.hashes[i],
                             parent_hash=prefix.parent_of(i), token_ids=prefix.block_tokens(i), codec=codec)
                for i in range(n_blocks)]

    def decode(self, codec: str, blobs: list[bytes]) -> None:
        """Decode into the first T1 slots, checking what the cache checks (but the hash)."""
        fingerprint = self.spec_for(codec).fingerprint
        for i, blob in enumerate(blobs):
            decode_block(blob, out=self.t1.block_bytes(i), expect_fingerprint=fingerprint,
                         expect_dtype=self.spec.dtype, expect_shape=self.spec.block_shape)

    def round_trip(self, codec: str, tokens: list[int], src: list[int], dst: list[int]) -> list[bytes]:
        """T0 ``src`` -> T1 -> encode -> decode into T1 -> T0 ``dst``; returns the blobs."""
        t1_slots = list(range(len(src)))
        spill(self.t0, self.t1, src, t1_slots)
        blobs = self.encode(codec, tokens, len(src))
        self.decode(codec, blobs)
        restore(self.t1, self.t0, t1_slots, dst)
        return blobs


def snr_db(exact: torch.Tensor, got: torch.Tensor) -> float:
    x, err = exact.double(), exact.double() - got.double()
    noise = float((err * err).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((x * x).sum()) / noise)


def margins(logits: torch.Tensor) -> torch.Tensor:
    top2 = logits.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def logit_metrics(exact: torch.Tensor, got: torch.Tensor) -> Row:
    kl = F.kl_div(F.log_softmax(got, -1), F.log_softmax(exact, -1), log_target=True, reduction="none").sum(-1)
    agree = exact.argmax(-1) == got.argmax(-1)
    m = margins(exact)
    low = m < m.median()
    quartile = torch.bucketize(m, m.quantile(torch.tensor([0.25, 0.5, 0.75])))
    by_margin = [(float(m[quartile == q].median()), float(agree[quartile == q].float().mean()))
                 for q in range(4) if (quartile == q).any()]
    return dict(kl=float(kl.mean()), top1=float(agree.float().mean()), margin_median=float(m.median()),
                by_margin_quartile=by_margin,
                top1_low_margin=float(agree[low].float().mean()) if low.any() else math.nan,
                top1_high_margin=float(agree[~low].float().mean()),
                max_flipped_margin=float(m[~agree].max()) if (~agree).any() else None, positions=len(m))


def timed_median(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def prefix_phase(b: Bench, ids: list[int], sizes: Sizes, codecs: list[str]) -> dict[str, Row]:
    """Items 1, 2 and 4: one exact prefill of the longest prefix, then per codec a restore
    of all its blocks, their SNR, the teacher-forced logits after each prefix, size, speed."""
    longest, n = max(sizes.prefixes), sizes.next_tokens
    nb = longest // b.bs
    exact_slots, restored = list(range(nb)), list(range(nb, 2 * nb))
    cont = list(range(2 * nb, 2 * nb + -(-(n + b.bs) // b.bs)))
    b.forward([(ids[:longest], 0, exact_slots)])
    exact_kv = b.t0.kv[:, :, :nb].clone()
    reference = {h: b.forward([(ids[h:h + n], h, exact_slots[:h // b.bs] + cont)], all_logits=True)
                 for h in sizes.prefixes}
    raw_bytes = nb * b.spec.bytes_per_block
    rows = {}
    for codec in codecs:
        blobs = b.round_trip(codec, ids[:longest], exact_slots, restored)
        got = b.t0.kv[:, :, nb:2 * nb]
        layers = [dict(k=snr_db(exact_kv[i, 0], got[i, 0]), v=snr_db(exact_kv[i, 1], got[i, 1]))
                  for i in range(b.spec.num_layers)]
        got_logits = {h: b.forward([(ids[h:h + n], h, restored[:h // b.bs] + cont)], all_logits=True)
                      for h in sizes.prefixes}
        logits = {h: logit_metrics(reference[h], got_logits[h]) for h in sizes.prefixes}
        logits["all"] = logit_metrics(torch.cat(list(reference.values())), torch.cat(list(got_logits.values())))
        enc_s = timed_median(lambda c=codec: b.encode(c, ids[:longest], nb), sizes.reps)
        dec_s = timed_median(lambda c=codec, bl=blobs: b.decode(c, bl), sizes.reps)
        rows[codec] = dict(
            stored_per_raw=sum(map(len, blobs)) / raw_bytes, encode_gbs=raw_bytes / enc_s / 1e9,
            decode_gbs=raw_bytes / dec_s / 1e9, k_snr=snr_db(exact_kv[:, 0], got[:, 0]),
            v_snr=snr_db(exact_kv[:, 1], got[:, 1]), layers=layers, logits=logits)
    return rows


def greedy(b: Bench, prompts: list[list[int]], tables: list[list[int]], cached: int, steps: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute each prompt after its first ``cached`` tokens (in T0 at ``tables``), then
    decode ``steps`` greedy tokens together: (tokens [P, steps], margins [P, steps])."""
    logits = b.forward([(p[cached:], cached, t) for p, t in zip(prompts, tables)])
    tokens, gaps = [logits.argmax(-1)], [margins(logits)]
    ctx = len(prompts[0])
    for step in range(1, steps):
        logits = b.forward([([int(tok)], ctx + step - 1, t) for tok, t in zip(tokens[-1], tables)])
        tokens.append(logits.argmax(-1))
        gaps.append(margins(logits))
    return torch.stack(tokens, 1), torch.stack(gaps, 1)


def greedy_phase(b: Bench, prompts: list[list[int]], sizes: Sizes, codecs: list[str]) -> dict[str, Row]:
    """Item 3: prompts' full blocks restored through each codec vs through raw (exact)."""
    length, steps, bs = sizes.prompt_len, sizes.greedy_tokens, b.bs
    per_prompt = -(-(length + steps) // bs)
    nb = (length - 1) // bs  # a hit is capped at length - 1 tokens
    exact = [list(range(i * per_prompt, (i + 1) * per_prompt)) for i in range(len(prompts))]
    run = [[s + len(prompts) * per_prompt for s in t] for t in exact]
    for p, t in zip(prompts, exact):
        b.forward([(p, 0, t)])
    out: dict[str, Row] = {}
    ref_tokens = ref_margins = None
    for codec in ("raw", *[c for c in codecs if c in LOSSY]):
        for p, src, dst in zip(prompts, exact, run):
            b.round_trip(codec, p, src[:nb], dst[:nb])
        tokens, gaps = greedy(b, prompts, run, nb * bs, steps)
        if ref_tokens is None:
            ref_tokens, ref_margins = tokens, gaps
            continue
        same = (tokens == ref_tokens).int().cumprod(1)
        before = same.sum(1)  # tokens before the first divergence
        diverged = before < steps
        at = ref_margins[diverged, before[diverged]]
        out[codec] = dict(identical=float((~diverged).float().mean()), tokens_before=float(before.float().mean()),
                          margin_at_divergence=[float(m) for m in at], prompts=len(prompts), steps=steps)
    out["raw"] = dict(margin_median=float(ref_margins.median()), prompts=len(prompts), steps=steps)
    return out


def load_model(name: str, device: torch.device):
    if os.path.isdir(name):
        config, model, digest = load_checkpoint(name, device=device)
        return config, model, digest, load_tokenizer(name)
    config, model, digest = builtin_model(name, device=device)
    return config, model, digest, load_tokenizer(None, config.vocab_size)


def text_ids(tokenizer, need: int) -> list[int]:
    text = "\n\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    ids = tokenizer.encode(text)
    return (ids * -(-need // len(ids)))[:need]


def run_model(name: str, sizes: Sizes, codecs: list[str], device: torch.device, console: Console) -> Row:
    t = time.perf_counter()
    config, model, digest, tokenizer = load_model(name, device)
    spec = kv_spec(config, name, digest)
    longest = max(sizes.prefixes)
    stride = (longest + sizes.next_tokens) // max(1, sizes.prompts)
    ids = text_ids(tokenizer, longest + sizes.next_tokens + sizes.prompt_len + stride * sizes.prompts)
    greedy_blocks = 2 * sizes.prompts * -(-(sizes.prompt_len + sizes.greedy_tokens) // spec.block_size)
    prefix_blocks = 2 * longest // spec.block_size + -(-(sizes.next_tokens + spec.block_size) // spec.block_size)
    b = Bench(model, spec, max(greedy_blocks, prefix_blocks), longest // spec.block_size)
    result = dict(model=name, dtype=str(spec.dtype).removeprefix("torch."), layers=spec.num_layers,
                  kv_bytes_per_token=spec.bytes_per_token)
    result["codecs"] = prefix_phase(b, ids, sizes, codecs)
    prompts = [ids[i * stride:i * stride + sizes.prompt_len] for i in range(sizes.prompts)]
    result["greedy"] = greedy_phase(b, prompts, sizes, codecs)
    console.print(f"{name}: {time.perf_counter() - t:.0f}s", highlight=False)
    return result


def fmt_snr(x: float) -> str:
    return "exact" if math.isinf(x) else f"{x:.1f}"


def render(console: Console, r: Row, sizes: Sizes) -> None:
    h1, h2 = sizes.prefixes[0], max(sizes.prefixes)
    t = Table(title=f"{r['model']} ({r['dtype']} KV, {r['layers']} layers): size, speed, KV SNR after a "
                    f"{h2}-token restore", title_justify="left")
    for col in ("codec", "stored / raw", "encode GB/s", "decode GB/s", "K SNR dB", "V SNR dB",
                "min layer K / V dB"):
        t.add_column(col, justify="left" if col == "codec" else "right")
    for codec, c in r["codecs"].items():
        lo_k, lo_v = min(x["k"] for x in c["layers"]), min(x["v"] for x in c["layers"])
        t.add_row(codec, f"{c['stored_per_raw']:.3f}", f"{c['encode_gbs']:.2f}", f"{c['decode_gbs']:.2f}",
                  fmt_snr(c["k_snr"]), fmt_snr(c["v_snr"]), f"{fmt_snr(lo_k)} / {fmt_snr(lo_v)}")
    console.print(t)
    t = Table(title=f"{r['model']}: next-token logits after a restored prefix ({sizes.next_tokens} "
                    f"teacher-forced positions), greedy continuation ({r['greedy']['raw']['prompts']} prompts "
                    f"x {sizes.greedy_tokens} tokens) vs exact", title_justify="left")
    for col in ("codec", f"KL @{h1}", f"top-1 @{h1}", f"KL @{h2}", f"top-1 @{h2}", "median margin",
                "top-1 below / above median margin", "largest flipped margin", "greedy identical",
                "tokens before divergence", "margin at divergence (median)"):
        t.add_column(col, justify="left" if col == "codec" else "right")
    for codec, c in r["codecs"].items():
        a, z, pooled = c["logits"][h1], c["logits"][h2], c["logits"]["all"]
        g = r["greedy"].get(codec) if codec in LOSSY else None
        flipped = pooled["max_flipped_margin"]
        t.add_row(codec, f"{a['kl']:.2e}", f"{a['top1']:.1%}", f"{z['kl']:.2e}", f"{z['top1']:.1%}",
                  f"{pooled['margin_median']:.3f}",
                  f"{pooled['top1_low_margin']:.0%} / {pooled['top1_high_margin']:.0%}",
                  "-" if flipped is None else f"{flipped:.3f}",
                  f"{g['identical']:.0%}" if g else "(reference)" if codec == "raw" else "-",
                  f"{g['tokens_before']:.1f} / {g['steps']}" if g else "-",
                  f"{statistics.median(g['margin_at_divergence']):.3f}" if g and g["margin_at_divergence"] else "-")
    console.print(t)
    console.print(f"{r['model']}: median exact margin over the greedy steps {r['greedy']['raw']['margin_median']:.3f}; "
                  f"SNR per layer (K / V dB): " + "; ".join(
                      f"{codec} " + " ".join(f"{fmt_snr(x['k'])}/{fmt_snr(x['v'])}" for x in c["layers"])
                      for codec, c in r["codecs"].items() if codec in LOSSY), highlight=False)


def plot(results: list[Row], path: str, title: str, console: Console) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return
    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 8), squeeze=False)
    for ax, r in zip(axes[0], results):
        for codec, c in r["codecs"].items():
            if codec not in LOSSY:
                continue
            layers = range(len(c["layers"]))
            for key, style in (("k", "-"), ("v", "--")):
                ax.plot(layers, [x[key] for x in c["layers"]], style, marker=".",
                        label=f"{codec} {key.upper()} ({c['stored_per_raw']:.2f}x bytes)")
            if r["dtype"] == "bfloat16" and codec in TARGETS:
                ax.axhline(TARGETS[codec][1], color="grey", lw=0.8, ls=":")
        ax.set(xlabel="layer", ylabel="SNR (dB)", title=f"{r['model']} ({r['dtype']}): KV SNR per layer")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax, r in zip(axes[1], results):
        for codec in LOSSY:
            if codec in r["codecs"]:
                pts = r["codecs"][codec]["logits"]["all"]["by_margin_quartile"]
                ax.plot([m for m, _ in pts], [a * 100 for _, a in pts], marker="o", label=codec)
        ax.set(xscale="log", xlabel="exact top-1 minus top-2 logit (median of each quartile of positions)",
               ylabel="top-1 agreement (%)", title=f"{r['model']}: next-token agreement vs margin")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    console.print(f"plot: {path}")


def verdicts(console: Console, results: list[Row], sizes: Sizes) -> list[str]:
    lines = []
    for r in results:
        if r["model"] != "qwen2.5-0.5b-shape":
            continue
        for codec, (max_ratio, min_snr) in TARGETS.items():
            c = r["codecs"].get(codec)
            if c is None:
                continue
            lo = min(min(x["k"], x["v"]) for x in c["layers"])
            ok = c["stored_per_raw"] <= max_ratio and min(c["k_snr"], c["v_snr"]) >= min_snr
            text = (f"{codec} on {r['model']}: {c['stored_per_raw']:.3f} of raw bf16 bytes (target <= {max_ratio}), "
                    f"K {c['k_snr']:.1f} dB and V {c['v_snr']:.1f} dB SNR over all layers after a "
                    f"{max(sizes.prefixes)}-token restore (target >= {min_snr:.0f}; lowest layer {lo:.1f})")
            lines.append(f"verdict: {'PASS' if ok else 'FAIL'} {text}")
            console.print(f"verdict: {'[green]PASS' if ok else '[red]FAIL'}[/] {text}", highlight=False)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"short prefixes {QUICK.prefixes}, {QUICK.prompts} prompts x {QUICK.greedy_tokens} tokens")
    parser.add_argument("--builtin", action="append", metavar="NAME",
                        help="built-in model (repeatable; default: small and qwen2.5-0.5b-shape)")
    parser.add_argument("--model", action="append", default=[], metavar="DIR", help="checkpoint directory (repeatable)")
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="model and T0 device: cpu, cuda, auto")
    parser.add_argument("--png", default=str(ROOT / "bench/results/codec_quality.png"))
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    codecs = [parse_codec(c).name.lower() for c in args.codecs.split(",")]
    models = (args.builtin or ([] if args.model else ["small", "qwen2.5-0.5b-shape"])) + args.model
    device = resolve_device(args.device)

    console = Console() if sys.stdout.isatty() else Console(width=200)
    title = header(f"device {device}", str(sizes))
    console.print(title, highlight=False)
    results = [run_model(name, sizes, codecs, device, console) for name in models]
    for r in results:
        render(console, r, sizes)
    lines = verdicts(console, results, sizes)
    plot(results, args.png, f"$ {shlex.join(sys.orig_argv)}", console)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": title, "results": results, "verdicts": lines}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
