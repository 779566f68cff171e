"""A resumable, multi-process build of one table, shard by shard: what RIL tables and
student-feature caches are both built with.

A build writes into `<output_dir>.incomplete` (claimed by a marker file, under a lock), one
folder per finished shard; a killed build resumes at the first missing shard. Under
`accelerate launch`/torchrun, rank r builds shards r, r + world, ... and rank 0 assembles them
into `output_dir` in one rename, with its metadata file, so only a whole table is ever loaded.

    build = ShardedBuild(output_dir, metadata, kind="RIL table", num_items=len(dataset),
                         shard_size=1000, metadata_file="ril_metadata.json")
    build.run(lambda shard, start, stop: make_rows(start, stop))  # -> a datasets.Dataset
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from typing import Callable, Optional

import datasets
import torch

from ..files import read_json, write_json
from ..integrity import OWNER_FILE, BuildLock, claim_workdir, metadata_digest, remove_owned, table_digests
from ..progress import quiet_progress
from .table import attach_metadata, load_from_disk_named

logger = logging.getLogger(__name__)

BUILD_FILE = "build.json"  # the settings of the build a work folder holds

# tables below this size are written without a progress bar: a short write inside the build
QUIET_SAVE_BYTES = 1 << 30


def dist_info() -> tuple[int, int]:
    """(rank, world size) under `accelerate launch`/torchrun; the process group is started here
    when the launcher set one up but nothing has initialised it yet (e.g. examples/build_table.py)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend=backend)
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def on_every_rank(rank: int, fn: Callable, *args, **kwargs) -> None:
    """Run `fn` on every rank, then wait for all of them; if any rank failed, every rank raises
    (the failed one its own error), instead of the others waiting at a barrier until the process
    group times out."""
    error = None
    try:
        fn(*args, **kwargs)
    except Exception as err:  # re-raised below, after telling the other ranks
        error = err
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        reports = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(reports, None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
        if failed and error is None:
            raise RuntimeError("rank {} failed, so this rank stops too: {}".format(*failed[0]))
    if error is not None:
        raise error


def on_rank0(rank: int, fn: Callable, *args, **kwargs) -> None:
    """Run `fn` on rank 0 while the other ranks wait; if it fails, every rank raises."""
    on_every_rank(rank, fn if rank == 0 else _nothing, *args, **kwargs)


def _nothing(*args, **kwargs) -> None:
    return None


def default_build_dir(key: str, kind: str = "ril_tables") -> str:
    """`$HF_HOME/fdbpl_hf/<kind>/<key>`: where a build goes when no output_dir is given
    (`kind` "ril_tables" or "feature_caches")."""
    from huggingface_hub.constants import HF_HOME

    return os.path.join(HF_HOME, "fdbpl_hf", kind, key)


def absent_or_empty(path: str) -> bool:
    """True for a folder a build may create or fill (e.g. one made by `tempfile.mkdtemp()`)."""
    return not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path))


def start_build(lock: BuildLock, work: str, metadata: dict, kind: str) -> None:
    """Take the build lock, then create (or resume) the owned work folder."""
    lock.acquire()
    prepare_workdir(work, metadata, kind)


def prepare_workdir(work: str, metadata: dict, kind: str = "RIL table") -> None:
    """Claim `work` and record the build's settings in it, or check that the interrupted build it
    holds has the same `build_key` and `shard_size` (shards are named by index) before resuming."""
    resumed = claim_workdir(work, kind, legacy_marker=BUILD_FILE)
    build_file = os.path.join(work, BUILD_FILE)
    if resumed and os.path.isfile(build_file):
        previous = read_json(build_file, f"the settings of the interrupted build in {work} are lost, so its finished "
                                         f"shards cannot be trusted: delete {work} to start the build over")
        if not isinstance(previous, dict):
            raise ValueError(f"{build_file} holds no build settings: delete {work} to start the build over")
        if previous.get("build_key") != metadata["build_key"]:
            versions = (previous.get("library_version"), metadata.get("library_version"))
            upgraded = (f"; it was started by fdbpl_hf {versions[0]}, this is {versions[1]}, whose builds of the same "
                        "settings may differ" if versions[0] != versions[1] else "")
            raise ValueError(f"{work} holds an interrupted build with other settings (another teacher, its weights, "
                             f"the source images, M, K or seed{upgraded}); delete it to start over")
        if previous.get("shard_size") != metadata["shard_size"]:
            # finished shards are named by index: another shard_size would map them to other rows
            raise ValueError(f"{work} holds an interrupted build with shard_size={previous.get('shard_size')}; "
                             f"resume it with that shard_size (got {metadata['shard_size']}) or delete it")
        logger.info("resuming the interrupted %s build in %s", kind, work)
        return
    write_json(build_file, metadata)  # whole or absent: a full disk leaves no half-written settings


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def remove_leftover_work(output_dir: str, build_key: str, kind: str) -> None:
    """Remove the work folder of the finished build in `output_dir` when a kill after its assembly
    left it behind (the table is renamed into place, then the work folder removed): its shards are
    a second copy of the table that nothing reads. Only a folder fdbpl_hf owns, of the same build
    key, on rank 0, and not while a live build holds the lock; what the build did not write stays."""
    work = output_dir + ".incomplete"
    if not os.path.isfile(os.path.join(work, OWNER_FILE)):
        return
    # rank 0 only, without starting a process group for it (dist_info would)
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if (torch.distributed.get_rank() if initialized else int(os.environ.get("RANK", "0"))) != 0:
        return
    try:
        previous = read_json(os.path.join(work, BUILD_FILE), "")
    except (OSError, ValueError):
        return
    if not isinstance(previous, dict) or previous.get("build_key") != build_key:
        return
    lock = BuildLock(output_dir + ".lock", kind)
    try:
        lock.acquire()
    except RuntimeError:  # a live build holds it
        return
    try:
        shards = [n for n in os.listdir(work) if n.startswith("shard-")]
        remove_owned(work, shards + [BUILD_FILE, "table"])
        logger.info("removed %s, left by a %s build killed after it finished", work, kind)
    finally:
        lock.release()


def assemble(work: str, output_dir: str, num_shards: int, metadata: dict, metadata_file: str) -> None:
    """Concatenate the finished shards of `work` into `output_dir` with `metadata_file` (row
    digests, size stats, metadata digest), in one rename; then remove what the build wrote."""
    shard_names = [shard_name(s) for s in range(num_shards)]
    parts = [load_from_disk_named(os.path.join(work, name)) for name in shard_names]
    table = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    staging = os.path.join(work, "table")
    shutil.rmtree(staging, ignore_errors=True)
    # content digests of the rows, in order: verified when the table is loaded
    metadata = dict(metadata, integrity={"rows": table_digests(table)})
    attach_metadata(table, metadata)
    with quiet_progress(enabled=table.data.nbytes < QUIET_SAVE_BYTES):
        table.save_to_disk(os.path.join(staging, "data"))
    data_bytes = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(staging) for f in fs)
    rows = len(table)
    final = dict(metadata, complete=True, stats={"num_rows": rows, "disk_bytes": data_bytes,
                                                 "bytes_per_region": data_bytes / max(rows, 1)})
    final["metadata_digest"] = metadata_digest(final)
    write_json(os.path.join(staging, metadata_file), final)
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    if os.path.isdir(output_dir):
        os.rmdir(output_dir)  # an empty folder made for the table; a non-empty one was refused before
    os.replace(staging, output_dir)  # the table appears whole, or not at all
    # only what the build wrote; anything else a user put there stays
    remove_owned(work, shard_names + [n + ".tmp" for n in shard_names] + [BUILD_FILE, "table"])


class ShardedBuild:
    """One build of `num_items` source items into `output_dir`, `shard_size` items per shard.

    `metadata` must hold the build's `build_key` (it names the settings a resumed build must share);
    it is written, completed, as `metadata_file` next to the assembled rows. Check that
    `output_dir` does not already hold the finished build before making one (the build refuses
    nothing there: `assemble` replaces only an empty folder)."""

    def __init__(self, output_dir: str, metadata: dict, *, kind: str, num_items: int, shard_size: int,
                 metadata_file: str):
        if shard_size < 1:
            raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
        self.output_dir, self.metadata, self.kind = output_dir, metadata, kind
        self.num_items, self.shard_size, self.metadata_file = num_items, shard_size, metadata_file
        self.work = output_dir + ".incomplete"
        self.num_shards = math.ceil(num_items / shard_size)
        self.rank, self.world = dist_info()

    def my_shards(self) -> list[tuple[int, int, int]]:
        """`(shard, start, stop)` of the shards this rank builds (items `start:stop`)."""
        return [(s, s * self.shard_size, min((s + 1) * self.shard_size, self.num_items))
                for s in range(self.rank, self.num_shards, self.world)]

    def run(self, build_shard: Callable[[int, int, int], datasets.Dataset],
            on_skip: Optional[Callable[[int, int, int], None]] = None,
            after_shards: Optional[Callable[[], None]] = None) -> None:
        """Build this rank's missing shards with `build_shard(shard, start, stop)` (`on_skip` is
        told of the ones already built), call `after_shards` (even on failure), then assemble on
        rank 0. Every rank returns once the assembled build is in `output_dir`."""
        lock = BuildLock(self.output_dir + ".lock", self.kind)
        try:
            on_rank0(self.rank, start_build, lock, self.work, dict(self.metadata, shard_size=self.shard_size),
                     self.kind)
            try:
                on_every_rank(self.rank, self._build_mine, build_shard, on_skip)  # also the barrier before assembly
            finally:
                if after_shards is not None:
                    after_shards()
            on_rank0(self.rank, assemble, self.work, self.output_dir, self.num_shards, self.metadata,
                     self.metadata_file)
        finally:
            lock.release()

    def _build_mine(self, build_shard, on_skip) -> None:
        for shard, start, stop in self.my_shards():
            shard_dir = os.path.join(self.work, shard_name(shard))
            if os.path.isdir(shard_dir):
                logger.info("%s shard %d/%d already built, skipping", self.kind, shard + 1, self.num_shards)
                if on_skip is not None:
                    on_skip(shard, start, stop)
                continue
            part = build_shard(shard, start, stop)
            tmp = shard_dir + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            with quiet_progress():  # the shard's own bar (table map, feature cache) covers it
                part.save_to_disk(tmp)
            os.replace(tmp, shard_dir)  # a shard exists only once fully written
