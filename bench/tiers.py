"""Benchmark the local KV tiers and the block codec against raw baselines.

Measures, in one run:

1. T0 -> T1 ``spill`` and T1 -> T0 ``restore`` (``kvstore.pools``) in GB/s, in batches of
   64 blocks covering the whole pool, for consecutive slots (0..n-1 -> 0..n-1) and scattered
   slots (destination slots a fixed-seed random permutation). Baseline: ``Tensor.copy_`` of the
   same bytes, batch by batch, between the two pools' buffers viewed as flat contiguous
   tensors (same pages and cache state as ours; host<->device when T0 is on CUDA).
2. ``encode_block`` / ``decode_block`` in GB/s of raw block bytes, one call per block, decoding
   into a preallocated ``out=`` row as the cache does, for codecs ``lz4``, ``raw`` and the lossy
   ``int8`` and ``fp8``, with the compression ratio (raw bytes / stored bytes). Baselines: ``lz4.frame.compress`` / ``lz4.frame.decompress`` of the same
   bytes, block by block; and the same on the byte-shuffled bytes ("shuffled"), i.e. lz4
   doing the compression work our codec does, without our header, checksums and plane
   split/join. (On randn data lz4.frame compresses nothing and stores frames verbatim, so
   its decompress is a memcpy.) Data: torch.randn in bf16, fp16 and fp32. One more row,
   "lz4 planes": ``lz4.block.decompress`` of just the lz4-compressed planes of our
   blocks, i.e. the lz4 work inside our decode without header, checksum and plane join: a
   ceiling for any decoder of these planes (not shown when no plane is compressed). And
   "int8 plain torch": the same int8 blocks dequantized the plain torch way
   (``(values.float() * scales).to(dtype)``, then copied into ``out``), against which the
   codec's chunked, fused decode is compared. Quality of the lossy codecs: bench/codec_quality.py.

Block: the KV of Qwen2.5-0.5B (24 layers, 2 KV heads, head_dim 64, bf16, 16 tokens: 196,608
bytes). Each figure is the median (``--best``: the best) of several timed passes after a
warm-up pass, ours and baseline interleaved; "spread" is (max - min) / median of our passes.
GB = 1e9 bytes. With 2 cores shared with other jobs, torch's 2 intra-op threads stall on
every parallel copy_; ``--threads 1`` or ``--best`` give steadier transfer figures.

Run:  .venv/bin/python bench/tiers.py [--quick] [--device auto|cpu|cuda] [--json PATH]
                                      [--threads N] [--best]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lz4.block
import lz4.frame
import numpy as np
import torch
from common import header
from rich.console import Console
from rich.table import Table

from kvstore.codec import PlaneCodec, decode_block, encode_block, parse_codec, read_header, tensor_bytes
from kvstore.pools import DevicePool, HostPool, resolve_device, restore, spill
from kvstore.spec import KVSpec, dtype_name

BATCH = 64  # blocks per spill/restore call: a typical prefix load
CODECS = ("lz4", "raw", "int8", "fp8")
Row = dict[str, Any]
Pick = Callable[[list[float]], float]  # statistics.median or min (best-of)


def spec_for(dtype: torch.dtype, codec: str = "raw") -> KVSpec:
    return KVSpec(num_layers=24, num_kv_heads=2, head_dim=64, dtype=dtype, block_size=16,
                  model_id="Qwen/Qwen2.5-0.5B", kv_codec=parse_codec(codec).kv_codec)


def timed(
    fns: dict[str, Callable[[], object]], reps: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Seconds per call of each function: one warm-up call each, then ``reps`` rounds that
    call every function once (interleaved, so drifting background load hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(-1, reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync()
            if rep >= 0:
                times[name].append(time.perf_counter() - t)
    return times


def drain(items: Iterable[object]) -> None:
    deque(items, maxlen=0)


def row(name: str, variant: str, nbytes: int, ours: list[float], base: list[float], pick: Pick,
        **extra: Any) -> Row:
    ours_gbs, base_gbs = nbytes / pick(ours) / 1e9, nbytes / pick(base) / 1e9
    spread = (max(ours) - min(ours)) / statistics.median(ours)
    return dict(measurement=name, variant=variant, ours_gbs=ours_gbs, baseline_gbs=base_gbs,
                ratio=ours_gbs / base_gbs, spread=spread, bytes=nbytes, ours_s=ours,
                baseline_s=base, **extra)


def bench_transfers(mib: int, reps: int, pick: Pick, device: torch.device) -> list[Row]:
    spec = spec_for(torch.bfloat16)
    n = max(BATCH, (mib << 20) // spec.bytes_per_block // BATCH * BATCH)
    t0, t1 = DevicePool(spec, n, device), HostPool(spec, n)
    t0.kv.copy_(torch.randn(t0.kv.shape, dtype=torch.float32).to(spec.dtype))
    t1.kv.copy_(t0.kv.permute(2, 0, 1, 3, 4, 5).cpu())  # touch every page before timing
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    consecutive = list(range(n))
    scattered = [int(s) for s in np.random.default_rng(0).permutation(n)]
    batches = [slice(i, i + BATCH) for i in range(0, n, BATCH)]

    # Baseline: the same bytes between the same two buffers, viewed flat (contiguous), so
    # that page and cache state match ours; device-to-host / host-to-device on CUDA.
    flat0, flat1 = t0.kv.view(n, -1), t1.kv.view(n, -1)
    fns: dict[str, Callable[[], object]] = {
        "raw spill": lambda: [flat1[b].copy_(flat0[b]) for b in batches],
        "raw restore": lambda: [flat0[b].copy_(flat1[b]) for b in batches]}
    for pattern, dst in (("consecutive", consecutive), ("scattered", scattered)):
        fns[f"spill {pattern}"] = lambda d=dst: [spill(t0, t1, consecutive[b], d[b])
                                                 for b in batches]
        fns[f"restore {pattern}"] = lambda d=dst: [restore(t1, t0, consecutive[b], d[b])
                                                   for b in batches]
    times = timed(fns, reps, sync)
    return [row(f"{op} {arrow}", pattern, n * spec.bytes_per_block, times[f"{op} {pattern}"],
                times[f"raw {op}"], pick, blocks=n)
            for pattern in ("consecutive", "scattered")
            for op, arrow in (("spill", "T0->T1"), ("restore", "T1->T0"))]


def bench_codec(dtype: torch.dtype, mib: int, reps: int, pick: Pick) -> list[Row]:
    spec = spec_for(dtype)
    n = max(8, (mib << 20) // spec.bytes_per_block)
    data = torch.randn((n, *spec.block_shape), dtype=torch.float32).to(dtype)
    blocks = [tensor_bytes(data[i]) for i in range(n)]
    out = np.empty((n, spec.bytes_per_block), dtype=np.uint8)  # stands in for T1's slots
    hashes = [i.to_bytes(16, "little") for i in range(n)]
    tokens = list(range(spec.block_size))
    nbytes = n * spec.bytes_per_block
    name = dtype_name(dtype).replace("bfloat", "bf").replace("float", "fp")

    def encode_each(codec: str) -> Iterator[bytes]:
        fingerprint = spec_for(dtype, codec).fingerprint
        return (encode_block(b, dtype=dtype, shape=spec.block_shape, fingerprint=fingerprint,
                             block_hash=h, parent_hash=h, token_ids=tokens, codec=codec)
                for b, h in zip(blocks, hashes))

    def decode_all(blobs: list[bytes], codec: str) -> None:
        fingerprint = spec_for(dtype, codec).fingerprint
        for i, blob in enumerate(blobs):
            decode_block(blob, out=out[i], expect_fingerprint=fingerprint,
                         expect_hash=hashes[i], expect_dtype=dtype, expect_shape=spec.block_shape)

    frames = [lz4.frame.compress(b) for b in blocks]
    itemsize = data.element_size()
    shuffled = [b.reshape(-1, itemsize).T.copy().reshape(-1) for b in blocks]
    shuffled_frames = [lz4.frame.compress(b) for b in shuffled]
    blobs = {codec: list(encode_each(codec)) for codec in CODECS}
    for codec, encoded in blobs.items():
        decode_all(encoded, codec)
        if parse_codec(codec).kv_codec == "exact" and not np.array_equal(out, np.stack(blocks)):
            raise AssertionError(f"{codec} round trip of {name} blocks is not exact")
        back = torch.from_numpy(out).view(dtype).float()
        if parse_codec(codec).kv_codec != "exact" and snr_db(data.float(), back.view(data.shape)) < 25:
            raise AssertionError(f"{codec} round trip of {name} blocks is far from the data")
    # Each output is dropped before the next call, as the cache does (keeping them all alive
    # would make glibc trim and re-fault the heap on every pass, timing page faults).
    fns: dict[str, Callable[[], object]] = {
        "lz4.frame encode": lambda: drain(lz4.frame.compress(b) for b in blocks),
        "lz4.frame decode": lambda: drain(lz4.frame.decompress(f) for f in frames),
        "shuffled encode": lambda: drain(lz4.frame.compress(b) for b in shuffled),
        "shuffled decode": lambda: drain(lz4.frame.decompress(f) for f in shuffled_frames)}
    for codec, encoded in blobs.items():
        fns[f"encode {codec}"] = lambda c=codec: drain(encode_each(c))
        fns[f"decode {codec}"] = lambda c=codec, e=encoded: decode_all(e, c)
    fns["int8 plain torch"] = lambda: torch_dequant_int8(blobs["int8"], out)
    planes = lz4_planes(blobs["lz4"])
    if planes:
        fns["lz4 planes"] = lambda: drain(
            lz4.block.decompress(p, uncompressed_size=size) for p, size in planes)
    times = timed(fns, reps, lambda: None)

    def extra(codec: str, op: str) -> dict[str, Any]:
        return dict(blocks=n, comp_ratio=nbytes / sum(map(len, blobs[codec])),
                    lz4_frame_ratio=nbytes / sum(map(len, frames)),
                    shuffled_gbs=nbytes / pick(times[f"shuffled {op}"]) / 1e9,
                    shuffled_ratio=nbytes / sum(map(len, shuffled_frames)))

    rows = [row(f"{op} {codec}", name, nbytes, times[f"{op} {codec}"], times[f"lz4.frame {op}"],
                pick, **extra(codec, op))
            for codec in CODECS for op in ("encode", "decode")]
    rows.append(row("int8 plain torch", name, nbytes, times["int8 plain torch"],
                    times["lz4.frame decode"], pick, **extra("int8", "decode")))
    if planes:
        rows.insert(2, row("lz4 planes", name, nbytes, times["lz4 planes"],
                           times["lz4.frame decode"], pick, **extra("lz4", "decode")))
    return rows


def snr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10((x * x).sum() / ((x - y) ** 2).sum()))


def torch_dequant_int8(blobs: list[bytes], out: np.ndarray) -> None:
    """int8 blocks dequantized the plain torch way, without the codec's header checks and
    checksum: what the fused decode is measured against."""
    warnings.filterwarnings("ignore", "The given NumPy array is not writable")  # read only
    for i, blob in enumerate(blobs):
        hdr = read_header(blob)
        layers, _, tokens, heads, head_dim = hdr.shape
        (_, nk), (_, nv), (_, n) = hdr.planes
        payload = torch.from_numpy(np.frombuffer(blob, dtype=np.uint8, offset=hdr.header_len))
        k_scales = payload[:nk].view(torch.bfloat16).view(layers, 1, heads, head_dim).float()
        v_scales = payload[nk:nk + nv].view(torch.bfloat16).view(layers, tokens, heads, 1).float()
        values = payload[nk + nv:].view(torch.int8).view(hdr.shape).float()
        x = torch.stack([values[:, 0] * k_scales, values[:, 1] * v_scales], dim=1).to(hdr.dtype)
        torch.from_numpy(out[i]).view(hdr.dtype).view(hdr.shape).copy_(x)


def lz4_planes(blobs: list[bytes]) -> list[tuple[memoryview, int]]:
    """The lz4-compressed planes of encoded blocks, with their decompressed sizes."""
    planes = []
    for blob in blobs:
        hdr = read_header(blob)
        off = hdr.header_len
        for kind, size in hdr.planes:
            if kind == PlaneCodec.LZ4:
                planes.append((memoryview(blob)[off:off + size], hdr.raw_len // len(hdr.planes)))
            off += size
    return planes


def render(console: Console, title: str, rows: list[Row], baseline: str, codec: bool) -> None:
    table = Table(title=title, title_justify="left")
    for col in ("measurement", "variant", "ours GB/s", f"{baseline} GB/s", "ours/base", "spread"):
        table.add_column(col, justify="left" if col in ("measurement", "variant") else "right")
    if codec:
        for col in ("shuffled GB/s", "ours/shuffled", "comp. ratio", "lz4.frame ratio", "shuffled ratio"):
            table.add_column(col, justify="right")
    for r in rows:
        cells = [r["measurement"], r["variant"], f"{r['ours_gbs']:.2f}", f"{r['baseline_gbs']:.2f}",
                 f"{r['ratio']:.2f}", f"{r['spread']:.0%}"]
        if codec:
            cells += [f"{r['shuffled_gbs']:.2f}", f"{r['ours_gbs'] / r['shuffled_gbs']:.2f}",
                      f"{r['comp_ratio']:.3f}x", f"{r['lz4_frame_ratio']:.3f}x", f"{r['shuffled_ratio']:.3f}x"]
        table.add_row(*cells)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 MiB transfers, 8 MiB codec")
    parser.add_argument("--device", default="auto", help="T0 device: auto (CUDA if any), cpu, cuda")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--best", action="store_true", help="best-of instead of median")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pick, stat = (min, "best-of") if args.best else (statistics.median, "median")
    device = resolve_device(args.device)
    mib, codec_mib, reps = (32, 8, 7) if args.quick else (256, 64, 9)

    console = Console() if sys.stdout.isatty() else Console(width=160)
    title = header(f"T0 device {device}", f"{reps} timed reps ({stat}) after 1 warm-up")
    console.print(title, highlight=False)
    start = time.perf_counter()
    transfers = bench_transfers(mib, reps, pick, device)
    render(console, f"T0 <-> T1 transfers, {transfers[0]['bytes'] / 2**20:.0f} MiB per pass, "
           f"{BATCH} blocks per call", transfers, "raw copy_", codec=False)
    codecs = [r for dt in (torch.bfloat16, torch.float16, torch.float32)
              for r in bench_codec(dt, codec_mib, reps, pick)]
    render(console, f"Block codec, {codec_mib} MiB of randn blocks per pass, one call per block",
           codecs, "lz4.frame", codec=True)

    restore_pct = next(r for r in transfers if r["measurement"].startswith("restore")
                       and r["variant"] == "consecutive")["ratio"]
    bf16_decode = next(r for r in codecs if r["measurement"] == "decode lz4" and r["variant"] == "bf16")
    bf16_planes = next((r for r in codecs if r["measurement"] == "lz4 planes"
                        and r["variant"] == "bf16"), None)
    decode_pct = bf16_decode["ratio"]
    decode_shuffled_pct = bf16_decode["ours_gbs"] / bf16_decode["shuffled_gbs"]
    verdicts = [f"T1 restore (consecutive) reaches {restore_pct:.0%} of raw copy (target >= 50%)",
                f"lz4 decode (bf16) reaches {decode_pct:.0%} of lz4.frame.decompress of the same bytes "
                f"(target >= 50%)",
                f"lz4 decode (bf16) reaches {decode_shuffled_pct:.0%} of lz4.frame.decompress of the "
                f"same bytes byte-shuffled (target >= 50%)"]
    for ok, text in zip((restore_pct >= 0.5, decode_pct >= 0.5, decode_shuffled_pct >= 0.5), verdicts):
        console.print(f"verdict: {'[green]PASS' if ok else '[red]FAIL'}[/] {text}", highlight=False)
    if bf16_planes:
        note = (f"lz4.block.decompress of the compressed planes alone (bf16) reaches "
                f"{bf16_planes['ratio']:.0%} of lz4.frame.decompress of the same bytes: a "
                f"ceiling for our lz4 decode")
        verdicts.append(f"note: {note}")
        console.print(f"note: {note}", highlight=False)
    for dt in ("bf16", "fp16", "fp32"):
        fused, plain = (next(r for r in codecs if r["measurement"] == m and r["variant"] == dt)
                        for m in ("decode int8", "int8 plain torch"))
        note = (f"int8 decode ({dt}) {fused['ours_gbs']:.2f} GB/s of output with header, checks and "
                f"checksum; plain torch dequantization {plain['ours_gbs']:.2f} GB/s "
                f"({fused['ours_gbs'] / plain['ours_gbs']:.1f}x)")
        verdicts.append(f"note: {note}")
        console.print(f"note: {note}", highlight=False)
    console.print(f"total {time.perf_counter() - start:.1f}s", highlight=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": title, "reps": reps, "transfers": transfers, "codec": codecs,
                       "verdicts": verdicts}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
