"""`RILTableConfig`: the settings of one RIL table build, as a plain dataclass.

`build_ril_table(dataset, teacher, config)` reads it, `examples/build_table.py` parses it from the
command line with `transformers.HfArgumentParser`, and the finished table stores it whole under
its metadata's `build_config` key (`RILTableConfig.from_metadata(ril_metadata(table))`). Which of
these settings change the table's content is decided by the build key, not by this class: the
batch sizes, `shard_size`, `num_proc` and `device` change how fast a table is built, not its rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any, Optional

from ..clip_ops import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ..validation import Custom, check_fields, check_image_stats, check_templates, integer, one_of, text

DEFAULT_NUM_REGIONS = 500
DEFAULT_TOP_K = 20
DEFAULT_TEMPLATE = "a photo of a {}."
BUILD_CONFIG_KEY = "build_config"  # where a table's metadata keeps its RILTableConfig (tables from 0.5 on)
FILL_RULES = ("mr", "dense")  # how training rebuilds dense logits (fdbpl_hf.ril.replay.dense_teacher_logits)


def _templates_or_none(where: str, value: Any) -> None:
    if value is not None:
        check_templates(where, value)


TEMPLATES = Custom(_templates_or_none, "a template with one '{}' (or a list of them) or None")


@dataclass
class RILTableConfig:
    """How to build an RIL table (everything but the data, the teacher and where the table goes).

    `template` may also be a list of templates (ensembled) when set from Python.
    """

    num_regions: Annotated[int, integer(1)] = field(default=DEFAULT_NUM_REGIONS, metadata={
        "help": "Regions per image, M (paper: 500)."})
    top_k: Annotated[Optional[int], integer(1, optional=True)] = field(default=None, metadata={
        "help": f"Teacher classes kept per region, K (default min({DEFAULT_TOP_K}, number of classes))."})
    seed: Annotated[int, integer(0)] = field(default=0, metadata={"help": "Seed of the region sampling."})
    template: Annotated[Optional[str], TEMPLATES] = field(default=None, metadata={
        "help": f"Prompt template of a CLIP teacher (default {DEFAULT_TEMPLATE!r}; build_table.py: the dataset's)."})
    fill: Annotated[str, one_of(*FILL_RULES)] = field(default="mr", metadata={
        "help": "How training rebuilds dense teacher logits from the stored top-K: 'mr' (marginal re-norm: the "
                "classes left out get the smallest kept log-probability - 10) or 'dense' (needs K = C)."})
    teacher_name: Annotated[Optional[str], text(optional=True)] = field(default=None, metadata={
        "help": "Teacher name recorded in the table."})
    teacher_revision: Annotated[Optional[str], text(optional=True)] = field(default=None, metadata={
        "help": "Teacher revision (branch, tag or commit), recorded in the table."})
    teacher_input_size: Annotated[Optional[int], integer(1, optional=True)] = field(default=None, metadata={
        "help": "Region size of a callable teacher (a CLIP's comes from its config)."})
    teacher_image_mean: Optional[list[float]] = field(default=None, metadata={
        "help": "Pixel mean of the teacher's normalisation (default OpenAI CLIP's)."})
    teacher_image_std: Optional[list[float]] = field(default=None, metadata={
        "help": "Pixel std of the teacher's normalisation (default OpenAI CLIP's)."})
    image_column: Annotated[str, text()] = field(default="image", metadata={
        "help": "Image column of the source dataset."})
    label_column: Annotated[Optional[str], text(optional=True)] = field(default="label", metadata={
        "help": "Label column of the source dataset (None for unlabelled data: then pass class names)."})
    source_id: Annotated[Optional[str], text(optional=True)] = field(default=None, metadata={
        "help": "Source dataset id, recorded in the table."})
    source_revision: Annotated[Optional[str], text(optional=True)] = field(default=None, metadata={
        "help": "Source dataset revision, recorded."})
    images_per_batch: Annotated[int, integer(1)] = field(default=4, metadata={"help": "Images per datasets.map batch."})
    teacher_batch_size: Annotated[int, integer(1)] = field(default=256, metadata={
        "help": "Regions per teacher forward."})
    shard_size: Annotated[int, integer(1)] = field(default=1000, metadata={"help": "Images per resumable shard."})
    num_proc: Annotated[Optional[int], integer(1, optional=True)] = field(default=None, metadata={
        "help": "datasets.map worker processes (worker r uses GPU r)."})
    device: Optional[str] = field(default=None, metadata={
        "help": "Teacher device (default: where the teacher is; build_table.py: cuda if available)."})

    def __post_init__(self) -> None:
        # every rule in the annotations above, so a bad setting fails when it is given (from Python, a
        # JSON file or the command line), not deep in a build
        check_fields(self)
        if self.teacher_image_mean is not None or self.teacher_image_std is not None:
            check_image_stats("RILTableConfig.teacher_image_mean",
                              OPENAI_CLIP_MEAN if self.teacher_image_mean is None else self.teacher_image_mean,
                              "RILTableConfig.teacher_image_std",
                              OPENAI_CLIP_STD if self.teacher_image_std is None else self.teacher_image_std)

    @classmethod
    def with_overrides(cls, config: Optional["RILTableConfig"], settings: dict[str, Any],
                       caller: str = "build_ril_table") -> "RILTableConfig":
        """`config` (default: the defaults) with the keyword `settings` applied on top; an unknown
        keyword raises a `TypeError` naming it and the known ones."""
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"{caller}: config must be an RILTableConfig, got {type(config).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"{caller}() got unexpected keyword arguments {unknown}; the table settings are the "
                            f"fields of RILTableConfig: {sorted(known)}")
        return dataclasses.replace(config or cls(), **settings)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (lists for sequences, strings for devices)."""
        out = dataclasses.asdict(self)
        for key in ("teacher_image_mean", "teacher_image_std"):
            if out[key] is not None:
                out[key] = [float(v) for v in out[key]]
        if out["template"] is not None and not isinstance(out["template"], str):
            out["template"] = list(out["template"])
        if out["device"] is not None:
            out["device"] = str(out["device"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RILTableConfig":
        """A config from `to_dict()` output; keys a later version added are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> Optional["RILTableConfig"]:
        """The config a table was built with, from its metadata; None for tables written before
        0.5, which did not store it (their settings are in the metadata's other keys)."""
        stored = metadata.get(BUILD_CONFIG_KEY)
        return None if stored is None else cls.from_dict(stored)
