"""Where an adapter's files are: a local folder or a Hub repo, in the current or the 0.3 format.

Kept apart from `prompts.py` so that `config.py` (which reads an adapter's config) and
`prompts.py` (which reads its weights and needs `FDBPLConfig`) both depend on it, not on each other.
"""

import os
import re
from typing import Optional

from huggingface_hub import hf_hub_download

FDBPL_CONFIG_NAME = "fdbpl_config.json"
LEGACY_CONFIG_NAME = "config.json"  # the 0.3 format


def hub_model_id(name: Optional[str]) -> Optional[str]:
    """`name` when it reads as a Hub model id, else None: cards and pushed configs never show a
    local path ("../ckpt/student", "/data/clip", "C:\\models"). A Hub-cache snapshot path gives
    back its repo id."""
    if not isinstance(name, str) or not name.strip():
        return None
    parts = os.path.normpath(name).replace("\\", "/").split("/")
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return "/".join(parts[-3].split("--")[1:]) or None
    if (os.path.isabs(name) or name.startswith((".", "~")) or ".." in name or "\\" in name or ":" in name
            or not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) or os.path.exists(name)):
        return None
    return name


def adapter_file(model_id: str | os.PathLike, name: str, *, revision: Optional[str] = None, cache_dir=None,
                 force_download: bool = False, local_files_only: bool = False, token=None) -> str:
    """Local path of file `name` of an adapter folder or Hub repo (downloaded if needed)."""
    model_id = str(model_id)
    if os.path.isdir(model_id):
        path = os.path.join(model_id, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_id} is not an FDBPL adapter: no {name}")
        return path
    try:
        return hf_hub_download(model_id, name, revision=revision, cache_dir=cache_dir,
                               force_download=force_download, local_files_only=local_files_only, token=token)
    except Exception as err:
        # "runs/eurosat" is a folder name and a Hub id alike: say both were tried
        raise FileNotFoundError(
            f"no FDBPL adapter at {model_id!r}: no folder {os.path.abspath(model_id)}, and no {name} "
            f"could be read from a Hub repo {model_id} ({type(err).__name__}: {err})") from err


def locate_adapter_config(model_id: str | os.PathLike, **where) -> tuple[str, bool]:
    """(path of the FDBPL config file, whether the adapter is in the 0.3 format)."""
    try:
        return adapter_file(model_id, FDBPL_CONFIG_NAME, **where), False
    except FileNotFoundError as new_err:
        try:
            return adapter_file(model_id, LEGACY_CONFIG_NAME, **where), True
        except FileNotFoundError:
            raise FileNotFoundError(f"{new_err} (nor the 0.3 format's {LEGACY_CONFIG_NAME})") from new_err
