import io
import subprocess
import sys

from rich.console import Console

from kvstore.demo import DemoConfig, run_demo


def test_demo_reuses_from_every_tier_and_verifies_every_block():
    """Two workers, a real block store on an embedded Redis: T0, T1 and T2 all serve hits."""
    out = io.StringIO()
    totals = run_demo(DemoConfig(sessions=4, turns=4, t0_blocks=64, t1_blocks=256), Console(file=out, width=120))
    assert totals["t0"] > 0 and totals["t1"] > 0 and totals["t2"] > 0
    assert totals["prompt"] == totals["t0"] + totals["t1"] + totals["t2"] + totals["computed"]
    assert totals["verified_blocks"] * 16 == totals["t0"] + totals["t1"] + totals["t2"]
    assert "T0 hit" in out.getvalue()


def test_cli_rejects_bad_flags_with_a_message():
    r = subprocess.run([sys.executable, "-m", "kvstore.cli", "demo", "--t0-blocks", "many"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid int value" in r.stderr
    r = subprocess.run([sys.executable, "-m", "kvstore.cli", "demo", "--t0-blocks", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "t0_blocks must be positive" in r.stderr
