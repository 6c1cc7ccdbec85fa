"""deploy/ cannot run here (no Docker engine), so check that it is consistent with the code:
valid compose YAML, CLI flags and environment variables that exist, files that exist."""
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import yaml

from kvstore.config import BlockStoreConfig

ROOT = Path(__file__).resolve().parents[1]


def test_compose_file_is_valid_and_matches_the_cli():
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    assert set(compose["services"]) == {"redis", "blockstore", "sessions"}
    redis_cmd = compose["services"]["redis"]["command"]
    assert "allkeys-lru" in redis_cmd and "--maxmemory" in redis_cmd
    store = compose["services"]["blockstore"]
    assert store["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / store["build"]["dockerfile"]).exists()
    assert store["command"][:2] == ["blockstore", "serve"]
    help_text = subprocess.run(
        [sys.executable, "-m", "kvstore.cli", "blockstore", "serve", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout
    for flag in (a for a in store["command"] if a.startswith("--")):
        assert flag in help_text, f"compose passes {flag}, which `kvstore blockstore serve` does not take"
    fields = {f.name.upper() for f in dataclasses.fields(BlockStoreConfig)}
    for var in store["environment"]:
        assert var.startswith("KVSTORE_BLOCKSTORE_") and var.removeprefix("KVSTORE_BLOCKSTORE_") in fields, var
    assert compose["services"]["blockstore"]["depends_on"]["redis"]["condition"] == "service_healthy"
    sessions = compose["services"]["sessions"]
    assert sessions["command"][0] == "serve" and sessions["image"] == store["image"]
    serve_help = subprocess.run([sys.executable, "-m", "kvstore.cli", "serve", "--help"],
                                capture_output=True, text=True, check=True).stdout
    for flag in (a for a in sessions["command"] if a.startswith("--")):
        assert flag in serve_help, f"compose passes {flag}, which `kvstore serve` does not take"
    assert "blockstore:50051" in sessions["command"] and "redis://redis:6379/0" in sessions["command"]


def test_dockerfile_copies_what_exists():
    for src in re.findall(r"^COPY (\S+)", (ROOT / "deploy/Dockerfile").read_text(), re.M):
        assert (ROOT / src).exists(), src
