"""Writing files: whole or not at all, with the mode the user's umask gives.

- `atomic_write` / `write_json`: the content goes to a temporary file beside the target, is flushed
  to disk (fsync), then renamed over it (`os.replace`). A reader, a kill or a full disk sees the
  old file or the new one, never a half-written one; a write that fails leaves no temporary file.
- `file_mode()`: the mode `open()` gives a new file (0o666 minus the umask). Temporary files
  (`mkstemp`) and some libraries (safetensors) create files with mode 0600; everything fdbpl_hf
  leaves in a user's folder gets this mode instead, like the rest of the folder.
- `read_json`: a JSON file, with an error that names it and says what to do when it is unreadable.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import Any, Optional

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the OS says it (Linux), else by setting
    and restoring it under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The permission bits of a new file under the current umask (0o644 for the usual 022)."""
    return 0o666 & ~current_umask()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(folder: str) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the OS allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    """Flush a file someone else wrote (a library's `save_*`) to disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str, mode: Optional[int] = None) -> str:
    """Replace `path` by `data` in one rename (see the module docstring); returns the path.
    `mode`: the file's permission bits (default `file_mode()`)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mkstemp made it 0600
            os.fchmod(fd, file_mode() if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(folder)
    return path


def write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> str:
    """`json.dump(obj)` into `path`, atomically (default: indent 2, sorted keys)."""
    options = {"indent": 2, "sort_keys": True, **dump_kwargs}
    return atomic_write(path, json.dumps(obj, **options) + "\n")


def read_json(path: str | os.PathLike, remedy: str) -> Any:
    """The content of a JSON file; an unreadable one (truncated by a full disk, edited, not JSON)
    raises a `ValueError` that names it and says `remedy` (what to do)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({type(err).__name__}: {err}): the file is truncated (a full "
                         f"disk or a crash while it was written by an older fdbpl_hf) or was edited; {remedy}") from err
