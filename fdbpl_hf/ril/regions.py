"""Region sampling and exact replay: the geometry shared by the table builder and the trainer.

A region is a crop box normalised to the image (top, left, height, width in [0, 1]) stored as
uint16 fixed point (x / 65535: uniform 1.5e-5 precision, better than fp16 near 1), plus a
horizontal-flip flag. The builder crops from the *decoded stored* box, so replay reproduces the
teacher's pixels by construction.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..clip_ops import normalize_pixels
from ..validation import check_fields, flag, integer, interval, one_of, probability

BOX_SCALE = 65535
RENDERERS = ("uint8", "float")
# both renderers resize with F.interpolate(align_corners=False), which the other modes refuse
INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class RegionSpec:
    """How regions are drawn and rendered (RandomResizedCrop semantics).

    `output_size` is the teacher's input size; a student must share it to replay the table.
    `renderer` is how crops are resized: "uint8" (default: PyTorch's antialiased uint8 kernels,
    PIL's filter, about 4-8x cheaper on CPU) or "float" (float32 interpolation, used by fdbpl_hf 0.1 tables,
    which have no renderer field and keep replaying with it). Builder and replay always use
    the table's renderer, so replay stays exact either way.
    `exif_transpose`: turn each image upright by its EXIF orientation before cropping, as
    `datasets.Image` decodes it (so training sees the images evaluation sees); tables built before
    the field existed replay without it, as they were built.
    """

    # the rules in the annotations are checked by __post_init__ (fdbpl_hf.validation)
    output_size: Annotated[int, integer(1)] = 224
    scale: Annotated[tuple[float, float], interval(0, 1, low_open=True)] = (0.08, 1.0)  # of the image's area
    ratio: Annotated[tuple[float, float], interval(0, low_open=True)] = (3 / 4, 4 / 3)  # finite: log-uniform draw
    flip_prob: Annotated[float, probability()] = 0.5
    interpolation: Annotated[str, one_of(*INTERPOLATIONS)] = "bicubic"
    antialias: Annotated[bool, flag()] = True
    renderer: Annotated[str, one_of(*RENDERERS)] = "uint8"
    exif_transpose: Annotated[bool, flag()] = True

    def __post_init__(self) -> None:
        check_fields(self)
        # numpy numbers (np.float32(0.08)) as the Python numbers of the same value: the spec is stored as JSON
        for name, cast in (("output_size", int), ("flip_prob", float)):
            object.__setattr__(self, name, cast(getattr(self, name)))
        for name in ("scale", "ratio"):
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        if self.renderer == "uint8" and not self.antialias:
            raise ValueError("the uint8 renderer resizes with antialiased filters only: use renderer='float' for "
                             "antialias=False")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RegionSpec":
        d = dict(d)
        d.setdefault("renderer", "float")  # tables from before the field was added
        d.setdefault("exif_transpose", False)  # tables up to 0.5.0 cropped the stored orientation
        d["scale"], d["ratio"] = tuple(d["scale"]), tuple(d["ratio"])
        return cls(**d)


def region_rng(seed: int, image_index: int) -> np.random.Generator:
    """The generator of one image's regions: depends only on (seed, row), not on batching or ranks."""
    return np.random.default_rng([seed, image_index])


def sample_regions(height: int, width: int, num_regions: int, spec: RegionSpec,
                   rng: np.random.Generator, attempts: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """`num_regions` RandomResizedCrop boxes as uint16 `[M, 4]` (top, left, h, w) and flips `[M]`."""
    area = height * width
    shape = (num_regions, attempts)
    target = area * rng.uniform(spec.scale[0], spec.scale[1], size=shape)
    aspect = np.exp(rng.uniform(math.log(spec.ratio[0]), math.log(spec.ratio[1]), size=shape))
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.argmax(axis=1)
    pick = np.arange(num_regions)
    h, w, ok = h[pick, first], w[pick, first], valid[pick, first]
    # Fallback when no attempt fits: the central crop at the closest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < spec.ratio[0]:
        fw, fh = width, int(round(width / spec.ratio[0]))
    elif in_ratio > spec.ratio[1]:
        fh, fw = height, int(round(height * spec.ratio[1]))
    else:
        fw, fh = width, height
    h = np.where(ok, h, max(fh, 1))
    w = np.where(ok, w, max(fw, 1))
    top_u, left_u = rng.random(num_regions), rng.random(num_regions)
    top = np.where(ok, np.floor(top_u * (height - h + 1)), (height - h) // 2)
    left = np.where(ok, np.floor(left_u * (width - w + 1)), (width - w) // 2)
    flips = rng.random(num_regions) < spec.flip_prob
    boxes = np.stack([top / height, left / width, h / height, w / width], axis=1)
    return np.rint(boxes * BOX_SCALE).astype(np.uint16), flips


def decode_box(box, height: int, width: int) -> tuple[int, int, int, int]:
    """Stored uint16 box -> integer pixel box (top, left, h, w), clipped inside the image."""
    t, l, h, w = (float(v) / BOX_SCALE for v in box)
    top = min(int(round(t * height)), height - 1)
    left = min(int(round(l * width)), width - 1)
    bh = max(1, min(int(round(h * height)), height - top))
    bw = max(1, min(int(round(w * width)), width - left))
    return top, left, bh, bw


# 16-bit integer modes: values 0..65535 map to 0..255 (x / 257: 65535 -> 255 exactly)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def rgb_array(image: Image.Image, where: str = "the image") -> np.ndarray:
    """A PIL image as uint8 RGB `[H, W, 3]`, scaled by what its pixel type means.

    8-bit modes (L, P, CMYK, RGBA, LA, 1, ...) go through PIL's `convert("RGB")` (alpha dropped).
    16-bit images (I;16*) and 32-bit integer images (I, as PIL opens 16-bit PNGs) are 16-bit
    intensities: x / 257. Float images (F) must hold intensities in [0, 1]: x * 255. Anything
    else (negative or larger values, NaN) is refused with `where` named, since PIL's own
    conversion clips such images to black and white.
    """
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if mode in _SIXTEEN_BIT or mode == "I" or mode == "F":
        values = np.asarray(image)
        if mode == "F":
            values = values.astype(np.float64)
            lo, hi = (float(np.nanmin(values)), float(np.nanmax(values))) if values.size else (0.0, 0.0)
            if not np.isfinite(values).all() or lo < 0 or hi > 1:
                raise ValueError(f"{where} is a float image (mode F) with values in [{lo:g}, {hi:g}]: float images "
                                 "must hold intensities in [0, 1]. Rescale it (or convert it to 8-bit) first.")
            scaled = np.rint(values * 255.0)
        else:
            values = values.astype(np.int64)
            lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
            if lo < 0 or hi > 65535:
                raise ValueError(f"{where} is a 32-bit integer image (mode {mode}) with values in [{lo}, {hi}], "
                                 "outside the 16-bit range 0-65535 it is read as. Rescale it to 8 or 16 bits "
                                 "first.")
            scaled = np.rint(values / 257.0)
        gray = scaled.astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("I;16S", "I;32", "I;32S", "I;32L", "I;32B", "F;16", "F;32"):
        raise ValueError(f"{where} has the raw pixel mode {mode}, which fdbpl_hf cannot scale to 8 bits reliably: "
                         "convert it to RGB yourself")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def rgb_image(image: Image.Image, where: str = "the image") -> Image.Image:
    """`rgb_array` as a PIL RGB image (for image processors)."""
    if image.mode == "RGB":
        return image
    return Image.fromarray(rgb_array(image, where), mode="RGB")


def image_to_tensor(image: Image.Image, where: str = "the image") -> torch.Tensor:
    """PIL image -> uint8 `[3, H, W]` through `rgb_array` (16-bit and float images scaled by their
    pixel type, or refused; 8-bit modes converted by PIL)."""
    return torch.from_numpy(rgb_array(image, where).copy()).permute(2, 0, 1)


def render_region(image: torch.Tensor, box, flip: bool, spec: RegionSpec) -> torch.Tensor:
    """Crop, resize and flip one region of a uint8 `[3, H, W]` image -> float `[3, S, S]` in [0, 1].

    The "uint8" renderer runs on the CPU (PyTorch has no uint8 antialiased kernels on GPUs): the
    result is on the CPU whatever the image's device."""
    if spec.renderer == "uint8":
        out = _resized_uint8(image, box, spec).float().div_(255)
        return out.flip(-1) if flip else out
    _, height, width = image.shape
    top, left, h, w = decode_box(box, height, width)
    size = (spec.output_size, spec.output_size)
    crop = image[:, top : top + h, left : left + w].unsqueeze(0).float()
    out = F.interpolate(crop, size=size, mode=spec.interpolation, align_corners=False,
                        antialias=spec.antialias and (h > size[0] or w > size[1]))
    out = out.clamp_(0, 255).squeeze(0).div_(255)
    return out.flip(-1) if flip else out


def _resized_uint8(image: torch.Tensor, box, spec: RegionSpec) -> torch.Tensor:
    """The "uint8" renderer's crop and antialiased resize: uint8 `[3, S, S]` on the CPU."""
    _, height, width = image.shape
    top, left, h, w = decode_box(box, height, width)
    crop = image[:, top : top + h, left : left + w].unsqueeze(0).cpu().contiguous()
    size = (spec.output_size, spec.output_size)
    return F.interpolate(crop, size=size, mode=spec.interpolation, align_corners=False, antialias=True).squeeze(0)


def render_jobs(jobs, spec: RegionSpec, mean, std) -> torch.Tensor:
    """Normalised float32 pixels `[n, 3, S, S]` of `(image, box, flip, ...)` jobs, on the CPU for the
    "uint8" renderer: equal, bit for bit, to stacking `render_region(image, box, flip, spec)` and
    normalising the stack (`mean`/`std`: sequences or `channel_stats` tensors). The uint8 renderer's
    regions are resized into one uint8 batch and converted once (every element goes through the
    same correctly rounded float operations, and a flip only moves values), not per region."""
    if spec.renderer != "uint8":
        pixels = torch.stack([render_region(image, box, bool(flip), spec) for image, box, flip, *_ in jobs])
        return normalize_pixels(pixels, mean, std, inplace=True)
    size = spec.output_size
    batch = torch.empty((len(jobs), 3, size, size), dtype=torch.uint8)
    for n, (image, box, flip, *_) in enumerate(jobs):
        out = _resized_uint8(image, box, spec)
        batch[n].copy_(out.flip(-1) if flip else out)
    return normalize_pixels(batch.float().div_(255), mean, std, inplace=True)


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """Per-channel normalisation of `[..., 3, S, S]` pixels in [0, 1]."""
    return normalize_pixels(pixels, mean, std)
