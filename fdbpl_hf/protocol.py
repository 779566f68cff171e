"""One base-to-novel run of one method, end to end: the unit the demo and the protocol tests repeat.

Methods: "zero-shot" (the student's hand-crafted prompt), "coop" (cross-entropy on the few-shot
labels, positive prompt only), "fdbpl-online" (a live teacher scores every replayed region, the
PromptKD/KDPL way), "fdbpl-offline" (FDBPL: the teacher runs once into an RIL table) and
"fdbpl-cached" (offline plus a student-feature cache: training skips images and the image tower).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Optional, Sequence

import torch

from .config import FDBPLConfig
from .data import resolve_dataset, training_set
from .evaluation import ZeroShotCLIP, evaluate_base_to_novel
from .modeling import get_fdbpl_model
from .pipeline import train_prompts
from .ril import CLIPTeacher, EnsembleTeacher, RegionSpec, RILDataset, Teacher, build_ril_table, ril_metadata
from .trainer import FDBPLTrainingArguments
from .validation import check_value, integer

METHODS = ("zero-shot", "coop", "fdbpl-online", "fdbpl-offline", "fdbpl-cached")


def _load(path: str):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    return (CLIPModel.from_pretrained(path), AutoTokenizer.from_pretrained(path),
            CLIPImageProcessorPil.from_pretrained(path))


def _members(teacher: "str | Sequence[str]", names: list[str], template: str, device: str) -> list[Teacher]:
    """One `CLIPTeacher` per checkpoint path."""
    members = []
    for path in [teacher] if isinstance(teacher, str) else list(teacher):
        t_clip, t_tok, t_proc = _load(path)
        members.append(CLIPTeacher(t_clip.to(device), t_tok, names, template, t_proc.image_mean, t_proc.image_std,
                                   name=os.path.basename(os.path.normpath(path))))
    return members


def _teacher(teacher: "str | Sequence[str]", names: list[str], template: str, device: str,
             weighting: str) -> Teacher:
    """One `CLIPTeacher` for a checkpoint path; an `EnsembleTeacher` for several (mixed per `weighting`)."""
    paths = [teacher] if isinstance(teacher, str) else list(teacher)
    members = _members(paths, names, template, device)
    if len(members) == 1:
        if weighting != "fixed":
            raise ValueError(f"teacher_weighting={weighting!r} needs several teachers, got one: {paths[0]}")
        return members[0]
    return EnsembleTeacher(members, weighting=weighting)


def run_base_to_novel(method: str, *, student: str, teacher: "Optional[str | Sequence[str]]" = None,
                      dataset: str = "digits", teacher_weighting: str = "fixed",
                      seed: int = 1, num_shots: int = 16, output_dir: str, num_train_epochs: float = 50,
                      per_device_train_batch_size: int = 32, learning_rate: float = 0.002,
                      num_regions: Optional[int] = None, top_k: Optional[int] = None,
                      region_scale: tuple[float, float] = (0.08, 1.0), flip_prob: float = 0.5,
                      training_overrides: Optional[dict] = None, progress: bool = False,
                      compose: bool = False, print_logs: bool = True) -> dict[str, Any]:
    """Train (unless zero-shot) and evaluate one method; returns the base/novel/HM result with
    `train_seconds` and, for the offline methods, the table's (and the feature cache's) build time and size.
    `region_scale` is the area range of the random regions (paper: (0.08, 1.0)); `flip_prob`
    their horizontal-flip rate (0 for data where a mirror image is another class, like digits).

    `num_regions` defaults to the number of epochs: each image replays one new region per epoch,
    so more regions than epochs are never read. `teacher` is a checkpoint path, or several for an
    equal-weight `EnsembleTeacher` (`teacher_weighting`: "fixed", or per region "max_prob" / "entropy").
    With `compose` (offline methods, several teachers) each teacher gets its own table over the same
    regions and training mixes them per region (`RILDataset(dataset, tables, teacher_weighting=...)`)
    instead of one table of the `EnsembleTeacher`.
    `print_logs=False` keeps the trainer's per-step loss dictionaries off stdout (`train_prompts`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method.startswith("fdbpl") and teacher is None:
        raise ValueError(f"{method} needs a teacher checkpoint")
    # 0 regions would silently mean the default (`num_regions or epochs`)
    check_value("run_base_to_novel num_regions", num_regions, integer(1, optional=True))
    check_value("run_base_to_novel num_shots", num_shots, integer(1))
    check_value("run_base_to_novel seed", seed, integer(0))
    if compose and (method not in ("fdbpl-offline", "fdbpl-cached") or isinstance(teacher, str)
                    or len(list(teacher)) < 2):
        raise ValueError("compose=True builds one table per teacher and mixes them: it needs an offline method and "
                         f"several teacher checkpoints, got {method} with {teacher!r}")
    info = resolve_dataset(dataset)
    test = info.load(info.test_split)
    clip, tokenizer, processor = _load(student)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extra: dict[str, Any] = {"train_seconds": 0.0}
    if method == "zero-shot":
        model = ZeroShotCLIP(clip, tokenizer, info.template)
    else:
        data = training_set(info, num_shots=num_shots, seed=seed, classes="base")
        names, size = data["class_names"], clip.config.vision_config.image_size
        regions = num_regions or max(1, math.ceil(num_train_epochs))
        mean, std = processor.image_mean, processor.image_std
        spec = RegionSpec(output_size=size, scale=tuple(region_scale), flip_prob=flip_prob)
        teacher_obj = None
        if method.startswith("fdbpl"):
            teacher_obj = (_members(teacher, names, data["template"], device) if compose else
                           _teacher(teacher, names, data["template"], device, teacher_weighting))
        if method in ("fdbpl-offline", "fdbpl-cached"):
            start = time.perf_counter()
            # composed: one table per teacher, the same seed and regions; else one table of the (ensemble) teacher
            builds = [(t, os.path.join(output_dir, f"table_{i}")) for i, t in enumerate(teacher_obj)] if compose \
                else [(teacher_obj, os.path.join(output_dir, "table"))]
            tables = [build_ril_table(data["dataset"], t, class_names=names, num_regions=regions, top_k=top_k,
                                      seed=seed, region_spec=spec, output_dir=folder) for t, folder in builds]
            extra.update(table_build_seconds=round(time.perf_counter() - start, 2),
                         table_bytes=sum(ril_metadata(t)["stats"]["disk_bytes"] for t in tables),
                         table_regions=len(tables[0]))
            mixing = dict(teacher_weighting=teacher_weighting) if compose else {}
            train_data = RILDataset(data["dataset"], tables if compose else tables[0], image_mean=mean, image_std=std,
                                    image_size=size, class_names=names, **mixing)
            teacher_obj = None  # FDBPL's point: no teacher at train time
        else:
            train_data = RILDataset.online(data["dataset"], class_names=names, image_mean=mean, image_std=std,
                                           region_spec=spec, num_regions=regions, seed=seed)
        model = get_fdbpl_model(clip, FDBPLConfig(base_model_name_or_path=student, template=data["template"]),
                                tokenizer)
        settings = dict(
            output_dir=os.path.join(output_dir, "run"), num_train_epochs=num_train_epochs,
            per_device_train_batch_size=per_device_train_batch_size, learning_rate=learning_rate, seed=seed,
            loss_type="coop" if method == "coop" else "fdbpl", save_strategy="no", report_to="none",
            logging_steps=5, disable_tqdm=not progress, use_cpu=device == "cpu",
        )
        args = FDBPLTrainingArguments(**{**settings, **(training_overrides or {})})
        cache_dir = os.path.join(output_dir, "feature_cache") if method == "fdbpl-cached" else None
        trainer, _, facts = train_prompts(model, args, train_data, teacher=teacher_obj, feature_cache_dir=cache_dir,
                                          progress=progress, print_logs=print_logs)
        extra.update(facts)
        trainer.save_model()
        model.eval()
    result = evaluate_base_to_novel(model, test, info, image_processor=processor, tokenizer=tokenizer,
                                    template=info.template, progress=progress)
    result.update(extra, method=method, seed=seed, num_shots=num_shots)
    return result
