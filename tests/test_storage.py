"""Identity, storage and errors (issue 21): teachers and students are identified by ALL their
weights, a table never replays under another table's metadata, build outputs behind symbolic links,
atomic JSON, locks left by an earlier process with our pid, and datasets with a format or transform."""

import json
import os
import socket
import subprocess
import sys

import datasets
import pytest
import torch
from conftest import make_clip

from fdbpl_hf import (CallableTeacher, EnsembleTeacher, FDBPLConfig, RILDataset, build_feature_cache, build_ril_table,
                      get_fdbpl_model, load_ril_table, ril_metadata)
from fdbpl_hf.files import atomic_write
from fdbpl_hf.integrity import (BuildLock, IntegrityError, boot_id, process_start_time, sampled_tensor_fingerprint,
                                tensor_digest, tensor_fingerprint)
from fdbpl_hf.ril.features import check_feature_cache, feature_cache_metadata, weights_fingerprint
from fdbpl_hf.ril.feature_cache import CACHE_METADATA_FILE, content_key
from fdbpl_hf.integrity import metadata_digest
from fdbpl_hf.ril.sharding import BUILD_FILE
from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN as MEAN
from fdbpl_hf.ril.teachers import OPENAI_CLIP_STD as STD
from fdbpl_hf.testing.worlds import DIGIT_NAMES

M, K = 2, 3


class Wide(torch.nn.Module):
    """A module teacher with a 9,600-value weight: 0.6's fingerprint sampled every second value."""

    def __init__(self, nudge: float = 0.0):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 4 * 4, 200)
        generator = torch.Generator().manual_seed(0)
        torch.nn.init.normal_(self.proj.weight, generator=generator)
        torch.nn.init.zeros_(self.proj.bias)
        with torch.no_grad():
            self.proj.weight.view(-1)[1] += nudge  # outside 0.6's sample; it moves class 0's logit

    def forward(self, pixels):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(pixels, 4).flatten(1))[:, :10]


def build(ds, teacher=None, out=None, **kw):
    kw = {"num_regions": M, "top_k": K, "teacher_input_size": 16, **kw}
    return build_ril_table(ds, Wide() if teacher is None else teacher, output_dir=None if out is None else str(out),
                           **kw)


def replay(ds, table, **kw):
    return RILDataset(ds, table, image_mean=MEAN, image_std=STD, **kw)


@pytest.fixture(scope="module")
def table(digits_small, tmp_path_factory):
    return build(digits_small, out=tmp_path_factory.mktemp("storage") / "t")


# ---- identity by all the weights ------------------------------------------------------------------
def test_teachers_that_differ_outside_the_old_sample_get_two_tables(digits_small):
    a, b = Wide(), Wide(nudge=3.0)
    assert sampled_tensor_fingerprint({"fn": a}) == sampled_tensor_fingerprint({"fn": b})  # 0.6 shared one table
    assert tensor_fingerprint({"fn": a}) != tensor_fingerprint({"fn": b})
    first, second = build(digits_small, a), build(digits_small, b)  # default folders, named by the build key
    key = [ril_metadata(t)["build_key"] for t in (first, second)]
    assert key[0] != key[1] and first.cache_files[0]["filename"] != second.cache_files[0]["filename"]
    assert list(first["topk_logits"]) != list(second["topk_logits"])


def test_the_weights_digest_reads_every_byte_in_chunks(tokenizer):
    weight = torch.randn(1000, 7)
    whole = tensor_digest(weight)
    assert tensor_digest(weight, chunk_bytes=13) == whole  # the chunked path, as accelerators stream
    assert tensor_digest(weight.t().contiguous().t()) == whole  # the values, not the memory layout
    assert tensor_digest(weight.to(torch.bfloat16)) != tensor_digest(weight.to(torch.float16))
    a, b = make_clip("small"), make_clip("small")
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():  # 16,384 values: 0.6 sampled every fourth
        b.vision_model.encoder.layers[0].mlp.fc1.weight.view(-1)[1] += 1e-3  # one value, outside 0.6's sample
    assert sampled_tensor_fingerprint({"v": b.vision_model}) == sampled_tensor_fingerprint({"v": a.vision_model})
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert tensor_fingerprint({"clip": a}, threads=2) == tensor_fingerprint({"clip": a})


def test_a_feature_cache_of_0_6_keeps_working(digits_small, table, tokenizer, tmp_path):
    student = get_fdbpl_model(make_clip("tiny", seed=2, image_size=16), FDBPLConfig(), tokenizer)
    data = replay(digits_small, table)
    cache = build_feature_cache(data, student, epochs=1, output_dir=str(tmp_path / "c"), progress=False)
    assert feature_cache_metadata(cache)["student"]["weights"].startswith("sha256:")
    # the cache as 0.6 wrote it: the sampled fingerprint, under its build key and digest
    path = tmp_path / "c" / CACHE_METADATA_FILE
    meta = json.loads(path.read_text())
    meta["student"]["weights"] = sampled_tensor_fingerprint({"vision_model": student.clip.vision_model,
                                                            "visual_projection": student.clip.visual_projection})
    content = {k: v for k, v in meta.items() if k not in ("build_key", "library_version", "complete", "stats",
                                                         "integrity", "metadata_digest")}
    content["student"] = {k: v for k, v in content["student"].items() if k != "name"}
    meta["build_key"] = content_key(content)
    meta["metadata_digest"] = metadata_digest(meta)
    path.write_text(json.dumps(meta))
    from fdbpl_hf import load_feature_cache

    old = data.with_feature_cache(load_feature_cache(str(tmp_path / "c")))
    check_feature_cache(old, student)  # compared by the sampled scheme it was made with
    other = get_fdbpl_model(make_clip("tiny", seed=3, image_size=16), FDBPLConfig(), tokenizer)
    with pytest.raises(ValueError, match="student weights: the cache was built with another checkpoint"):
        check_feature_cache(old, other)


def test_a_table_of_0_6_still_loads_and_a_rebuild_into_its_folder_says_why_it_differs(digits_small, table, tmp_path):
    import shutil

    from fdbpl_hf.ril.table import build_key

    old = tmp_path / "old"
    shutil.copytree(table.cache_files[0]["filename"].rsplit("/data/", 1)[0], old)
    meta = json.loads((old / "ril_metadata.json").read_text())
    meta["teacher"]["weights"] = sampled_tensor_fingerprint({"fn": Wide()})  # the key 0.6 made
    meta["build_key"] = build_key(meta)
    meta["metadata_digest"] = metadata_digest(meta)
    (old / "ril_metadata.json").write_text(json.dumps(meta))
    assert len(replay(digits_small, load_ril_table(str(old)))) == 30  # loads and replays as it is
    with pytest.raises(ValueError, match="differs in teacher.weights.*sampled weights fingerprint"):
        build(digits_small, out=old)


def test_an_ensemble_of_plain_functions_needs_an_output_dir(digits_small):
    def member(seed):
        weights = torch.randn(3 * 4 * 4, 10, generator=torch.Generator().manual_seed(seed))
        return CallableTeacher(lambda px: torch.nn.functional.adaptive_avg_pool2d(px, 4).flatten(1) @ weights, 10, 16)

    # 0.6 keyed it by the mixing weights alone: two such ensembles shared one default folder
    with pytest.raises(ValueError, match="is \\(or holds\\) a callable whose weights fdbpl_hf cannot fingerprint"):
        build(digits_small, EnsembleTeacher([member(0), member(1)]))


# ---- a table and its metadata travel together ------------------------------------------------------
def test_metadata_of_another_table_is_refused(digits_small, table, tmp_path):
    other = build(digits_small, out=tmp_path / "seed5", seed=5)
    for verify in (True, False):
        with pytest.raises(ValueError, match="metadata= given with the RIL table belongs to another table \\(seed\\)"):
            replay(digits_small, table, metadata=ril_metadata(other), verify=verify)
    replay(digits_small, table, metadata=ril_metadata(table))  # its own: fine
    rows_only = datasets.Dataset(table.data)  # rows without metadata (e.g. load_dataset of a pushed table)
    with pytest.raises(IntegrityError, match="rows 0-59 differ"):
        replay(digits_small, rows_only, metadata=ril_metadata(other))


# ---- output folders behind symbolic links ------------------------------------------------------------
def test_an_output_dir_linked_to_an_empty_or_missing_folder_is_built_through(digits_small, tmp_path):
    (tmp_path / "empty").mkdir()
    for target in ("empty", "missing"):
        link = tmp_path / f"to_{target}"
        link.symlink_to(tmp_path / target)
        built = build(digits_small, out=link)  # 0.6: the whole build, then NotADirectoryError
        assert len(built) == 30 * M and link.is_symlink() and len(load_ril_table(str(link))) == 30 * M
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(ValueError, match="symbolic link that cannot be resolved"):
        build(digits_small, out=loop)


# ---- atomic JSON --------------------------------------------------------------------------------------
def test_json_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "build.json"
    atomic_write(path, '{"old": 1}')

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, '{"new": 2}')
    assert path.read_text() == '{"old": 1}' and os.listdir(tmp_path) == ["build.json"]


def test_a_half_written_build_json_names_the_file_and_what_to_do(digits_small, tmp_path, monkeypatch):
    from fdbpl_hf.ril import sharding

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # a build stopped after its settings were written
    monkeypatch.setattr(sharding.ShardedBuild, "_build_mine", killed)
    with pytest.raises(KeyboardInterrupt):
        build(digits_small, out=tmp_path / "t")
    monkeypatch.undo()
    work = tmp_path / "t.incomplete"
    (work / BUILD_FILE).write_text('{"build_key": "ab')  # as 0.6 left it after a full disk
    with pytest.raises(ValueError, match=f"{BUILD_FILE} is not valid JSON .*delete {work} to start the build over"):
        build(digits_small, out=tmp_path / "t")


# ---- locks ----------------------------------------------------------------------------------------------
def _lock(path, **fields):
    record = {"pid": os.getpid(), "host": socket.gethostname(), "time": "earlier", **fields}
    path.write_text(json.dumps(record))


def test_a_stale_lock_with_our_own_pid_is_taken_over(tmp_path, caplog):
    path = tmp_path / "t.lock"
    me = process_start_time(os.getpid())
    cases = {
        "which this process never took": {},  # 0.6's record: our pid, from before a container restart
        "now belongs to another process": {"start_time": me + 1, "boot_id": boot_id()},  # a reused pid: ours
        "before this machine last booted": {"start_time": me, "boot_id": "another-boot"},
    }
    for reason, fields in cases.items():
        _lock(path, **fields)
        with caplog.at_level("WARNING"):
            lock = BuildLock(str(path), "RIL table").acquire()  # 0.6: refused, forever
        assert reason in caplog.text
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid() and record["start_time"] == me and record["boot_id"] == boot_id()
        lock.release()
        caplog.clear()
    # a live process with its own start time holds it: refused
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _lock(path, pid=child.pid, start_time=process_start_time(child.pid), boot_id=boot_id())
        with pytest.raises(RuntimeError, match=f"process {child.pid} on host"):
            BuildLock(str(path), "RIL table").acquire()
    finally:
        child.kill()
        child.wait()
    assert BuildLock(str(path), "RIL table").acquire().held  # and once it is gone, taken over


# ---- datasets with a format or a transform -------------------------------------------------------------
def test_a_formatted_or_transformed_dataset_reads_its_stored_rows(digits_small, table, tmp_path):
    from fdbpl_hf.data import reorder_classes, subset_classes

    torch_rows = digits_small.with_format("torch")
    data = replay(torch_rows, table)  # 0.6: every row "an image the table was not built on"
    assert int(data[3]["labels"]) == digits_small[3]["label"]
    transformed = digits_small.with_transform(lambda batch: {"pixel_values": [0] * len(batch["label"])})
    with pytest.warns(UserWarning, match="the transform is not applied"):
        replay(transformed, table)
    again = build(torch_rows, out=tmp_path / "again")
    assert ril_metadata(again)["build_key"] == ril_metadata(table)["build_key"]
    subset = subset_classes(torch_rows, [2, 0])  # 0.6: 0 rows (tensor(2) in {2, 0} is False)
    assert len(subset) == 6 and subset.format["type"] == "torch"
    assert sorted(subset.with_format(None)["label"]) == [0, 0, 0, 1, 1, 1]
    reordered = reorder_classes(torch_rows, list(reversed(DIGIT_NAMES)))  # 0.6: KeyError: tensor(0)
    assert reordered.with_format(None)["label"] == [9 - y for y in digits_small["label"]]


def test_evaluation_reads_the_stored_images_of_a_formatted_dataset(digits_small, tokenizer):
    from fdbpl_hf.evaluation import ZeroShotCLIP, encode_images
    from fdbpl_hf.testing.worlds import image_processor_for

    clip = make_clip("tiny")
    model = ZeroShotCLIP(clip, tokenizer, "a photo of the digit {}.")
    kw = {"image_processor": image_processor_for(clip.config), "progress": False}
    plain = encode_images(model, digits_small, **kw)
    for formatted in (digits_small.with_format("torch"), digits_small.with_format("numpy")):
        got = encode_images(model, formatted, **kw)
        torch.testing.assert_close(got.features, plain.features, atol=0, rtol=0)  # same process, same kernels
        assert torch.equal(got.labels, plain.labels)
