"""Decode tokens/s at a long context: our forward over the paged T0 pool vs transformers' generate.

For each model, context length C and batch B: B sequences whose first C-1 tokens are cached
decode N tokens greedily, one token per sequence per step.
  ours           ``Transformer.forward`` over the paged pool (a ``ForwardBatch`` per step, as
                 the engine builds it), the context in the block layout given by --layouts:
                 ``runs`` (each sequence's blocks consecutive, as the allocator hands them out)
                 or ``shuffled`` (every block elsewhere: the worst case)
  before         the same with ``workers/model.py`` as of the git ref --before (the weights
                 and pool are shared; omitted without --before)
  transformers   ``generate`` on the same weights and torch threads, continuing from its own
                 KV cache of the same C-1 tokens (a ``DynamicCache``)
The pool is filled from transformers' cache, so both continue from the same K/V; the table
says whether the greedy tokens agree.

Run:  .venv/bin/python bench/decode.py [--quick] [--models small,qwen2.5-0.5b-shape] [--before REF]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import transformers
from common import header
from rich.console import Console
from rich.table import Table
from ttft import hf_model

from kvstore.pools import DevicePool
from workers.loader import builtin_model, kv_spec
from workers.model import ForwardBatch, decode_kernel

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 16


def before_model(ref: str, config, model):
    """``workers/model.py`` as of git ``ref``, holding ``model``'s weights (shared, not copied)."""
    source = subprocess.run(["git", "show", f"{ref}:workers/model.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "model_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("model_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["model_before"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(module.ModelConfig)}
    with torch.device("meta"):
        old = module.Transformer(module.ModelConfig(**fields))
    old.load_state_dict(model.state_dict(), strict=True, assign=True)
    return old.eval(), module.ForwardBatch


def tables_for(layout: str, batch: int, blocks: int, seed: int) -> list[list[int]]:
    slots = list(range(batch * blocks))
    if layout == "shuffled":
        random.Random(seed).shuffle(slots)
    elif layout != "runs":
        raise ValueError(f"unknown layout {layout!r} (runs, shuffled)")
    return [slots[i * blocks:(i + 1) * blocks] for i in range(batch)]


def fill_pool(kv: torch.Tensor, cache, tables: list[list[int]], n: int) -> None:
    """Copy transformers' cached K/V of n tokens into every sequence's blocks."""
    for table in tables:
        rows = (torch.tensor(table)[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:n].to(kv.device)
        for layer in range(kv.shape[0]):
            for part, src in enumerate((cache.layers[layer].keys, cache.layers[layer].values)):
                kv[layer, part].view(-1, *kv.shape[4:]).index_copy_(0, rows, src[0].transpose(0, 1))


def decode_ours(model, fb_cls, kv, tables, ctx: int, first: int, steps: int) -> tuple[float, list[list[int]]]:
    toks = [first] * len(tables)
    out = []
    start = time.perf_counter()
    for s in range(steps):
        fb = fb_cls.build([([t], ctx - 1 + s, table) for t, table in zip(toks, tables)], BLOCK, device=kv.device)
        toks = model(fb, kv).argmax(-1).tolist()  # the engine samples on the host too
        out.append(toks)
    return time.perf_counter() - start, out


def decode_hf(hf, cache, ids: list[int], batch: int, steps: int) -> tuple[float, list[list[int]]]:
    c = copy.deepcopy(cache)
    c.batch_repeat_interleave(batch)
    inp = torch.tensor([ids] * batch, device=hf.device)
    start = time.perf_counter()
    with torch.inference_mode():
        gen = hf.generate(inp, attention_mask=torch.ones_like(inp), past_key_values=c, do_sample=False,
                          max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0)
    tokens = gen[:, len(ids):].T.tolist()
    return time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, C in 256,1024, 8 steps, 1 rep")
    parser.add_argument("--models", default="small,qwen2.5-0.5b-shape")
    parser.add_argument("--ctx", default="1024,4096", help="context lengths C")
    parser.add_argument("--batch", default="1,8", help="batch sizes B")
    parser.add_argument("--layouts", default="runs,shuffled")
    parser.add_argument("--steps", type=int, default=32, help="tokens decoded per sequence")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--before", metavar="REF", help="git ref of workers/model.py to compare against")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the weights and KV live (cpu, cuda)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*past_key_values.*")  # 5.x renames it; 4.x knows only it
    transformers.logging.set_verbosity_error()
    if args.quick:
        args.models, args.ctx, args.steps, args.reps = "small", "256,1024", 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    ctxs = [int(c) for c in args.ctx.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    layouts = args.layouts.split(",")

    console = Console() if sys.stdout.isatty() else Console(width=140)
    title = header(f"{args.steps} tokens per sequence", f"median of {args.reps}")
    console.print(title, highlight=False)
    rows = []
    for name in args.models.split(","):
        config, model, digest = builtin_model(name, device=args.device)
        spec = kv_spec(config, f"builtin-{name}", digest, block_size=BLOCK)
        hf = hf_model(config, model).to(model.device)
        old = before_model(args.before, config, model) if args.before else None
        console.print(f"model {name}: {config.num_params / 1e6:.0f}M params, {config.dtype}, decode kernel "
                      f"{decode_kernel(model.device, config.dtype)} on {model.device}", highlight=False)
        for ctx in ctxs:
            ids = torch.randint(0, config.vocab_size, (ctx,), generator=torch.Generator().manual_seed(ctx)).tolist()
            with torch.inference_mode():
                cache = hf(torch.tensor([ids[:-1]], device=hf.device), use_cache=True).past_key_values
            blocks = -(-(ctx + args.steps) // BLOCK)
            for batch in batches:
                kv = DevicePool(spec, batch * blocks, device=args.device).kv
                for layout in layouts:
                    tables = tables_for(layout, batch, blocks, seed=ctx + batch)
                    fill_pool(kv, cache, tables, ctx - 1)
                    ours = partial(decode_ours, kv=kv, tables=tables, ctx=ctx, first=ids[-1], steps=args.steps)
                    runs = {"ours": partial(ours, model, ForwardBatch)}
                    if old is not None:
                        runs["before"] = partial(ours, *old)
                    if layout == layouts[0]:  # its cache has no layout
                        runs["transformers"] = partial(decode_hf, hf, cache, ids, batch, args.steps)
                    times: dict[str, list[float]] = {k: [] for k in runs}
                    tokens = {}
                    for fn in runs.values():
                        fn()  # warm-up (first-call costs)
                    for _ in range(args.reps):  # interleaved: drifting machine load hits all alike
                        for k, fn in runs.items():
                            t, tokens[k] = fn()
                            times[k].append(t)
                    tps = {k: batch * args.steps / statistics.median(v) for k, v in times.items()}
                    row = dict(model=name, layout=layout, ctx=ctx, batch=batch, tps=tps,
                               same_tokens={k: tokens[k] == tokens["ours"] for k in tokens if k != "ours"})
                    rows.append(row)
                    console.print(f"{name} {layout} C={ctx} B={batch}: "
                                  + ", ".join(f"{k} {v:.1f} tok/s" for k, v in tps.items()), highlight=False)

    table = Table(title="decode tokens/s (all sequences together)", title_justify="left")
    for col in ("model", "layout", "C", "B", "ours", "before", "transformers", "ours / before",
                "ours / transformers", "same tokens as ours"):
        table.add_column(col, justify="right")
    for r in rows:
        t = r["tps"]
        fmt = lambda k: f"{t[k]:.1f}" if k in t else "-"  # noqa: E731
        ratio = lambda k: f"{t['ours'] / t[k]:.2f}x" if k in t else "-"  # noqa: E731
        same = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in r["same_tokens"].items()) or "-"
        table.add_row(r["model"], r["layout"], str(r["ctx"]), str(r["batch"]), fmt("ours"), fmt("before"),
                      fmt("transformers"), ratio("before"), ratio("transformers"), same)
    console.print(table)
    at = max(ctxs)
    for r in rows:
        if r["ctx"] == at and "transformers" in r["tps"]:
            ok = r["tps"]["ours"] >= r["tps"]["transformers"]
            console.print(f"verdict: {'[green]PASS' if ok else '[red]FAIL'}[/] {r['model']} C={at} B={r['batch']} "
                          f"({r['layout']}): ours {r['tps']['ours'] / r['tps']['transformers']:.2f}x transformers "
                          "generate (target >= 1x)", highlight=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": title, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
