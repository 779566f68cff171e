"""Small operations every part of the package does the same way: CLIP's pixel normalisation,
the text features of prompt templates and the checks on them (the model's own tokenizer, one
distinct prompt per class), and running torch on a given number of threads."""

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


def check_tokenizer(clip, tokenizer) -> None:
    """Refuse a tokenizer that is not the CLIP model's: the text tower pools at the tokenizer's EOS
    (the first `eos_token_id` of each row, or the largest id for legacy configs with id 2), so an
    EOS the model does not know pools every prompt at position 0: identical features, no error."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    vocab = clip.config.text_config.vocab_size
    if bos is None or eos is None:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no BOS or EOS token: pass the CLIP "
                         "model's own tokenizer")
    model_eos = getattr(clip.text_model, "eos_token_id", clip.config.text_config.eos_token_id)
    if max(bos, eos) >= vocab or (model_eos != 2 and eos != model_eos):
        raise ValueError(f"the tokenizer's BOS/EOS ids ({bos}, {eos}) are not the CLIP model's (EOS "
                         f"{model_eos}, {vocab} token embeddings): pass the model's own tokenizer")


def refuse_identical_prompts(class_names: Sequence[str], token_rows: Sequence[Sequence[int]]) -> None:
    """Two classes whose prompts are the same tokens ("cat" and "Cat ", or ImageNet's two "maillot")
    get the same text features: the later one could never be predicted, a silently wrong accuracy."""
    seen: dict[tuple, int] = {}
    for i, ids in enumerate(token_rows):
        j = seen.setdefault(tuple(ids), i)
        if j != i:
            raise ValueError(f"classes {j} ({class_names[j]!r}) and {i} ({class_names[i]!r}) give the same prompt "
                             "tokens, hence the same text features: one of them could never be predicted; "
                             "give each class a distinct name")


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
