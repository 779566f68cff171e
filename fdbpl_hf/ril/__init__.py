"""Region Information Lookup tables: build (teacher, offline), publish (Hub), replay (training)."""

from .build import build_ril_table
from .compose import check_composable, mix_soft_labels, region_key
from .device_replay import DeviceImageStore
from .features import build_feature_cache, check_feature_cache, feature_cache_metadata, load_feature_cache
from .publish import push_ril_table
from .regions import RegionSpec
from .replay import RILDataset, dense_teacher_logits
from .sharding import ShardedBuild
from .table import check_table_matches, load_ril_table, ril_metadata
from .table_config import RILTableConfig
from .teachers import CallableTeacher, CLIPTeacher, EnsembleTeacher, Teacher

__all__ = [
    "build_ril_table", "RILTableConfig", "ShardedBuild", "push_ril_table", "build_feature_cache", "load_feature_cache", "feature_cache_metadata",
    "check_feature_cache", "load_ril_table", "ril_metadata", "check_table_matches",
    "RILDataset", "dense_teacher_logits", "RegionSpec", "DeviceImageStore",
    "Teacher", "CLIPTeacher", "CallableTeacher", "EnsembleTeacher", "region_key", "check_composable", "mix_soft_labels",
]
