"""A small offline model zoo: a teacher and a student CLIP pretrained on real digit images.

No pretrained CLIP can be downloaded where the examples and tests run, and numbers measured
with random-weight CLIPs mean nothing. This module makes a small world where they do mean
something: two small `CLIPModel`s pretrained contrastively (CLIP's symmetric InfoNCE with a
learnable temperature) on the *train* part of the offline MNIST digits (`fdbpl_hf.data`'s fixed
80/20 split, so the test rows stay unseen), paired with captions drawn from several templates:
the teacher reads every template in `CAPTION_TEMPLATES` (the evaluation prompt among them), the
student a narrower family, `STUDENT_CAPTION_TEMPLATES`, so its hand-crafted evaluation prompt
is misphrased and a learned prompt has something to gain, as with real CLIP.

- `pretrain_clip` trains one model;
- `zero_shot_accuracy` measures CLIP zero-shot classification with one prompt template;
- `build_zoo` trains a stronger "teacher" and a weaker "student" (same image size, so the
  student can replay the teacher's regions) and saves each exactly like a Hub checkpoint, so the
  rest of the pipeline loads them with `CLIPModel.from_pretrained(path)`,
  `AutoTokenizer.from_pretrained(path)` and `CLIPImageProcessorPil.from_pretrained(path)`.

Builds are cached under `$HF_HOME/fdbpl_hf/zoo/<settings hash>` and written atomically.

A second world, `build_zoo(world="numbers")`, pretrains the same way on 100 two-digit numbers
composed from the digit split (`fdbpl_hf.data`'s "numbers"): the many-class world where a table
keeps K < C classes (`WORLDS`, `ZooWorld`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .worlds import DIGIT_NAMES, image_processor_for
from ..clip_ops import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize_pixels, prompt_text_features, torch_threads
from ..ril.regions import rgb_image

__all__ = [
    "CAPTION_TEMPLATES",
    "DIGIT_NUMERALS",
    "EVAL_TEMPLATE",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "STUDENT_CAPTION_TEMPLATES",
    "STUDENT_SPEC",
    "TEACHER_SPEC",
    "ZOO_FORMAT_VERSION",
    "NUMBERS_STUDENT_SPEC",
    "NUMBERS_TEACHER_SPEC",
    "NUMBER_CAPTION_TEMPLATES",
    "NUMBER_EVAL_TEMPLATE",
    "NUMBER_STUDENT_CAPTION_TEMPLATES",
    "WORLDS",
    "ZooModelSpec",
    "ZooWorld",
    "build_zoo",
    "default_zoo_root",
    "digits_splits",
    "pretrain_clip",
    "read_zoo_marker",
    "zero_shot_accuracy",
]

logger = logging.getLogger(__name__)

# Bump whenever a change makes previously cached zoos wrong or stale (training recipe, layout).
ZOO_FORMAT_VERSION = 2
MARKER_NAME = "zoo.json"

DIGIT_NUMERALS = [str(i) for i in range(10)]

# The zoo's zero-shot evaluation prompt, also the "digits" registry template in fdbpl_hf.data.
EVAL_TEMPLATE = "a photo of the digit {}."

# Every template is filled with every name form of a class (word and numeral), so the text
# encoder sees the same concept phrased many ways rather than memorising one string per class.
CAPTION_TEMPLATES = (
    "a photo of the digit {}.",
    "a photo of the number {}.",
    "the number {}",
    "the digit {}",
    "a handwritten {}.",
    "a handwritten digit {}.",
    "an image of a {}.",
    "a picture of the digit {}.",
    "a drawing of the number {}.",
    "a black and white photo of a {}.",
    "a blurry photo of the digit {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the digit {}.",
    "{}",
    "{}.",
)

# The student's captions: a narrower caption distribution (numbers and handwriting) that never
# uses the words "photo", "of" or "digit". Its hand-crafted prompt `EVAL_TEMPLATE` is therefore
# phrased in words its text tower never learned, as real CLIP's hand-crafted prompts are guesses
# at its web-caption distribution: the prompt, not the image features, is what holds the
# student back, which is the gap prompt learning exists to close. Measured on the held-out
# digits of the base classes 0-4 (`STUDENT_SPEC`): 65.4 % zero-shot with `EVAL_TEMPLATE` against
# 84.0 % with the bare name "{}", 82.5 % for a nearest-class-mean of 16 shots per class and
# 91.4 % for a linear probe on all train rows (the frozen image features are not the limit).
# Trained on every caption template instead (zoo format 1), the student scored 79.4 % on base
# with `EVAL_TEMPLATE`, already the 16-shot class-mean level (79.1 %; a linear probe on the 16
# shots: 81.3 %): no prompt had room to beat it, and FDBPL (~80 %), CoOp and zero-shot tied.
STUDENT_CAPTION_TEMPLATES = (
    "{}",
    "{}.",
    "the number {}",
    "number {}",
    "a handwritten {}.",
    "a handwritten number {}",
)


# ---------------------------------------------------------------------------------------------
# Splits and pixels
# ---------------------------------------------------------------------------------------------


def digits_splits():
    """The fixed 80/20 stratified train/test split of the offline digits (from `fdbpl_hf.data`).

    Returns `(train, test)` `datasets.Dataset`s (4,000 / 1,000 rows). The zoo pretrains only on
    `train`; `test` is the held-out set later used for evaluation, so it is never trained on.
    """
    from ..data import get_dataset_info

    info = get_dataset_info("digits")
    return info.load("train"), info.load("test")


def _to_rgb_uint8(images: Sequence[Any], size: int) -> torch.Tensor:
    """PIL images -> uint8 `[N, 3, size, size]`, resized like `CLIPImageProcessor` would.

    The processor resizes the shortest edge (bicubic) and centre-crops; doing the same here keeps
    training pixels identical to what the saved processor produces at evaluation.
    """
    from PIL import Image

    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        image = rgb_image(image, f"image {i}")
        w, h = image.size
        if (w, h) != (size, size):
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            image = image.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            image = image.crop((left, top, left + size, top + size))
        out[i] = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _random_resized_crop(
    pixels: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Batched RandomResizedCrop on float `[B, 3, S, S]` via one affine `grid_sample`.

    FDBPL later shows the student random regions of area (0.08, 1) of each image, so the models
    see crops during pretraining too. No flips: a mirrored digit is often a different digit or
    none. Boxes are clamped inside the image (torchvision retries instead; the difference only
    slightly favours larger crops).
    """
    b = pixels.shape[0]
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    # Centres in grid_sample's [-1, 1] coordinates such that the box stays inside the image.
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - h)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def _caption_bank(tokenizer, templates: Sequence[str], class_names: Sequence[Sequence[str]], max_length: int):
    """All (class, template, name form) captions tokenised once into fixed-shape tensors.

    Returns `(input_ids [K, L], attention_mask [K, L], class_of_caption [K], captions)`; the
    texts are few (templates x names), so tokenising them once beats tokenising every batch.
    """
    captions, owners = [], []
    for c, names in enumerate(class_names):
        for template in templates:
            for name in names:
                captions.append(template.format(name))
                owners.append(c)
    tokens = tokenizer(captions, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return tokens["input_ids"], tokens["attention_mask"], torch.tensor(owners), captions


def _normalise_class_names(class_names: Sequence[str | Sequence[str]]) -> list[list[str]]:
    return [[n] if isinstance(n, str) else list(n) for n in class_names]


# ---------------------------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------------------------


def _contrastive_loss(logits_per_image: torch.Tensor, labels: torch.Tensor, multi_positive: bool) -> torch.Tensor:
    """Symmetric InfoNCE. With `multi_positive`, every same-class caption in the batch is a positive.

    With 10 classes a batch of 64 holds ~6 images per class whose captions mean the same thing.
    Plain InfoNCE treats those as negatives: even a model that separates the classes perfectly
    keeps a gradient pushing each image away from the other captions of its class, i.e. it is
    asked to tell apart captions that cannot be told apart. Spreading the target uniformly over
    the same-class pairs makes perfect class separation a stationary point, while keeping CLIP's
    symmetric image->text / text->image form and its learnable temperature. (Class-balanced
    batches would not help: with 10 classes any batch larger than 10 has duplicates.)
    """
    if not multi_positive:
        target = torch.arange(len(labels))
        return (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.t(), target)) / 2
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(1, keepdim=True)  # symmetric matrix, so it serves both directions
    loss_i = -(target * F.log_softmax(logits_per_image, dim=1)).sum(1).mean()
    loss_t = -(target * F.log_softmax(logits_per_image.t(), dim=1)).sum(1).mean()
    return (loss_i + loss_t) / 2


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # CLIP recipe: no decay on gains, biases, embeddings and the temperature.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain_clip(
    config,
    tokenizer,
    dataset,
    *,
    epochs: float,
    batch_size: int,
    lr: float,
    seed: int,
    captions: Sequence[str] = CAPTION_TEMPLATES,
    class_names: Sequence[str | Sequence[str]] | None = None,
    image_size: int | None = None,
    image_column: str = "image",
    label_column: str = "label",
    weight_decay: float = 0.1,
    warmup_fraction: float = 0.05,
    crop_scale: tuple[float, float] | None = (0.5, 1.0),
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
    multi_positive: bool = True,
    max_steps: int | None = None,
    grad_clip: float | None = 1.0,
    loss_history: list[float] | None = None,
    log_every: int = 0,
    num_threads: int | None = None,
):
    """Pretrain a fresh `CLIPModel(config)` contrastively on `dataset`'s images and class captions.

    Each image is paired with one caption drawn at random from `captions` (templates with `{}`)
    filled with one of its class's names (`class_names[c]` is a name or a list of name forms;
    default: the dataset's `ClassLabel` names plus numerals for the digits). Images are converted
    to RGB, resized to `image_size` (default: the config's), augmented with a random resized crop
    of area `crop_scale` (None disables it) and normalised with `image_mean`/`image_std`.
    Optimiser: AdamW with linear warmup then cosine decay; the temperature is CLIP's learnable
    `logit_scale`, clamped at log(100) as in CLIP. The loss is `_contrastive_loss` (see there for
    `multi_positive`).

    Deterministic for a given `seed` on a given machine: the initialisation and all sampling use
    seeded generators, and the caller's global torch RNG state is restored afterwards. The torch
    thread count is left alone unless `num_threads` is given, and then restored afterwards (one
    thread is as fast for tiny models and immune to OpenMP spin-waiting on a busy machine).
    `epochs` may be fractional; `max_steps` caps the step count. Appends each step's loss to
    `loss_history` when given. Returns the model in eval mode.
    """
    from transformers import CLIPModel

    size = int(image_size or config.vision_config.image_size)
    if size != config.vision_config.image_size:
        raise ValueError(f"image_size {size} differs from the config's {config.vision_config.image_size}")
    if size % config.vision_config.patch_size:
        raise ValueError(f"patch size {config.vision_config.patch_size} must divide image size {size}")
    if class_names is None:
        names = list(dataset.features[label_column].names)
        class_names = [[n, str(i)] for i, n in enumerate(names)] if names == DIGIT_NAMES else names
    names_per_class = _normalise_class_names(class_names)

    pixels = _to_rgb_uint8(dataset[image_column], size)
    labels = torch.tensor(dataset[label_column], dtype=torch.long)
    if labels.min() < 0 or labels.max() >= len(names_per_class):
        raise ValueError(f"labels must lie in [0, {len(names_per_class)}) to match class_names")
    max_len = config.text_config.max_position_embeddings
    ids_bank, mask_bank, owner, _ = _caption_bank(tokenizer, captions, names_per_class, max_len)
    # Per class, the bank rows of its captions, padded to a rectangle for vectorised sampling.
    per_class = [torch.nonzero(owner == c).flatten() for c in range(len(names_per_class))]
    counts = torch.tensor([len(p) for p in per_class])
    table = torch.stack([F.pad(p, (0, int(counts.max()) - len(p))) for p in per_class])

    n = len(labels)
    steps_per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    total = max(1, int(round(epochs * steps_per_epoch)))
    if max_steps is not None:
        total = min(total, max_steps)
    warmup = int(warmup_fraction * total)
    max_scale = math.log(100.0)

    with torch.random.fork_rng(devices=[]), torch_threads(num_threads):
        torch.manual_seed(seed)
        model = CLIPModel(config)
        model.train()
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)

        def lr_at(step: int) -> float:
            if step < warmup:
                return lr * (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return lr * 0.5 * (1 + math.cos(math.pi * progress))

        order = torch.randperm(n, generator=generator)
        cursor = 0
        start = time.perf_counter()
        for step in range(total):
            if cursor + batch_size > n:  # reshuffle each epoch; drop the ragged tail
                order, cursor = torch.randperm(n, generator=generator), 0
            idx = order[cursor : cursor + batch_size]
            cursor += batch_size
            batch_labels = labels[idx]
            pick = (torch.rand(len(idx), generator=generator) * counts[batch_labels]).long()
            cap = table[batch_labels, pick]

            x = pixels[idx].float().div_(255)
            if crop_scale is not None:
                x = _random_resized_crop(x, generator, crop_scale)
            x = normalize_pixels(x, image_mean, image_std)
            ids, mask = ids_bank[cap], mask_bank[cap]
            width = int(mask.sum(1).max())  # trim padding the batch does not need
            out = model(input_ids=ids[:, :width], attention_mask=mask[:, :width], pixel_values=x)
            loss = _contrastive_loss(out.logits_per_image, batch_labels, multi_positive)

            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, max_scale)
            if loss_history is not None:
                loss_history.append(loss.item())
            if log_every and (step % log_every == 0 or step == total - 1):
                logger.info("step %d/%d loss %.4f scale %.1f (%.1fs)", step + 1, total, loss.item(),
                            float(model.logit_scale.exp()), time.perf_counter() - start)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def zero_shot_accuracy(
    model,
    tokenizer,
    processor_or_norm,
    dataset,
    class_names: Sequence[str],
    template: str = EVAL_TEMPLATE,
    *,
    image_column: str = "image",
    label_column: str = "label",
    batch_size: int = 500,
) -> float:
    """CLIP zero-shot top-1 accuracy on `dataset` with one prompt `template.format(name)` per class.

    `processor_or_norm` is either an image processor (called as `processor(images=...,
    return_tensors="pt")`) or a `(mean, std)` pair, in which case images are converted to RGB,
    resized to the model's image size and normalised here (the same pixels a default
    `CLIPImageProcessor` gives for square images). The model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        text = prompt_text_features(model, tokenizer, class_names, [template])[0]
        size = model.config.vision_config.image_size
        correct = 0
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            if isinstance(processor_or_norm, (tuple, list)):
                mean, std = processor_or_norm
                x = normalize_pixels(_to_rgb_uint8(rows[image_column], size).float().div_(255), mean, std)
            else:
                x = processor_or_norm(images=[rgb_image(im, f"row {start + n}") for n, im in enumerate(rows[image_column])],
                                      return_tensors="pt")["pixel_values"]
            image = F.normalize(model.get_image_features(pixel_values=x.to(device)).pooler_output.float(), dim=-1)
            pred = (image @ text.t()).argmax(-1).cpu()
            correct += int((pred == torch.tensor(rows[label_column])).sum())
        return correct / max(1, len(dataset))
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# The zoo
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooModelSpec:
    """Architecture and training recipe of one zoo model (every field enters the cache key).

    `train_rows_per_class` trains on a seeded per-class subset of the train split (None: all of
    it); fewer rows and steps are how the student is made weaker than the teacher. `captions` are
    the caption templates (None: `CAPTION_TEMPLATES`).
    """

    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    patch_size: int = 7
    image_size: int = 28
    projection_dim: int = 128
    max_position_embeddings: int = 32
    epochs: float = 13.0
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    crop_scale: tuple[float, float] | None = (0.5, 1.0)
    train_rows_per_class: int | None = None
    seed: int = 0
    captions: tuple[str, ...] | None = None

    def config(self):
        """The `CLIPConfig` (real CLIP vocabulary and special-token ids, OpenAI-style EOS pooling)."""
        from transformers import CLIPConfig

        return CLIPConfig(
            text_config=dict(vocab_size=49408, hidden_size=self.text_width, intermediate_size=4 * self.text_width,
                             num_hidden_layers=self.text_layers, num_attention_heads=self.text_heads,
                             max_position_embeddings=self.max_position_embeddings,
                             bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
            vision_config=dict(hidden_size=self.vision_width, intermediate_size=4 * self.vision_width,
                               num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_heads,
                               image_size=self.image_size, patch_size=self.patch_size),
            projection_dim=self.projection_dim,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["crop_scale"] = list(self.crop_scale) if self.crop_scale is not None else None
        d["captions"] = list(self.captions) if self.captions is not None else None
        return d

    def replace(self, **overrides: Any) -> "ZooModelSpec":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown zoo model setting(s): {sorted(unknown)}")
        if overrides.get("crop_scale") is not None:
            overrides["crop_scale"] = tuple(overrides["crop_scale"])
        if overrides.get("captions") is not None:
            if isinstance(overrides["captions"], str):
                raise TypeError("captions must be a sequence of templates, not one string")
            overrides["captions"] = tuple(overrides["captions"])
        return dataclasses.replace(self, **overrides)


# Patch 7 (a 4x4 grid on 28px digits) rather than 4: ~3x cheaper per step, which buys the ~800
# steps a from-scratch ViT needs within the CPU budget. Measured on one thread of a shared 2-core
# machine: teacher 91.7 % zero-shot on the held-out digits (97.4 % on the base digits 0-4) in
# ~2.3 min, student 45.2 % (65.4 % on base) in ~13 s (see examples/build_zoo.py).
TEACHER_SPEC = ZooModelSpec()
# Weaker by size (width 64, 2+2 layers), data (100 of the 400 train digits per class) and steps,
# and pretrained on a narrower caption family (`STUDENT_CAPTION_TEMPLATES`) that leaves its
# hand-crafted prompt misphrased, so prompts have real headroom on its frozen image features.
# With it, FDBPL at the paper's settings (examples/demo.py) lifts base accuracy from 65.4 % to
# ~85.7 % (seeds 1-3) and novel from 64.2 % to ~73.3 %.
STUDENT_SPEC = ZooModelSpec(
    text_width=64, text_layers=2, vision_width=64, vision_layers=2, projection_dim=64,
    epochs=25.0, train_rows_per_class=100, seed=1, captions=STUDENT_CAPTION_TEMPLATES,
)


# ---------------------------------------------------------------------------------------------
# Worlds: which data and captions a zoo is pretrained on
# ---------------------------------------------------------------------------------------------

# The "numbers" world (100 two-digit numbers composed from MNIST digits, `fdbpl_hf.data`'s
# "numbers"): a many-class world where a table's top-K (K < C = 100) really drops classes and a
# region showing one digit leaves the teacher torn between ten numbers.
NUMBER_EVAL_TEMPLATE = "a photo of the number {}."
NUMBER_CAPTION_TEMPLATES = (
    "a photo of the number {}.",
    "the number {}",
    "number {}",
    "a handwritten number {}.",
    "a picture of the number {}.",
    "an image of the number {}.",
    "a photo of a {}.",
    "a black and white photo of the number {}.",
    "a close-up photo of a {}.",
    "a drawing of the number {}.",
    "{}",
    "{}.",
)
# As in the digit world: the student never reads the evaluation prompt's words "photo", "of" and
# "the", so its hand-crafted prompt is misphrased and a learned prompt has headroom.
NUMBER_STUDENT_CAPTION_TEMPLATES = (
    "{}",
    "{}.",
    "number {}",
    "a handwritten {}.",
    "a handwritten number {}",
)


# Measured (build_zoo(world="numbers"), see docs/ablations.md): teacher/student zero-shot accuracy.
# Pretraining crops keep >= 85 % of the area: a (0.5, 1) crop of a two-digit strip often cuts a
# digit off while the caption still names both (the digit zoo's crops would teach wrong pairs).
NUMBERS_TEACHER_SPEC = TEACHER_SPEC.replace(epochs=10.0, crop_scale=(0.85, 1.0))
NUMBERS_STUDENT_SPEC = STUDENT_SPEC.replace(epochs=25.0, train_rows_per_class=20, crop_scale=(0.85, 1.0),
                                            captions=NUMBER_STUDENT_CAPTION_TEMPLATES)


@dataclass(frozen=True)
class ZooWorld:
    """The data, class names and captions one zoo is pretrained on, with its default models.

    `dataset` is the `fdbpl_hf.data` registry name whose "train" split pretrains both models and
    whose "test" split (never trained on) measures their zero-shot accuracy with `eval_template`.
    `class_names[c]` are the name forms of class c filled into the captions; `captions` are the
    teacher's templates (a spec's own `captions` win, as the student's do).
    """

    name: str
    dataset: str
    class_names: tuple[tuple[str, ...], ...]
    eval_names: tuple[str, ...]
    eval_template: str
    captions: tuple[str, ...]
    teacher: ZooModelSpec
    student: ZooModelSpec

    def splits(self):
        """`(train, test)` `datasets.Dataset`s of this world."""
        if self.name == "digits":
            return digits_splits()  # looked up at call time (tests swap in a cached version)
        from ..data import get_dataset_info

        info = get_dataset_info(self.dataset)
        return info.load("train"), info.load("test")

    def settings(self, teacher: ZooModelSpec, student: ZooModelSpec) -> dict[str, Any]:
        """Everything a build depends on (the cache key is its hash)."""
        if self.name == "digits":  # the digit zoo's settings as before worlds existed: same cache key
            return _zoo_settings(teacher, student)
        return {
            "format_version": ZOO_FORMAT_VERSION,
            "world": self.name,
            "data": {"dataset": self.dataset, "train_split": "train", "test_split": "test",
                     "composition": "fdbpl_hf.offline.compose_numbers of the digit split of the same name"},
            "captions": list(self.captions),
            "class_names": [list(n) for n in self.class_names],
            "eval_template": self.eval_template,
            "image_mean": list(OPENAI_CLIP_MEAN),
            "image_std": list(OPENAI_CLIP_STD),
            "teacher": teacher.to_dict(),
            "student": student.to_dict(),
        }


def _numbers_world() -> ZooWorld:
    from .worlds import NUMBER_NAMES

    # Teacher: the digit teacher's architecture, trained longer (100 classes, 6,000 composites).
    # Student: the digit student's size on 20 composites per class and the narrow captions.
    return ZooWorld(
        name="numbers", dataset="numbers", class_names=tuple((n,) for n in NUMBER_NAMES),
        eval_names=tuple(NUMBER_NAMES), eval_template=NUMBER_EVAL_TEMPLATE, captions=NUMBER_CAPTION_TEMPLATES,
        teacher=NUMBERS_TEACHER_SPEC, student=NUMBERS_STUDENT_SPEC,
    )


def _digits_world() -> ZooWorld:
    return ZooWorld(
        name="digits", dataset="digits",
        class_names=tuple((n, str(i)) for i, n in enumerate(DIGIT_NAMES)), eval_names=tuple(DIGIT_NAMES),
        eval_template=EVAL_TEMPLATE, captions=CAPTION_TEMPLATES, teacher=TEACHER_SPEC, student=STUDENT_SPEC,
    )


# Built on demand, so a world's default specs are read when a zoo is built (not frozen at import).
WORLDS: dict[str, Callable[[], ZooWorld]] = {"digits": _digits_world, "numbers": _numbers_world}


def default_zoo_root() -> str:
    """`$HF_HOME/fdbpl_hf/zoo` (HF_HOME read now, falling back to huggingface_hub's default)."""
    hf_home = os.environ.get("HF_HOME")
    if not hf_home:
        from huggingface_hub import constants

        hf_home = constants.HF_HOME
    return os.path.join(os.path.expanduser(hf_home), "fdbpl_hf", "zoo")


def _zoo_settings(teacher: ZooModelSpec, student: ZooModelSpec) -> dict[str, Any]:
    return {
        "format_version": ZOO_FORMAT_VERSION,
        "data": {"dataset": "digits", "train_split": "train", "test_split": "test",
                 "split": "80/20 stratified, seed 0"},
        "captions": list(CAPTION_TEMPLATES),
        "class_names": [[n, str(i)] for i, n in enumerate(DIGIT_NAMES)],
        "eval_template": EVAL_TEMPLATE,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "teacher": teacher.to_dict(),
        "student": student.to_dict(),
    }


def _settings_key(settings: Mapping[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_zoo_marker(path: str | os.PathLike | Mapping[str, str]) -> dict[str, Any] | None:
    """The marker of a built zoo (settings, accuracies, timings), or None if absent/unreadable.

    `path` is the zoo directory, a model directory inside it, or `build_zoo`'s returned dict.
    """
    if isinstance(path, Mapping):
        path = os.path.dirname(os.path.abspath(path["teacher"]))
    path = os.fspath(path)
    candidates = [os.path.join(path, MARKER_NAME), os.path.join(os.path.dirname(os.path.abspath(path)), MARKER_NAME)]
    for candidate in candidates:
        try:
            with open(candidate, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            continue
    return None


def _complete(zoo_dir: str, settings: Mapping[str, Any]) -> bool:
    marker = read_zoo_marker(zoo_dir) if os.path.isfile(os.path.join(zoo_dir, MARKER_NAME)) else None
    if marker is None or marker.get("settings") != json.loads(json.dumps(settings)):
        return False
    return all(os.path.isfile(os.path.join(zoo_dir, name, "config.json")) for name in ("teacher", "student"))


def _remove_tree(path: str) -> None:
    # Rename first so a concurrent reader never sees a half-deleted zoo under the final name.
    trash = f"{path}.trash-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def build_zoo(
    cache_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
    teacher_kwargs: Mapping[str, Any] | None = None,
    student_kwargs: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    num_threads: int | None = None,
    world: str | ZooWorld = "digits",
) -> dict[str, str]:
    """Train (or reuse) the teacher and student CLIPs; returns `{"teacher": path, "student": path}`.

    `world` picks the data and captions (`WORLDS`: "digits", the default, or "numbers", 100
    two-digit numbers). `teacher_kwargs` / `student_kwargs` override fields of the world's
    default specs (digits: `TEACHER_SPEC` / `STUDENT_SPEC`, numbers: `NUMBERS_TEACHER_SPEC` /
    `NUMBERS_STUDENT_SPEC`; `ZooModelSpec`). The zoo lives in `<cache_dir>/<hash of settings and
    ZOO_FORMAT_VERSION>` (`cache_dir` defaults to `default_zoo_root()`), holding `teacher/`, `student/` (each a
    `save_pretrained` model + tokenizer + image processor directory) and `zoo.json` (the settings,
    the zero-shot accuracies of both models on the world's held-out test split with its evaluation
    template, over all classes and (`zero_shot_base_novel`) base / novel among their own classes, and
    build times). A zoo whose marker matches the settings is reused unless `force`. A build is
    trained in a temporary sibling directory and moved into place with one `os.replace`, so an
    interrupted build never leaves a partial zoo. `progress` receives one-line status messages;
    `num_threads` is passed to `pretrain_clip` (it is not part of the cache key).
    """
    from .worlds import clip_tokenizer

    say = progress or logger.info
    if isinstance(world, str):
        if world not in WORLDS:
            raise ValueError(f"unknown zoo world {world!r}; choose from {sorted(WORLDS)}")
        world = WORLDS[world]()
    teacher = world.teacher.replace(**dict(teacher_kwargs or {}))
    student = world.student.replace(**dict(student_kwargs or {}))
    if teacher.image_size != student.image_size:
        raise ValueError(f"teacher and student must share the image size (FDBPL replays teacher-sized regions), "
                         f"got {teacher.image_size} and {student.image_size}")
    settings = world.settings(teacher, student)
    root = os.path.abspath(os.path.expanduser(os.fspath(cache_dir)) if cache_dir is not None else default_zoo_root())
    zoo_dir = os.path.join(root, _settings_key(settings))
    paths = {"teacher": os.path.join(zoo_dir, "teacher"), "student": os.path.join(zoo_dir, "student")}
    if not force and _complete(zoo_dir, settings):
        say(f"zoo cache hit: {zoo_dir}")
        return paths

    os.makedirs(root, exist_ok=True)
    train, test = world.splits()
    class_names = settings["class_names"]
    eval_names = list(world.eval_names)
    template = world.eval_template
    from ..data import base_novel_split, subset_classes

    base_ids, novel_ids = base_novel_split(len(eval_names))
    test_parts = {"base": subset_classes(test, base_ids), "novel": subset_classes(test, novel_ids)}
    # os.mkdir, unlike tempfile.mkdtemp (0700), honours the umask, so a shared cache stays readable.
    tmp = os.path.join(root, f".{os.path.basename(zoo_dir)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        accuracy, base_novel, seconds, cpu_seconds, num_rows = {}, {}, {}, {}, {}
        for role, spec in (("teacher", teacher), ("student", student)):
            config = spec.config()
            tokenizer = clip_tokenizer(model_max_length=spec.max_position_embeddings)
            rows = train
            if spec.train_rows_per_class is not None:
                from ..data import few_shot_indices

                rows = train.select(few_shot_indices(train, spec.train_rows_per_class, seed=spec.seed))
            num_rows[role] = len(rows)
            say(f"training {role} on {len(rows)} images ...")
            start, cpu_start = time.perf_counter(), time.process_time()
            model = pretrain_clip(
                config, tokenizer, rows, epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed,
                captions=spec.captions or settings["captions"], class_names=class_names, image_size=spec.image_size,
                weight_decay=spec.weight_decay, warmup_fraction=spec.warmup_fraction, crop_scale=spec.crop_scale,
                num_threads=num_threads,
            )
            seconds[role] = round(time.perf_counter() - start, 2)
            cpu_seconds[role] = round(time.process_time() - cpu_start, 2)
            processor = image_processor_for(config, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
            accuracy[role] = zero_shot_accuracy(model, tokenizer, processor, test, eval_names, template)
            # The protocol's view: base images among base classes only, novel among novel only.
            base_novel[role] = {
                part: zero_shot_accuracy(model, tokenizer, processor, test_parts[part],
                                         [eval_names[i] for i in ids], template)
                for part, ids in (("base", base_ids), ("novel", novel_ids))
            }
            say(f"{role}: {seconds[role]:.1f}s, zero-shot accuracy {accuracy[role]:.4f} on {len(test)} test images "
                f"(base {base_novel[role]['base']:.4f}, novel {base_novel[role]['novel']:.4f})")
            out = os.path.join(tmp, role)
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            processor.save_pretrained(out)
        import transformers

        marker = {
            "settings": settings,
            "key": os.path.basename(zoo_dir),
            "zero_shot_accuracy": accuracy,
            "zero_shot_base_novel": base_novel,
            "eval": {"template": template, "class_names": eval_names, "split": "test", "num_rows": len(test),
                     "base_ids": base_ids, "novel_ids": novel_ids},
            "train_rows": num_rows,
            "build_seconds": seconds,
            "build_cpu_seconds": cpu_seconds,  # all threads; about 2x wall time on an idle 2-core machine
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with open(os.path.join(tmp, MARKER_NAME), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=1)
            f.write("\n")
        if not force and _complete(zoo_dir, settings):
            # A concurrent build of the same settings finished first: keep its (identical) zoo.
            shutil.rmtree(tmp, ignore_errors=True)
            say(f"zoo built concurrently by another process: {zoo_dir}")
            return paths
        if os.path.exists(zoo_dir):  # stale, incomplete, or being forced
            if not os.path.isfile(os.path.join(zoo_dir, MARKER_NAME)):
                # never delete what this library did not write: a zoo always carries its marker
                raise ValueError(f"{zoo_dir} exists but holds no {MARKER_NAME}, so fdbpl_hf did not write it; "
                                 "move it away or pass another cache_dir")
            _remove_tree(zoo_dir)
        try:
            os.replace(tmp, zoo_dir)
        except OSError:
            # Another process finished the same zoo first (rename onto a non-empty directory).
            if not _complete(zoo_dir, settings):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"zoo written to {zoo_dir}")
    return paths
