"""One progress bar per long job: internal `datasets` steps draw none, the table build keeps its own."""

import datasets
import pytest
from conftest import make_clip

from fdbpl_hf import build_ril_table
from fdbpl_hf.data import reorder_classes, subset_classes
from fdbpl_hf.progress import quiet_progress

SILENCED = ("Selecting classes", "Relabelling", "Reordering classes", "Saving the dataset")


@pytest.fixture
def bars_on():
    """Bars enabled for the test (other test modules disable them at import), then restored."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.enable_progress_bars()
    yield
    if not was_enabled:
        datasets.disable_progress_bars()


def test_class_subsets_draw_no_bar(bars_on, digits_small, capfd):
    subset = subset_classes(digits_small, [3, 1])
    reordered = reorder_classes(digits_small, list(reversed(digits_small.features["label"].names)))
    err = capfd.readouterr().err
    assert not [d for d in SILENCED if d in err], err
    # the work was still done, and the bars are back on afterwards
    assert subset.features["label"].names == [digits_small.features["label"].names[c] for c in (3, 1)]
    assert len(reordered) == len(digits_small)
    assert datasets.is_progress_bar_enabled()


def test_table_build_draws_exactly_its_own_bar(bars_on, digits_small, tokenizer, tmp_path, capfd):
    teacher = make_clip("tiny", seed=1)
    build_ril_table(digits_small, teacher, teacher_tokenizer=tokenizer, num_regions=2, top_k=2,
                    output_dir=str(tmp_path / "t"), shard_size=len(digits_small))
    err = capfd.readouterr().err
    assert "RIL shard 1/1" in err  # the long job keeps its bar
    assert not [d for d in SILENCED if d in err], err
    descriptions = {line.split(":")[0].strip() for line in err.replace("\r", "\n").splitlines() if "%|" in line}
    assert descriptions == {"RIL shard 1/1"}, descriptions


def test_quiet_progress_restores_the_callers_setting(bars_on):
    with quiet_progress():
        assert not datasets.is_progress_bar_enabled()
    assert datasets.is_progress_bar_enabled()
    with quiet_progress(enabled=False):  # long steps keep their bar
        assert datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    with quiet_progress():
        pass
    assert not datasets.is_progress_bar_enabled()  # a caller who turned bars off keeps them off
    datasets.enable_progress_bars()
    with pytest.raises(RuntimeError), quiet_progress():
        raise RuntimeError("restored even when the block fails")
    assert datasets.is_progress_bar_enabled()
