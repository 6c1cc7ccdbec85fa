"""The ``kvstore`` command."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    for f in dataclasses.fields(cls):
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, dest=f.name)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, dest=f.name)


def main(argv: list[str] | None = None) -> int:
    from kvstore.demo import DemoConfig

    parser = argparse.ArgumentParser(prog="kvstore", description="Distributed tiered KV-cache for LLM inference.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="simulated multi-turn sessions through the tiered cache")
    _add_dataclass_flags(demo, DemoConfig)
    blockstore = sub.add_parser("blockstore", help="the block store service (T2): `kvstore blockstore serve --help`")
    blockstore.add_argument("action", choices=["serve"])
    blockstore.add_argument("rest", nargs=argparse.REMAINDER, help="flags of `serve`")
    args = parser.parse_args(argv)
    if args.command == "blockstore":
        from services.blockstore.server import main as serve

        return serve(args.rest)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "demo":
        from kvstore.demo import run_demo

        cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)})
        try:
            run_demo(cfg)
        except (ValueError, RuntimeError) as e:
            print(f"kvstore demo: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
