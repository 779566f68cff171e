"""The host side of builds (issue 20, item 4): decoding and cropping ahead of the device, in order,
without changing a single stored value; and the training process's batch reads (item 5's C)."""

import pickle
import threading
import time

import datasets
import numpy as np
import pytest
import torch

from fdbpl_hf import RegionSpec, RILDataset, build_feature_cache, build_ril_table
from fdbpl_hf.clip_ops import channel_stats, normalize_pixels
from fdbpl_hf.ril import build as build_module
from fdbpl_hf.ril import device_replay, replay as replay_module
from fdbpl_hf.ril.host_pipeline import HostPool, check_host_threads, default_host_threads, lagged, ordered
from fdbpl_hf.ril.regions import image_to_tensor, region_rng, render_jobs, render_region, sample_regions
from fdbpl_hf.ril.table import take_rows
from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from fdbpl_hf.testing.worlds import DIGIT_NAMES

from conftest import make_clip


def linear_teacher(pixels):
    # cheap, deterministic, and its logits depend on every pixel
    return pixels.mean(dim=(2, 3)) @ torch.arange(30.0).view(3, 10)


def test_ordered_yields_in_order_runs_ahead_boundedly_and_raises_at_the_failing_item():
    started, consumed = [], [0]
    lock = threading.Lock()

    def work(i):
        with lock:
            started.append(i)
            # the pool may run `ahead` items beyond the one being handed over, never more
            assert i <= consumed[0] + 3, (i, consumed[0])
        time.sleep(0.002 * ((7 * i) % 5))  # finish out of order
        if i == 11:
            raise ValueError("item 11 is broken")
        return i * i

    out = []
    with HostPool(3, single_thread_ops=False) as pool:
        with pytest.raises(ValueError, match="item 11 is broken"):
            for value in ordered(pool, work, range(20), ahead=3):
                out.append(value)
                consumed[0] += 1
    assert out == [i * i for i in range(11)]  # every item before the broken one, in order
    assert max(started) <= 11 + 3


def test_lagged_collects_each_item_after_the_next_is_produced():
    events = []

    def produce():
        for i in range(4):
            events.append(f"queue {i}")
            yield i

    results = list(lagged(produce(), lambda i: events.append(f"read {i}") or i))
    assert results == [0, 1, 2, 3]
    assert events == ["queue 0", "queue 1", "read 0", "queue 2", "read 1", "queue 3", "read 2", "read 3"]


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_batched_cpu_rendering_equals_the_per_region_renderer_bit_for_bit(interpolation):
    """render_jobs converts a uint8 batch once; replay renders and normalises region by region:
    the same correctly rounded float operations per element, so equal bits (torch.equal)."""
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, size=(3, h, w), dtype=np.uint8)) for h, w in
              ((37, 53), (120, 90), (16, 16))]
    spec = RegionSpec(output_size=24, interpolation=interpolation)
    jobs = []
    for n, image in enumerate(images):
        boxes, flips = sample_regions(image.shape[1], image.shape[2], 6, spec, region_rng(3, n))
        flips[:2] = [True, False]
        jobs.extend((image, boxes[r], bool(flips[r]), n) for r in range(6))
    mean_std = channel_stats(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    expected = torch.stack([normalize_pixels(render_region(im, box, flip, spec), *mean_std, inplace=True)
                            for im, box, flip, _ in jobs])
    assert torch.equal(render_jobs(jobs, spec, *mean_std), expected)
    float_spec = RegionSpec(output_size=24, renderer="float")
    expected = normalize_pixels(torch.stack([render_region(im, box, flip, float_spec) for im, box, flip, _ in jobs]),
                                *mean_std, inplace=True)
    assert torch.equal(render_jobs(jobs, float_spec, *mean_std), expected)


def test_the_build_decodes_the_next_group_while_the_teacher_runs(digits_small, tmp_path, monkeypatch):
    """Causality, not timing: during the teacher's call on group k, the host threads decode the
    first image of group k + 1 (the call waits for it, 20 s at most). A serial build decodes group
    k + 1 only after the call returns, so every wait would time out."""
    decoded = {}
    original = build_module.decode_image

    def recording_decode(cell, row, *args):
        image = original(cell, row, *args)
        decoded.setdefault(row, threading.Event()).set()
        return image

    monkeypatch.setattr(build_module, "decode_image", recording_decode)
    calls, waits = [0], []

    def teacher(pixels):
        group = calls[0]  # 4 images x 2 regions = one teacher call per group
        calls[0] += 1
        next_first = 4 * (group + 1)
        if next_first < len(digits_small):
            waits.append(decoded.setdefault(next_first, threading.Event()).wait(timeout=20))
        return linear_teacher(pixels)

    build_ril_table(digits_small, teacher, teacher_input_size=16, num_regions=2, top_k=3, images_per_batch=4,
                    teacher_batch_size=8, host_threads=1, output_dir=str(tmp_path / "t"))
    assert calls[0] == 8 and len(waits) == 7 and all(waits), waits  # 30 images: 7 full groups + 2 images


def test_host_threads_change_speed_not_content(digits_small, tmp_path):
    kw = dict(teacher_input_size=16, num_regions=3, top_k=3, images_per_batch=4, teacher_batch_size=5)
    one = build_ril_table(digits_small, linear_teacher, output_dir=str(tmp_path / "a"), host_threads=1, **kw)
    many = build_ril_table(digits_small, linear_teacher, output_dir=str(tmp_path / "b"), host_threads=5, **kw)
    assert one.data.equals(many.data)
    again = build_ril_table(digits_small, linear_teacher, output_dir=str(tmp_path / "a"), **kw)  # default threads
    assert again.data.equals(one.data)  # the same build key: the finished table comes back
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=f"host_threads must be an integer >= 1 or None, got {bad!r}"):
            build_ril_table(digits_small, linear_teacher, output_dir=str(tmp_path / "c"), host_threads=bad, **kw)
    with pytest.raises(ValueError, match="images_per_batch must be an integer >= 1, got 0"):
        build_ril_table(digits_small, linear_teacher, output_dir=str(tmp_path / "c"), images_per_batch=0,
                        **{k: v for k, v in kw.items() if k != "images_per_batch"})
    assert default_host_threads(torch.device("cpu")) == 1 and check_host_threads(None) is None


def test_cache_builds_with_more_host_threads_store_the_same_features(digits_small, tmp_path, tokenizer):
    table = build_ril_table(digits_small, linear_teacher, teacher_input_size=32, num_regions=3, top_k=3,
                            output_dir=str(tmp_path / "t"))
    data = RILDataset(digits_small, table, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    clip = make_clip("tiny", seed=2)
    one = build_feature_cache(data, clip, epochs=2, batch_size=6, dtype="float32", host_threads=1,
                              output_dir=str(tmp_path / "c1"), progress=False)
    three = build_feature_cache(data, clip, epochs=2, batch_size=6, dtype="float32", host_threads=3,
                                output_dir=str(tmp_path / "c3"), progress=False)
    assert one.data.equals(three.data)
    with pytest.raises(ValueError, match="host_threads must be a positive integer"):
        build_feature_cache(data, clip, epochs=2, host_threads=0, output_dir=str(tmp_path / "c0"), progress=False)


def test_take_rows_reads_what_datasets_numpy_format_reads(digits_small, tmp_path):
    table = build_ril_table(digits_small, linear_teacher, teacher_input_size=16, num_regions=3, top_k=4,
                            shard_size=7, output_dir=str(tmp_path / "t"))
    positions = [5, 0, 89, 17, 17, 30]
    for data in (table, table.shuffle(seed=0), datasets.Dataset.from_dict({"v": [[1.5, 2.0], [3.0, 4.0]] * 45})):
        fast = take_rows(data, positions)
        slow = data.with_format("numpy")[positions]
        for column in data.column_names:
            assert fast[column].dtype == slow[column].dtype and np.array_equal(fast[column], slow[column]), column


def test_columns_become_the_dataset_from_dict_makes():
    """Shards are written from Arrow arrays directly (datasets' from_dict encodes list columns row by
    row): the same schema, features and rows, for a table's and a cache's columns."""
    from fdbpl_hf.ril.table import columns_to_dataset, table_features

    rng = np.random.default_rng(0)
    n = 37
    table = {"box": rng.integers(0, 65535, (n, 4)).astype(np.uint16), "flip": rng.random(n) < 0.5,
             "topk_indices": rng.integers(0, 50, (n, 5)).astype(np.int16),
             "topk_logits": -rng.random((n, 5)).astype(np.float16), "teacher_entropy": rng.random(n).astype(np.float16)}
    cache = {"region": rng.integers(0, 9, n).astype(np.int32), "image_features": rng.random((n, 8)).astype(np.float32)}
    cache_features = datasets.Features({"region": datasets.Value("int32"),
                                        "image_features": datasets.List(datasets.Value("float32"), length=8)})
    for columns, features in ((table, table_features(5, 50)), (cache, cache_features)):
        fast, slow = columns_to_dataset(columns, features), datasets.Dataset.from_dict(columns, features=features)
        assert fast.features == slow.features and fast.data.schema.equals(slow.data.schema)
        assert fast.data.equals(slow.data)


def test_region_for_keeps_permutations_without_changing_the_schedule(digits_small, tmp_path, monkeypatch):
    table = build_ril_table(digits_small, linear_teacher, teacher_input_size=16, num_regions=5, top_k=3,
                            output_dir=str(tmp_path / "t"))

    def data():
        return RILDataset(digits_small, table, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)

    def formula(i, e):  # the schedule every table replays (spec: perm_i[e mod M])
        return int(np.random.default_rng([0, i, 1]).permutation(5)[e % 5])

    kept = data()
    kept.region_for(0)  # its memo is made at the first draw
    monkeypatch.setattr(replay_module, "PERMUTATION_MEMO_ENTRIES", 0)
    drawn = data()
    for epoch in (0, 3, 7, 0):
        assert [kept.region_for(i, epoch) for i in range(30)] == [formula(i, epoch) for i in range(30)]
        assert [drawn.region_for(i, epoch) for i in range(30)] == [formula(i, epoch) for i in range(30)]
    assert kept._permutations is not None and drawn._permutations is None
    assert pickle.loads(pickle.dumps(kept))._permutations is None  # DataLoader workers draw their own


def test_online_regions_are_kept_without_changing_them(digits_small, monkeypatch):
    """The online dataset draws an image's M regions as the builder does; kept once drawn (store
    and pixel items alike), they are the builder's boxes and flips."""
    from fdbpl_hf import DeviceImageStore

    spec = RegionSpec(output_size=16)

    def online():
        return RILDataset.online(digits_small, class_names=DIGIT_NAMES, image_mean=OPENAI_CLIP_MEAN,
                                 image_std=OPENAI_CLIP_STD, region_spec=spec, num_regions=4, seed=3)

    kept, stored = online(), online()
    stored.use_image_store(DeviceImageStore.from_dataset(stored))
    kept.__getitems__([1]), stored.__getitems__([1])  # their memos are made at the first draw
    monkeypatch.setattr(replay_module, "DRAWN_MEMO_REGIONS", 0)
    drawn = online()
    for epoch in (0, 1, 5):
        for data in (kept, stored, drawn):
            data.set_epoch(epoch)
        indices = [4, 0, 29, 4]
        items = kept.__getitems__(indices)
        again, fresh, store_items = kept.__getitems__(indices), drawn.__getitems__(indices), stored.__getitems__(indices)
        for n, index in enumerate(indices):
            assert torch.equal(items[n]["pixel_values"], again[n]["pixel_values"])
            assert torch.equal(items[n]["pixel_values"], fresh[n]["pixel_values"])
            image = image_to_tensor(build_module.decode_image(digits_small.cast_column(
                "image", datasets.Image(decode=False))[index]["image"], index))
            boxes, flips = sample_regions(image.shape[1], image.shape[2], 4, spec, region_rng(3, index))
            region = kept.region_for(index)
            assert bool(store_items[n]["region_flip"]) == bool(flips[region])
            expected = device_replay.pixel_boxes(boxes[region:region + 1], np.array([image.shape[1]]),
                                                 np.array([image.shape[2]]))[0]
            assert store_items[n]["region_crop"].tolist() == expected.tolist()
    assert kept._drawn is not None and stored._drawn is not None and drawn._drawn is None


def test_store_and_cache_batches_are_views_of_batch_tensors(digits_small, tmp_path):
    """The training process builds one tensor per field and batch (items are views): the values
    are the per-item ones (labels, regions, soft labels)."""
    from fdbpl_hf import DeviceImageStore

    table = build_ril_table(digits_small, linear_teacher, teacher_input_size=16, num_regions=3, top_k=3,
                            output_dir=str(tmp_path / "t"))
    data = RILDataset(digits_small, table, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    stored = RILDataset(digits_small, table, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    stored.use_image_store(DeviceImageStore.from_dataset(stored))
    stored.set_epoch(2), data.set_epoch(2)
    indices = [7, 3, 29]
    pixel_items, store_items = data.__getitems__(indices), stored.__getitems__(indices)
    for a, b, index in zip(pixel_items, store_items, indices):
        assert int(b["image_index"]) == index and int(b["labels"]) == digits_small[index]["label"]
        for key in ("labels", "region", "topk_indices", "topk_logits", "teacher_entropy"):
            assert torch.equal(a[key], b[key]), key


def test_device_rendering_makes_no_host_tensors_per_batch(monkeypatch):
    """The normalisation constants live on the device once made: a `torch.tensor(..., device=cuda)`
    per batch is a host-to-device copy that waits for all the device's queued work."""
    store = device_replay.DeviceImageStore(torch.randint(0, 256, (40 * 30, 3), dtype=torch.uint8),
                                           np.array([40]), np.array([30]))
    spec = RegionSpec(output_size=16)
    args = (torch.tensor([0, 0]), torch.tensor([[0, 0, 40, 30], [5, 3, 20, 17]]), torch.tensor([False, True]), spec,
            (64, 32), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    device_replay._DEVICE_STATS.clear()
    with torch.inference_mode():  # as a build makes them first
        first = device_replay.render_regions(store, *args)
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    assert torch.equal(device_replay.render_regions(store, *args), first)
    assert made == []
    for constant in device_replay.device_channel_stats(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "cpu"):
        assert not constant.is_inference()  # made in a build's inference mode, they still serve training


def test_prepared_chunks_render_what_the_cpu_renders(digits_small):
    """The builders' device renderer, split into its host half (run on the host threads) and its
    device half: the regions of a chunk equal the CPU renderer's, bit for bit."""
    spec = RegionSpec(output_size=16)
    cells = digits_small.cast_column("image", datasets.Image(decode=False))["image"][:3]
    images = [image_to_tensor(build_module.decode_image(c, n)) for n, c in enumerate(cells)]
    jobs = []
    for n, image in enumerate(images):
        boxes, flips = sample_regions(image.shape[1], image.shape[2], 3, spec, region_rng(0, n))
        jobs.extend((image, boxes[r], bool(flips[r]), n) for r in range(3))
    renderer = device_replay.DeviceChunkRenderer(spec, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "cpu")
    prepared = renderer.prepare(jobs)
    assert prepared.pixels.shape[0] == sum(im.shape[1] * im.shape[2] for im in images)  # each image once
    expected = render_jobs(jobs, spec, *channel_stats(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    assert torch.equal(renderer.render(prepared), expected)
