"""The benchmark scripts still run end to end (smoke runs; their timings are not asserted)."""

import json
import os
import sys

from conftest import run_ok

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args: str, timeout: int = 300) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return run_ok([sys.executable, *args], env=env, timeout=timeout, cwd=REPO).stdout


def test_host_overhead_smoke():
    out = run_script("benchmarks/host_overhead.py", "--steps", "3", "--rounds", "1")
    assert "308 modules, 400 parameter tensors" in out  # ViT-B/32's structure
    assert "host time the Trainer and data path add per step" in out


def test_speed_real_smoke(tmp_path):
    report = tmp_path / "speed_real.json"
    out = run_script("benchmarks/speed_real.py", "--quick", "--device", "cpu", "--size", "small", "--json",
                     str(report))
    figures = json.loads(report.read_text())["configs"]["C=50"]
    assert "errors" not in figures, figures.get("errors")
    assert set(figures["step_ms"]) == {"online", "offline", "cached", "pure student step", "pure text step"}
    assert "speed-up, offline FDBPL vs online" in out


def test_speed_cost_scaled_smoke():
    out = run_script("benchmarks/speed.py", "--quick")
    assert "speed-up as share of the limit" in out and "limit of the real models (FLOPs" in out
