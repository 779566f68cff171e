"""Integrity mechanisms shared by tables, feature caches and their builds.

- Ownership: a work folder (`<output_dir>.incomplete`) carries `OWNER_FILE`, written when this
  library created the folder. A folder without it is never adopted, and cleaning up removes only
  the entries a build wrote (its shards, its staging folder, its own files), never the folder's
  other content.
- Locks: `<output_dir>.lock` says which process (pid, host, time, boot id, process start time) is
  building; a second build is refused with that information, a lock that provably belongs to no
  running build on this host (dead process, reused pid, another boot) is taken over.
- Content digests: a table's rows are hashed column by column (the logical values, so an Arrow
  folder and its Parquet export hash the same) in fixed chunks of rows, at build time, and the
  digests are checked when it is loaded. `FDBPL_HF_VERIFY=0` (or `verify=False`) skips the check.
- Weights fingerprints: `tensor_fingerprint` hashes every byte of every tensor of some modules;
  feature caches (student image tower) and tables (teacher) key on it.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import operator
import os
import shutil
import socket
import tempfile
import time
from typing import Iterable, Optional, Sequence

import numpy as np

from .files import file_mode, pid_alive, write_json

logger = logging.getLogger(__name__)

OWNER_FILE = ".fdbpl_hf-owner.json"
VERIFY_ENV = "FDBPL_HF_VERIFY"
DIGEST_CHUNK_ROWS = 65536
IMAGE_DIGEST_BYTES = 8  # per image: 64 bits tell swapped or replaced images apart


class IntegrityError(ValueError):
    """Stored data differs from what was recorded when it was written (corruption, edits, reordering)."""


def verification_enabled(verify: Optional[bool] = None) -> bool:
    """`verify` when given, else the `FDBPL_HF_VERIFY` environment variable (default on; "0" skips)."""
    if verify is not None:
        return bool(verify)
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def expand_path(path) -> str:
    """`~` and `~user` expanded, then absolute: `output_dir="~/x"` means the home folder's x."""
    return os.path.abspath(os.path.expanduser(str(path)))


def build_output_dir(path) -> str:
    """Where a build writes `path`: `~` expanded and symbolic links resolved, so a link to an empty
    or missing folder is built through (the table lands where it points; its `.incomplete` work
    folder and `.lock` sit beside that). A link that cannot be resolved (a loop) is refused now,
    not after the build."""
    expanded = expand_path(path)
    try:
        return os.path.realpath(expanded, strict=True)
    except FileNotFoundError:
        resolved = os.path.realpath(expanded)
    except OSError as err:  # ELOOP
        raise ValueError(f"output_dir {path} is a symbolic link that cannot be resolved ({err}): give a folder, or "
                         "a link to one") from None
    if os.path.islink(resolved):
        raise ValueError(f"output_dir {path} is a symbolic link that cannot be resolved (a loop): give a folder, or "
                         "a link to one")
    return resolved


# ---- weights ------------------------------------------------------------------------------------
WEIGHTS_DIGEST_PREFIX = "sha256:"  # fingerprints without it were made by 0.6's sampling (`sampled_tensor_fingerprint`)
DEVICE_CHUNK_BYTES = 1 << 26  # 64 MiB of a device tensor are copied to the host at a time


def tensor_digest(tensor, chunk_bytes: int = DEVICE_CHUNK_BYTES) -> bytes:
    """sha256 of a tensor's bytes, read `chunk_bytes` at a time: on the CPU each chunk is a view of
    the tensor's memory (no copy), on an accelerator each chunk is copied to the host in turn."""
    import torch

    t = tensor.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.device.type == "meta":
        raise ValueError("a tensor on the meta device has no values to fingerprint: load the weights first")
    flat = t.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()  # one tensor at a time
    raw = flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)
    h = hashlib.sha256()
    for start in range(0, raw.numel(), chunk_bytes):
        h.update(raw[start: start + chunk_bytes].cpu().numpy())
    return h.digest()


def tensor_fingerprint(modules: dict, threads: int = 1) -> str:
    """A digest of ALL the weights of `{prefix: torch module}`: every state-dict entry's name,
    dtype, shape and bytes (sha256, each tensor read once, in place on the CPU). Two checkpoints
    that differ in any value get different fingerprints. `threads`: tensors hashed in parallel
    (the result does not depend on it; 2 threads were no faster than 1 on the 2-core machine
    where it was measured). Cost: `python benchmarks/weights_digest.py` (docs/guarantees.md):
    1.3-2.2 s for ViT-L/14's 1.7 GB on a loaded 2-core machine."""
    from concurrent.futures import ThreadPoolExecutor

    entries = [(f"{prefix}.{name}", tensor) for prefix, module in modules.items()
               for name, tensor in sorted(module.state_dict().items())]
    seen: dict = {}
    unique = []
    for _, tensor in entries:  # tied weights are hashed once
        key = _storage_key(tensor)
        if key not in seen:
            seen[key] = len(unique)
            unique.append(tensor)
    if threads > 1 and len(unique) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:  # hashlib releases the GIL on big buffers
            digests = list(pool.map(tensor_digest, unique))
    else:
        digests = [tensor_digest(t) for t in unique]
    h = hashlib.sha256()
    for name, tensor in entries:
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        h.update(digests[seen[_storage_key(tensor)]])
    return WEIGHTS_DIGEST_PREFIX + h.hexdigest()[:32]


def _storage_key(tensor) -> tuple:
    if tensor.device.type == "meta":
        return (id(tensor),)
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tensor.stride(), tensor.dtype)


def sampled_tensor_fingerprint(modules: dict, samples_per_tensor: int = 4096) -> str:
    """The fingerprint of fdbpl_hf 0.4-0.6 (names, shapes and an even subsample of every tensor):
    kept only to check the student of a feature cache built by those versions. It misses changes
    outside the sample; `tensor_fingerprint` does not."""
    h = hashlib.sha256()
    for prefix, module in modules.items():
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // samples_per_tensor)
            h.update(f"{prefix}.{name}:{tuple(tensor.shape)}".encode())
            h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def is_sampled_fingerprint(fingerprint: Optional[str]) -> bool:
    """Whether a stored weights fingerprint was made by 0.4-0.6's sampling."""
    return isinstance(fingerprint, str) and not fingerprint.startswith(WEIGHTS_DIGEST_PREFIX)


# ---- ownership ----------------------------------------------------------------------------------
def _owner_record(kind: str) -> dict:
    return {"created_by": "fdbpl_hf", "kind": kind, "pid": os.getpid(), "host": socket.gethostname(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def claim_workdir(work: str, kind: str, legacy_marker: Optional[str] = None) -> bool:
    """Create `work` with this library's ownership marker, or accept it when it already carries one.

    Returns True when an existing (owned) folder is resumed. A folder that exists without the
    marker is refused: it is not ours, and a build must neither fill nor later delete it.
    `legacy_marker`: a file name that fdbpl_hf <= 0.3 wrote first in its work folders (accepted as
    a marker, and the real one is added).
    """
    try:
        os.makedirs(os.path.dirname(work) or ".", exist_ok=True)
        os.mkdir(work)
    except FileExistsError:
        marker = os.path.join(work, OWNER_FILE)
        if os.path.isfile(marker):
            return True
        if legacy_marker and os.path.isfile(os.path.join(work, legacy_marker)) and _is_ours(
                os.path.join(work, legacy_marker)):
            write_json(marker, _owner_record(kind))
            return True
        what = "a file" if not os.path.isdir(work) else "a folder fdbpl_hf did not create (no " + OWNER_FILE + ")"
        raise ValueError(f"{work} is {what}: a {kind} build keeps its unfinished work there and deletes it when "
                         "done, so it refuses to use it. Move or rename it, or pass another output_dir.") from None
    write_json(os.path.join(work, OWNER_FILE), _owner_record(kind))
    return False


def _is_ours(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        return isinstance(record, dict) and "build_key" in record
    except (OSError, ValueError, AttributeError):
        return False


def remove_owned(work: str, names: Iterable[str]) -> None:
    """Delete the entries `names` of an owned work folder, then the folder if nothing else is left;
    anything else found in it is kept, with a warning."""
    if not os.path.isfile(os.path.join(work, OWNER_FILE)):
        logger.warning("not removing %s: it has no fdbpl_hf ownership marker", work)
        return
    for name in list(names) + [OWNER_FILE]:
        path = os.path.join(work, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
    left = os.listdir(work)
    if left:
        logger.warning("kept %s: it holds files this build did not write (%s)", work, ", ".join(sorted(left)[:5]))
    else:
        os.rmdir(work)


# ---- locks --------------------------------------------------------------------------------------
_HELD_LOCKS: set = set()  # lock files this process holds


def boot_id() -> Optional[str]:
    """This machine's boot id (Linux): it changes at every boot, so a lock of before a reboot is stale."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def process_start_time(pid: int) -> Optional[int]:
    """When process `pid` started, in clock ticks since boot (Linux), or None: a pid reused by
    another process (after a container restart, our own) has another start time."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, after "(comm) "
    except (OSError, ValueError, IndexError):
        return None


def _lock_record(kind: str) -> dict:
    return {**_owner_record(kind), "boot_id": boot_id(), "start_time": process_start_time(os.getpid())}


def stale_lock_reason(holder: dict, path: str) -> Optional[str]:
    """Why the lock record `holder` (of this host) provably belongs to no running build, or None:
    another boot; a dead process; a live pid with another start time (reused); or this process's
    own pid in a lock this process never took (a process before a container restart)."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return None
    if holder.get("boot_id") and boot_id() and holder["boot_id"] != boot_id():
        return f"process {pid} ran before this machine last booted"
    if not pid_alive(pid):
        return f"process {pid} is no longer running"
    recorded, now = holder.get("start_time"), process_start_time(pid)
    if recorded is not None and now is not None and recorded != now:
        return f"process id {pid} now belongs to another process (started at another time)"
    if pid == os.getpid() and path not in _HELD_LOCKS and recorded is None:
        return f"it names this process's id {pid}, which this process never took it with (an earlier process)"
    return None


class BuildLock:
    """An exclusive lock file `path` holding who builds: pid, host, time, boot id and the process's
    start time. It is made whole before it appears (hard-linked from a written temporary file), so
    a reader never sees half a record.

    A second holder is refused with that record. A lock on this host that provably belongs to no
    running build (`stale_lock_reason`: another boot, a dead process, a reused pid, this process's
    own pid from before a container restart) is taken over with a warning; on another host it
    cannot be checked: the error says how to clear it.
    """

    def __init__(self, path: str, what: str):
        self.path, self.what, self.held = path, what, False

    def acquire(self) -> "BuildLock":
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(3):
            if self._create(json.dumps(_lock_record(self.what), sort_keys=True)):
                self.held = True
                _HELD_LOCKS.add(self.path)
                return self
            holder = self._holder()
            reason = stale_lock_reason(holder, self.path) if holder and holder.get("host") == socket.gethostname() \
                else None
            if reason is not None:
                logger.warning("taking over the stale lock %s: %s", self.path, reason)
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            who = (f"process {holder.get('pid')} on host {holder.get('host')} since {holder.get('time')}"
                   if holder else "a process whose lock file is unreadable")
            if self.path in _HELD_LOCKS:
                who += " (this process: a build started inside another, or from another thread)"
            raise RuntimeError(f"another {self.what} build into the same folder is running: {who} holds "
                               f"{self.path}. Wait for it to finish (then this call returns its result), or, if "
                               "that process is gone, delete the lock file.") from None
        raise RuntimeError(f"could not take the lock {self.path}")

    def _create(self, record: str) -> bool:
        """Create the lock file holding `record`, whole; False when it exists."""
        folder = os.path.dirname(self.path) or "."
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(self.path)}.", suffix=".tmp")
        try:
            os.fchmod(fd, file_mode())
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(record)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)  # atomic, and fails if the lock exists
                return True
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: exclusive create, then write
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, file_mode())
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(record)
                return True
        finally:
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass

    def _holder(self) -> Optional[dict]:
        for attempt in range(5):  # a lock made by exclusive create is briefly empty
            try:
                with open(self.path, encoding="utf-8") as f:
                    record = json.load(f)
                return record if isinstance(record, dict) else None
            except FileNotFoundError:
                return None
            except (OSError, ValueError):
                time.sleep(0.05 * (attempt + 1))
        return None

    def release(self) -> None:
        if self.held:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.held = False
            _HELD_LOCKS.discard(self.path)

    def __enter__(self) -> "BuildLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- table content --------------------------------------------------------------------------------
def _column_arrays(array, name: str) -> list[np.ndarray]:
    """The flat value arrays of one Arrow column (nested fixed/variable lists unrolled)."""
    import pyarrow as pa

    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if array.null_count:
        raise IntegrityError(f"column {name!r} holds {array.null_count} missing (null) values")
    if pa.types.is_fixed_size_list(array.type) or pa.types.is_list(array.type) or \
            pa.types.is_large_list(array.type):
        out = []
        if not pa.types.is_fixed_size_list(array.type):
            out.append(np.asarray(array.value_lengths()))
        return out + _column_arrays(array.flatten(), name)
    values = array.to_numpy(zero_copy_only=False)
    if values.dtype == object:
        return [np.frombuffer(json.dumps(values.tolist(), default=str).encode(), dtype=np.uint8)]
    return [np.ascontiguousarray(values)]


def chunk_digest(pa_table, start: int, stop: int) -> str:
    """sha256 of rows start..stop-1 of an Arrow table: column names, types and values, in row order."""
    h = hashlib.sha256()
    part = pa_table.slice(start, stop - start)
    for name in sorted(part.column_names):
        h.update(name.encode())
        for values in _column_arrays(part.column(name), name):
            # the values' dtype, not Arrow's type string: a Parquet round trip renames list fields
            h.update(f":{values.dtype.str}:{values.size};".encode())
            h.update(values.reshape(-1).view(np.uint8))  # the buffer itself, no copy
    return h.hexdigest()[:32]


def table_digests(dataset, chunk_rows: int = DIGEST_CHUNK_ROWS) -> dict:
    """`{"chunk_rows", "chunks": [digest per chunk of rows]}` of a `datasets.Dataset`'s rows as stored
    (an indices mapping, e.g. after `select`/`shuffle`, is applied first)."""
    pa_table = _arrow_rows(dataset)
    n = pa_table.num_rows
    return {"chunk_rows": chunk_rows, "num_rows": n,
            "chunks": [chunk_digest(pa_table, s, min(s + chunk_rows, n)) for s in range(0, n, chunk_rows)]}


def _arrow_rows(dataset):
    if getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices(keep_in_memory=True)
    return dataset.data.table if hasattr(dataset.data, "table") else dataset.data


def verify_table_digests(dataset, recorded: dict, what: str, layout: str = "") -> None:
    """Raise `IntegrityError` naming the first chunk of rows whose content differs from `recorded`."""
    pa_table = _arrow_rows(dataset)
    n, size = pa_table.num_rows, int(recorded["chunk_rows"])
    chunks = list(recorded["chunks"])
    if recorded.get("num_rows", n) != n:
        raise IntegrityError(f"{what} has {n} rows, {recorded['num_rows']} were written when it was built: rows were "
                             "added or removed (a subset or another table)")
    if len(chunks) != -(-n // size):
        raise IntegrityError(f"{what} has {n} rows, which is not the {len(chunks)} chunk(s) of {size} rows its "
                             "metadata records: rows were added or removed")
    for k, digest in enumerate(chunks):
        start, stop = k * size, min((k + 1) * size, n)
        if chunk_digest(pa_table, start, stop) != digest:
            raise IntegrityError(
                f"{what}: rows {start}-{stop - 1} differ from what was written when it was built (corrupted, "
                f"edited or reordered{layout}). Rebuild it, or re-download it.")


# ---- source images ------------------------------------------------------------------------------
def image_digests(dataset, image_column: str, label_column: Optional[str], num_classes: Optional[int] = None,
                  batch_rows: int = 1024) -> bytes:
    """8 bytes per source row: sha256 of the image's encoded bytes and its label, in row order.

    Checks on the way what every consumer relies on: each row has an image, and each label is
    missing/-1 or a class id below `num_classes` (the error names the row).
    """
    import datasets

    from .rows import stored_rows

    # the stored rows: a torch format would hash labels as "tensor(3)", a transform its own output
    raw = stored_rows(dataset, warn=False).select_columns([c for c in (image_column, label_column) if c]).cast_column(
        image_column, datasets.Image(decode=False))
    out = bytearray()
    for start in range(0, len(raw), batch_rows):
        batch = raw[start: start + batch_rows]
        labels = batch[label_column] if label_column else [None] * len(batch[image_column])
        for n, (item, label) in enumerate(zip(batch[image_column], labels)):
            row = start + n
            if item is None or (item.get("bytes") is None and not item.get("path")):
                raise ValueError(f"row {row} of the source dataset has no image (column {image_column!r} is "
                                 "None): drop that row (dataset.filter) or fill it")
            if label is not None and num_classes is not None:
                class_id = _class_id(label)
                if class_id is None:
                    raise ValueError(f"row {row} of the source dataset has label {label!r} (column {label_column!r}), "
                                     f"not a class id: labels must be integers 0-{num_classes - 1} in class_names "
                                     f"order (string labels: dataset.class_encode_column({label_column!r}))")
                if class_id != -1 and not 0 <= class_id < num_classes:
                    raise ValueError(f"row {row} of the source dataset has label {label}, outside the {num_classes} "
                                     f"classes (0-{num_classes - 1}): fix the label or the class list")
            h = hashlib.sha256(_encoded(item, row))
            h.update(b"|" + str(label).encode())
            out += h.digest()[:IMAGE_DIGEST_BYTES]
    return bytes(out)


def _class_id(label) -> Optional[int]:
    """`label` as an integer class id (ints, numpy ints, integral floats), or None (text, 1.5, lists)."""
    try:
        return operator.index(label)
    except TypeError:
        return int(label) if isinstance(label, float) and label.is_integer() else None


def encoded_image_digest(item: dict, row: int) -> bytes:
    """`IMAGE_DIGEST_BYTES` of sha256 over one undecoded image cell's encoded bytes (no label): what
    an image store records of each image it holds."""
    return hashlib.sha256(_encoded(item, row)).digest()[:IMAGE_DIGEST_BYTES]


def _encoded(item: dict, row: int) -> bytes:
    if item.get("bytes") is not None:
        return item["bytes"]
    try:
        with open(item["path"], "rb") as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"row {row} of the source dataset: its image file cannot be read ({err})") from err


def encode_digests(digests: bytes) -> str:
    return base64.b64encode(digests).decode("ascii")


def decode_digests(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def first_differences(recorded: bytes, found: bytes, limit: int = 5, holder: str = "the table",
                      absent: str = "an image the table was not built on") -> list[str]:
    """Human-readable list of rows whose digest differs, with where the row's image sits in the
    other list when it was moved (a shuffled or re-ordered dataset). `holder` names what recorded
    the digests, `absent` an image it does not have."""
    size = IMAGE_DIGEST_BYTES
    rec = [recorded[i: i + size] for i in range(0, len(recorded), size)]
    got = [found[i: i + size] for i in range(0, len(found), size)]
    where = {d: i for i, d in enumerate(rec)}
    out = []
    for i, (a, b) in enumerate(zip(rec, got)):
        if a != b:
            moved = where.get(b)
            out.append(f"row {i}" + (f" (holds {holder}'s image {moved}: reordered)" if moved is not None
                                     else f" ({absent})"))
            if len(out) == limit:
                out.append("...")
                break
    return out


# ---- metadata -------------------------------------------------------------------------------------
def json_digest(value, length: int) -> str:
    """The first `length` hex digits of the sha256 of `value` as sorted JSON: the one content key
    of metadata, build settings and caches."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


def metadata_digest(metadata: dict, exclude: Sequence[str] = ("metadata_digest",)) -> str:
    """sha256 of a metadata dict (sorted JSON) without the `exclude` keys."""
    return json_digest({k: v for k, v in metadata.items() if k not in exclude}, 32)


def require_keys(metadata: dict, keys: Sequence[str], where: str) -> None:
    """Raise a `ValueError` naming `where` and the missing keys (dotted paths for nested ones)."""
    missing = []
    for key in keys:
        node = metadata
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    if missing:
        raise ValueError(f"{where} lacks the key(s) {', '.join(missing)}: the file is truncated or was edited; "
                         "rebuild or re-download it")
