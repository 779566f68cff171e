"""The training pipeline that `examples/train.py` and `fdbpl_hf.protocol` share: optionally
cache the frozen student's image features, then train the prompts with `FDBPLTrainer`."""

from __future__ import annotations

import time
from typing import Any, Optional

from transformers import PrinterCallback, ProgressCallback

from .ril import RILDataset, build_feature_cache
from .ril.feature_cache import feature_cache_metadata
from .trainer import FDBPLTrainer, FDBPLTrainingArguments


class _BarOnlyProgressCallback(ProgressCallback):
    """transformers' training progress bar without the log dictionaries it writes under the bar."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def train_prompts(model, args: FDBPLTrainingArguments, train_data: RILDataset, *, teacher=None,
                  feature_cache_dir: Optional[str] = None, progress: bool = True,
                  cache_device: Optional[str] = None, print_logs: bool = True,
                  ) -> tuple[FDBPLTrainer, Any, dict[str, Any]]:
    """Train `model`'s prompts on `train_data` (an offline `RILDataset`, or an online one with a
    `teacher`); returns `(trainer, train output, facts)`.

    With `feature_cache_dir`, the student's image features of the regions the first epochs replay
    are built there first (or loaded, when that folder already holds them) and training reads them
    instead of images. `facts` holds `train_seconds`, `train_steps` and, with a cache,
    `cache_build_seconds` and `cache_bytes`. Training resumes from `args.resume_from_checkpoint`.
    `print_logs=False` keeps the per-step loss dictionaries out of stdout (they stay in
    `trainer.state.log_history`); a progress bar, when `args.disable_tqdm` is off, still shows.
    """
    facts: dict[str, Any] = {}
    if feature_cache_dir is not None:
        if train_data.is_online:
            raise ValueError("a feature cache stores features of an RIL table's regions: train_data has no table")
        start = time.perf_counter()
        epochs = min(train_data.num_regions, args.replay_epochs(len(train_data)))
        cache = build_feature_cache(train_data, model, epochs=epochs, output_dir=feature_cache_dir,
                                    device=cache_device, num_workers=args.dataloader_num_workers, progress=progress)
        facts.update(cache_build_seconds=round(time.perf_counter() - start, 2),
                     cache_bytes=feature_cache_metadata(cache)["stats"]["disk_bytes"])
        train_data = train_data.with_feature_cache(cache)
    trainer = FDBPLTrainer(model=model, args=args, train_dataset=train_data, teacher=teacher)
    if not print_logs:
        # transformers prints every log with PrinterCallback (no bar) or under ProgressCallback's bar
        trainer.remove_callback(PrinterCallback)
        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(_BarOnlyProgressCallback)
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    facts.update(train_seconds=round(time.perf_counter() - start, 2), train_steps=trainer.state.global_step)
    return trainer, output, facts
