"""deploy/ cannot run here (no Docker engine), so check that it is consistent with the code:
valid compose YAML, CLI flags and environment variables that exist, files that exist."""
import dataclasses
import re
from pathlib import Path

import yaml

from kvstore.config import config_from_args
from services.blockstore.server import BlockStoreConfig, build_parser
from services.cli import main as cli
from services.cli.serve import ServeConfig

ROOT = Path(__file__).resolve().parents[1]


def _interpolate(arg: str) -> str:
    """Compose's ${VAR:-default} -> default and ${VAR:?message} -> a sample value."""
    return re.sub(r"\$\{[A-Z_]+:([-?])([^}]*)\}", lambda m: m[2] if m[1] == "-" else "x=y", arg)


def test_compose_file_is_valid_and_matches_the_cli():
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    assert set(compose["services"]) == {"redis", "blockstore", "sessions"}
    redis_cmd = compose["services"]["redis"]["command"]
    # Blocks and sessions share this Redis: only keys with a TTL (blocks) may be evicted.
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "volatile-lru" and "--maxmemory" in redis_cmd
    store = compose["services"]["blockstore"]
    assert store["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / store["build"]["dockerfile"]).exists()
    assert store["command"][:2] == ["blockstore", "serve"]
    # The real parsers: an unknown or misspelt flag fails here (SystemExit / _UsageError).
    args = build_parser(BlockStoreConfig()).parse_args([_interpolate(a) for a in store["command"][2:]])
    config = config_from_args(BlockStoreConfig, args)
    assert (config.host, config.port, config.redis_url) == ("0.0.0.0", 50051, "redis://redis:6379/0")
    fields = {f.name.upper() for f in dataclasses.fields(BlockStoreConfig)}
    for var in store["environment"]:
        assert var.startswith("KVSTORE_BLOCKSTORE_") and var.removeprefix("KVSTORE_BLOCKSTORE_") in fields, var
    assert compose["services"]["blockstore"]["depends_on"]["redis"]["condition"] == "service_healthy"
    sessions = compose["services"]["sessions"]
    assert sessions["command"][0] == "serve" and sessions["image"] == store["image"]
    args = cli.build_parser().parse_args([_interpolate(a) for a in sessions["command"]])
    serve = config_from_args(ServeConfig, args)
    assert (serve.session.blockstore_address, serve.session.redis_url, serve.model) == ("blockstore:50051", "redis://redis:6379/0", "small")


def test_dockerfile_copies_what_exists():
    for src in re.findall(r"^COPY (\S+)", (ROOT / "deploy/Dockerfile").read_text(), re.M):
        assert (ROOT / src).exists(), src
