"""Device-resident replay: one batched kernel over a uint8 image store equals today's CPU replay bit for bit,
on the CPU device these tests run on (on CUDA the last float32 steps round within one ulp: not checked here)."""

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import odd_images

from fdbpl_hf import RegionSpec, RILDataset, build_ril_table
from fdbpl_hf.ril.device_replay import (
    DeviceImageStore, collate_device_replay, padded_size, pixel_boxes, render_batch, render_regions,
)
from fdbpl_hf.ril.regions import decode_box, render_region
from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# uint8 pixels from the batched crop kernel against torch's uint8 resize: bit-equal on any kernels by
# construction (integer weights, products and sums held exactly in float64; fdbpl_hf/ril/device_replay.py),
# and the claim that most depends on the CPU, so it runs again under ATen's default kernels.
pytestmark = pytest.mark.numerics


def replay(ds, table, **kw):
    return RILDataset(ds, table, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, **kw)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_batched_kernel_equals_torch_uint8_resize(mode):
    """Random crops of random-size images, down- and up-sampled, one side equal to the output or
    not, at several output sizes: every pixel equals the per-crop uint8 antialiased resize + flip."""
    rng = np.random.default_rng(0)
    shapes = [(37, 53), (300, 41), (5, 7), (224, 180), (96, 96)]
    images = [torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    images[1] = (torch.linspace(0, 255, 41).view(1, 41, 1) * torch.linspace(0, 1, 300).view(300, 1, 1)).expand(
        300, 41, 3).to(torch.uint8).contiguous()  # smooth: interior weights, not only clamped noise
    store = DeviceImageStore(torch.cat([im.reshape(-1, 3) for im in images]), np.array([s[0] for s in shapes]),
                             np.array([s[1] for s in shapes]))
    for size in (16, 33, 96):
        spec = RegionSpec(output_size=size, interpolation=mode)
        idx = rng.integers(0, len(shapes), 40)
        boxes = rng.integers(0, 65536, (40, 4)).astype(np.uint16)
        boxes[::7, 2:] = 65535  # whole image from the top-left corner on
        boxes[3] = [0, 0, 65535, round(96 / 96 * 65535)]
        flips = rng.random(40) < 0.5
        crops = pixel_boxes(boxes, store.heights[idx], store.widths[idx])
        pad = (padded_size(crops[:, 2]), padded_size(crops[:, 3]))
        got = render_regions(store, torch.from_numpy(idx), torch.from_numpy(crops), torch.from_numpy(flips), spec,
                             pad)
        for n in range(40):
            chw = images[idx[n]].permute(2, 0, 1)
            assert tuple(crops[n]) == decode_box(boxes[n], chw.shape[1], chw.shape[2])
            want = render_region(chw, boxes[n], bool(flips[n]), spec)
            assert torch.equal(got[n], want), (size, n, tuple(crops[n]))
    # the check is sharp: an off-by-one crop changes the pixels
    shifted = torch.from_numpy(crops.copy())
    shifted[:, 0] = torch.clamp(shifted[:, 0] - 1, min=0)
    moved = render_regions(store, torch.from_numpy(idx), shifted, torch.from_numpy(flips), spec, pad)
    assert not torch.equal(moved, got)


def _batch_pixels(data, indices):
    return torch.stack([item["pixel_values"] for item in data.__getitems__(indices)])


def test_store_replay_equals_cpu_replay_on_a_real_table(digits_small, teacher_clip, tokenizer, tmp_path):
    """A table built by the teacher over real digits: device-resident batches == today's batches
    at several epochs (labels, regions and soft labels too), and a trained-on batch has B crops of
    different sizes."""
    table = build_ril_table(digits_small, teacher_clip, num_regions=6, top_k=4, teacher_tokenizer=tokenizer,
                            output_dir=str(tmp_path / "t"))
    cpu = replay(digits_small, table)
    dev = replay(digits_small, table).use_image_store(DeviceImageStore.from_dataset(digits_small))
    assert dev.image_store.nbytes == sum(np.asarray(im).size for im in digits_small["image"]) * 3  # 28x28 L -> RGB
    indices = [3, 0, 29, 17, 17, 8, 21]
    for epoch in (0, 1, 5, 7):
        cpu.set_epoch(epoch)
        dev.set_epoch(epoch)
        batch = collate_device_replay(dev.__getitems__(indices))
        assert "pixel_values" not in batch
        assert torch.equal(render_batch(dev, batch), _batch_pixels(cpu, indices))
        ref = cpu.__getitems__(indices)
        for key in ("labels", "region", "topk_indices", "topk_logits", "teacher_entropy"):
            assert torch.equal(batch[key], torch.stack([item[key] for item in ref])), key
    assert len({tuple(c) for c in batch["region_crop"][:, 2:].tolist()}) > 2


def test_store_replay_of_odd_images_and_the_online_dataset(teacher_clip, tokenizer, tmp_path):
    images = odd_images(sixteen_bit=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1, 1]}, features=features)
    table = build_ril_table(ds, teacher_clip, num_regions=3, top_k=2, teacher_tokenizer=tokenizer,
                            output_dir=str(tmp_path / "t"))
    store = DeviceImageStore.from_dataset(ds)
    cpu, dev = replay(ds, table), replay(ds, table).use_image_store(store)
    online_args = dict(class_names=["a", "b"], image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                       region_spec=RegionSpec(output_size=32), num_regions=3, seed=4)
    online_cpu = RILDataset.online(ds, **online_args)
    online_dev = RILDataset.online(ds, **online_args).use_image_store(store)
    for epoch in range(3):
        for a, b in ((cpu, dev), (online_cpu, online_dev)):
            a.set_epoch(epoch)
            b.set_epoch(epoch)
            batch = collate_device_replay(b.__getitems__([0, 1, 2, 3, 4]))
            assert torch.equal(render_batch(b, batch), _batch_pixels(a, [0, 1, 2, 3, 4]))


def test_store_refusals(digits_small, teacher_clip, tokenizer, tmp_path):
    table = build_ril_table(digits_small, teacher_clip, num_regions=2, top_k=3, teacher_tokenizer=tokenizer,
                            output_dir=str(tmp_path / "f"), region_spec=RegionSpec(output_size=32, renderer="float"))
    with pytest.raises(ValueError, match="reproduces the 'uint8' renderer only"):
        replay(digits_small, table).use_image_store(DeviceImageStore.from_dataset(digits_small))
    with pytest.raises(ValueError, match="holds 3 images, the dataset has 30"):
        uint8 = build_ril_table(digits_small, teacher_clip, num_regions=2, top_k=3, teacher_tokenizer=tokenizer,
                                output_dir=str(tmp_path / "u"))
        replay(digits_small, uint8).use_image_store(DeviceImageStore.from_dataset(digits_small.select(range(3))))
    # a store of the same number of other images (here a shuffled copy) rendered every region from another
    # image without a word
    shuffled = DeviceImageStore.from_dataset(digits_small.shuffle(seed=1))
    with pytest.raises(ValueError, match=r"other images than the dataset, or in another order \(dataset row 0 \(holds "
                                         r"the store's image 21: reordered\)"):
        replay(digits_small, uint8).use_image_store(shuffled)


def test_kernel_matches_torch_on_a_224px_crop():
    """The real output size (224) from a 500 x 375 image, the ImageNet case, against F.interpolate."""
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
    store = DeviceImageStore(image.reshape(-1, 3), np.array([375]), np.array([500]))
    crops = torch.tensor([[10, 20, 300, 410], [0, 0, 375, 500], [100, 200, 120, 90]])
    got = render_regions(store, torch.zeros(3, dtype=torch.long), crops, torch.tensor([False, True, False]),
                         RegionSpec(output_size=224), (384, 512))
    chw = image.permute(2, 0, 1).unsqueeze(0)
    for n, (t, l, h, w) in enumerate(crops.tolist()):
        want = F.interpolate(chw[:, :, t:t + h, l:l + w].contiguous(), size=(224, 224), mode="bicubic",
                             align_corners=False, antialias=True)[0].float().div(255)
        assert torch.equal(got[n], want.flip(-1) if n == 1 else want)


def test_table_build_with_the_device_kernel_equals_the_cpu_build(digits_small, teacher_clip, tokenizer, tmp_path,
                                                                 monkeypatch):
    """The builder renders with the batched kernel when the teacher runs on an accelerator; forced
    here on CPU: every column of the table is identical (same pixels, so the same teacher outputs)."""
    from fdbpl_hf.ril import build as build_module

    from fdbpl_hf.ril import device_replay

    submitted = []
    render = device_replay.DeviceChunkRenderer.render
    monkeypatch.setattr(device_replay.DeviceChunkRenderer, "render",
                        lambda self, prepared: submitted.append(len(prepared.index)) or render(self, prepared))
    tables = {}
    for name, flag in (("cpu", False), ("kernel", True)):
        monkeypatch.setattr(build_module, "DEVICE_RENDER", flag)
        tables[name] = build_ril_table(digits_small, teacher_clip, num_regions=4, top_k=4, teacher_tokenizer=tokenizer,
                                       output_dir=str(tmp_path / name), teacher_batch_size=7)  # chunks split images
    assert sum(submitted) == 30 * 4  # the kernel rendered every region of the second build
    for column in ("box", "flip", "topk_indices", "topk_logits", "teacher_entropy"):
        assert np.array_equal(np.asarray(tables["cpu"][column]), np.asarray(tables["kernel"][column])), column
