"""The ``kvstore`` command.

    kvstore serve                 # everything on embedded defaults; prints where it listens
    kvstore serve --http-port 8000  # ... plus the OpenAI-compatible HTTP API on 127.0.0.1:8000/v1
    kvstore demo [--address A]    # scripted agent workload (starts its own service without --address)
    kvstore chat --address A      # interactive session
    kvstore stats --address A     # the running service at a glance (--watch 2 refreshes)
    kvstore admin drain w1        # operate it: drain a worker, flush a namespace, list/close sessions
    kvstore tiers-demo            # the cache tiers alone, with synthetic KV
    kvstore blockstore serve      # the block store service (T2) alone
    kvstore config check FILE     # a `kvstore serve --config` file, checked without starting anything
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from typing import TYPE_CHECKING

from kvstore.client import SessionAPIError, SessionClient
from kvstore.config import add_config_flags, config_from_args, from_env, from_toml
from services.cli.keys import api_keys
from services.common.errors import ConfigError

if TYPE_CHECKING:
    from services.cli.serve import ServeConfig

SERVE_ENV = "KVSTORE_SERVE_"


_SERVE_HELP = {
    "api_keys": "'key=ns1,ns2;key2=*' (shows in ps: prefer --api-keys-file or the environment); "
                "empty and no file: no authentication, loopback only",
    "api_keys_file": "API keys, one 'key=ns1,ns2' or 'sha256:<hex of the key>=ns1' per line",
    "data_dir": "the session Redis' append-only file; empty: $XDG_DATA_HOME/kvstore or ~/.local/share/kvstore",
    "session_redis_maxmemory": "maxmemory of the embedded session Redis (noeviction)",
    "redis_maxmemory": "maxmemory of the embedded block Redis (allkeys-lru)",
    "redis_url": "Redis for sessions (must not evict) and, without --blocks-redis-url, blocks; empty: embedded",
    "blocks_redis_url": "Redis for blocks (allkeys-lru advised); empty: --redis-url, else embedded",
    "shared_workers": "workers outlive this process and serve every `kvstore serve --shared-workers` replica "
                      "joined to the same Ray cluster (--ray-address) with the same Redis and block store; "
                      "`kvstore admin drain` or stopping Ray stops them",
    "http_port": "port of the OpenAI-compatible HTTP API on --host (same keys and TLS); -1: off, 0: a free one",
}


def serve_settings(config_file: str = "") -> ServeConfig:
    """``kvstore serve``'s settings before its flags: defaults, then ``config_file`` (TOML), then
    KVSTORE_SERVE_* variables. Raises ValueError naming a bad setting."""
    from services.cli.serve import ServeConfig
    return from_env(ServeConfig, prefix=SERVE_ENV, base=from_toml(ServeConfig, config_file) if config_file else None)


def build_parser(config_file: str = "") -> argparse.ArgumentParser:
    """The ``kvstore`` parser, its ``serve`` flags defaulting to ``serve_settings(config_file)``;
    raises ValueError for a bad setting there."""
    # Imported here: torch and Ray take seconds, and `serve` refuses an unsafe bind before that.
    from services.cli.demo import DemoConfig
    from services.cli.tiers_demo import DemoConfig as TiersDemoConfig

    parser = argparse.ArgumentParser(prog="kvstore", description="Distributed tiered KV-cache for LLM inference.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service: Redis, block store, Ray workers, session API")
    serve.add_argument("--config", default=config_file, help="a TOML file of settings, under the environment's "
                                                             f"and the flags' (env {SERVE_ENV}CONFIG)")
    add_config_flags(serve, serve_settings(config_file), env_prefix=SERVE_ENV, help=_SERVE_HELP)
    add_config_flags(sub.add_parser("demo", help="scripted agent workload against the service "
                                                 "(starts one without --address)"), DemoConfig())
    chat = sub.add_parser("chat", help="an interactive session against a running service")
    chat.add_argument("--address", default="127.0.0.1:50052")
    chat.add_argument("--api-key", default="")
    chat.add_argument("--session", default="", help="continue this session id instead of creating one")
    chat.add_argument("--system", default="You are a helpful assistant.", help="system prompt of a new session")
    chat.add_argument("--max-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0)
    add_config_flags(sub.add_parser("tiers-demo", help="the cache tiers alone, with synthetic KV"),
                     TiersDemoConfig())
    stats = sub.add_parser("stats", help="a running service at a glance: workers, tiers, reuse, TTFT, Redis memory")
    stats.add_argument("--address", default="127.0.0.1:50052")
    stats.add_argument("--api-key", default="", help="an admin key (namespace '*') when the service has keys")
    stats.add_argument("--watch", type=float, default=0.0, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
    admin = sub.add_parser("admin", help="operate a running service (an admin key): drain a worker, flush a "
                                         "namespace's blocks, list or close its sessions")
    admin.add_argument("action", choices=["drain", "flush", "sessions"])
    admin.add_argument("target", help="drain: a worker id (w0, w1, ...); flush, sessions: a namespace")
    admin.add_argument("--address", default="127.0.0.1:50052")
    admin.add_argument("--api-key", default="", help="an admin key (namespace '*') when the service has keys")
    admin.add_argument("--timeout", type=float, default=60.0, help="drain: seconds its generations may take")
    admin.add_argument("--close", action="store_true", help="sessions: close every listed one")
    admin.add_argument("--limit", type=int, default=1000, help="sessions: at most this many, newest first")
    config = sub.add_parser("config", help="check a `kvstore serve --config` file")
    config.add_argument("action", choices=["check"])
    config.add_argument("file")
    blockstore = sub.add_parser("blockstore", help="the block store service (T2): `kvstore blockstore serve --help`")
    blockstore.add_argument("action", choices=["serve"])
    blockstore.add_argument("rest", nargs=argparse.REMAINDER, help="flags of `serve`")
    return parser


def _early_serve_flags(argv: list[str]) -> argparse.Namespace | None:
    """The flags of ``kvstore serve`` read before the full parser is built (it imports torch
    and Ray, and its defaults come from the config file): --host, --api-keys, --api-keys-file
    and --config, or their KVSTORE_SERVE_* variables. None for another command."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    pre.add_argument("--log-level")
    pre.add_argument("command", nargs="?")
    for name in ("host", "api_keys", "api_keys_file", "config"):
        pre.add_argument(f"--{name.replace('_', '-')}", dest=name, default=os.environ.get(SERVE_ENV + name.upper(), ""))
    try:
        known, _ = pre.parse_known_args(argv)
    except argparse.ArgumentError:
        return None  # the full parser says what is wrong
    return known if known.command == "serve" else None


def _serve_refusal(flags: argparse.Namespace | None) -> str:
    """Why ``kvstore serve`` must not start ("" if it may): a non-loopback ``--host`` without
    API keys, or unusable keys. Checked in a fraction of a second, before the full parser;
    ``Service`` checks again (e.g. an abbreviated flag, or a host from the config file)."""
    if flags is None or not flags.host:
        return ""
    try:
        api_keys(flags.host, flags.api_keys, flags.api_keys_file)
    except ConfigError as e:
        return str(e)
    return ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    early = _early_serve_flags(argv)
    if refusal := _serve_refusal(early):
        print(f"kvstore serve: {refusal}", file=sys.stderr)
        return 2
    try:
        parser = build_parser(early.config if early else "")
    except ValueError as e:
        print(f"kvstore: bad settings: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command == "blockstore":
        from services.blockstore.server import main as blockstore_main
        return blockstore_main(args.rest)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            from services.cli.serve import ServeConfig, serve
            config = config_from_args(ServeConfig, args)
            os.environ.pop(SERVE_ENV + "API_KEYS", None)  # read: no child process inherits the keys
            return asyncio.run(serve(config))
        if args.command == "demo":
            from services.cli.demo import DemoConfig, run_demo
            totals = run_demo(config_from_args(DemoConfig, args))
            return 0 if totals["same"] else 1
        if args.command == "chat":
            return _chat(args)
        if args.command == "config":
            return _check_config(args.file)
        if args.command == "stats":
            from services.cli.stats import run_stats
            return run_stats(args.address, args.api_key, args.watch)
        if args.command == "admin":
            from services.cli.admin import run_admin
            return run_admin(args.address, args.api_key, args.action, args.target, args.timeout, args.close, args.limit)
        if args.command == "tiers-demo":
            from services.cli.tiers_demo import DemoConfig, run_demo
            run_demo(config_from_args(DemoConfig, args))
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a clear message instead of a traceback for what users can fix
        if isinstance(e, (ValueError, RuntimeError, OSError, SessionAPIError)):
            print(f"kvstore {args.command}: {e}", file=sys.stderr)
            return 2 if isinstance(e, ValueError) else 1
        raise
    return 0


def _check_config(path: str) -> int:
    """Check a config file as ``kvstore serve --config`` reads it (the environment left out):
    every key known, every value of its type and within its limits; raises ValueError."""
    from services.cli.serve import ServeConfig
    from services.session.server import validate_config
    settings = from_toml(ServeConfig, path)
    try:
        config = from_env(ServeConfig, env={}, base=settings)
        keys = api_keys(config.session.host, config.session.api_keys, config.api_keys_file)
        # As serve runs it: with the keys of its file, and an embedded Redis unless one is given.
        validate_config(dataclasses.replace(config.session, api_keys=keys,
                                            redis_url=config.session.redis_url or "redis://embedded"))
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    print(f"{path}: ok ({len(settings)} settings)")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from workers.loader import BUILTIN_MODELS
    with SessionClient(args.address, api_key=args.api_key, timeout_s=None) as kv:
        info = kv.get_session(args.session) if args.session else kv.create_session(system_prompt=args.system)
        session = info.session_id
        print(f"session {session}  (/fork branches it, /info shows it, /quit or Ctrl-D ends)")
        if info.model in BUILTIN_MODELS:
            print(f"note: the built-in model {info.model!r} has seeded random weights: its replies are noise "
                  "(serve a checkpoint with --model DIR for real text)")
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                return 0
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return 0
            if line == "/info":
                print(kv.get_session(session))
                continue
            if line == "/fork":
                session = kv.fork(session).session_id
                print(f"now in fork {session}")
                continue
            try:
                reply = kv.generate(session, [{"role": "user", "content": line}], max_tokens=args.max_tokens,
                                    temperature=args.temperature)
                print("assistant> ", end="", flush=True)
                for chunk in reply:
                    print(chunk.text, end="", flush=True)
                u = reply.usage
                print(f"\n  [{u.prompt_tokens} prompt tokens, cached T0 {u.cached_tokens_t0} / T1 {u.cached_tokens_t1}"
                      f" / T2 {u.cached_tokens_t2}, TTFT {1e3 * u.ttft_seconds:.0f} ms, {u.tokens_per_second:.0f} "
                      f"tok/s on {u.worker_id}]")
            except SessionAPIError as e:
                print(f"\n  error: {e}")


if __name__ == "__main__":
    sys.exit(main())
