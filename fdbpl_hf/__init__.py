"""fdbpl_hf: Faster Distillation-Based Prompt Learning (arXiv 2505.18053) on the Hugging Face stack."""

from .config import FDBPLConfig
from .integrity import IntegrityError
from .modeling import FDBPLCLIPModel, FDBPLOutput, get_fdbpl_model
from .prompts import FDBPLPromptLearner
from .ril import (
    CallableTeacher, CLIPTeacher, DeviceImageStore, EnsembleTeacher, RegionSpec, RILDataset, RILTableConfig, Teacher,
    build_feature_cache, build_ril_table, dense_teacher_logits, load_feature_cache, load_ril_table, push_ril_table,
    ril_metadata,
)
from .trainer import FDBPLTrainer, FDBPLTrainingArguments
from .version import __version__

__all__ = [
    "FDBPLConfig",
    "FDBPLCLIPModel",
    "FDBPLOutput",
    "FDBPLPromptLearner",
    "get_fdbpl_model",
    "FDBPLTrainer",
    "FDBPLTrainingArguments",
    "build_ril_table",
    "RILTableConfig",
    "build_feature_cache",
    "load_feature_cache",
    "push_ril_table",
    "load_ril_table",
    "ril_metadata",
    "RILDataset",
    "DeviceImageStore",
    "dense_teacher_logits",
    "RegionSpec",
    "Teacher",
    "CLIPTeacher",
    "CallableTeacher",
    "EnsembleTeacher",
    "IntegrityError",
    "__version__",
]
