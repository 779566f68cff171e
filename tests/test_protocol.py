"""The protocol runner on tiny checkpoints: every method end to end (the zoo runs are in test_protocol_zoo)."""

import pytest

from fdbpl_hf.protocol import METHODS, run_base_to_novel


@pytest.fixture(scope="module")
def results(tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("protocol")
    return {m: run_base_to_novel(m, student=tiny_checkpoints["student"], teacher=tiny_checkpoints["teacher"],
                                 num_shots=2, output_dir=str(out / m), num_train_epochs=2,
                                 per_device_train_batch_size=4, flip_prob=0.0)
            for m in METHODS}


def test_every_method_reports_the_protocol(results):
    for method, r in results.items():
        assert r["method"] == method and 0 <= r["base_acc"] <= 100 and 0 <= r["novel_acc"] <= 100
        assert (r["train_seconds"] > 0) == (method != "zero-shot")
    for method in ("fdbpl-offline", "fdbpl-cached"):
        assert results[method]["table_regions"] == 10 * 2  # 5 base classes x 2 shots x M = 2 epochs
    assert results["fdbpl-cached"]["cache_bytes"] > 0 and "cache_bytes" not in results["fdbpl-offline"]


def test_the_cache_changes_speed_not_results(results):
    # same regions, same soft labels; the cache stores the student's own features in fp16, which may
    # flip a near-tie among the ~500 test digits per split, not more than a handful
    off, cached = results["fdbpl-offline"], results["fdbpl-cached"]
    assert abs(off["base_acc"] - cached["base_acc"]) <= 2.0 and abs(off["novel_acc"] - cached["novel_acc"]) <= 2.0


def test_unknown_method_and_missing_teacher(tiny_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        run_base_to_novel("kdpl", student=tiny_checkpoints["student"], output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="needs a teacher"):
        run_base_to_novel("fdbpl-cached", student=tiny_checkpoints["student"], output_dir=str(tmp_path))


def test_the_scripts_run_in_process_through_main(tiny_checkpoints, tmp_path):
    """examples/build_table.py and examples/train.py expose `main(argv)`, as trl's scripts do, and
    train.py trains through `fdbpl_hf.pipeline.train_prompts`, as the protocol runner does: a
    table, then a run from a feature cache, in this process."""
    import os
    import sys

    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    sys.path.insert(0, examples)
    try:
        import build_table
        import train
    finally:
        sys.path.remove(examples)
    data = ["--dataset", "digits", "--num_shots", "2", "--classes", "base"]
    table = build_table.main(["--teacher", tiny_checkpoints["teacher"], "--output_dir", str(tmp_path / "t"), *data,
                              "--num_regions", "2", "--top_k", "3"])
    assert len(table) == 10 * 2  # 5 base classes x 2 shots x M = 2
    trainer = train.main(["--student", tiny_checkpoints["student"], "--table", str(tmp_path / "t"), *data,
                          "--feature_cache", str(tmp_path / "c"), "--output_dir", str(tmp_path / "run"),
                          "--num_train_epochs", "2", "--per_device_train_batch_size", "4", "--report_to", "none",
                          "--save_strategy", "no", "--use_cpu", "--disable_tqdm", "true"])
    assert trainer.train_dataset.feature_cache is not None and trainer.state.global_step > 0
    assert os.path.isfile(tmp_path / "run" / "fdbpl_config.json")
    assert os.path.isfile(tmp_path / "c" / "feature_cache.json")
