"""Speed options of `FDBPLTrainer` that keep the comparison fair: the online teacher runs with the
student's precision and compilation, and nothing in a training step waits for the device.

- Precision: accelerate applies `--bf16`/`--fp16` autocast to the student's forward only (it wraps
  `model.forward`); `TeacherRunner` runs the online teacher under the same autocast.
  With `cast_frozen_backbone` (the default) both frozen backbones are cast to that precision once
  per `train`/`evaluate`/`predict` instead (`fdbpl_hf.precision`), and compute without autocast.
- Compilation: `--torch_compile` (transformers' own option, with `--torch_compile_backend` and
  `--torch_compile_mode`) makes accelerate `torch.compile` the student model; the trainer compiles
  the FDBPL loss and the online teacher's forward with the same backend and mode.
  `--torch_compile_mode reduce-overhead` (CUDA graphs) is for CUDA devices only.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable, Optional

import torch
import transformers

logger = logging.getLogger(__name__)

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_options(args) -> Optional[dict]:
    """`torch.compile` keyword arguments from the Trainer's `torch_compile*` arguments, or None when
    compilation is off. Raises when a CUDA-graph mode is asked for on another device."""
    if not getattr(args, "torch_compile", False):
        return None
    mode = args.torch_compile_mode
    if mode in CUDA_GRAPH_MODES and args.device.type != "cuda":
        raise ValueError(f"torch_compile_mode={mode!r} captures CUDA graphs, and this run is on {args.device.type}: "
                         "leave torch_compile_mode unset (plain torch.compile) off CUDA")
    return {"backend": args.torch_compile_backend or "inductor", "mode": mode}


def compiled(fn: Callable, options: Optional[dict]) -> Callable:
    """`fn` compiled with `options` (from `compile_options`), or `fn` itself when they are None."""
    return fn if options is None else torch.compile(fn, **options)


def autocast_factory(accelerator, device_type: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast `accelerator.autocast()` enters (its precision on `device_type`), as a
    plain `torch.autocast` that dynamo traces (accelerate's own builds its arguments through
    `os.environ`, which a fullgraph compile cannot trace). Its cache is off: a cast cached while a
    CUDA graph is captured would be replayed stale (PyTorch's rule), and nothing here casts a leaf
    that requires grad, which is all the cache serves."""
    precision = str(getattr(accelerator, "mixed_precision", "no"))
    if not getattr(accelerator, "native_amp", False) or precision not in ("bf16", "fp16"):
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, device_type, dtype=dtype, cache_enabled=False)


class TeacherRunner:
    """Runs the online teacher as the trainer runs the student: under the student's autocast (same
    precision; `autocast` a factory such as `autocast_factory`'s) and compiled with the student's
    options (same compilation). Output: float32 logits `[B, C]`, a fresh tensor (CUDA graphs reuse
    their output memory at the next replay)."""

    def __init__(self, teacher, autocast: Callable[[], contextlib.AbstractContextManager], options: Optional[dict]):
        self.teacher = teacher
        self.autocast = autocast
        self.options = options
        self._logits = compiled(teacher.logits, options)

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            out = self._logits(pixel_values)
        out = out.float()
        return out.clone() if self.options is not None and out.dtype == torch.float32 else out


class PixelRenormaliser:
    """Turns pixels normalised with one mean/std into pixels normalised with another, with the
    constants already on the device (a `torch.tensor(..., device=cuda)` per step is a blocking copy)."""

    def __init__(self, from_mean, from_std, to_mean, to_std, device):
        def col(values):
            return torch.tensor(values, dtype=torch.float32, device=device).view(3, 1, 1)

        self.from_mean, self.from_std = col(from_mean), col(from_std)
        self.to_mean, self.to_std = col(to_mean), col(to_std)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        # the arithmetic of un-normalising and `regions.normalize`, step by step (same rounding)
        raw = pixels * self.from_std + self.from_mean
        return (raw - self.to_mean) / self.to_std
