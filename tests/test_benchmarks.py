"""The benchmark scripts still run end to end (smoke runs; their timings are not asserted)."""

import json
import os
import re
import sys

import pytest
from conftest import HUB_SITE, run_ok

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args: str, timeout: int = 300) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO, HUB_SITE]))
    return run_ok([sys.executable, *args], env=env, timeout=timeout, cwd=REPO).stdout


def test_host_overhead_smoke():
    out = run_script("benchmarks/host_overhead.py", "--steps", "3", "--rounds", "1")
    assert "308 modules, 400 parameter tensors" in out  # ViT-B/32's structure
    assert "host time the Trainer and data path add per step" in out


def test_weights_digest_smoke():
    out = run_script("benchmarks/weights_digest.py", "--sizes", "tiny", "--reps", "1", "--threads", "1", "2")
    assert "full sha256, 2 thread(s)" in out and "0.6's sampled fingerprint" in out


def test_gpu_measurement_smoke(tmp_path):
    """The one-call GPU measurement end to end on CPU with tiny models: the eager stage (builds, bare
    pieces, every mode), a tuned stage whose --train_arg reaches the Trainer, and the goal lines."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, OUT_DIR=str(out), PYTHON=sys.executable,
               FDBPL_COMMIT="abc123", EAGER_CONFIGS="8x50", TUNED_CONFIGS="8x50", COMPILE="none",
               TUNED_ARGS="--train_arg lambda_pcd=0.5 --modes cached",
               EXTRA_ARGS="--device cpu --size small --quick")
    log = run_ok(["bash", "benchmarks/gpu_measurement.sh"], env=env, timeout=400, cwd=REPO).stdout
    eager = json.loads((out / "speed_gpu_eager.json").read_text())
    assert eager["commit"] == "abc123" and eager["command"].startswith("python benchmarks/speed_real.py --variant eager")
    figures = eager["configs"]["b8 C=50"]
    assert "errors" not in figures and "errors" not in eager, (figures.get("errors"), eager.get("errors"))
    assert set(figures["step_ms"]) == {"online", "offline", "cached", "cached workers", "online store",
                                       "offline store", "pure student step", "pure text step"}
    assert set(figures["pieces_ms"]) == {"teacher_logits", "student_image_fwd", "text_fwd_bwd_2C"}
    assert figures["image_store"]["images"] > 0 and figures["ratios_vs_online"]["offline"] > 0
    assert not any(any(runs) for runs in figures["student_compiled"].values())  # eager: nothing compiled
    assert eager["builds"]["table"]["vs_bare_teacher"] > 0 and eager["builds"]["feature_cache"]["vs_bare_student"] > 0
    tuned = json.loads((out / "speed_gpu_tuned.json").read_text())
    assert tuned["variant"] == "tuned" and tuned["train_args"] == {"lambda_pcd": 0.5}  # typed as the field is
    assert set(tuned["configs"]["b8 C=50"]["step_ms"]) == {"cached"}
    goals = (out / "speed_gpu_goals.md").read_text()
    assert "| b8 C=50 | offline |" in goals and "GOAL NOT MEASURED  offline / online at batch 32, C = 50" in goals
    assert re.search(r"GOAL (PASS|MISS)  table build / bare teacher >= 0.9: \d", goals)
    assert "stage eager: exit 0" in log and "stage tuned: exit 0" in log


def test_speed_real_refuses_unknown_training_arguments_and_types_known_ones():
    speed_real = load_benchmark("speed_real")
    assert speed_real.parse_train_args(["torch_compile=true", "lambda_pcd=0.25", "torch_compile_mode=max-autotune"]) \
        == {"torch_compile": True, "lambda_pcd": 0.25, "torch_compile_mode": "max-autotune"}
    for bad in (["no_such_field=1"], ["lambda_pcd"], ["lambda_pcd=high"]):
        with pytest.raises(SystemExit, match="--train_arg"):
            speed_real.parse_train_args(bad)
    assert speed_real.parse_configs(["32x50", "256X500"]) == [(32, 50), (256, 500)]


def test_speed_real_gives_every_mode_run_a_fresh_student_and_teacher(tokenizer):
    """0.6 reused one student across modes, and accelerate returns a model it prepared once unchanged,
    so the compiled modes never compiled it: every run now wraps a copy of the pristine CLIPs."""
    import torch
    from conftest import make_clip

    speed_real = load_benchmark("speed_real")
    models = speed_real.Models(make_clip("tiny", seed=1), make_clip("tiny", seed=2), tokenizer)
    pristine = {k: v.clone() for k, v in models.student_clip.state_dict().items()}
    first, second = models.student(["cat", "dog"]), models.student()
    assert first is not second and first.clip is not models.student_clip and second.clip is not first.clip
    with torch.no_grad():
        for p in first.clip.parameters():
            p.add_(1.0)  # whatever a run does to its student
    assert all(torch.equal(v, pristine[k]) for k, v in models.student_clip.state_dict().items())
    assert all(torch.equal(v, pristine[k]) for k, v in second.clip.state_dict().items())
    assert first.class_names == ["cat", "dog"]
    a, b = models.teacher(["cat", "dog"]), models.teacher(["cat", "dog"])
    assert a is not b and a.model is not b.model and a.model is not models.teacher_clip


def test_speed_goals_compare_best_against_best_and_flag_an_untreated_baseline():
    goals = load_benchmark("speed_goals")

    def report(variant, steps, builds=None):
        return {"variant": variant, "configs": {"b32 C=50": {"step_ms": steps}}, **({"builds": builds} if builds else {})}

    eager = report("eager", {"online": 60.0, "offline": 20.0, "cached": 12.0, "cached workers": 9.0},
                   {"table": {"vs_bare_teacher": 0.95}, "feature_cache": {"vs_bare_student": 0.5}})
    lines = goals.goal_lines([eager])
    assert lines[0].startswith("MISS  offline / online at batch 32, C = 50 >= 4x: 3.00x")
    assert lines[1].startswith("PASS  feature cache / online at batch 32, C = 50 >= 6x: 6.67x (cached workers [eager]")
    assert lines[2].startswith("NOT MEASURED") and lines[3].startswith("NOT MEASURED")
    assert lines[-2] == "PASS  table build / bare teacher >= 0.9: 0.95"
    assert lines[-1] == "MISS  feature-cache build / bare student >= 0.9: 0.50"
    # a compiled offline step against an online baseline that was never compiled: not a fair ratio
    lines = goals.goal_lines([eager, report("compiled", {"offline": 10.0})])
    assert lines[0].startswith("INCOMPLETE (PASS if the online baseline in variant 'compiled' were no faster)  ")
    lines = goals.goal_lines([eager, report("compiled", {"offline": 10.0, "online": 50.0})])
    assert lines[0].startswith("PASS  offline / online at batch 32, C = 50 >= 4x: 5.00x (offline [compiled] 10.0 ms "
                               "vs online [compiled] 50.0 ms)")


def test_build_speed_and_data_path_smoke(tmp_path):
    """The CPU benchmarks of issue 20 run end to end (figures printed and saved, never asserted)."""
    import torch

    threads = torch.get_num_threads()
    try:  # in this process: a subprocess would pay the imports again
        load_benchmark("build_speed").main(["--quick", "--json", str(tmp_path / "b.json")])
        load_benchmark("data_path").main(["--quick", "--json", str(tmp_path / "d.json")])
    finally:
        torch.set_num_threads(threads)
    builds = json.loads((tmp_path / "b.json").read_text())
    assert builds["table"][0]["ratio"] > 0 and builds["cache"][0]["ratio"] > 0 and builds["free_teacher"]["regions"] == 16
    paths = json.loads((tmp_path / "d.json").read_text())
    assert {r["path"] for r in paths["rows"]} >= {"feature cache", "offline store", "online store"}


def load_benchmark(name: str):
    """A benchmark script as a module, in this process (the scripts set HF_HUB_OFFLINE & co. at import:
    the environment is restored after the test by the `restore_environment` fixture)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def restore_environment():
    saved = dict(os.environ)
    path = list(sys.path)
    yield
    os.environ.clear()
    os.environ.update(saved)
    sys.path[:] = path


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
        ablation.main(["--quick", "--subset", "loss", "teachers", "compose", "--teacher", tiny_checkpoints["teacher"],
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
    compose = json.loads((out / "compose.json").read_text())  # issue 23: two tables, mixed at training time
    composed = compose["configs"][1]
    assert composed["compose"] is True and composed["runs"][0]["settings"]["compose"] is True
    assert composed["runs"][0]["table_regions"] == 50 and 0 <= composed["runs"][0]["hm"] <= 100


def test_compose_benchmark_smoke(tiny_checkpoints, tmp_path):
    """benchmarks/compose.py on tiny random CLIPs: both parts run and write their records."""
    import importlib.util

    import torch

    saved_env = dict(os.environ)  # the script makes its process offline at import: undo it for later tests
    spec = importlib.util.spec_from_file_location("compose_benchmark", os.path.join(REPO, "benchmarks", "compose.py"))
    compose = importlib.util.module_from_spec(spec)
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(compose)
        out = compose.main(["--quick", "--teacher", tiny_checkpoints["teacher"], "--student",
                            tiny_checkpoints["student"], "--cost_classes", "5", "--cost_images", "8",
                            "--cost_size", "32", "--out", str(tmp_path / "compose.json")])
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(saved_env)
    records = out["approximation"]["records"]
    assert [(r["weighting"], r["k"]) for r in records] == [(w, k) for w in ("fixed", "max_prob", "entropy")
                                                           for k in (1, 50)]
    assert all(r["kl_composed"] < 1e-3 for r in records if r["k"] == 50)  # K = C: the joint build, up to fp16
    assert {(r["path"], r["tables"]) for r in out["cost"]["records"]} >= {("pixels", 3), ("feature cache", 2)}
    assert json.loads((tmp_path / "compose.json").read_text())["command"].startswith("python benchmarks/compose.py")


def test_step_gpu_smoke(tmp_path):
    """Issue 20's step-time script (benchmarks/gpu_measurement.sh runs it on CUDA): the fused step on CPU."""
    report = tmp_path / "step.json"
    run_script("benchmarks/step_gpu.py", "--device", "cpu", "--size", "small", "--classes", "10", "--batch", "4",
               "--steps", "1", "--warmup", "1", "--workers", "0", "--variants", "fused", "--json", str(report))
    result = json.loads(report.read_text())
    assert result["errors"] == {}
    assert set(result["step_ms"]) == {"online / fused", "offline / fused", "cached / fused"}
    assert result["commit"] and result["command"].startswith("python benchmarks/step_gpu.py --device cpu")
