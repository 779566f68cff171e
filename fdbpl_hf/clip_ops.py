"""Small operations every part of the package does the same way: CLIP's pixel normalisation,
the text features of prompt templates, and running torch on a given number of threads."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

# OpenAI CLIP's image normalisation (its CLIPImageProcessor's image_mean / image_std)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def channel_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """`mean` and `std` as float32 `[3, 1, 1]` tensors, which broadcast over `[..., 3, S, S]` pixels."""
    return (torch.tensor(mean, dtype=torch.float32).view(3, 1, 1),
            torch.tensor(std, dtype=torch.float32).view(3, 1, 1))


def normalize_pixels(pixels: torch.Tensor, mean, std, *, inplace: bool = False) -> torch.Tensor:
    """`(pixels - mean) / std` per channel for `[..., 3, S, S]` pixels in [0, 1]; `mean`/`std` are
    sequences or `channel_stats` tensors. `inplace=True` reuses `pixels` (no pixel-sized copies)."""
    mean_t = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
    return pixels.sub_(mean_t).div_(std_t) if inplace else (pixels - mean_t) / std_t


def prompt_text_features(clip, tokenizer, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """L2-normalised text features `[T, C, P]` of every template `t.format(class_name)` of a
    `CLIPModel` (no gradients): a teacher ensembles them, a zero-shot classifier takes one."""
    device = next(clip.parameters()).device
    with torch.no_grad():
        feats = []
        for template in templates:
            tokens = tokenizer([template.format(c) for c in class_names], padding=True,
                               return_tensors="pt").to(device)
            feats.append(F.normalize(clip.get_text_features(**tokens).pooler_output.float(), dim=-1))
    return torch.stack(feats)


@contextlib.contextmanager
def torch_threads(num_threads: Optional[int]) -> Iterator[None]:
    """Run the block with `num_threads` torch intra-op threads, then restore the previous count
    (None: leave the setting alone)."""
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    if previous != num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
