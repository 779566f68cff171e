"""The frozen backbone's precision: cast once, not at every call.

autocast casts a float32 weight to bf16 at every op that uses it (it keeps casts only of leaves
that require grad, and the backbone is frozen): about 490 casts per training step of a ViT-B/32
student. `frozen_weights_in` casts the frozen parameters of a model once for a block (the Trainer
wraps `train`, `evaluate` and `predict` in it under `--bf16`/`--fp16`) and puts the very same
float32 tensors back afterwards, so the model the user holds is unchanged once the block ends.
Inside, the towers compute in their weights' dtype with autocast switched off
(`reduced_precision_block`), as CLIP is usually run in half precision (CoOp's "fp16"); the
learnable contexts, their gradients, the logits and the loss stay float32.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from .frozen_layers import forget

logger = logging.getLogger(__name__)

REDUCED_DTYPES = (torch.bfloat16, torch.float16)


def module_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """The dtype of a module's first floating-point parameter (None if it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def module_device_type(module: nn.Module) -> str:
    """The device type ("cuda", "cpu", ...) of a module's first parameter."""
    for p in module.parameters():
        return p.device.type
    return "cpu"


def reduced_precision_block(module: nn.Module, dtype: Optional[torch.dtype] = None):
    """A context for running `module` whose weights are in `dtype` (default: its own): autocast off
    when that is bf16/fp16 (autocast would re-cast activations and, for its float32 ops such as
    layer norm on CUDA, the weights too), nothing otherwise (float32 weights keep an enclosing
    autocast, as before)."""
    dtype = dtype or module_dtype(module)
    device_type = module_device_type(module)
    if dtype in REDUCED_DTYPES and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def frozen_weights_in(modules: Iterable[nn.Module], dtype: torch.dtype) -> Iterator[list[nn.Module]]:
    """Within the block, every floating-point parameter and buffer of the `modules` is in `dtype`;
    afterwards the original tensors are back (the same storage, bit for bit).

    All or nothing: if one of them has a trainable parameter, none is cast (with a warning), since a
    cast frozen part next to a float32 trainable one would fail inside the forward. Nesting is
    free: tensors already in `dtype` are not touched. Yields the modules it cast.
    """
    modules = list(modules)
    trainable = [type(m).__name__ for m in modules if any(p.requires_grad for p in m.parameters())]
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    cast: list[nn.Module] = []
    if trainable:
        logger.warning("the backbone keeps its float32 weights: %s has trainable parameters (only a frozen backbone "
                       "is cast to %s once; autocast casts it at every call instead)", trainable[0], dtype)
        modules = []
    seen: set[int] = set()
    try:
        for module in modules:
            changed = False
            for t in (*module.parameters(), *module.buffers()):
                if not t.is_floating_point() or t.dtype == dtype or id(t) in seen:
                    continue
                seen.add(id(t))
                swapped.append((t, t.data))
                t.data = t.data.to(dtype)
                changed = True
            if changed:
                cast.append(module)
        yield cast
    finally:
        for t, original in reversed(swapped):
            t.data = original
        for module in cast:  # the encoders' prepared bf16 copies (fdbpl_hf.frozen_layers): free them now
            forget(module)
