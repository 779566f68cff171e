"""Speed options of `FDBPLTrainer` that keep the comparison fair: the online teacher runs with the
student's precision and compilation, and nothing in a training step waits for the device.

- Precision: accelerate applies `--bf16`/`--fp16` autocast to the student's forward only (it wraps
  `model.forward`); `TeacherRunner` runs the online teacher under the same `accelerator.autocast()`.
- Compilation: `--torch_compile` (transformers' own option, with `--torch_compile_backend` and
  `--torch_compile_mode`) makes accelerate `torch.compile` the student model; the trainer compiles
  the FDBPL loss and the online teacher's forward with the same backend and mode.
  `--torch_compile_mode reduce-overhead` (CUDA graphs) is for CUDA devices only.
"""

from __future__ import annotations

import inspect
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


class TeacherRunner:
    """Runs the online teacher as the trainer runs the student: under the accelerator's autocast
    (same precision) and compiled with the student's options (same compilation). Output: float32
    logits `[B, C]`, a fresh tensor (CUDA graphs reuse their output memory at the next replay)."""

    def __init__(self, teacher, accelerator, options: Optional[dict]):
        self.teacher = teacher
        self.accelerator = accelerator
        self.options = options
        self._logits = compiled(teacher.logits, options)

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.accelerator.autocast():
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


def prepared_text_mask(text_model, attention_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """The attention mask transformers' CLIP text tower derives from a 2-D padding mask (4-D, or
    None when nothing is padded), computed once: `create_causal_mask` checks the padding on the
    host (`padding_mask.all()`, a device sync) at every call, and returns a prepared 4-D mask as is."""
    from transformers.masking_utils import create_causal_mask

    weight = text_model.embeddings.token_embedding.weight
    # only the shape, dtype and device of the embeddings are read: a stride-0 view, no memory
    embeds = torch.empty((), dtype=weight.dtype, device=weight.device).expand(
        *attention_mask.shape, weight.shape[-1])
    return create_causal_mask(**causal_mask_arguments(create_causal_mask, text_model.config, embeds, attention_mask))


def causal_mask_arguments(create_causal_mask: Callable, config, embeds: torch.Tensor,
                          attention_mask: torch.Tensor) -> dict:
    """The keyword arguments CLIP's text tower passes to `create_causal_mask` (no cache), spelled as
    the installed transformers names them: 5.0 takes `input_embeds`, `cache_position` and
    `past_key_values`; later 5.x `inputs_embeds` and `past_key_values`; 5.2x `inputs_embeds` and `cache`."""
    names = inspect.signature(create_causal_mask).parameters
    kwargs = {"config": config, "attention_mask": attention_mask,
              ("inputs_embeds" if "inputs_embeds" in names else "input_embeds"): embeds}
    # 5.2x still accepts a deprecated keyword-only past_key_values, with a warning when both are given
    kwargs["cache" if "cache" in names else "past_key_values"] = None
    if "cache_position" in names:  # what CLIP's own call passes there: the positions of the whole sequence
        kwargs["cache_position"] = torch.arange(embeds.shape[1], device=embeds.device)
    unknown = set(kwargs) - set(names)
    if unknown or not all(p.name in kwargs for p in names.values() if p.default is inspect.Parameter.empty):
        raise RuntimeError(f"transformers {transformers.__version__}'s create_causal_mask{inspect.signature(create_causal_mask)} "
                           "is not one fdbpl_hf knows (5.0-5.25): please report it with your transformers version")
    return kwargs
