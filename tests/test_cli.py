import hashlib
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from rich.console import Console
from serveprocess import start_serve, stop_serve
from servicehelpers import wait_for

from kvstore.client import SessionClient
from services.cli.keys import api_keys
from services.cli.main import main
from services.cli.tiers_demo import DemoConfig, run_demo
from services.common.auth import TokenTable
from services.common.errors import ConfigError, RequestError


def test_demo_reuses_from_every_tier_and_verifies_every_block():
    """Two workers, a real block store on an embedded Redis: T0, T1 and T2 all serve hits."""
    out = io.StringIO()
    totals = run_demo(DemoConfig(sessions=4, turns=4, t0_blocks=64, t1_blocks=256), Console(file=out, width=120))
    assert totals["t0"] > 0 and totals["t1"] > 0 and totals["t2"] > 0
    assert totals["prompt"] == totals["t0"] + totals["t1"] + totals["t2"] + totals["computed"]
    assert totals["verified_blocks"] * 16 == totals["t0"] + totals["t1"] + totals["t2"]
    assert "T0 hit" in out.getvalue()


def cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, env", [
    (["serve", "--host", "0.0.0.0"], {}),
    (["--log-level", "INFO", "serve", "--model", "tiny"], {"KVSTORE_SERVE_HOST": "10.1.2.3"}),
    (["serve", "--host", "::", "--api-keys-file", os.devnull], {}),  # a file without keys
])
def test_serve_refuses_a_non_loopback_host_without_keys_before_starting_anything(args, env):
    start = time.monotonic()
    r = cli(*args, env=env, timeout=30)
    elapsed = time.monotonic() - start
    assert r.returncode == 2 and "refusing to serve on non-loopback host" in r.stderr, r.stderr
    assert "--api-keys-file" in r.stderr and "Ray" not in r.stderr + r.stdout  # nothing started
    assert elapsed < 2, f"refused after {elapsed:.1f} s"


def test_shared_workers_without_the_shared_tiers_are_refused_before_starting_anything():
    r = cli("serve", "--shared-workers", "--ray-address", "auto", timeout=30)
    assert r.returncode == 2 and "--shared-workers needs --ray-address, --redis-url and --blockstore-address" \
        in r.stderr, r.stderr
    assert "Ray" not in r.stdout


def test_api_keys_come_from_the_flag_and_a_file_of_plain_and_hashed_entries(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# tenant a\nkey-a=tenant-a\n\nsha256:{hashlib.sha256(b'key-b').hexdigest()}=tenant-b,shared\n")
    table = TokenTable(api_keys("0.0.0.0", "admin=*", str(keys)))
    for key, namespaces in (("key-a", {"tenant-a"}), ("key-b", {"tenant-b", "shared"}), ("admin", {"*"})):
        assert table.authenticate([("authorization", f"Bearer {key}")]) == namespaces
    for wrong in ("sha256:" + hashlib.sha256(b"key-b").hexdigest(), "key-c"):  # the digest is not the key
        with pytest.raises(RequestError, match="unknown token"):
            table.authenticate([("authorization", f"Bearer {wrong}")])
    with pytest.raises(ConfigError, match="64 hex digits"):
        TokenTable("sha256:abc=tenant-a")
    with pytest.raises(ConfigError, match="listed twice"):
        TokenTable(f"key-b=x\nsha256:{hashlib.sha256(b'key-b').hexdigest()}=y")
    with pytest.raises(ConfigError, match="cannot read the API keys file"):
        api_keys("127.0.0.1", "", str(tmp_path / "missing"))


def test_cli_rejects_bad_flags_with_a_message(capsys):
    with pytest.raises(SystemExit) as e:
        main(["tiers-demo", "--t0-blocks", "many"])
    assert e.value.code == 2 and "invalid int value" in capsys.readouterr().err
    assert main(["tiers-demo", "--t0-blocks", "0"]) == 2
    assert "t0_blocks must be positive" in capsys.readouterr().err
    # The service demo and serve check their flags before starting anything.
    for args, message in ((["demo", "--t0-blocks", "0"], "t0_blocks must be positive"),
                          (["demo", "--model", "nosuch"], "unknown built-in model 'nosuch'"),
                          (["demo", "--sessions", "0"], "sessions must be >= 1"),
                          (["demo", "--workers", "0"], "workers must be >= 1"),
                          (["serve", "--workers", "0"], "workers must be >= 1")):
        assert main(args) == 2, args
        assert message in capsys.readouterr().err, args
    assert main(["demo", "--address", "127.0.0.1:1", "--sessions", "1"]) == 1  # nothing listens there
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_demo_starts_the_service_reuses_every_tier_and_shuts_down(tmp_path):
    """The README's first command, smaller: serve + scripted agent workload + clean exit."""
    r = cli("demo", "--model", "tiny", "--sessions", "2", "--rounds", "3", timeout=300,
            env={"XDG_DATA_HOME": str(tmp_path)})  # where the session Redis keeps its data
    assert r.returncode == 0, r.stdout + r.stderr
    summary = r.stdout[r.stdout.index("prompt tokens: reused"):]
    t0, t1, t2 = (int(summary.split(" from " + t)[0].split()[-1]) for t in ("T0", "T1", "T2"))
    assert t0 > 0 and t1 > 0 and t2 > 0, summary
    assert "outputs with and" in summary and "identical" in summary and "service stopped" in r.stdout


def test_serve_chat_and_clean_shutdown_on_sigterm(tmp_path):
    """`kvstore serve` prints its address, serves `kvstore chat`, and stops cleanly on SIGTERM."""
    served = start_serve(tmp_path)
    try:
        chat = subprocess.run([sys.executable, "-m", "services.cli.main", "chat", "--address", served.address,
                               "--max-tokens", "4"],
                              input="hello\n/fork\nagain\n/quit\n", capture_output=True, text=True, timeout=120)
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.count("assistant> ") == 2 and "now in fork default:" in chat.stdout
        assert "cached T0" in chat.stdout and "on w0" in chat.stdout
    finally:
        output = stop_serve(served)
    assert "shutting down" in output



def test_stats_after_a_demo_shows_reuse_from_every_tier(tmp_path):
    """`kvstore demo` against a running service, then `kvstore stats` (an admin key; a tenant's is refused)."""
    metrics_port = _free_port()
    served = start_serve(tmp_path, "--workers", "2", "--t0-blocks", "160", "--metrics-port", str(metrics_port),
                         api_keys="sk-admin=*;sk-tenant=tenant-a", always_load=True)
    scrape = lambda: _worker_samples(f"http://127.0.0.1:{metrics_port}/metrics")  # noqa: E731
    try:
        before = scrape()
        demo = cli("demo", "--address", served.address, "--api-key", "sk-tenant", timeout=300)
        assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
        # Whatever the demo's routing did: a new prompt on w0, then on w1, which finds it in T2 only.
        with SessionClient(served.address, api_key="sk-admin") as admin, \
                SessionClient(served.address, api_key="sk-tenant") as kv:
            prompt = "A prompt only this check uses. " * 20
            stored = admin.get_stats().blocks_stored
            first, second = (kv.create_session(system_prompt=prompt).session_id for _ in range(2))
            kv.generate(first, tokens=[1], max_tokens=1, worker_id="w0").result()
            assert wait_for(lambda: admin.get_stats().blocks_stored >= stored + len(prompt) // 16, 30)
            t2 = kv.generate(second, tokens=[1], max_tokens=1, worker_id="w1").result()
            assert t2.usage.cached_tokens_t2 >= len(prompt) // 16 * 16 - 16, t2.usage
        refused = cli("stats", "--address", served.address, "--api-key", "sk-tenant")
        shown = cli("stats", "--address", served.address, "--api-key", "sk-admin")
        with SessionClient(served.address, api_key="sk-admin") as kv:
            stats = kv.get_stats()
        after = scrape()
    finally:
        stop_serve(served)
    assert before['kvstore_worker_up{worker="w0"}'] == before['kvstore_worker_up{worker="w1"}'] == 1
    reused = {t: sum(after[f'kvstore_worker_reused_tokens_total{{tier="{t}",worker="{w}"}}'] for w in ("w0", "w1"))
              for t in ("t0", "t1", "t2")}
    assert list(reused.values()) == list(stats.cached_tokens) and all(reused.values()), (reused, stats)
    assert not any(v for k, v in before.items() if k.startswith("kvstore_worker_reused_tokens_total"))
    assert after['kvstore_worker_blocks{state="capacity",tier="t0",worker="w0"}'] == 160
    # Both workers generated; w1's last turn waited for its prefix from T2.
    generated = sum(after[f'kvstore_worker_generated_tokens_total{{worker="{w}"}}'] for w in ("w0", "w1"))
    assert generated == stats.completion_tokens > 0
    for w in ("w0", "w1"):
        steps = after[f'kvstore_worker_step_seconds_count{{worker="{w}"}}']
        assert before[f'kvstore_worker_step_seconds_count{{worker="{w}"}}'] == 0 < steps
        assert after[f'kvstore_worker_batch_size_count{{worker="{w}"}}'] == steps
        assert after[f'kvstore_worker_step_seconds_sum{{worker="{w}"}}'] > 0
        assert after[f'kvstore_worker_prefill_tokens_total{{worker="{w}"}}'] > 0
    assert before['kvstore_worker_load_seconds_count{tier="t2",worker="w1"}'] == 0
    assert after['kvstore_worker_load_seconds_count{tier="t2",worker="w1"}'] >= 1
    assert after['kvstore_worker_load_seconds_bucket{le="+Inf",tier="t2",worker="w1"}'] >= 1
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr and "admin" in refused.stderr
    assert shown.returncode == 0, shown.stderr
    assert "prompt tokens reused" in shown.stdout and "w0" in shown.stdout and "w1" in shown.stdout
    assert stats.turns >= 7 and stats.sessions >= 3 and all(n > 0 for n in stats.cached_tokens), stats
    assert sum(stats.cached_tokens) < stats.prompt_tokens and stats.ttft_p50_seconds > 0
    assert [w.alive for w in stats.workers] == [True, True] and all(w.t0_blocks == 160 for w in stats.workers)
    assert sum(sum(w.loaded_tokens) for w in stats.workers) == sum(stats.cached_tokens)
    assert stats.session_redis_used_memory > 0 and stats.blocks_stored > 0 and stats.blocks_redis_used_memory > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_samples(url: str) -> dict[str, float]:
    """The kvstore_worker_* samples of a Prometheus endpoint, by name{labels} as it prints them."""
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("kvstore_worker_")}
