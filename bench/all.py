"""Every benchmark in one run: `make bench` (quick: a sanity pass, ~5 min) and `make bench-full`
(the commands of the README's Performance summary, ~30 min on the project's 2-core machine).

Each benchmark runs as its own process, one after another (they would skew each other's
timings side by side); its output goes to the console and to `<out>/<name>.txt`. A progress
bar shows which one runs and how long it has taken against what it usually takes. At the end,
a table: each command, its exit status, wall time and verdicts, also written to
`<out>/summary.md`. The exit status is 1 if any benchmark failed (a crash, or outputs that
differ where they must be equal); a FAIL verdict is a target not reached, reported, not an
error. Quick mode writes its plots under `<out>`; full mode writes the README's plots in
`bench/results/`.

Run:  .venv/bin/python bench/all.py [--full] [--out DIR] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import header
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "bench/results"


@dataclasses.dataclass(frozen=True)
class Bench:
    name: str  # of its output file
    argv: tuple[str, ...]  # the script and its arguments, from the project root
    expected_s: float  # on the project's machine (2 cores), for the progress bar


def quick(out: str) -> list[Bench]:
    return [
        Bench("tiers", ("bench/tiers.py", "--quick"), 10),
        Bench("remote", ("bench/remote.py", "--quick"), 10),
        Bench("ttft", ("bench/ttft.py", "--quick", "--png", f"{out}/ttft.png"), 25),
        Bench("mixed", ("bench/mixed.py", "--quick"), 10),
        Bench("decode", ("bench/decode.py", "--quick"), 10),
        Bench("codec_quality", ("bench/codec_quality.py", "--quick", "--png", f"{out}/codec_quality.png"), 15),
        Bench("policies", ("bench/policies.py", "--quick", "--png", f"{out}/policies.png"), 20),
        Bench("trace", ("bench/trace.py", "--png", f"{out}/trace.png"), 130),
        Bench("http_demo", ("bench/http_demo.py", "--quick"), 15),
        Bench("agents", ("bench/agents.py", "--quick", "--sweep", "1,2,4", "--plot", f"{out}/agents.png"), 60),
    ]


def full() -> list[Bench]:
    """The README's Performance summary; its plots go where the README shows them."""
    return [
        Bench("tiers", ("bench/tiers.py",), 25),
        Bench("remote", ("bench/remote.py",), 50),
        Bench("policies", ("bench/policies.py", "--png", f"{RESULTS}/policies.png"), 60),
        Bench("ttft", ("bench/ttft.py", "--model", "qwen2.5-0.5b-shape", "--hist", "1024,4096", "--reps", "3",
                       "--png", f"{RESULTS}/ttft_qwen.png"), 370),
        Bench("agents", ("bench/agents.py", "--sweep", "4,8,16", "--plot", f"{RESULTS}/agents.png"), 830),
        Bench("trace", ("bench/trace.py", "--requests", "3000", "--speed", "2", "--tokens-per-block", "16",
                        "--concurrency", "16", "--png", f"{RESULTS}/trace.png"), 600),
    ]


@dataclasses.dataclass
class Outcome:
    bench: Bench
    returncode: int
    wall_s: float
    passed: int
    failed: int

    def command(self) -> str:
        return shlex.join([".venv/bin/python", *self.bench.argv])


def run(bench: Bench, out: Path, progress: Progress) -> Outcome:
    """Run one benchmark, its output echoed above the progress bar and kept in ``out``."""
    env = dict(os.environ, COLUMNS=str(max(progress.console.width, 160)), PYTHONUNBUFFERED="1")
    passed = failed = 0
    start = time.perf_counter()
    with (out / f"{bench.name}.txt").open("w") as log, subprocess.Popen(
            [sys.executable, *bench.argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1) as proc:
        for line in proc.stdout:
            log.write(line)
            progress.console.print(line.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)
            passed += line.startswith("verdict: PASS")
            failed += line.startswith("verdict: FAIL")
    return Outcome(bench, proc.returncode, time.perf_counter() - start, passed, failed)


def summary(outcomes: list[Outcome], title: str) -> Table:
    table = Table(title=title)
    for col in ("benchmark", "command", "exit", "wall (min)", "verdicts PASS / FAIL"):
        table.add_column(col, justify="left" if col in ("benchmark", "command") else "right")
    for o in outcomes:
        table.add_row(o.bench.name, o.command(), str(o.returncode), f"{o.wall_s / 60:.1f}", f"{o.passed} / {o.failed}")
    table.add_row("all", "", "", f"{sum(o.wall_s for o in outcomes) / 60:.1f}", "")
    return table


def markdown(outcomes: list[Outcome], first_line: str) -> str:
    lines = [first_line, "", "| benchmark | command | exit | wall (min) | verdicts PASS / FAIL |", "|---|---|---|---|---|"]
    lines += [f"| {o.bench.name} | `{o.command()}` | {o.returncode} | {o.wall_s / 60:.1f} | {o.passed} / {o.failed} |"
              for o in outcomes]
    return "\n".join(lines) + f"\n\ntotal {sum(o.wall_s for o in outcomes) / 60:.1f} min\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the README's commands (~30 min) instead of quick ones")
    ap.add_argument("--out", type=Path, help="where outputs go (default: /tmp/kvstore-bench/quick or full)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="these benchmarks only")
    args = ap.parse_args()
    mode = "full" if args.full else "quick"
    out = (args.out or Path("/tmp/kvstore-bench") / mode).resolve()
    out.mkdir(parents=True, exist_ok=True)
    benches = full() if args.full else quick(str(out))
    if args.only:
        unknown = set(args.only) - {b.name for b in benches}
        if unknown:
            ap.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {[b.name for b in benches]}")
        benches = [b for b in benches if b.name in args.only]
    console = Console(width=max(Console().width, 120))
    first_line = header(f"{mode} mode, outputs in {out}")
    console.print(first_line, highlight=False)
    outcomes: list[Outcome] = []
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
               TextColumn("usually ~{task.fields[usual]}"))
    with Progress(*columns, console=console) as progress:
        overall = progress.add_task(f"{mode}: 0/{len(benches)}", total=sum(b.expected_s for b in benches),
                                    usual=f"{sum(b.expected_s for b in benches) / 60:.0f} min")
        for i, bench in enumerate(benches):
            progress.update(overall, description=f"{mode}: {i}/{len(benches)}")
            task = progress.add_task(bench.name, total=None, usual=f"{bench.expected_s / 60:.1f} min")
            outcomes.append(run(bench, out, progress))
            progress.remove_task(task)
            progress.update(overall, advance=bench.expected_s, description=f"{mode}: {i + 1}/{len(benches)}")
    console.print(summary(outcomes, f"{mode} benchmarks"))
    (out / "summary.md").write_text(markdown(outcomes, first_line))
    console.print(f"outputs: {out}")
    return 0 if all(o.returncode == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
