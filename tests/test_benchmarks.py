"""The benchmark scripts still run end to end (smoke runs; their timings are not asserted)."""

import json
import os
import sys

from conftest import HUB_SITE, run_ok

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args: str, timeout: int = 300) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO, HUB_SITE]))
    return run_ok([sys.executable, *args], env=env, timeout=timeout, cwd=REPO).stdout


def test_host_overhead_smoke():
    out = run_script("benchmarks/host_overhead.py", "--steps", "3", "--rounds", "1")
    assert "308 modules, 400 parameter tensors" in out  # ViT-B/32's structure
    assert "host time the Trainer and data path add per step" in out


def test_speed_real_smoke(tmp_path):
    report = tmp_path / "speed_real.json"
    # batch 8: the smoke run checks that every mode runs, not timings (the store modes render in float64 on CPU)
    out = run_script("benchmarks/speed_real.py", "--quick", "--device", "cpu", "--size", "small", "--batch", "8",
                     "--json", str(report))
    result = json.loads(report.read_text())
    figures = result["configs"]["C=50"]
    assert "errors" not in figures, figures.get("errors")
    # device-resident replay (image store) modes added for issue 16
    assert set(figures["step_ms"]) == {"online", "offline", "cached", "online store", "offline store",
                                       "pure student step", "pure text step"}
    assert figures["image_store"]["images"] > 0 and figures["image_store"]["bytes"] > 0
    assert set(figures["figures"]["variant"]) >= {"speedup_offline", "speedup_offline_store_vs_online_store"}
    assert result["commit"] and result["command"].startswith("python benchmarks/speed_real.py --quick")
    assert "speed-up, offline FDBPL vs online" in out and "offline store vs online store" in out


def test_speed_cost_scaled_smoke():
    # tiny scaled models: the test checks that every section runs, not the scaled costs (benchmarks/README.md)
    out = run_script("benchmarks/speed.py", "--quick", "--threads", "1", "--calibrate", "0", "--classes", "5",
                     "--batch", "8", "--teacher-width", "64", "--teacher-layers", "2", "--student-width", "64",
                     "--student-layers", "1", "--text-width", "64", "--text-layers", "1")
    assert "speed-up as share of the limit" in out and "limit of the real models (FLOPs" in out


def test_ablation_quick_smoke(tiny_checkpoints, tmp_path):
    """benchmarks/ablation.py's smallest configuration end to end (tiny random CLIPs, 1 epoch of 1 shot):
    the loss subset and the teacher subset (an ensemble teacher through run_base_to_novel)."""
    import importlib.util

    import torch

    # the script sets HF_HUB_OFFLINE & co. at import, for its own runs: undo that after the test, or
    # every later test's subprocess (the loopback Hub ones) would start offline
    saved_env = dict(os.environ)
    spec = importlib.util.spec_from_file_location("ablation", os.path.join(REPO, "benchmarks", "ablation.py"))
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    out = tmp_path / "ablation"
    threads = torch.get_num_threads()
    try:  # in this process: a subprocess would pay the imports and the numbers composition again
        ablation.main(["--quick", "--subset", "loss", "teachers", "--teacher", tiny_checkpoints["teacher"],
                       "--student", tiny_checkpoints["student"], "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(saved_env)
    loss = json.loads((out / "loss.json").read_text())
    assert loss["facts"]["command"].startswith("python benchmarks/ablation.py --quick")
    assert [c["label"] for c in loss["configs"]] == ["L+ only", "L+ + L-"]
    run = loss["configs"][0]["runs"][0]
    assert run["settings"]["training"]["use_pcd"] is False and run["table_regions"] == 50  # 50 classes x 1 shot x M=1
    assert 0 <= run["base_acc"] <= 100 and 0 <= run["novel_acc"] <= 100
    teachers = json.loads((out / "teachers.json").read_text())
    assert teachers["configs"][1]["runs"][0]["settings"]["teacher"] == [tiny_checkpoints["teacher"],
                                                                       tiny_checkpoints["student"]]
    assert "| L+ only |" in (out / "loss.md").read_text()
