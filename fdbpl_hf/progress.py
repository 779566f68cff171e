"""One progress bar per long job: `quiet_progress()` hides `datasets`' bars for internal steps.

`datasets` draws a bar for every `map`, `filter` and `save_to_disk`, however small. Inside a table
build or a data split those are bookkeeping steps (relabelling a label column, writing a shard that
was just computed) and their bars bury the ones that matter: the build, training and evaluation.
"""

import contextlib
from collections.abc import Iterator

import datasets
import datasets.config

__all__ = ["quiet_progress"]


@contextlib.contextmanager
def quiet_progress(enabled: bool = True) -> Iterator[None]:
    """Hide `datasets`' progress bars inside the block and restore the previous setting after it.

    `enabled=False` makes it a no-op, for steps that are internal but can be long on big data.
    A user who forces bars on with `HF_DATASETS_DISABLE_PROGRESS_BARS=0` keeps them.
    """
    # the environment variable, read once by datasets at import: 0 means bars on, whatever the code says
    forced_on = datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is False
    was_enabled = datasets.is_progress_bar_enabled()
    if not enabled or forced_on or not was_enabled:
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()
