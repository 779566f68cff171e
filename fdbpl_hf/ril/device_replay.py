"""Device-resident replay: the few-shot images decoded once into a uint8 store on any device, and
all B regions of a step cropped and resized by one batched tensor kernel that reproduces the
"uint8" renderer (`render_region`: PyTorch's antialiased uint8 CPU kernel, PIL's filter): bit for bit
on the CPU, within one float32 ulp on CUDA (below).

Why it is exact: PyTorch's uint8 antialiased resize is separable (width first, then height), with
per-axis weights computed in float64, rounded to int16 fixed point at a precision chosen from the
largest weight, accumulated in integers and rounded back to uint8 after each axis. Here the same
integer weights form dense `[S, crop]` matrices (zero outside each crop's filter window) and both
passes are float64 batched matmuls: every product and sum is an integer far below 2**53, so the
float64 result is the integer result, and the rounding `(sum + 2**(p-1)) >> p` is reproduced by a
floor of an exact power-of-two division. The only possible difference: the weights' normalising
sum is a tensor reduction here and a sequential loop in PyTorch's kernel, which can differ in the
last bit of a float64 weight; that changes an int16 weight only at an exact half-way tie
(never seen in the tests, which compare thousands of crops bit for bit).

On CUDA the integer part is as exact, but the last float32 steps (`/ 255`, the normalisation) round
differently from the CPU kernels: measured on an H200, 1,023 of 1,024 normalised regions differed
from the CPU replay, by at most 6e-8 (one float32 ulp of values below 1; issue 20). "Bit for bit"
holds on the CPU only; on CUDA the replay is exact up to that ulp.

Memory of the store: 3 bytes per source pixel. 16-shot ImageNet (16,000 images) needs about 6.7 GB
of device memory at an average of 400 x 350 pixels, 9.0 GB at 500 x 375 (the typical JPEG size).
See docs/gpu-speed.md (with the per-step working memory).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from ..integrity import IMAGE_DIGEST_BYTES, encoded_image_digest
from ..rows import stored_rows
from .host_pipeline import (
    HostPool, check_host_threads, default_host_threads, ordered, pinned_empty, source_cells, to_device,
)
from .regions import BOX_SCALE, RegionSpec, image_to_tensor
from .table import decode_image

# PyTorch's antialiased filters (aten/src/ATen/native/UpSample.h): half-width and a = -0.5 for bicubic
_HALF_WIDTH = {"bilinear": 1.0, "bicubic": 2.0}
_CUBIC_A = -0.5
_MAX_PRECISION = 22
# pad crop sizes of a batch up to a multiple of this: fewer distinct shapes (allocator reuse)
PAD_MULTIPLE = 32


class DeviceImageStore:
    """Every source image decoded once, as uint8 RGB pixels in one flat `[P, 3]` tensor on `device`.

    Decoding goes through the replay's own path (`decode_image` + `image_to_tensor`: the same modes,
    16-bit scaling and errors), so stored pixels are the pixels replay would decode.
    `heights`/`widths`/`offsets` are kept on the host (numpy, for region geometry without a device
    sync) and on the device (for the gather). `exif_transpose`: whether the images were turned upright
    by their EXIF orientation (`RegionSpec.exif_transpose`; a table's replay needs the same).
    `image_digests`: 8 bytes of sha256 of each image's encoded bytes, in order (`from_dataset`
    records them, `RILDataset.use_image_store` compares them with its dataset's); None: not known."""

    def __init__(self, pixels: torch.Tensor, heights: np.ndarray, widths: np.ndarray, exif_transpose: bool = True,
                 image_digests: Optional[bytes] = None):
        if pixels.dtype != torch.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be uint8 [P, 3], got {pixels.dtype} {tuple(pixels.shape)}")
        self.heights = np.asarray(heights, dtype=np.int64)
        self.widths = np.asarray(widths, dtype=np.int64)
        sizes = self.heights * self.widths
        if int(sizes.sum()) != pixels.shape[0]:
            raise ValueError(f"the store holds {pixels.shape[0]} pixels, the image sizes add up to {int(sizes.sum())}")
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.pixels = pixels
        self.exif_transpose = bool(exif_transpose)
        if image_digests is not None and len(image_digests) != IMAGE_DIGEST_BYTES * len(self.heights):
            raise ValueError(f"image_digests holds {len(image_digests)} bytes, {IMAGE_DIGEST_BYTES} per image expected")
        self.image_digests = image_digests
        # pinned and non-blocking on CUDA: a plain copy would wait for all the device's queued work
        self._device_meta = to_device(np.stack([self.offsets, self.widths]), pixels.device)

    @classmethod
    def from_dataset(cls, data, device="cpu", image_column: Optional[str] = None,
                     host_threads: Optional[int] = None) -> "DeviceImageStore":
        """Decode every image of `data` (an `RILDataset`, or a `datasets.Dataset` with `image_column`)
        once, in `host_threads` threads (default: every usable CPU up to 32 for an accelerator, one
        for the CPU), and move the pixels to `device`."""
        import datasets

        if hasattr(data, "source"):  # an RILDataset: its source already reads undecoded cells
            source, column, upright = data.source, data.image_column, data.spec.exif_transpose
        else:
            column, upright = image_column or "image", True  # as datasets.Image decodes
            source = stored_rows(data, "the dataset of the image store").select_columns([column]).cast_column(column, datasets.Image(decode=False))
        threads = check_host_threads(host_threads) or default_host_threads(torch.device(device))

        def decode(item):
            row, cell = item
            image = image_to_tensor(decode_image(cell, row, upright), f"row {row} of the source dataset")  # [3, H, W]
            return image.permute(1, 2, 0).reshape(-1, 3), image.shape[1], image.shape[2], encoded_image_digest(cell,
                                                                                                               row)

        chunks, heights, widths, digests = [], [], [], []
        with HostPool(threads, single_thread_ops=False) as pool:
            for pixels, height, width, digest in ordered(pool, decode, source_cells(source, column,
                                                                                    range(len(source)), 1024),
                                                         ahead=2 * threads):
                heights.append(height)
                widths.append(width)
                chunks.append(pixels)
                digests.append(digest)
        if not chunks:
            raise ValueError("the dataset is empty (0 rows): there is nothing to store")
        pixels = torch.cat(chunks).to(device)
        return cls(pixels, np.array(heights), np.array(widths), upright, b"".join(digests))

    def __len__(self) -> int:
        return len(self.heights)

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    @property
    def nbytes(self) -> int:
        """Device memory of the stored pixels (the metadata adds 16 bytes per image)."""
        return self.pixels.numel()

    def to(self, device) -> "DeviceImageStore":
        if torch.device(device) == self.device:
            return self
        return DeviceImageStore(self.pixels.to(device), self.heights, self.widths, self.exif_transpose,
                                self.image_digests)


def pixel_boxes(boxes: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Stored uint16 boxes `[B, 4]` -> integer pixel boxes `[B, 4]` (top, left, h, w); element-wise
    `regions.decode_box` (same float64 arithmetic, round half to even like Python's `round`)."""
    b = np.asarray(boxes).astype(np.float64) / BOX_SCALE
    heights, widths = np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    top = np.minimum(np.rint(b[:, 0] * heights).astype(np.int64), heights - 1)
    left = np.minimum(np.rint(b[:, 1] * widths).astype(np.int64), widths - 1)
    bh = np.maximum(1, np.minimum(np.rint(b[:, 2] * heights).astype(np.int64), heights - top))
    bw = np.maximum(1, np.minimum(np.rint(b[:, 3] * widths).astype(np.int64), widths - left))
    return np.stack([top, left, bh, bw], axis=1)


def padded_size(sizes: np.ndarray) -> int:
    """The batch's padded crop extent: its largest crop side rounded up to `PAD_MULTIPLE`."""
    return int(math.ceil(int(np.max(sizes)) / PAD_MULTIPLE) * PAD_MULTIPLE)


def _filter(x: torch.Tensor, mode: str) -> torch.Tensor:
    x = x.abs()
    if mode == "bilinear":
        return torch.where(x < 1, 1 - x, torch.zeros_like(x))
    a = _CUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def aa_weights(in_sizes: torch.Tensor, out_size: int, length: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer-valued float64 resampling matrices `[B, out_size, length]` (zero past each input size)
    and their fixed-point precisions `[B]`: PyTorch's antialiased uint8 weights for resizing inputs
    of `in_sizes` `[B]` pixels to `out_size`."""
    if mode not in _HALF_WIDTH:
        raise ValueError(f"the batched uint8 renderer supports bilinear and bicubic, got {mode!r}")
    size = in_sizes.to(torch.float64).view(-1, 1, 1)
    scale = size / out_size
    upscaled = scale >= 1.0
    support = torch.where(upscaled, _HALF_WIDTH[mode] * scale, torch.full_like(scale, _HALF_WIDTH[mode]))
    invscale = torch.where(upscaled, 1.0 / scale, torch.ones_like(scale))
    i = torch.arange(out_size, dtype=torch.float64, device=size.device).view(1, -1, 1)
    center = scale * (i + 0.5)
    lo = torch.trunc(center - support + 0.5).clamp_min(0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), size)
    j = torch.arange(length, dtype=torch.float64, device=size.device).view(1, 1, -1)
    inside = (j >= lo) & (j < hi)
    w = torch.where(inside, _filter((j - center + 0.5) * invscale, mode), torch.zeros((), dtype=torch.float64,
                                                                                       device=size.device))
    total = w.sum(-1, keepdim=True)
    w = torch.where(total != 0, w / torch.where(total != 0, total, torch.ones_like(total)), w)
    # the precision: the largest p < 22 whose next step would overflow int16 for the largest weight
    w_max = w.amax(dim=(1, 2)).view(-1, 1)
    steps = 2.0 ** torch.arange(1, _MAX_PRECISION + 1, dtype=torch.float64, device=size.device).view(1, -1)
    overflow = torch.trunc(0.5 + w_max * steps) >= 2 ** 15
    precision = torch.where(overflow.any(1), overflow.to(torch.int64).argmax(1),
                            torch.full_like(w_max[:, 0], _MAX_PRECISION, dtype=torch.int64))
    v = w * (2.0 ** precision.to(torch.float64)).view(-1, 1, 1)
    return torch.where(v < 0, torch.trunc(v - 0.5), torch.trunc(v + 0.5)), precision


def _round_shift(x: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """`clamp((x + 2**(p-1)) >> p, 0, 255)` on exact float64 integers, p per batch row."""
    scale = (2.0 ** precision.to(torch.float64)).view(-1, *([1] * (x.ndim - 1)))
    return torch.floor((x + scale / 2) / scale).clamp_(0, 255)


def render_regions(store: DeviceImageStore, image_indices: torch.Tensor, crops: torch.Tensor, flips: torch.Tensor,
                   spec: RegionSpec, pad: tuple[int, int], mean: Optional[Sequence[float]] = None,
                   std: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Crop, resize and flip B regions in one batched computation on the store's device.

    `image_indices` `[B]`, `crops` `[B, 4]` integer pixel boxes (`pixel_boxes`), `flips` `[B]` bool,
    `pad` = (rows, columns) every crop fits in (`padded_size`: a host value, so no device sync).
    Returns float32 `[B, 3, S, S]` in [0, 1], or normalised with `mean`/`std`: equal to
    `render_region(image, box, flip, spec)` (then `.sub_(mean).div_(std)`) with spec.renderer
    "uint8", bit for bit on the CPU, within one float32 ulp on CUDA (module doc)."""
    if spec.renderer != "uint8":
        raise ValueError("the batched renderer reproduces the 'uint8' renderer; this table renders with "
                         f"{spec.renderer!r} (fdbpl_hf 0.1 tables): replay it from the CPU (no image store)")
    device = store.device
    index = image_indices.to(device, torch.int64)
    crops = crops.to(device, torch.int64)
    top, left, h, w = crops.unbind(1)
    offsets, widths = store._device_meta[0][index], store._device_meta[1][index]
    rows, cols = pad
    y = torch.minimum(torch.arange(rows, device=device).view(1, -1), h.view(-1, 1) - 1)  # [B, rows]
    x = torch.minimum(torch.arange(cols, device=device).view(1, -1), w.view(-1, 1) - 1)  # [B, cols]
    # positions past a crop repeat its last row/column: their weights are zero
    flat = (offsets + top * widths).view(-1, 1, 1) + y.unsqueeze(2) * widths.view(-1, 1, 1) + (left.view(-1, 1)
                                                                                               + x).unsqueeze(1)
    crop = store.pixels[flat].permute(0, 3, 1, 2).to(torch.float64)  # [B, 3, rows, cols]
    size = spec.output_size
    wx, px = aa_weights(w, size, cols, spec.interpolation)  # [B, S, cols]
    wy, py = aa_weights(h, size, rows, spec.interpolation)  # [B, S, rows]
    out = _round_shift(torch.matmul(crop, wx.transpose(1, 2).unsqueeze(1)), px)  # [B, 3, rows, S]
    out = _round_shift(torch.matmul(wy.unsqueeze(1), out), py)  # [B, 3, S, S]
    out = out.to(torch.float32).div_(255)
    out = torch.where(flips.to(device, torch.bool).view(-1, 1, 1, 1), out.flip(-1), out)
    if mean is not None:
        mean_t, std_t = device_channel_stats(mean, std, device)
        out = out.sub_(mean_t).div_(std_t)
    return out


_DEVICE_STATS: dict = {}


def device_channel_stats(mean: Sequence[float], std: Sequence[float], device) -> tuple[torch.Tensor, torch.Tensor]:
    """`mean`/`std` as float32 `[3, 1, 1]` tensors on `device`, made once per (values, device): a
    `torch.tensor(..., device="cuda")` per batch is a host-to-device copy that waits for the device."""
    key = (tuple(float(v) for v in mean), tuple(float(v) for v in std), str(torch.device(device)))
    stats = _DEVICE_STATS.get(key)
    if stats is None:
        # ordinary tensors even when a build (inference mode) makes them first: training reuses them
        with torch.inference_mode(False):
            stats = tuple(to_device(torch.tensor(v, dtype=torch.float32).view(3, 1, 1), device) for v in key[:2])
        _DEVICE_STATS[key] = stats
    return stats


def collate_device_replay(items: list[dict]) -> dict:
    """The default collation plus, for device-replay items, `region_pad` (host ints: the padded crop
    size of the batch). Other items (e.g. an evaluation set without a store) collate as usual."""
    from torch.utils.data import default_collate

    batch = default_collate(items)
    if "region_crop" not in batch:
        return batch
    crops = batch["region_crop"].numpy()
    batch["region_pad"] = (padded_size(crops[:, 2]), padded_size(crops[:, 3]))
    return batch


def render_batch(data, inputs: dict) -> torch.Tensor:
    """The normalised `[B, 3, S, S]` pixels of a collated device-replay batch, on the store's device."""
    return render_regions(data.image_store, inputs["image_index"], inputs["region_crop"], inputs["region_flip"],
                          data.spec, tuple(int(v) for v in inputs["region_pad"]), data.image_mean, data.image_std)


class PreparedChunk:
    """The host half of rendering a chunk: its distinct images' pixels in one flat uint8 `[P, 3]`
    buffer (pinned when the device is CUDA) and every job's image slot, pixel box and flip."""

    def __init__(self, chunk: list, device: torch.device):
        slots: dict[int, int] = {}
        images = []
        for image, _, _, _ in chunk:
            if id(image) not in slots:
                slots[id(image)] = len(images)
                images.append(image)
        self.heights = np.array([im.shape[1] for im in images], dtype=np.int64)
        self.widths = np.array([im.shape[2] for im in images], dtype=np.int64)
        self.pixels = pinned_empty((int((self.heights * self.widths).sum()), 3), torch.uint8, device)
        # CHW views of HWC decodes: permuted back they are contiguous, so this is the only copy
        torch.cat([im.permute(1, 2, 0).reshape(-1, 3) for im in images], out=self.pixels)
        self.index = np.array([slots[id(job[0])] for job in chunk], dtype=np.int64)
        self.crops = pixel_boxes(np.stack([np.asarray(job[1]) for job in chunk]), self.heights[self.index],
                                 self.widths[self.index])
        self.flips = np.array([bool(job[2]) for job in chunk], dtype=bool)
        self.pad = (padded_size(self.crops[:, 2]), padded_size(self.crops[:, 3]))


class DeviceChunkRenderer:
    """The table/cache builders' region renderer on the teacher's device: each chunk of
    `(image, box, flip, row)` jobs (uint8 CPU images) is uploaded once per distinct image and
    rendered by `render_regions` in one batched computation, equal to the CPU renderer it
    replaces (bit for bit on a CPU device, within one float32 ulp on CUDA). The builder uses it when the teacher runs on an accelerator.

    `prepare(chunk)` is the host half (thread-safe: builders run it in their host pool, ahead of
    the device), `render(prepared)` queues the uploads (non-blocking from pinned memory on CUDA)
    and the kernel."""

    def __init__(self, spec: RegionSpec, mean, std, device):
        self.spec, self.mean, self.std, self.device = spec, tuple(mean), tuple(std), torch.device(device)

    def prepare(self, chunk: list) -> PreparedChunk:
        return PreparedChunk(chunk, self.device)

    def render(self, prepared: PreparedChunk) -> torch.Tensor:
        """Normalised float32 `[len(chunk), 3, S, S]` on the device (queued, not waited for)."""
        store = DeviceImageStore(to_device(prepared.pixels, self.device), prepared.heights, prepared.widths)
        with torch.inference_mode():
            return render_regions(store, to_device(prepared.index, self.device),
                                  to_device(prepared.crops, self.device), to_device(prepared.flips, self.device),
                                  self.spec, prepared.pad, self.mean, self.std)
