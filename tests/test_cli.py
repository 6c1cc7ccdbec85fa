import io
import subprocess
import sys

from rich.console import Console

from kvstore.demo import DemoConfig, run_demo


def test_demo_reuses_from_t0_and_t1_and_verifies_every_block():
    out = io.StringIO()
    totals = run_demo(DemoConfig(sessions=3, turns=3, t0_blocks=48, t1_blocks=256), Console(file=out, width=120))
    assert totals["t0"] > 0 and totals["t1"] > 0  # the small T0 forced spills that came back
    assert totals["prompt"] == totals["t0"] + totals["t1"] + totals["t2"] + totals["computed"]
    assert totals["verified_blocks"] * 16 == totals["t0"] + totals["t1"]
    assert "T0 hit" in out.getvalue()


def test_cli_rejects_bad_flags_with_a_message():
    r = subprocess.run([sys.executable, "-m", "kvstore.cli", "demo", "--t0-blocks", "many"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid int value" in r.stderr
    r = subprocess.run([sys.executable, "-m", "kvstore.cli", "demo", "--t0-blocks", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "t0_blocks must be positive" in r.stderr
