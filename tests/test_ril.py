"""RIL tables: build, determinism, exact replay, resume after a kill, publishing, bad input."""

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
from conftest import HUB_SITE, make_clip, odd_images, run_ok, torchrun_command
from PIL import Image

from fdbpl_hf import (
    CallableTeacher, CLIPTeacher, EnsembleTeacher, RegionSpec, RILDataset, build_ril_table, dense_teacher_logits,
    load_ril_table, push_ril_table, ril_metadata,
)
from fdbpl_hf.testing.worlds import DIGIT_NAMES
from fdbpl_hf.ril.regions import RENDERERS
from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



M, K = 6, 4


def build(ds, teacher_clip, tokenizer, out, **kw):
    kw = {"num_regions": M, "top_k": K, "teacher_tokenizer": tokenizer, "output_dir": str(out), **kw}
    return build_ril_table(ds, teacher_clip, **kw)


def replay(ds, table, **kw):
    return RILDataset(ds, table, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, **kw)


def test_table_layout_and_metadata(digits_small, teacher_clip, tokenizer, tmp_path):
    table = build(digits_small, teacher_clip, tokenizer, tmp_path / "t", template="a photo of the digit {}.")
    assert len(table) == len(digits_small) * M
    f = table.features
    assert (f["box"].feature.dtype, f["box"].length) == ("uint16", 4)
    assert f["flip"].dtype == "bool"
    assert (f["topk_indices"].feature.dtype, f["topk_indices"].length) == ("int16", K)
    assert (f["topk_logits"].feature.dtype, f["topk_logits"].length) == ("float16", K)
    assert f["teacher_entropy"].dtype == "float16"
    meta = ril_metadata(table)
    assert meta["entropy_column"] == "teacher_entropy"
    assert meta["num_regions"] == M and meta["top_k"] == K and meta["seed"] == 0 and meta["fill"] == "mr"
    assert meta["class_names"] == DIGIT_NAMES
    assert meta["teacher"]["templates"] == ["a photo of the digit {}."]
    assert meta["teacher"]["logit_scale"] == pytest.approx(float(teacher_clip.logit_scale.exp()))
    assert meta["regions"]["output_size"] == 32 and meta["regions"]["scale"] == [0.08, 1.0]
    assert meta["source"]["num_rows"] == 30 and len(meta["source"]["fingerprint"]) == 32
    assert meta["library_version"] and meta["complete"]
    rows = table.with_format("numpy")[:]
    assert (rows["topk_logits"] <= 0).all()  # log-probabilities
    assert (np.diff(rows["topk_logits"].astype(np.float32), axis=1) <= 0).all()  # sorted top-K
    boxes = rows["box"].astype(np.float64) / 65535
    assert (boxes[:, 2] > 0).all() and (boxes[:, 0] + boxes[:, 2] <= 1 + 1e-4).all()
    assert 0 < rows["flip"].mean() < 1


def test_deterministic_and_cached(digits_small, teacher_clip, tokenizer, tmp_path):
    a = build(digits_small, teacher_clip, tokenizer, tmp_path / "a", shard_size=7)
    b = build(digits_small, teacher_clip, tokenizer, tmp_path / "b", shard_size=30, images_per_batch=3)
    assert a.data.equals(b.data)  # independent of sharding and batching
    c = build(digits_small, teacher_clip, tokenizer, tmp_path / "c", seed=1)
    assert not np.array_equal(a.with_format("numpy")["box"], c.with_format("numpy")["box"])
    again = build(digits_small, teacher_clip, tokenizer, tmp_path / "a", shard_size=7)
    assert again.data.equals(a.data)
    with pytest.raises(ValueError, match="other settings"):
        build(digits_small, teacher_clip, tokenizer, tmp_path / "a", seed=5)


def test_num_proc_gives_the_same_table(digits_small, teacher_clip, tokenizer, tmp_path):
    a = build(digits_small, teacher_clip, tokenizer, tmp_path / "a")
    b = build(digits_small, teacher_clip, tokenizer, tmp_path / "b", num_proc=2)
    assert a.data.equals(b.data)


@pytest.mark.numerics
@pytest.mark.parametrize("renderer", ["uint8", "float"])
def test_replay_reproduces_the_teacher(digits_small, teacher_clip, tokenizer, tmp_path, renderer):
    table = build(digits_small, teacher_clip, tokenizer, tmp_path / "t",
                  region_spec=RegionSpec(output_size=32, renderer=renderer))
    data = replay(digits_small, table, image_size=32, class_names=DIGIT_NAMES)
    assert data.spec.renderer == renderer
    teacher = CLIPTeacher(teacher_clip, tokenizer, DIGIT_NAMES)
    regions_seen = set()
    for epoch in range(3):
        data.set_epoch(epoch)
        for i in (0, 7, 29):
            item = data[i]
            regions_seen.add((i, int(item["region"])))
            with torch.no_grad():
                logp = torch.log_softmax(teacher(item["pixel_values"][None]), -1)[0]
            top = logp.topk(K)
            assert torch.equal(top.indices, item["topk_indices"])
            # stored as float16: relative rounding 2^-11
            torch.testing.assert_close(item["topk_logits"], top.values, rtol=2e-3, atol=1e-3)
            # the entropy of the FULL distribution over the 10 classes, not of the top-K
            full = -(logp.exp() * logp).sum()
            torch.testing.assert_close(item["teacher_entropy"], full, rtol=2e-3, atol=1e-3)
            top_only = torch.log_softmax(top.values, -1)
            assert float(full) > float(-(top_only.exp() * top_only).sum()) + 0.1  # K < C: they differ
            assert item["labels"] == digits_small[i]["label"]
    assert len(regions_seen) == 9  # a new region every epoch
    # the permutation visits every region once per M epochs
    assert sorted(data.region_for(5, e) for e in range(M)) == list(range(M))


def test_tables_without_the_entropy_column_load_with_a_warning(digits_small, teacher_clip, tokenizer, tmp_path):
    """A 0.3 table (no teacher_entropy column) still loads and replays, with a warning at K < C."""
    table = build(digits_small, teacher_clip, tokenizer, tmp_path / "t")
    old_dir = tmp_path / "old"
    shutil.copytree(tmp_path / "t", old_dir)
    old_rows = datasets.load_from_disk(str(old_dir / "data")).remove_columns("teacher_entropy")
    old_rows.save_to_disk(str(tmp_path / "old_data"))
    shutil.rmtree(old_dir / "data")
    shutil.move(str(tmp_path / "old_data"), str(old_dir / "data"))
    meta = json.loads((old_dir / "ril_metadata.json").read_text())
    for key in ("integrity", "metadata_digest"):  # 0.3 tables carry no content digests either
        meta.pop(key)
    (old_dir / "ril_metadata.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"no 'teacher_entropy' column.*top-4 rebuild.*no weight below 0\.398"):
        old = load_ril_table(str(old_dir))
    item = replay(digits_small, old)[3]
    assert "teacher_entropy" not in item
    assert torch.equal(item["topk_indices"], replay(digits_small, table)[3]["topk_indices"])


def test_corrupt_entropy_values_are_refused(digits_small, teacher_clip, tokenizer, tmp_path):
    table = build(digits_small, teacher_clip, tokenizer, tmp_path / "t")
    bad = table.map(lambda row, i: {"teacher_entropy": 9.0 if i == 2 * M + 1 else row["teacher_entropy"]},
                    with_indices=True, features=table.features)
    data = replay(digits_small, bad, verify=False)  # verified, the content digests refuse it up front
    data.set_epoch(next(e for e in range(M) if data.region_for(2, e) == 1))
    with pytest.raises(ValueError, match=r"teacher entropy 9.0 .*image 2, region 1.*outside \[0, log C"):
        data.__getitems__([0, 1, 2, 3])


def test_clip_teacher_refuses_identical_prompts_and_another_tokenizer(teacher_clip, tokenizer):
    """The teacher labels every region of a table: two classes with the same prompt under every template
    split their soft labels evenly, and a tokenizer with another EOS gave every class one feature (a
    uniform teacher), each silently, into a table that is then trusted."""
    from transformers import CLIPTokenizer

    from fdbpl_hf.testing.worlds import _clip_vocab_and_merges

    with pytest.raises(ValueError, match=r"classes 0 \('cat'\) and 2 \('Cat '\) give the same prompt tokens"):
        CLIPTeacher(teacher_clip, tokenizer, ["cat", "dog", "Cat "], templates=["a photo of a {}.", "a {}."])
    CLIPTeacher(teacher_clip, tokenizer, ["cat", "dog", "bird"], templates=["a photo of a {}.", "a {}."])
    vocab, merges = _clip_vocab_and_merges()
    other = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), unk_token="<|endoftext|>",
                          bos_token="<|startoftext|>", eos_token="!", pad_token="!")
    with pytest.raises(ValueError, match="pass the model's own tokenizer"):
        CLIPTeacher(teacher_clip, other, ["cat", "dog"])


@pytest.mark.numerics
def test_dense_teacher_logits():
    idx = torch.tensor([[2, 0], [1, 3]])
    val = torch.tensor([[-0.1, -2.5], [-0.3, -1.0]])
    out = dense_teacher_logits(idx, val, 4)
    expected = torch.tensor([[-2.5, -12.5, -0.1, -12.5], [-11.0, -0.3, -11.0, -1.0]])
    torch.testing.assert_close(out, expected)
    logits = torch.randn(3, 5)
    top = torch.log_softmax(logits, -1).topk(5)
    dense = dense_teacher_logits(top.indices, top.values, 5, fill="dense")
    torch.testing.assert_close(dense.softmax(-1), logits.softmax(-1))
    # a dense row that repeats a class leaves another unset: NaN, which the loss then shows
    repeated = dense_teacher_logits(torch.tensor([[0, 0, 1]]), torch.tensor([[-0.5, -0.5, -1.0]]), 3, fill="dense")
    assert repeated[0, :2].isfinite().all() and repeated[0, 2].isnan()
    with pytest.raises(ValueError, match="K = C"):
        dense_teacher_logits(idx, val, 4, fill="dense")
    with pytest.raises(ValueError, match="exceeds"):
        dense_teacher_logits(idx, val, 1)


def test_table_refuses_the_wrong_partner(digits_small, teacher_clip, tokenizer, tmp_path):
    table = build(digits_small, teacher_clip, tokenizer, tmp_path / "t")
    other = digits_small.select(list(range(29, -1, -1)))  # same rows, other order
    # every image is bound (0.3 sampled 16 rows and said "fingerprint"): the error names the rows
    with pytest.raises(ValueError, match="source images: row 0 \\(holds the table's image 29: reordered\\)"):
        replay(other, table)
    with pytest.raises(ValueError, match="source rows: table 30 vs dataset 20"):
        replay(digits_small.select(range(20)), table)
    with pytest.raises(ValueError, match="class count: table 10 vs given 5"):
        replay(digits_small, table, class_names=DIGIT_NAMES[:5])
    renamed = list(DIGIT_NAMES)
    renamed[3] = "3"
    with pytest.raises(ValueError, match="class order: class 3 is 'three' in the table but '3' in class_names"):
        replay(digits_small, table, class_names=renamed)
    with pytest.raises(ValueError, match="table regions are 32px .* vs student 224px"):
        replay(digits_small, table, image_size=224)
    with pytest.raises(ValueError, match="no RIL metadata"):
        replay(digits_small, datasets.Dataset.from_dict({"box": [[0, 0, 1, 1]]}))


def _crash_script(out_dir: str, kill_at_row: int, calls_file: str) -> str:
    return textwrap.dedent(f"""
        import os, signal, sys, torch
        from fdbpl_hf import build_ril_table
        from fdbpl_hf.testing.worlds import load_digits
        ds = load_digits(num_per_class=3)
        def teacher(pixels):
            with open({calls_file!r}, "a") as f:
                f.write(f"{{len(pixels)}}\\n")
            torch.manual_seed(0)
            return pixels.mean(dim=(2, 3)) @ torch.arange(30.0).view(3, 10)
        kill_at = {kill_at_row}
        import fdbpl_hf.ril.build as b
        original = b.decode_image
        def guarded(cell, row, *args):  # the build decodes each image once, on a host thread
            if kill_at >= 0 and row >= kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # as a crash or an OOM-killer would
            return original(cell, row, *args)
        b.decode_image = guarded
        build_ril_table(ds, teacher, teacher_input_size=16, num_regions=4, top_k=3,
                        output_dir={out_dir!r}, shard_size=8, images_per_batch=4)
        print("DONE")
    """)


def test_killed_build_resumes_without_recomputing(tmp_path):
    out, calls = str(tmp_path / "table"), str(tmp_path / "calls.txt")
    script = tmp_path / "build.py"
    script.write_text(_crash_script(out, kill_at_row=20, calls_file=calls))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]
    assert not os.path.exists(out)  # nothing that loads as a table
    with pytest.raises(ValueError):
        load_ril_table(out)
    finished = sorted(d for d in os.listdir(out + ".incomplete") if d.startswith("shard-") and "tmp" not in d)
    assert finished == ["shard-00000", "shard-00001"]  # rows 0-15 done; 16-19 died with the process
    regions_before = sum(int(x) for x in open(calls).read().split())

    script.write_text(_crash_script(out, kill_at_row=-1, calls_file=calls))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "DONE" in run.stdout, run.stderr[-2000:]
    regions_after = sum(int(x) for x in open(calls).read().split()) - regions_before
    assert regions_after == (30 - 16) * 4  # only the unfinished shards ran again
    assert not os.path.exists(out + ".incomplete")

    clean_out = str(tmp_path / "clean")
    script.write_text(_crash_script(clean_out, kill_at_row=-1, calls_file=str(tmp_path / "c2.txt")))
    run_ok([sys.executable, str(script)], timeout=300)
    assert load_ril_table(out).data.equals(load_ril_table(clean_out).data)


def test_publish_round_trip(fake_hub, digits_small, teacher_clip, tokenizer, tmp_path):
    table = build(digits_small, teacher_clip, tokenizer, tmp_path / "t")
    table2 = build(digits_small, teacher_clip, tokenizer, tmp_path / "t2", num_regions=3, top_k=10)
    name = push_ril_table(table, "tester/digits-ril")
    name2 = push_ril_table(table2, "tester/digits-ril")
    assert name == f"clipmodel_k{K}_m{M}" and name2 == "clipmodel_k10_m3"
    assert sorted(datasets.get_dataset_config_names("tester/digits-ril")) == sorted([name, name2])
    rows = datasets.load_dataset("tester/digits-ril", name, split="train", cache_dir=str(tmp_path / "c1"))
    assert rows.features == table.features
    assert rows.data.table.select(table.column_names).equals(table.data.table)
    loaded = load_ril_table("tester/digits-ril", name2, cache_dir=str(tmp_path / "c2"))
    assert ril_metadata(loaded)["top_k"] == 10 and loaded.data.table.equals(table2.data.table)
    replay(digits_small, loaded, class_names=DIGIT_NAMES)[0]  # usable for training as is
    offline = run_ok([sys.executable, "-c", "from fdbpl_hf import load_ril_table; print(len(load_ril_table("
                      f"'tester/digits-ril', '{name2}', cache_dir={str(tmp_path / 'c2')!r})))"],
                     env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=os.pathsep.join([REPO, HUB_SITE])), timeout=300)
    assert offline.stdout.strip() == str(len(table2))  # the cached table loads without the network
    card = fake_hub.read_file("tester/digits-ril", "README.md", repo_type="dataset").decode()
    assert f"Config `{name}`" in card and f"Config `{name2}`" in card
    assert "| regions per image (M) | 6 |" in card and "| top-K | 4 |" in card
    assert "load_ril_table" in card and "hf_fake_token" not in card
    with pytest.raises(ValueError, match="has no table config 'nope': .*Available: \\['clipmodel"):
        load_ril_table("tester/digits-ril", "nope")
    with pytest.raises(FileNotFoundError, match="no folder .*tables/missing, and no Hub dataset repo"):
        load_ril_table("tables/missing")  # a relative folder that is not there, or a repo id
    push_ril_table(table, "tester/digits-ril")  # re-push: the section is replaced, not duplicated
    card = fake_hub.read_file("tester/digits-ril", "README.md", repo_type="dataset").decode()
    assert card.count(f"Config `{name}`") == 1


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_dataset(images, labels, names=("a", "b")):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def test_odd_images_are_converted(teacher_clip, tokenizer, tmp_path):
    images = odd_images()
    ds = image_dataset(images, [0, 1, 0, 1])
    table = build(ds, teacher_clip, tokenizer, tmp_path / "t", top_k=2)
    item = replay(ds, table)[2]
    assert item["pixel_values"].shape == (3, 32, 32) and torch.isfinite(item["pixel_values"]).all()


def test_bad_input_fails_clearly(teacher_clip, tokenizer, tmp_path, digits_small):
    good = _png(Image.new("RGB", (8, 8)))
    corrupt = image_dataset([{"bytes": good, "path": None}, {"bytes": b"not an image", "path": None}], [0, 1])
    with pytest.raises(ValueError, match="row 1 of the source dataset: the image cannot be decoded"):
        build(corrupt, teacher_clip, tokenizer, tmp_path / "a", top_k=2)
    truncated = image_dataset([{"bytes": good[: len(good) // 2], "path": None}], [0])
    with pytest.raises(ValueError, match="row 0 .* cannot be decoded"):
        build(truncated, teacher_clip, tokenizer, tmp_path / "b", top_k=2)
    with pytest.raises(ValueError, match="top_k must be between 1 and the number of classes \\(10\\), got 11"):
        build(digits_small, teacher_clip, tokenizer, tmp_path / "c", top_k=11)
    with pytest.raises(ValueError, match=re.escape("RILTableConfig.num_regions must be an integer >= 1, got 0")):
        build(digits_small, teacher_clip, tokenizer, tmp_path / "d", num_regions=0)
    plain = digits_small.cast_column("label", datasets.Value("int64"))
    with pytest.raises(ValueError, match="not a datasets.ClassLabel"):
        build(plain, teacher_clip, tokenizer, tmp_path / "e")
    table = build(plain, teacher_clip, tokenizer, tmp_path / "e2", class_names=DIGIT_NAMES)
    assert ril_metadata(table)["class_names"] == DIGIT_NAMES
    with pytest.raises(ValueError, match="column 'img' is not in the dataset"):
        build(digits_small, teacher_clip, tokenizer, tmp_path / "f", image_column="img")
    nan_teacher = CallableTeacher(lambda x: torch.full((len(x), 10), float("nan")), 10, 16)
    with pytest.raises(ValueError, match="NaN or inf logits on a region of source row 0"):
        build_ril_table(digits_small, nan_teacher, num_regions=2, output_dir=str(tmp_path / "g"))
    wrong = CallableTeacher(lambda x: torch.zeros(len(x), 7), 10, 16)
    with pytest.raises(ValueError, match="logits of shape \\(60, 7\\), expected \\(60, 10\\)"):
        build_ril_table(digits_small, wrong, num_regions=2, output_dir=str(tmp_path / "h"), images_per_batch=30)
    with pytest.raises(ValueError, match="teacher_input_size"):
        build_ril_table(digits_small, lambda x: x, output_dir=str(tmp_path / "i"))
    # the failed builds kept no shard that a resume could mistake for finished work
    assert not (tmp_path / "a.incomplete" / "shard-00000").exists()
    assert not (tmp_path / "b.incomplete" / "shard-00000").exists()


def test_output_dir_may_exist_empty_but_not_hold_other_files(digits_small, teacher_clip, tokenizer, tmp_path):
    empty = tmp_path / "made-by-mkdtemp"
    empty.mkdir()
    table = build(digits_small, teacher_clip, tokenizer, empty)
    assert len(table) == len(digits_small) * M and (empty / "ril_metadata.json").is_file()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists but is not an RIL table"):
        build(digits_small, teacher_clip, tokenizer, occupied)
    assert (occupied / "notes.txt").read_text() == "mine"  # nothing of the user's is touched


def test_module_teacher_runs_where_its_weights_are():
    from fdbpl_hf.ril.teachers import as_teacher

    with torch.device("meta"):  # stands in for a CUDA module: the teacher must not default to the CPU
        module = torch.nn.Linear(3, 10)
    assert as_teacher(module, DIGIT_NAMES, input_size=16).device == torch.device("meta")
    assert as_teacher(lambda x: x, DIGIT_NAMES, input_size=16).device == torch.device("cpu")


@pytest.mark.numerics
def test_ensemble_teacher_averages_distributions(digits_small, tokenizer, tmp_path):
    t1 = CLIPTeacher(make_clip("tiny", seed=1), tokenizer, DIGIT_NAMES)
    t2 = CLIPTeacher(make_clip("tiny", seed=2), tokenizer, DIGIT_NAMES)
    ensemble = EnsembleTeacher([t1, t2])
    pixels = torch.rand(3, 3, 32, 32)
    from fdbpl_hf.ril.regions import normalize

    norm = normalize(pixels, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    with torch.no_grad():
        expected = (t1(norm).softmax(-1) + t2(norm).softmax(-1)) / 2
        torch.testing.assert_close(ensemble(pixels).exp(), expected)
    table = build_ril_table(digits_small, ensemble, num_regions=2, top_k=3, output_dir=str(tmp_path / "e"))
    assert len(ril_metadata(table)["teacher"]["members"]) == 2


def test_examples_build_table_two_processes(fake_hub, tiny_checkpoints, tmp_path):
    """`examples/build_table.py` under torchrun: the teacher's own normalisation goes into the
    table, and only rank 0 publishes (one push, as many commits as a 1-process run makes)."""
    from transformers import CLIPImageProcessor

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_checkpoints["teacher"], teacher)
    processor = CLIPImageProcessor.from_pretrained(str(teacher))
    processor.image_mean, processor.image_std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    processor.save_pretrained(str(teacher))
    common = ["--teacher", str(teacher), "--dataset", "digits", "--num_shots", "2", "--classes", "all",
              "--num_regions", "2", "--top_k", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO, HUB_SITE]))
    run_ok(torchrun_command(os.path.join(REPO, "examples", "build_table.py"), *common, "--output_dir",
                            str(tmp_path / "two"), "--push_to_hub", "--hub_dataset_id", "tester/table2"), env=env, timeout=300)
    run_ok([sys.executable, os.path.join(REPO, "examples", "build_table.py"), *common,
            "--output_dir", str(tmp_path / "one"), "--push_to_hub", "--hub_dataset_id", "tester/table1"], env=env, timeout=300)
    meta = ril_metadata(load_ril_table(str(tmp_path / "two")))
    assert meta["teacher"]["image_mean"] == [0.5] * 3 and meta["teacher"]["image_std"] == [0.25] * 3
    one, two = fake_hub.repos[("dataset", "tester/table1")], fake_hub.repos[("dataset", "tester/table2")]
    assert len(two.commits) == len(one.commits) > 1


def test_two_process_build_equals_one_process(tmp_path):
    """Under torchrun (2 CPU processes, gloo) each rank builds every other shard; rank 0 assembles."""
    script = tmp_path / "build.py"
    script.write_text(textwrap.dedent("""
        import sys, torch
        from fdbpl_hf import build_ril_table
        from fdbpl_hf.testing.worlds import load_digits
        ds = load_digits(num_per_class=3)
        w = torch.randn(3 * 4 * 4, 10, generator=torch.Generator().manual_seed(0))
        def teacher(px):
            return torch.nn.functional.adaptive_avg_pool2d(px, 4).flatten(1) @ w
        build_ril_table(ds, teacher, teacher_input_size=16, num_regions=4, top_k=3, output_dir=sys.argv[1],
                        shard_size=4)
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run_ok(torchrun_command(str(script), str(tmp_path / "two")), env=env, timeout=300)
    run_ok([sys.executable, str(script), str(tmp_path / "one")], env=env, timeout=300)
    assert load_ril_table(str(tmp_path / "two")).data.equals(load_ril_table(str(tmp_path / "one")).data)

    # rank 0 refuses to resume a folder left by another build: both ranks stop with the reason,
    # rather than rank 1 waiting at a barrier until the process group times out
    (tmp_path / "clash.incomplete").mkdir()
    (tmp_path / "clash.incomplete" / "build.json").write_text('{"build_key": "other", "shard_size": 4}')
    proc = subprocess.run(torchrun_command(str(script), str(tmp_path / "clash")), capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode != 0
    assert "interrupted build with other settings" in proc.stderr
    assert "rank 0 failed, so this rank stops too" in proc.stderr

    # a rank failing on its own shards stops the others too, before assembling (no barrier wait)
    failing = tmp_path / "failing.py"
    failing.write_text(textwrap.dedent("""
        import os, sys
        from fdbpl_hf import build_ril_table
        from fdbpl_hf.testing.worlds import load_digits
        import torch
        def teacher(px):
            if os.environ["RANK"] == "1":
                raise RuntimeError("teacher exploded on rank 1")
            return torch.zeros(len(px), 10)
        build_ril_table(load_digits(num_per_class=3), teacher, teacher_input_size=16, num_regions=2, top_k=3,
                        output_dir=sys.argv[1], shard_size=4)
    """))
    proc = subprocess.run(torchrun_command(str(failing), str(tmp_path / "failing")), capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "teacher exploded on rank 1" in proc.stderr
    assert "rank 1 failed, so this rank stops too" in proc.stderr
    assert not (tmp_path / "failing").exists()  # nothing assembled from half the shards


def test_batched_items_equal_single_items(digits_small, teacher_clip, tokenizer, tmp_path):
    table = build(digits_small, teacher_clip, tokenizer, tmp_path / "t")
    data = replay(digits_small, table)
    data.set_epoch(4)
    batch = data.__getitems__([9, 2, 9, 17])
    for index, item in zip([9, 2, 9, 17], batch):
        single = data[index]
        assert item.keys() == single.keys()
        for key in item:
            assert torch.equal(item[key], single[key]), key
    # all epochs of one image at once (what feature caches build from) = each epoch's item
    epochs = data.render_epochs(9, M + 2)  # past M: the permutation wraps around
    assert data.replay_epochs == data.render_epochs  # the pre-0.5 name
    assert epochs["pixel_values"].shape == (M + 2, 3, 32, 32)
    for epoch in range(M + 2):
        data.set_epoch(epoch)
        assert torch.equal(epochs["pixel_values"][epoch], data[9]["pixel_values"])
        assert int(epochs["region"][epoch]) == int(data[9]["region"])


def test_resume_refuses_another_shard_size(tmp_path):
    from fdbpl_hf.ril.sharding import prepare_workdir

    meta = {"build_key": "abc", "shard_size": 8}
    prepare_workdir(str(tmp_path / "w"), meta)
    prepare_workdir(str(tmp_path / "w"), meta)  # same settings: resumes
    with pytest.raises(ValueError, match="shard_size=8"):
        prepare_workdir(str(tmp_path / "w"), dict(meta, shard_size=4))


def test_renderers():
    """uint8 (default) and float resize the same crop alike; 0.1 tables (no renderer field) replay
    with the float renderer they were built with; the uint8 renderer refuses what it cannot do."""
    from fdbpl_hf.ril.regions import render_region

    assert RegionSpec().renderer == "uint8"
    legacy = RegionSpec(output_size=32, renderer="float").to_dict()
    del legacy["renderer"]
    assert RegionSpec.from_dict(legacy).renderer == "float"
    assert RegionSpec.from_dict(RegionSpec(output_size=32).to_dict()).renderer == "uint8"
    # a smooth image, so both filters agree closely (they differ in kernel and rounding only)
    ramp = torch.linspace(0, 255, 64)
    image = torch.stack([ramp[None, :].expand(48, 64), ramp[:48, None].expand(48, 64),
                         torch.full((48, 64), 128.0)]).round().to(torch.uint8)
    box = np.array([0.1, 0.2, 0.6, 0.5]) * 65535
    for size in (16, 96):  # down- and upscaling
        fast = render_region(image, box, True, RegionSpec(output_size=size))
        slow = render_region(image, box, True, RegionSpec(output_size=size, renderer="float"))
        assert fast.shape == slow.shape == (3, size, size) and fast.dtype == torch.float32
        assert 0 <= fast.min() and fast.max() <= 1
        assert (fast - slow).abs().mean() < 2 / 255, (fast - slow).abs().mean()
    with pytest.raises(ValueError, match="renderer must be one of"):
        RegionSpec(renderer="pil")
    with pytest.raises(ValueError, match="antialiased filters only"):
        RegionSpec(antialias=False)
    RegionSpec(antialias=False, renderer="float")
    for renderer in RENDERERS:  # both resize with align_corners=False, which "nearest" refuses mid-build
        with pytest.raises(ValueError, match="RegionSpec.interpolation must be one of 'bilinear', 'bicubic'"):
            RegionSpec(interpolation="nearest", renderer=renderer)
    # numpy numbers are stored as the Python numbers of the same value (the spec goes into JSON metadata)
    spec = RegionSpec(output_size=np.int64(32), scale=(np.float32(0.08), np.float32(1.0)), flip_prob=np.float64(0.25))
    stored = json.loads(json.dumps(spec.to_dict()))
    assert stored["scale"] == [float(np.float32(0.08)), 1.0] and stored["output_size"] == 32
    assert RegionSpec.from_dict(stored) == spec and type(spec.flip_prob) is float and type(spec.output_size) is int


def test_table_config_is_stored_whole_and_keywords_still_work(digits_small, teacher_clip, tokenizer, tmp_path):
    """`build_ril_table(ds, teacher, RILTableConfig(...))` builds the same table as the keyword
    form; the metadata keeps the resolved config; keywords override the config; a typo is refused."""
    from fdbpl_hf import RILTableConfig

    config = RILTableConfig(num_regions=M, top_k=K, teacher_batch_size=7, shard_size=16)
    table = build_ril_table(digits_small, teacher_clip, config, teacher_tokenizer=tokenizer,
                            output_dir=str(tmp_path / "c"))
    meta = ril_metadata(table)
    stored = RILTableConfig.from_metadata(meta)
    assert stored == RILTableConfig(num_regions=M, top_k=K, teacher_batch_size=7, shard_size=16,
                                    template="a photo of a {}.", teacher_image_mean=list(OPENAI_CLIP_MEAN),
                                    teacher_image_std=list(OPENAI_CLIP_STD))
    by_keywords = build(digits_small, teacher_clip, tokenizer, tmp_path / "k", shard_size=16)
    assert ril_metadata(by_keywords)["build_key"] == meta["build_key"]  # batch size is not content
    assert np.array_equal(by_keywords.with_format("numpy")["topk_logits"], table.with_format("numpy")["topk_logits"])
    overridden = build_ril_table(digits_small, teacher_clip, config, num_regions=2, teacher_tokenizer=tokenizer,
                                 output_dir=str(tmp_path / "o"))
    assert len(overridden) == len(digits_small) * 2
    assert RILTableConfig.from_metadata(ril_metadata(overridden)).num_regions == 2
    with pytest.raises(TypeError, match="num_region"):
        build_ril_table(digits_small, teacher_clip, num_region=3, teacher_tokenizer=tokenizer,
                        output_dir=str(tmp_path / "x"))


def test_tables_without_a_stored_config_still_load(digits_small, teacher_clip, tokenizer, tmp_path):
    """A table written before the config was stored (0.4's metadata: no build_config) loads and replays."""
    from fdbpl_hf import RILTableConfig
    from fdbpl_hf.integrity import metadata_digest

    build(digits_small, teacher_clip, tokenizer, tmp_path / "t")
    path = tmp_path / "t" / "ril_metadata.json"
    meta = json.loads(path.read_text())
    del meta["build_config"]
    meta["library_version"] = "0.4.0"
    meta["metadata_digest"] = metadata_digest(meta)
    path.write_text(json.dumps(meta))
    table = load_ril_table(str(tmp_path / "t"))
    assert RILTableConfig.from_metadata(ril_metadata(table)) is None
    assert len(replay(digits_small, table, class_names=DIGIT_NAMES)) == len(digits_small)


def test_build_table_script_parses_the_config(tmp_path):
    """examples/build_table.py parses RILTableConfig's flags with HfArgumentParser, under the old names."""
    sys.path.insert(0, os.path.join(REPO, "examples"))
    try:
        import build_table
    finally:
        sys.path.pop(0)
    args, config = build_table.parse_args(["--teacher", "t", "--output_dir", str(tmp_path), "--num_regions", "3",
                                           "--top_k", "2", "--seed", "5", "--template", "a {}.",
                                           "--teacher_batch_size", "8", "--teacher_revision", "main",
                                           "--device", "cpu"])
    assert (args.teacher, args.output_dir) == ("t", str(tmp_path))
    assert (config.num_regions, config.top_k, config.seed, config.template, config.teacher_batch_size,
            config.teacher_revision, config.device) == (3, 2, 5, "a {}.", 8, "main", "cpu")


def _small_table(tmp_path, teacher_fn, num_classes=5, rows=3):
    """A 2-region table of `rows` random 20x24 images labelled 0..rows-1, built with a callable teacher."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(rows)]
    ds = image_dataset(images, list(range(rows)), names=[f"c{i}" for i in range(num_classes)])
    table = build_ril_table(ds, CallableTeacher(teacher_fn, num_classes, 16), num_regions=2,
                            top_k=num_classes, output_dir=str(tmp_path / "small"))
    return ds, table


def test_log_probabilities_below_the_float16_range_are_stored_finite(tmp_path):
    """A teacher whose logits span more than float16's range: the far classes' log-probabilities
    (about -1e5) were stored as -inf, and replay refused every such table as corrupt."""
    def sure(px):
        logits = torch.zeros(len(px), 5)
        logits[:, 2] = 1e5
        return logits

    ds, table = _small_table(tmp_path, sure)
    item = replay(ds, table)[0]
    assert torch.isfinite(item["topk_logits"]).all()
    assert int(item["topk_indices"][0]) == 2 and float(item["topk_logits"][0]) == 0.0
    dense = dense_teacher_logits(item["topk_indices"][None], item["topk_logits"][None], 5, fill="dense")
    assert torch.equal(dense.softmax(-1)[0], torch.eye(5)[2])


def test_a_missing_label_column_is_named_not_blamed_on_the_images(tmp_path):
    """The image digests cover the labels: a dataset without the table's label column (renamed, or
    a typo in label_column=) was reported as holding images the table was not built on."""
    ds, table = _small_table(tmp_path, lambda px: px.mean(dim=(2, 3)) @ torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"no label column 'lable' \(columns: \['image', 'label'\]\)"):
        replay(ds, table, label_column="lable")
    renamed = ds.rename_column("label", "labels")
    with pytest.raises(ValueError, match=r"label from column 'label', and the dataset has no label column 'label' "
                                         r"\(columns: \['image', 'labels'\]\); pass label_column=") as err:
        replay(renamed, table)
    assert "source images" not in str(err.value)
    assert int(replay(renamed, table, label_column="labels")[1]["labels"]) == 1


def test_class_names_must_cover_the_label_columns_classes(tmp_path):
    """With a ClassLabel column, class_names with an extra name built a table (and trained prompts)
    of one class too many, silently; a missing name failed only if some row had the last label."""
    rng = np.random.default_rng(0)
    ds = image_dataset([Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))], [0],
                       names=["cat", "dog", "fox"])
    for names in (["cat", "dog", "fox", "owl"], ["cat", "dog"]):
        teacher = CallableTeacher(lambda px, c=len(names): px.mean(dim=(2, 3)) @ torch.ones(3, c), len(names), 16)
        with pytest.raises(ValueError, match=rf"class_names has {len(names)} names, but the label column 'label' is "
                                             r"a ClassLabel of 3 classes \(cat, dog, fox\)"):
            build_ril_table(ds, teacher, num_regions=2, top_k=2, class_names=names, output_dir=str(tmp_path / "t"))
    teacher = CallableTeacher(lambda px: px.mean(dim=(2, 3)) @ torch.ones(3, 3), 3, 16)
    table = build_ril_table(ds, teacher, num_regions=2, top_k=2, class_names=["a cat", "a dog", "a fox"],
                            output_dir=str(tmp_path / "t"))  # other (e.g. cleaned) names, one per class: fine
    assert ril_metadata(table)["class_names"] == ["a cat", "a dog", "a fox"]


@pytest.mark.numerics
def test_regions_are_cut_from_the_upright_image_that_datasets_decodes(tmp_path):
    """A JPEG with an EXIF orientation (phone photos): `datasets.Image`, and so evaluation, turns it
    upright; the table and its replay cropped the stored (sideways) pixels, so training saw other
    images than evaluation. Tables built before keep replaying as they were built."""
    from fdbpl_hf.integrity import metadata_digest
    from fdbpl_hf.ril import DeviceImageStore
    from fdbpl_hf.ril.regions import image_to_tensor, render_region
    from fdbpl_hf.ril.table import build_key

    stored = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 30, 3), dtype=np.uint8))
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif.tobytes())
    ds = image_dataset([{"bytes": buf.getvalue(), "path": None}], [0])
    assert ds[0]["image"].size == (12, 30)  # upright, as datasets decodes it
    table = build_ril_table(ds, CallableTeacher(lambda px: px.mean(dim=(2, 3))[:, :2], 2, 16), num_regions=2,
                            top_k=2, output_dir=str(tmp_path / "t"))
    data = replay(ds, table)
    item = data[0]
    row = table.with_format("numpy")[int(item["region"])]
    upright = image_to_tensor(ds[0]["image"])
    expected = render_region(upright, row["box"], bool(row["flip"]), data.spec)
    expected = (expected - torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(item["pixel_values"], expected)
    store = DeviceImageStore.from_dataset(ds)
    assert (store.heights[0], store.widths[0]) == (30, 12)
    data.use_image_store(store)

    # a table from before: its regions were cut from the stored orientation, and replay keeps that
    path = tmp_path / "t" / "ril_metadata.json"
    meta = json.loads(path.read_text())
    del meta["regions"]["exif_transpose"]
    del meta["region_key"]  # 0.5 metadata had none (0.7 adds it)
    meta["build_key"] = build_key(meta)
    meta["metadata_digest"] = metadata_digest(meta)
    path.write_text(json.dumps(meta))
    old = replay(ds, load_ril_table(str(tmp_path / "t")))
    assert old.spec.exif_transpose is False
    with pytest.raises(ValueError, match="image store holds the images upright .* as stored"):
        old.use_image_store(DeviceImageStore.from_dataset(ds))
    assert old.use_image_store(DeviceImageStore.from_dataset(old)).image_store.heights[0] == 12


def test_an_undecodable_image_names_its_file(teacher_clip, tokenizer, tmp_path):
    """Image folders keep each row's file name: the error named only the row (and PIL a BytesIO object)."""
    good = _png(Image.new("RGB", (8, 8)))
    ds = image_dataset([{"bytes": good, "path": "cats/ok.png"}, {"bytes": good[:40], "path": "dogs/broken.png"}],
                       [0, 1])
    with pytest.raises(ValueError, match=r"row 1 of the source dataset \(file dogs/broken.png\): the image cannot be "
                                         "decoded"):
        build(ds, teacher_clip, tokenizer, tmp_path / "t", top_k=2)


def test_build_table_script_leaves_num_proc_workers_their_own_gpu(monkeypatch):
    """`--num_proc N` on an N-GPU machine: the script pinned the teacher to cuda:0 in the parent, so
    every map worker ran on GPU 0 (the labeler uses GPU `rank` only when no device is set)."""
    sys.path.insert(0, os.path.join(REPO, "examples"))
    try:
        import build_table
    finally:
        sys.path.pop(0)
    from fdbpl_hf import RILTableConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert build_table.teacher_device(RILTableConfig()) == "cuda:1"  # one GPU per launched process
    assert build_table.teacher_device(RILTableConfig(num_proc=4)) is None  # worker r picks GPU r
    assert build_table.teacher_device(RILTableConfig(num_proc=4, device="cuda:2")) == "cuda:2"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert build_table.teacher_device(RILTableConfig()) == "cpu"


def test_a_class_list_of_another_length_names_the_classes(tmp_path):
    """A class list one class short (or long) of the table's said only "class count: table 5 vs given 4"."""
    ds, table = _small_table(tmp_path, lambda px: px.mean(dim=(2, 3)) @ torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"class count: table 5 vs given 4 \(class 2 is 'c2' in the table but 'c3' "
                                         r"in class_names .*\); not given: 'c2'$"):
        replay(ds, table, class_names=["c0", "c1", "c3", "c4"])
    with pytest.raises(ValueError, match=r"class count: table 5 vs given 6 \(class 4 is 'c4' in the table but 'c 4' "
                                         r"in class_names .*\); not given: 'c4'; not in the table: 'c 4', 'c5'$"):
        replay(ds, table, class_names=["c0", "c1", "c2", "c3", "c 4", "c5"])


def test_unverified_replay_still_refuses_a_subset(tmp_path):
    """verify=False (or FDBPL_HF_VERIFY=0) skips hashing the images, and skipped the free row count
    too: a subset of the dataset replayed the soft labels of other images."""
    ds, table = _small_table(tmp_path, lambda px: px.mean(dim=(2, 3)) @ torch.ones(3, 5))
    with pytest.raises(ValueError, match="source rows: table 3 vs dataset 2"):
        replay(ds.select([2, 1]), table, verify=False)
    assert len(replay(ds, table, verify=False)) == 3


def test_a_table_missing_a_column_is_named(tmp_path):
    """A table without a column replay reads: verified, it was reported as rows that differ;
    unverified, the first batch failed with KeyError('topk_logits')."""
    from fdbpl_hf.ril.table import attach_metadata, table_features

    ds, table = _small_table(tmp_path, lambda px: px.mean(dim=(2, 3)) @ torch.ones(3, 5))
    partial = attach_metadata(table.remove_columns("topk_logits"), ril_metadata(table))
    for verify in (True, False):
        with pytest.raises(ValueError, match=r"the RIL table has no column 'topk_logits' \(columns: \['box', 'flip', "
                                             r"'topk_indices', 'teacher_entropy'\]\): it is not a whole RIL table"):
            replay(ds, partial, verify=verify)
    narrow = table.map(lambda row: {"topk_indices": row["topk_indices"][:3], "topk_logits": row["topk_logits"][:3]},
                       features=table_features(3, 5))
    with pytest.raises(ValueError, match=r"column 'topk_indices' holds 3 classes per region, its metadata says "
                                         "top_k=5"):
        replay(ds, attach_metadata(narrow, ril_metadata(table)), verify=False)



def test_build_settings_are_checked_and_numpy_integers_accepted(tmp_path):
    """teacher_batch_size=0 failed with range()'s bare message (-1: IndexError), seed=-1 with numpy's; a
    numpy integer num_regions was refused as "not a positive integer"."""
    rng = np.random.default_rng(0)
    ds = image_dataset([Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))], [0], names=["a", "b", "c"])
    teacher = CallableTeacher(lambda px: px.mean(dim=(2, 3)), 3, 16)
    for setting, message in ((dict(teacher_batch_size=0), "teacher_batch_size must be an integer >= 1, got 0"),
                             (dict(teacher_batch_size=-1), "teacher_batch_size must be an integer >= 1, got -1"),
                             (dict(seed=-1), "seed must be an integer >= 0, got -1"),
                             (dict(top_k=True), "top_k must be an integer >= 1 or None, got True")):
        with pytest.raises(ValueError, match=re.escape(message)):
            build_ril_table(ds, teacher, **{"num_regions": 2, "top_k": 2, **setting}, output_dir=str(tmp_path / "x"))
    table = build_ril_table(ds, teacher, num_regions=np.int64(3), top_k=np.int64(2), seed=np.int32(1),
                            output_dir=str(tmp_path / "t"))
    meta = ril_metadata(table)
    assert (len(table), meta["num_regions"], meta["top_k"], meta["seed"]) == (3, 3, 2, 1)
    assert type(meta["build_config"]["num_regions"]) is int


def test_an_occupied_output_dir_names_what_differs(tmp_path):
    """Rebuilding into a folder that holds another build listed the teacher, M, K and seed, equal or not
    (and nothing of what did differ, e.g. a table of an older fdbpl_hf without regions.exif_transpose)."""
    from fdbpl_hf.integrity import metadata_digest
    from fdbpl_hf.ril.table import build_key

    ds, table = _small_table(tmp_path, lambda px: px.mean(dim=(2, 3)) @ torch.ones(3, 5))
    teacher = CallableTeacher(lambda px: px.mean(dim=(2, 3)) @ torch.ones(3, 5), 5, 16)
    settings = dict(num_regions=2, top_k=5, output_dir=str(tmp_path / "small"))
    with pytest.raises(ValueError, match=r"built with other settings \(built by fdbpl_hf [\d.]+; differs in seed\)"):
        build_ril_table(ds, teacher, seed=3, **settings)
    with pytest.raises(ValueError, match=r"differs in num_regions, source.fingerprint, source.num_rows\)"):
        build_ril_table(ds.select([0, 1]), teacher, **dict(settings, num_regions=3))
    path = tmp_path / "small" / "ril_metadata.json"
    meta = json.loads(path.read_text())
    del meta["regions"]["exif_transpose"]
    meta.update(library_version="0.5.0", build_key=build_key(meta))
    meta["metadata_digest"] = metadata_digest(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"built by fdbpl_hf 0\.5\.0; differs in regions\.exif_transpose\)"):
        build_ril_table(ds, teacher, **settings)


def test_a_table_built_without_labels_replays_with_the_datasets_labels(tmp_path):
    """A table built with label_column=None binds the images alone: naming the dataset's label column at
    replay (for CoOp, or the labels of the items) reported every image as one the table was not built on."""
    rng = np.random.default_rng(0)
    ds = image_dataset([Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(3)],
                       [0, 1, 0])
    table = build_ril_table(ds, CallableTeacher(lambda px: px.mean(dim=(2, 3))[:, :2], 2, 16), label_column=None,
                            class_names=["a", "b"], num_regions=2, top_k=2, output_dir=str(tmp_path / "t"))
    assert int(replay(ds, table)[1]["labels"]) == -1  # no label column named: none is read
    assert [int(replay(ds, table, label_column="label")[i]["labels"]) for i in range(3)] == [0, 1, 0]
    other = ds.cast_column("image", datasets.Image(decode=False)).map(
        lambda row, i: {"image": {"bytes": _png(Image.new("RGB", (9, 9), (i, 0, 0))), "path": None}},
        with_indices=True).cast_column("image", datasets.Image())
    with pytest.raises(ValueError, match="source images: row 0 \\(an image the table was not built on\\)"):
        replay(other, table, label_column="label")  # the images themselves are still bound


def test_an_interrupted_build_of_another_version_says_so(tmp_path):
    """A build interrupted under an older fdbpl_hf, resumed after an upgrade that changes the build key
    (0.5.0 -> regions.exif_transpose): the refusal listed teacher, weights, images, M, K or seed only."""
    from fdbpl_hf.ril.sharding import prepare_workdir

    prepare_workdir(str(tmp_path / "w"), {"build_key": "old", "shard_size": 8, "library_version": "0.5.0"})
    with pytest.raises(ValueError, match=r"seed; it was started by fdbpl_hf 0\.5\.0, this is 0\.6\.0, whose builds"):
        prepare_workdir(str(tmp_path / "w"), {"build_key": "new", "shard_size": 8, "library_version": "0.6.0"})
    with pytest.raises(ValueError, match=r"M, K or seed\); delete it"):
        prepare_workdir(str(tmp_path / "w"), {"build_key": "new", "shard_size": 8, "library_version": "0.5.0"})
