"""deploy/ cannot run here (no Docker engine), so check that it is consistent with the code:
valid compose YAML, CLI flags and environment variables that exist, files that exist."""
import dataclasses
import json
import re
from pathlib import Path

import yaml

from kvstore.config import config_from_args
from services.blockstore.server import BlockStoreConfig, build_parser
from services.cli import main as cli
from services.cli.serve import ServeConfig

ROOT = Path(__file__).resolve().parents[1]


def _interpolate(arg: str) -> str:
    """Compose's ${VAR:-default} -> default and ${VAR:?message} / ${VAR} -> a sample value."""
    return re.sub(r"\$\{[A-Z_]+(?::([-?])([^}]*))?\}", lambda m: m[2] if m[1] == "-" else "x", arg)


def test_compose_file_is_valid_and_matches_the_cli():
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    core = {name for name, svc in compose["services"].items() if "profiles" not in svc}
    assert core == {"redis-sessions", "redis-blocks", "blockstore", "sessions"}
    # Sessions are never evicted and survive a crash; blocks are a cache.
    sessions_redis = compose["services"]["redis-sessions"]["command"][-1]
    assert "--maxmemory-policy noeviction" in sessions_redis and "--appendonly yes" in sessions_redis
    assert "--maxmemory-policy allkeys-lru" in compose["services"]["redis-blocks"]["command"][-1]
    for name in ("redis-sessions", "redis-blocks"):  # the password on stdin, not the command line
        assert "redis-server - " in compose["services"][name]["command"][-1]
        assert "requirepass $$REDIS_PASSWORD\n" in compose["services"][name]["command"][-1]
    store = compose["services"]["blockstore"]
    assert store["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / store["build"]["dockerfile"]).exists()
    assert store["command"][:2] == ["blockstore", "serve"]
    # The real parsers: an unknown or misspelt flag fails here (SystemExit / _UsageError).
    args = build_parser(BlockStoreConfig()).parse_args([_interpolate(a) for a in store["command"][2:]])
    config = config_from_args(BlockStoreConfig, args)
    assert (config.host, config.port) == ("0.0.0.0", 50051)
    fields = {f.name.upper() for f in dataclasses.fields(BlockStoreConfig)}
    for var in store["environment"]:
        assert var.startswith("KVSTORE_BLOCKSTORE_") and var.removeprefix("KVSTORE_BLOCKSTORE_") in fields, var
    assert store["environment"]["KVSTORE_BLOCKSTORE_REDIS_URL"].endswith("@redis-blocks:6379/0")
    assert compose["services"]["blockstore"]["depends_on"]["redis-blocks"]["condition"] == "service_healthy"
    sessions = compose["services"]["sessions"]
    assert sessions["command"][0] == "serve" and sessions["image"] == store["image"]
    args = cli.build_parser().parse_args([_interpolate(a) for a in sessions["command"]])
    serve = config_from_args(ServeConfig, args)
    assert (serve.session.blockstore_address, serve.model) == ("blockstore:50051", "small")
    for var in sessions["environment"]:  # KVSTORE_SERVE_<FIELD> sets what --<field> does
        assert var.startswith("KVSTORE_SERVE_"), var
        cli.build_parser().parse_args(["serve", "--" + var.removeprefix("KVSTORE_SERVE_").lower().replace("_", "-"), "x"])
    assert sessions["environment"]["KVSTORE_SERVE_REDIS_URL"].endswith("@redis-sessions:6379/0")
    for service in (store, sessions):  # secrets only in the environment: a command line is public
        assert not [a for a in service["command"] if re.search("TOKEN|KEYS|PASSWORD|redis://", a)], service["command"]


def test_dockerfile_copies_what_exists():
    for src in re.findall(r"^COPY (\S+)", (ROOT / "deploy/Dockerfile").read_text(), re.M):
        assert (ROOT / src).exists(), src


def test_example_config_file_passes_config_check_and_shows_the_defaults(capsys):
    from kvstore.config import from_env, from_toml

    path = ROOT / "deploy/kvstore.toml"
    assert cli.main(["config", "check", str(path)]) == 0, capsys.readouterr().err
    settings = from_toml(ServeConfig, str(path))
    assert len(settings) >= 15 and from_env(ServeConfig, env={}, base=settings) == ServeConfig()


def _exported_series() -> set[str]:
    """Every series name the session service (with its workers' collector) and the block store export."""
    from prometheus_client import CollectorRegistry

    from services.blockstore.metrics import Metrics as BlockStoreMetrics
    from services.session.metrics import SessionMetrics, WorkerCollector

    workers = CollectorRegistry()
    workers.register(WorkerCollector(dict))
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    return {m.name + suffix for registry in (SessionMetrics().registry, BlockStoreMetrics().registry, workers)
            for m in registry.collect() for suffix in suffixes[m.type]}


def test_monitoring_profile_scrapes_both_services_and_the_dashboard_uses_only_exported_series():
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    assert {n for n, svc in compose["services"].items() if svc.get("profiles") == ["monitoring"]} == \
        {"prometheus", "grafana"}
    for service in compose["services"].values():  # every mounted file exists
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert not source.startswith(".") or (ROOT / "deploy" / source).exists(), source
    scrape = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    ports = {name: [p.rsplit(":", 1)[-1] for p in svc.get("ports", [])] for name, svc in compose["services"].items()}
    assert targets == {"sessions:9200", "blockstore:9100"}
    assert all(t.split(":")[1] in ports[t.split(":")[0]] for t in targets)
    assert "--metrics-port" in compose["services"]["sessions"]["command"]
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/kvstore.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b(kvstore_[a-z0-9_]+)", e)}
    assert len(dashboard["panels"]) >= 10 and used, used
    assert used <= _exported_series(), used - _exported_series()
    assert {"kvstore_worker_reused_tokens_total", "kvstore_session_ttft_seconds_bucket", "kvstore_worker_load_seconds_bucket",
            "kvstore_worker_step_seconds_bucket", "kvstore_worker_generated_tokens_total"} <= used
