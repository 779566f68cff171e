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
