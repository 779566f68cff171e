"""Nothing silent (issue 12): ownership of work folders, teacher weights in the build key, every
source image and table row bound, stored data verified on load, values validated, 16-bit/float
images, errors that name the thing, locks, incomplete checkpoints, launch traps."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pytest
import torch
from conftest import HUB_SITE, make_clip, run_ok, torchrun_command
from PIL import Image

from fdbpl_hf import RILDataset, build_feature_cache, build_ril_table, load_ril_table, push_ril_table, ril_metadata
from fdbpl_hf.integrity import BuildLock, IntegrityError
from fdbpl_hf.testing.worlds import DIGIT_NAMES
from fdbpl_hf.ril.features import load_feature_cache
from fdbpl_hf.ril.regions import image_to_tensor
from fdbpl_hf.ril.table import attach_metadata
from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN as MEAN
from fdbpl_hf.ril.teachers import OPENAI_CLIP_STD as STD

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M, K = 3, 4


class Pooled(torch.nn.Module):
    """A tiny module teacher: pooled pixels -> 10 logits (its weights are fingerprinted)."""

    def __init__(self, seed: int):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 4 * 4, 10)
        generator = torch.Generator().manual_seed(seed)
        torch.nn.init.normal_(self.proj.weight, generator=generator)
        torch.nn.init.normal_(self.proj.bias, generator=generator)

    def forward(self, pixels):
        return 4 * self.proj(torch.nn.functional.adaptive_avg_pool2d(pixels, 4).flatten(1))


def build(ds, out=None, teacher=None, **kw):
    kw = {"num_regions": M, "top_k": K, "teacher_input_size": 16, "output_dir": None if out is None else str(out),
          **kw}
    return build_ril_table(ds, teacher if teacher is not None else Pooled(0), **kw)


def replay(ds, table, **kw):
    return RILDataset(ds, table, image_mean=MEAN, image_std=STD, **kw)


@pytest.fixture(scope="module")
def table_dir(digits_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("integrity") / "table"
    build(digits_small, out)
    return out


def _copy(table_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(table_dir, dst)
    return dst


def _edit_metadata(folder, edit):
    path = folder / "ril_metadata.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


# ---- 1. data loss -------------------------------------------------------------------------------
def test_a_work_folder_we_did_not_create_is_refused_and_kept(digits_small, tmp_path):
    mine = tmp_path / "t.incomplete"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="did not create"):
        build(digits_small, tmp_path / "t")
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert not (tmp_path / "t").exists()


def test_assembly_removes_only_what_the_build_wrote(digits_small, tmp_path, monkeypatch):
    import fdbpl_hf.ril.sharding as sharding

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # killed after the shards, before assembly

    monkeypatch.setattr(sharding, "assemble", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(digits_small, tmp_path / "t", shard_size=16)
    work = tmp_path / "t.incomplete"
    assert (work / ".fdbpl_hf-owner.json").is_file()
    (work / "notes.txt").write_text("a user's file put there meanwhile")
    monkeypatch.undo()
    table = build(digits_small, tmp_path / "t", shard_size=16)
    assert len(table) == 30 * M
    assert sorted(os.listdir(work)) == ["notes.txt"]  # the shards went, the user's file stayed


def test_a_build_killed_after_its_assembly_leaves_no_second_copy(digits_small, tmp_path, monkeypatch):
    """The table is renamed into place, then the work folder removed: a kill in between left the shards
    (a second copy of the table) beside it for good, as every later call returned the finished table."""
    import fdbpl_hf.ril.sharding as sharding

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sharding, "remove_owned", killed)
    with pytest.raises(KeyboardInterrupt):
        build(digits_small, tmp_path / "t", shard_size=16)
    monkeypatch.undo()
    work = tmp_path / "t.incomplete"
    assert (work / "shard-00000").is_dir() and (tmp_path / "t").is_dir()
    (tmp_path / "other.incomplete").mkdir()  # not this build's: never touched
    assert len(build(digits_small, tmp_path / "t", shard_size=16)) == 30 * M
    assert not work.exists() and (tmp_path / "other.incomplete").is_dir()


def test_a_feature_cache_work_folder_we_did_not_create_is_refused(digits_small, table_dir, tokenizer, tmp_path):
    from fdbpl_hf import FDBPLConfig, get_fdbpl_model

    model = get_fdbpl_model(make_clip("tiny", seed=2, image_size=16), FDBPLConfig(), tokenizer)
    data = replay(digits_small, load_ril_table(str(table_dir)))
    (tmp_path / "c.incomplete").mkdir()
    (tmp_path / "c.incomplete" / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="did not create"):
        build_feature_cache(data, model, epochs=1, output_dir=str(tmp_path / "c"), progress=False)
    assert (tmp_path / "c.incomplete" / "mine.txt").read_text() == "x"


# ---- 2. the build key binds the teacher's weights -----------------------------------------------
def test_default_folder_keys_on_the_teachers_weights(digits_small, tokenizer):
    a = build_ril_table(digits_small, make_clip("tiny", seed=1), teacher_tokenizer=tokenizer, num_regions=2, top_k=3)
    b = build_ril_table(digits_small, make_clip("tiny", seed=5), teacher_tokenizer=tokenizer, num_regions=2, top_k=3)
    ma, mb = ril_metadata(a), ril_metadata(b)
    assert ma["teacher"]["name"] == mb["teacher"]["name"]  # two unnamed CLIPModels of one shape
    assert ma["build_key"] != mb["build_key"] and ma["teacher"]["weights"] != mb["teacher"]["weights"]
    assert not np.array_equal(a.with_format("numpy")["topk_logits"], b.with_format("numpy")["topk_logits"])
    c = build(digits_small, None, Pooled(0))
    d = build(digits_small, None, Pooled(1))  # module callables: fingerprinted too
    assert ril_metadata(c)["build_key"] != ril_metadata(d)["build_key"]
    with pytest.raises(ValueError, match="cannot fingerprint"):
        build(digits_small, None, lambda x: torch.zeros(len(x), 10))
    assert len(build(digits_small, None, lambda x: torch.zeros(len(x), 10), teacher_revision="zeros-v1")) == 30 * M


def test_a_resumed_build_with_another_teacher_is_refused(digits_small, tmp_path, monkeypatch):
    import fdbpl_hf.ril.sharding as sharding

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sharding, "assemble", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(digits_small, tmp_path / "t", Pooled(0))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="interrupted build with other settings"):
        build(digits_small, tmp_path / "t", Pooled(1))


# ---- 3. every image and every row is bound --------------------------------------------------------
def test_every_source_row_is_bound(digits_small, table_dir):
    table = load_ril_table(str(table_dir))
    order = list(range(30))
    order[2], order[4] = order[4], order[2]  # rows the 0.3 fingerprint never sampled
    with pytest.raises(ValueError, match="row 2 \\(holds the table's image 4: reordered\\)"):
        replay(digits_small.select(order), table)
    with pytest.raises(ValueError, match="table 30 vs dataset 15"):
        replay(digits_small.select(range(15)), table)
    replaced = datasets.concatenate_datasets([digits_small.select(range(6)), digits_small.select([20]),
                                              digits_small.select(range(7, 30))])
    replaced = replaced.cast_column("label", digits_small.features["label"])
    labels = list(digits_small["label"])
    if labels[20] == labels[6]:
        pytest.skip("same label")
    with pytest.raises(ValueError, match="row 6 \\(holds the table's image 20"):
        replay(replaced, table)
    with pytest.raises(ValueError, match="shuffled, subset or edited"):
        replay(digits_small.shuffle(seed=0), table)
    replay(digits_small, table)[0]  # the right dataset passes


def test_a_reordered_or_cut_table_is_refused(digits_small, table_dir):
    table = load_ril_table(str(table_dir))
    with pytest.raises(IntegrityError, match="rows 0-89 differ"):
        replay(digits_small, attach_metadata(table.shuffle(seed=0, keep_in_memory=True), ril_metadata(table)))
    with pytest.raises(IntegrityError, match="rows were added or removed|differ"):
        replay(digits_small, attach_metadata(table.select(range(45), keep_in_memory=True), ril_metadata(table)))


# ---- 4. what is stored is verified --------------------------------------------------------------
def test_corrupted_arrow_bytes_are_refused(table_dir, tmp_path):
    folder = _copy(table_dir, tmp_path)
    arrow = next((folder / "data").glob("data-*.arrow"))
    raw = bytearray(arrow.read_bytes())
    logits = np.asarray(load_ril_table(str(folder)).with_format("numpy")[:]["topk_logits"], np.float16).tobytes()
    raw[raw.find(logits[:16]) + 5] ^= 0x40  # one flipped bit in the stored log-probabilities
    arrow.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="rows 0-89 differ from what was written"):
        load_ril_table(str(folder))
    assert len(load_ril_table(str(folder), verify=False)) == 90  # the documented opt-out
    arrow.write_bytes(bytes(raw[:200]))  # truncated: Arrow cannot even open it
    with pytest.raises(ValueError, match="data-00000-of-00001.arrow.*cannot be read"):
        load_ril_table(str(folder))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["class_names"].reverse(), "edited after the build"),
    (lambda m: m["teacher"].update(name="openai/clip-vit-large-patch14"), "edited after the build"),
    (lambda m: m.update(build_key="0" * 16), "edited after the build"),
    (lambda m: m.update(stats={"num_rows": 1}), "metadata digest"),
    (lambda m: m.pop("seed"), "lacks the key\\(s\\) seed"),
    (lambda m: m["source"].pop("fingerprint"), "lacks the key\\(s\\) source.fingerprint"),
])
def test_edited_metadata_is_refused(table_dir, tmp_path, edit, message):
    folder = _copy(table_dir, tmp_path)
    _edit_metadata(folder, edit)
    with pytest.raises(ValueError, match=message):
        load_ril_table(str(folder))


def test_invalid_metadata_json_names_the_file(table_dir, tmp_path):
    folder = _copy(table_dir, tmp_path)
    (folder / "ril_metadata.json").write_text('{"format": ')
    with pytest.raises(ValueError, match="ril_metadata.json is not valid JSON"):
        load_ril_table(str(folder))


def _with_value(table, row, column, value):
    def edit(item, index):
        if index == row:
            item[column] = value(item[column])
        return item

    return attach_metadata(table.map(edit, with_indices=True, keep_in_memory=True), ril_metadata(table))


@pytest.mark.parametrize("column, value, message", [
    ("topk_logits", lambda v: [0.5] + v[1:], "log-probability 0.5 > 0 \\(row 7: image 2, region 1\\)"),
    ("topk_indices", lambda v: [v[1]] + v[1:], "repeats a class id within one region.*row 7: image 2"),
    ("topk_indices", lambda v: [12] + v[1:], "class ids .* outside 0-9 \\(row 7: image 2"),
])
def test_impossible_values_are_refused_with_their_row(digits_small, table_dir, column, value, message):
    table = load_ril_table(str(table_dir))
    bad = _with_value(table, 7, column, value)
    data = replay(digits_small, bad, verify=False)  # even unverified, values are checked when read
    region = 7 % M
    epoch = next(e for e in range(M) if data.region_for(2, e) == region)
    data.set_epoch(epoch)
    with pytest.raises(ValueError, match=message):
        data.__getitems__([2])
    with pytest.raises(IntegrityError):  # and the content digests catch the edit when verifying
        replay(digits_small, bad)


def test_a_feature_cache_with_two_rows_swapped_does_not_train(digits_small, table_dir, tokenizer, tmp_path):
    from fdbpl_hf import FDBPLConfig, get_fdbpl_model

    model = get_fdbpl_model(make_clip("tiny", seed=2, image_size=16), FDBPLConfig(), tokenizer)
    table = load_ril_table(str(table_dir))
    data = replay(digits_small, table)
    cache = build_feature_cache(data, model, epochs=1, output_dir=str(tmp_path / "c"), progress=False)
    order = list(range(len(cache)))
    order[3], order[4] = order[4], order[3]
    swapped = cache.select(order).flatten_indices()
    swapped.save_to_disk(str(tmp_path / "swapped"))
    shutil.rmtree(tmp_path / "c" / "data")
    shutil.move(str(tmp_path / "swapped"), str(tmp_path / "c" / "data"))
    with pytest.raises(IntegrityError, match="student-feature cache .*rows 0-29 differ"):
        load_feature_cache(str(tmp_path / "c"))
    with pytest.raises(IntegrityError, match="student-feature cache"):
        replay(digits_small, table, feature_cache=attach_metadata(swapped, json.loads(cache.info.description)))


# ---- 5. images ------------------------------------------------------------------------------------
def test_sixteen_bit_and_float_images_are_scaled_or_refused(tmp_path):
    from fdbpl_hf.ril.regions import rgb_array

    gradient = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    sixteen = Image.fromarray(gradient)
    assert sixteen.mode == "I;16"
    pixels = image_to_tensor(sixteen)
    assert (pixels == 255).float().mean() < 0.05  # 0.3: 99.6% white
    np.testing.assert_allclose(pixels[0, 0].numpy(), np.rint(gradient[0] / 257), atol=0)
    as_png = Image.open(io.BytesIO(_png(sixteen)))  # what a 16-bit PNG decodes to
    np.testing.assert_array_equal(image_to_tensor(as_png).numpy(), pixels.numpy())
    wide = Image.fromarray(gradient.astype(np.int32))
    np.testing.assert_array_equal(image_to_tensor(wide).numpy(), pixels.numpy())
    floats = Image.fromarray(np.tile(np.linspace(0, 1, 64, dtype=np.float32), (8, 1)))
    assert 120 < float(image_to_tensor(floats).float().mean()) < 135  # 0.3: only 0 and 1
    with pytest.raises(ValueError, match="row 3 .*float image .*values in \\[1000, 1000\\]"):
        rgb_array(Image.fromarray(np.full((4, 4), 1000, np.float32)), "row 3 of the source dataset")
    with pytest.raises(ValueError, match="outside the 16-bit range"):
        rgb_array(Image.fromarray(np.full((4, 4), 70000, np.int32)))


def _png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _images(items, labels, names=("a", "b")):
    return datasets.Dataset.from_dict({"image": items, "label": labels}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))}))


def test_sixteen_bit_images_build_and_replay_alike(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (40, 1))
    ds = _images([{"bytes": _png(Image.fromarray(gradient)), "path": None}] * 2, [0, 1])
    seen = []

    def teacher(px):
        seen.append(px.clone())
        return torch.zeros(len(px), 2)

    build_ril_table(ds, teacher, teacher_input_size=16, num_regions=2, output_dir=str(tmp_path / "t"),
                    teacher_image_mean=(0, 0, 0), teacher_image_std=(1, 1, 1))
    assert float(seen[0].mean()) < 0.9  # not washed out to white
    item = RILDataset(ds, load_ril_table(str(tmp_path / "t")), image_mean=(0, 0, 0), image_std=(1, 1, 1))[0]
    assert float(item["pixel_values"].mean()) < 0.9


def test_a_missing_image_names_its_row(tmp_path):
    ds = _images([None, {"bytes": _png(Image.new("RGB", (8, 8))), "path": None}], [0, 1])
    with pytest.raises(ValueError, match="row 0 of the source dataset has no image"):
        build(ds, tmp_path / "t", top_k=2, teacher=lambda x: torch.zeros(len(x), 2))


# ---- 6. errors that name the thing ----------------------------------------------------------------
def test_errors_name_the_row_the_class_and_the_cause(digits_small, tokenizer, tmp_path):
    plain = digits_small.cast_column("label", datasets.Value("int64"))
    labels = list(plain["label"])
    labels[5] = 10
    bad_labels = plain.remove_columns("label").add_column("label", labels)
    with pytest.raises(ValueError, match="row 5 of the source dataset has label 10, outside the 10 classes"):
        build(bad_labels, tmp_path / "a", class_names=DIGIT_NAMES)
    long_names = list(DIGIT_NAMES)
    long_names[4] = " ".join(["four"] * 80)
    with pytest.raises(ValueError, match="of class 'four four.*' is 8\\d tokens long, more than the teacher's 77"):
        build_ril_table(digits_small, make_clip("tiny", seed=1), teacher_tokenizer=tokenizer, class_names=long_names,
                        num_regions=2, output_dir=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="the dataset is empty"):
        build(digits_small.select([]), tmp_path / "c")


def test_a_corrupted_parquet_on_the_hub_is_not_a_missing_repo(fake_hub, table_dir, tmp_path):
    from hub_server import _Blob

    name = push_ril_table(load_ril_table(str(table_dir)), "tester/broken-ril")
    repo = fake_hub.repos[("dataset", "tester/broken-ril")]
    _, files = repo.resolve("main")
    files = dict(files)
    parquet = next(p for p in files if p.endswith(".parquet"))
    files[parquet] = _Blob(b"PAR1 this is not parquet PAR1", lfs=files[parquet].lfs)
    repo.commit(files, "main")
    with pytest.raises(ValueError, match="tester/broken-ril exists, but its table .*could not be read"):
        load_ril_table("tester/broken-ril", name, cache_dir=str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="no Hub dataset repo tester/absent"):
        load_ril_table("tester/absent", cache_dir=str(tmp_path / "c"))


def test_the_offline_error_names_the_right_wheel():
    from fdbpl_hf.testing.worlds import _package_file

    with pytest.raises(ImportError, match="pip install --no-deps open-clip-torch"):
        from unittest import mock

        with mock.patch("importlib.util.find_spec", return_value=None):
            _package_file("open_clip", "x")


# ---- 7. concurrency and faults ---------------------------------------------------------------------
def test_a_second_build_into_the_same_folder_says_who_holds_it(digits_small, tmp_path):
    import socket

    lock = BuildLock(str(tmp_path / "t.lock"), "RIL table").acquire()  # another build, alive
    try:
        with pytest.raises(RuntimeError, match=f"process {os.getpid()} on host {socket.gethostname()} since"):
            build(digits_small, tmp_path / "t")
    finally:
        lock.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "t.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                 "time": "earlier"}))
    assert len(build(digits_small, tmp_path / "t")) == 30 * M  # a dead holder's lock is taken over
    assert not (tmp_path / "t.lock").exists()


def test_resume_skips_a_checkpoint_killed_while_being_written(digits_small, table_dir, tokenizer, tmp_path, caplog):
    from fdbpl_hf import FDBPLConfig, get_fdbpl_model
    from fdbpl_hf.trainer import CHECKPOINT_COMPLETE, FDBPLTrainer, FDBPLTrainingArguments

    def args(out):
        return FDBPLTrainingArguments(output_dir=str(out), num_train_epochs=2, per_device_train_batch_size=10,
                                      save_strategy="steps", save_steps=2, use_cpu=True, report_to="none",
                                      disable_tqdm=True, warmup_epochs=0, learning_rate=0.05, seed=3)

    table = load_ril_table(str(table_dir))
    model = get_fdbpl_model(make_clip("tiny", seed=2, image_size=16), FDBPLConfig(), tokenizer)
    FDBPLTrainer(model=model, args=args(tmp_path / "run"), train_dataset=replay(digits_small, table)).train()
    assert sorted(os.listdir(tmp_path / "run")) >= ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert (tmp_path / "run" / "checkpoint-6" / CHECKPOINT_COMPLETE).is_file()
    # a kill while checkpoint-6 was written: its trainer state is cut short, its marker not yet there
    (tmp_path / "run" / "checkpoint-6" / CHECKPOINT_COMPLETE).unlink()
    (tmp_path / "run" / "checkpoint-6" / "trainer_state.json").write_text('{"global_st')
    resumed = get_fdbpl_model(make_clip("tiny", seed=2, image_size=16), FDBPLConfig(), tokenizer)
    trainer = FDBPLTrainer(model=resumed, args=args(tmp_path / "run"), train_dataset=replay(digits_small, table))
    with caplog.at_level("WARNING"):
        trainer.train(resume_from_checkpoint=True)
    assert "skipping checkpoint" in caplog.text and "checkpoint-6" in caplog.text
    assert trainer.state.global_step == 6


def test_a_kill_right_after_the_checkpoint_rotation_leaves_a_complete_checkpoint(digits_small, table_dir, tokenizer,
                                                                                  tmp_path, monkeypatch):
    """save_total_limit=1: the Trainer removes the older checkpoint at the end of each save. Up to 0.7
    that came before the new one's completion marker, so a kill in between left nothing to resume."""
    import transformers.trainer
    import transformers.trainer_utils

    from fdbpl_hf import FDBPLConfig, get_fdbpl_model
    from fdbpl_hf.trainer import FDBPLTrainer, FDBPLTrainingArguments, last_complete_checkpoint

    class Killed(BaseException):
        pass

    real = transformers.trainer_utils.rotate_checkpoints

    def rotate_then_die(**kwargs):  # the process dies as soon as a rotation has removed a checkpoint
        before = set(os.listdir(kwargs["output_dir"]))
        real(**kwargs)
        if set(os.listdir(kwargs["output_dir"])) < before:
            raise Killed

    for module in (transformers.trainer, transformers.trainer_utils):
        monkeypatch.setattr(module, "rotate_checkpoints", rotate_then_die)
    run = tmp_path / "run"
    args = FDBPLTrainingArguments(output_dir=str(run), max_steps=4, per_device_train_batch_size=10,
                                  save_strategy="steps", save_steps=2, save_total_limit=1, use_cpu=True,
                                  report_to="none", disable_tqdm=True, warmup_epochs=0)
    model = get_fdbpl_model(make_clip("tiny", seed=2, image_size=16), FDBPLConfig(), tokenizer)
    trainer = FDBPLTrainer(model=model, args=args, train_dataset=replay(digits_small, load_ril_table(str(table_dir))))
    with pytest.raises(Killed):
        trainer.train()
    assert sorted(os.listdir(run)) == ["checkpoint-4"]  # the rotation ran: checkpoint-2 is gone
    assert last_complete_checkpoint(str(run)) == str(run / "checkpoint-4")


# ---- 8. launch traps ----------------------------------------------------------------------------------
_WORLD = textwrap.dedent("""
    import os, sys, torch
    from fdbpl_hf.trainer import FDBPLTrainingArguments
    args = FDBPLTrainingArguments(output_dir=sys.argv[1], report_to="none")
    total = torch.tensor([1.0])
    torch.distributed.all_reduce(total)  # a real collective: both processes in one group
    # One file per rank: the launcher interleaves the processes' stdout without line boundaries.
    os.makedirs(sys.argv[1], exist_ok=True)
    with open(os.path.join(sys.argv[1], f"rank{args.process_index}.txt"), "w") as f:
        f.write(f"rank {args.process_index} world_size {args.world_size} all_reduce {int(total)}")
    # leave the group before exiting: torch tears a live gloo group down at interpreter exit, and
    # on a loaded machine one rank then died with "terminate called without an active exception"
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
""")


def _rank_reports(folder) -> list:
    return sorted(p.read_text() for p in folder.glob("rank*.txt"))


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_shipped_two_process_config_runs_two_processes(tmp_path):
    script = tmp_path / "world.py"
    script.write_text(_WORLD)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO, HUB_SITE]))
    config = os.path.join(REPO, "examples", "accelerate_configs", "multi_cpu_2proc.yaml")
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    run_ok([launcher, "launch", "--config_file", config, "--main_process_port", _free_port(), str(script),
            str(tmp_path / "o")], env=env, timeout=300)
    assert _rank_reports(tmp_path / "o") == [
        "rank 0 world_size 2 all_reduce 2", "rank 1 world_size 2 all_reduce 2"]


def test_torchrun_on_cpu_without_use_cpu_is_one_training(tmp_path):
    script = tmp_path / "world.py"
    script.write_text(_WORLD)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO, HUB_SITE]))
    run_ok(torchrun_command(str(script), str(tmp_path / "o")), env=env, timeout=300)
    # 0.3: two trainings of world size 1
    assert _rank_reports(tmp_path / "o") == ["rank 0 world_size 2 all_reduce 2", "rank 1 world_size 2 all_reduce 2"]


def test_home_folder_is_expanded(digits_small, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    table = build(digits_small, "~/tables/t")
    assert (tmp_path / "home" / "tables" / "t" / "ril_metadata.json").is_file()
    assert not (tmp_path / "~").exists()
    assert len(load_ril_table("~/tables/t")) == len(table)


def test_labels_that_are_not_class_ids_name_their_row(tmp_path):
    """Text labels (a CSV's "cat"), fractional or list labels: the build failed with int()'s bare message
    (text, lists), or truncated 1.5 to class 1 silently."""
    png = {"bytes": _png(Image.new("RGB", (8, 8))), "path": None}
    for labels, shown in ((["cat", "dog"], "'cat'"), ([0.0, 1.5], "1.5"), ([[0], [1]], "[0]")):
        ds = datasets.Dataset.from_dict({"image": [png, png], "label": labels}).cast_column("image", datasets.Image())
        row = 1 if shown == "1.5" else 0
        with pytest.raises(ValueError, match=rf"row {row} of the source dataset has label {re.escape(shown)} \(column "
                                             r"'label'\), not a class id: labels must be integers 0-9"):
            build(ds, tmp_path / "t", class_names=DIGIT_NAMES)
