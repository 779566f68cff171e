"""Evaluation protocols: base-to-novel, cross-dataset and OOD detection with the negative prompt.

Two kinds of classifier share one interface (`get_text_features(class_names, negative=...)`,
`get_image_features(pixel_values)`, `logit_scale`, `device`):

- a trained `FDBPLCLIPModel` (its learned positive prompt; the negative prompt on request);
- `ZeroShotCLIP`: a plain `CLIPModel` with a hand-crafted template (the CLIP baseline).

Logits are `logit_scale x cosine(image, class text)`, as in `CLIPModel.logits_per_image`.
Reported numbers (accuracy, HM, AUROC, FPR) are **percentages**, as in the literature; the
functions in `fdbpl_hf.metrics` return fractions and are scaled here.

OOD scores (higher = more in-distribution), from the positive logits `s+` and negative logits
`s-` of one image over the C known classes:

- `msp`: `max_c softmax(s+)_c`, the maximum-softmax-probability baseline (Hendrycks & Gimpel);
- `pos_neg_margin` (the headline negative-prompt score): `s+_k - s-_k` at the predicted class
  `k = argmax_c s+_c`. It equals `logit_scale * <x, t+_k - t-_k>` for unit features: the image
  projected on its predicted class's first-order difference `d_k` (spec section 5), the very
  quantity PCD ranks, and the per-class "yes vs no" contest of CLIPN; `sigmoid` of it is the
  probability that "a photo of a k" beats its negative prompt (monotone, so the same AUROC);
- `msp_diff`: `max_c softmax(s+)_c - max_c softmax(s-)_c`, a distribution-level variant
  (RADP pushes `softmax(s-)` towards uniform only on uninformative regions), kept for comparison.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .data import DatasetInfo, make_base_novel_test, resolve_dataset
from .metrics import accuracy, auroc, average_base_novel, fpr_at_tpr, harmonic_mean, per_class_accuracy, summarize_seeds
from .files import atomic_write, read_json
from .modeling import FDBPLCLIPModel, check_tokenizer, refuse_identical_prompts
from .rows import stored_rows
from .validation import (between, check_class_ids, check_class_names, check_class_order, check_template, check_value,
                         flag, integer, label_names_of, text)
from .version import __version__

__all__ = [
    "OOD_SCORES",
    "REQUIRED_PROTOCOL_KEYS",
    "EncodedImages",
    "ZeroShotCLIP",
    "as_classifier",
    "class_logits",
    "encode_images",
    "evaluate_base_to_novel",
    "evaluate_cross_dataset",
    "evaluate_domain_generalization",
    "evaluate_ood",
    "format_summary_markdown",
    "load_classifier",
    "load_results",
    "ood_metrics",
    "ood_scores",
    "predict_logits",
    "summarize_runs",
    "warn_if_classes_differ",
    "write_results",
]

OOD_SCORES = ("msp", "pos_neg_margin", "msp_diff")
# the true-positive rate the FPR is read at: a fraction (0.95), never a percentage (95)
TPR = between(0, 1, low_open=True, scale="fraction")  # fdbpl_hf.metrics.fpr_at_tpr's range
REQUIRED_PROTOCOL_KEYS = ("dataset", "method", "seed")
RESULTS_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Classifiers
# ---------------------------------------------------------------------------------------------


class ZeroShotCLIP:
    """A frozen `CLIPModel` scoring classes with a hand-crafted prompt (`template.format(name)`).

    Same interface as `FDBPLCLIPModel` for evaluation; it has no negative prompt.
    """

    def __init__(self, clip_model, tokenizer, template: str = "a photo of a {}."):
        from transformers import CLIPModel

        if not isinstance(clip_model, CLIPModel):
            raise TypeError(f"expected a transformers.CLIPModel, got {type(clip_model).__name__}")
        if tokenizer is None:
            raise ValueError("zero-shot CLIP needs the tokenizer of its checkpoint")
        check_template("ZeroShotCLIP template", template)
        check_tokenizer(clip_model, tokenizer)
        self.clip = clip_model.eval()
        self.tokenizer = tokenizer
        self.template = template

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def to(self, device: Union[str, torch.device]) -> "ZeroShotCLIP":
        self.clip.to(device)
        return self

    def prompts(self, class_names: Sequence[str], template: Optional[str] = None) -> list[str]:
        """The filled template of each class."""
        template = check_template("template", template or self.template)
        return [template.format(name) for name in check_class_names("class_names", class_names, unique=False)]

    def get_text_features(self, class_names: Sequence[str], negative: bool = False,
                          template: Optional[str] = None) -> torch.Tensor:
        """Projected (not normalised) text features `[C, P]` of the templated class names."""
        if negative:
            raise ValueError("zero-shot CLIP has no negative prompt; OOD scores other than 'msp' need an adapter")
        class_names = check_class_names("class_names", class_names, unique=False)  # identical: refused below
        texts = self.prompts(class_names, template)
        max_len = self.clip.config.text_config.max_position_embeddings
        # Tokenise without truncation first: a cut prompt would lose its EOS token (CLIP pools there)
        # and silently score the wrong text.
        token_rows = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        lengths = [len(ids) for ids in token_rows]
        for name, text, n in zip(class_names, texts, lengths):
            if n > max_len:
                raise ValueError(f"the prompt for class {name!r} ({text[:60]!r}...) is {n} tokens long, more than "
                                 f"the text encoder's {max_len}: shorten the class name or the template")
        refuse_identical_prompts(list(class_names), token_rows)
        batch = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            return self.clip.get_text_features(input_ids=batch["input_ids"],
                                               attention_mask=batch["attention_mask"]).pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.clip.get_image_features(pixel_values=pixel_values).pooler_output


Classifier = Union[FDBPLCLIPModel, ZeroShotCLIP]


def as_classifier(model, tokenizer=None, template: Optional[str] = None) -> Classifier:
    """An `FDBPLCLIPModel` or `ZeroShotCLIP` as is; a plain `CLIPModel` wrapped as `ZeroShotCLIP`."""
    if isinstance(model, (FDBPLCLIPModel, ZeroShotCLIP)):
        return model
    from transformers import CLIPModel

    if isinstance(model, CLIPModel):
        if tokenizer is None:
            raise ValueError("a plain CLIPModel needs tokenizer= (and a template) for zero-shot prompts")
        return ZeroShotCLIP(model, tokenizer, template or "a photo of a {}.")
    raise TypeError(f"expected an FDBPLCLIPModel, ZeroShotCLIP or CLIPModel, got {type(model).__name__}")


def _image_processor(name_or_path: str, **kwargs: Any):
    # The PIL processor needs no torchvision; older transformers only have CLIPImageProcessor.
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # pragma: no cover - depends on the transformers version
        from transformers import CLIPImageProcessor as Processor
    return Processor.from_pretrained(name_or_path, **kwargs)


def load_classifier(student: str, adapter: Optional[str] = None, *, template: str = "a photo of a {}.",
                    device: Optional[Union[str, torch.device]] = None, revision: Optional[str] = None,
                    adapter_revision: Optional[str] = None, check_base_model: bool = True,
                    local_files_only: bool = False) -> tuple[Classifier, Any]:
    """Load `(classifier, image_processor)`: the student CLIP with an adapter, or zero-shot without one.

    `student` and `adapter` are Hub ids or folders. An adapter trained on a different base model
    raises a `ValueError` naming both.
    """
    from transformers import AutoTokenizer, CLIPModel

    kwargs = dict(revision=revision, local_files_only=local_files_only)
    clip = CLIPModel.from_pretrained(student, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(student, **kwargs)
    processor = _image_processor(student, **kwargs)
    if adapter is None:
        model: Classifier = ZeroShotCLIP(clip, tokenizer, template)
    else:
        try:
            model = FDBPLCLIPModel.from_pretrained(clip, adapter, tokenizer=tokenizer, revision=adapter_revision,
                                                   local_files_only=local_files_only,
                                                   check_base_model=check_base_model)
        except ValueError as err:
            raise ValueError(f"cannot evaluate adapter {adapter!r} on student {student!r}: {err}") from err
        model.eval()
    if device is not None:
        model.to(device)
    return model, processor


# ---------------------------------------------------------------------------------------------
# Images -> features -> logits
# ---------------------------------------------------------------------------------------------


@dataclass
class EncodedImages:
    """Unit-norm image features `[N, P]` (float32, on the model's device) and labels `[N]` (or None)."""

    features: torch.Tensor
    labels: Optional[torch.Tensor]

    def __len__(self) -> int:
        return self.features.shape[0]


def _rgb(image, where: str = "an image"):
    from .ril.regions import rgb_image

    if image is None:
        raise ValueError(f"{where} has no image (None): drop that row (dataset.filter) or fill it")
    if isinstance(image, dict) and image.get("bytes") is not None:  # undecoded datasets.Image
        import io

        from PIL import Image

        image = Image.open(io.BytesIO(image["bytes"]))
    # MNIST-like grayscale (and RGBA/palette) images become 3-channel, as CLIP expects; 16-bit and
    # float images are scaled by their pixel type (the same helper as the table build and replay).
    return rgb_image(image, where)


def encode_images(model: Classifier, dataset, *, image_processor, batch_size: int = 64, image_column: str = "image",
                  label_column: Optional[str] = "label", name: str = "dataset",
                  progress: bool = True) -> EncodedImages:
    """Encode every image of `dataset` (a `datasets.Dataset`) once (batched, `torch.inference_mode`,
    on the model's device). Labels must be class ids: a row without one (None) or with a string
    label is refused with its row."""
    if image_processor is None:
        raise ValueError("image_processor is required (the student's CLIPImageProcessor)")
    check_value("batch_size", batch_size, integer(1))
    check_value("image_column", image_column, text())
    check_value("label_column", label_column, text(optional=True))
    _check_dataset(name, dataset)
    if len(dataset) == 0:
        raise ValueError(f"{name} has no rows")
    dataset = stored_rows(dataset, name)  # the stored images and labels, not a format's tensors or a transform's
    columns = dataset.column_names
    for column in (image_column, label_column):
        if column is not None and column not in columns:
            raise KeyError(f"{name} has no column {column!r} (columns: {columns})")
    keep = [c for c in (image_column, label_column) if c is not None]
    dataset = dataset.select_columns(keep)  # don't decode unrelated columns
    from tqdm.auto import tqdm

    device = model.device
    features, labels = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc=f"Encoding {name}", disable=not progress,
                      unit="batch"):
        rows = dataset[start : start + batch_size]
        images = [_rgb(im, f"row {start + n} of {name}") for n, im in enumerate(rows[image_column])]
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        with torch.inference_mode():
            feats = model.get_image_features(pixels).float()
        features.append(F.normalize(feats, dim=-1))
        if label_column is not None:
            labels.append(_label_tensor(rows[label_column], start, name, label_column))
    return EncodedImages(torch.cat(features), torch.cat(labels) if labels else None)


def _check_dataset(name: str, dataset: Any) -> None:
    """Refuse what is not a `datasets.Dataset` (a list of row dicts, a dict of columns: their
    length and slices mean other things), saying how to make one."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        return
    how = ""
    if isinstance(dataset, (list, tuple)):
        how = (": build one from the rows with datasets.Dataset.from_list(rows) (then cast the image column, "
               "dataset.cast_column('image', datasets.Image()))")
    elif isinstance(dataset, datasets.DatasetDict):
        how = f": pick a split, e.g. dataset[{next(iter(dataset), 'test')!r}]"
    elif isinstance(dataset, Mapping):
        how = ": build one from the columns with datasets.Dataset.from_dict(columns)"
    raise TypeError(f"{name} must be a datasets.Dataset, got {type(dataset).__name__}{how}")


def _label_tensor(values: Sequence[Any], start: int, name: str, label_column: str) -> torch.Tensor:
    """A batch's labels as int64, every value a class id (or -1, refused later with a hint)."""
    for n, value in enumerate(values):
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            continue
        if value is None:
            raise ValueError(f"row {start + n} of {name} has no label (None in column {label_column!r}): drop the "
                             "unlabelled rows (dataset.filter), or pass label_column=None to encode without labels")
        if isinstance(value, str):
            raise ValueError(f"row {start + n} of {name} has the label {value!r} in column {label_column!r}, a string: "
                             "labels must be class ids; turn the column into a ClassLabel "
                             f"(dataset.class_encode_column({label_column!r}), or DatasetInfo.prepare) and give the "
                             "class names in its order")
        raise ValueError(f"row {start + n} of {name} has the label {value!r} ({type(value).__name__}) in column "
                         f"{label_column!r}: labels must be integer class ids")
    return torch.as_tensor(list(values), dtype=torch.long)


def _text_features(model: Classifier, class_names: Sequence[str], negative: bool,
                   template: Optional[str]) -> torch.Tensor:
    with torch.inference_mode():
        if isinstance(model, ZeroShotCLIP):
            text = model.get_text_features(class_names, negative=negative, template=template)
        else:  # the adapter's learned context replaces any template
            text = model.get_text_features(class_names, negative=negative)
    return F.normalize(text.float(), dim=-1)


def _logits(model: Classifier, images: EncodedImages, text: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return (model.logit_scale.float() * images.features @ text.t()).cpu()


def class_logits(model: Classifier, images: EncodedImages, class_names: Sequence[str], *, negative: bool = False,
                 template: Optional[str] = None) -> torch.Tensor:
    """`[N, C]` logits (`logit_scale x cosine`) of encoded images against `class_names`, on the CPU.

    `template` is for zero-shot CLIP only; an adapter's learned context replaces it.
    """
    return _logits(model, images, _text_features(model, class_names, negative, template))


def predict_logits(model, dataset, class_names: Sequence[str], *, image_processor, tokenizer=None,
                   template: Optional[str] = None, batch_size: int = 64, negative: bool = False,
                   image_column: str = "image", label_column: Optional[str] = "label", name: str = "dataset",
                   progress: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`(logits [N, C], labels [N])` of `dataset` against `class_names`.

    `model`: an `FDBPLCLIPModel` (positive prompt, or the negative one with `negative=True`),
    a `ZeroShotCLIP`, or a plain `CLIPModel` with `tokenizer` and `template` (zero-shot).

    With labels (`label_column`, a `ClassLabel`), `class_names` must be that column's classes in
    label order (the labels index them); to score images against other classes (e.g. an OOD set
    against the in-distribution classes) pass `label_column=None`.
    """
    model = as_classifier(model, tokenizer, template)
    if negative and isinstance(model, ZeroShotCLIP):
        raise ValueError("zero-shot CLIP has no negative prompt")
    class_names = check_class_names("class_names", class_names)
    _check_class_label(name, dataset, label_column, class_names,
                       fix=_LABEL_ORDER_FIX + ", or pass label_column=None to score the images against other classes "
                                              "(no labels returned)")
    # Text first (once): a bad class name fails before the slow image pass.
    text = _text_features(model, class_names, negative, template)
    images = encode_images(model, dataset, image_processor=image_processor, batch_size=batch_size,
                           image_column=image_column, label_column=label_column, name=name, progress=progress)
    return _logits(model, images, text), images.labels


# ---------------------------------------------------------------------------------------------
# Metrics on logits
# ---------------------------------------------------------------------------------------------


def _pct(x: float) -> float:
    return 100.0 * float(x)


def _accuracy_block(logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                    where: str = "the dataset") -> dict[str, Any]:
    # A label outside the class list would count as a miss (and vanish from the per-class table):
    # a silently low accuracy, e.g. when fewer class names are given than the dataset has classes.
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(class_names)):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise ValueError(f"{where} has label {bad} but {len(class_names)} class names were given (labels must be "
                         f"0..{len(class_names) - 1}): give one class name per class, in the label order"
                         + (" (label -1 marks unlabelled rows: filter them out)" if bad < 0 else ""))
    per_class = per_class_accuracy(logits, labels, num_classes=len(class_names))
    return {
        "accuracy": _pct(accuracy(logits, labels)),
        "num_images": int(labels.numel()),
        "per_class_accuracy": {n: (None if math.isnan(a) else _pct(a)) for n, a in zip(class_names, per_class)},
    }


def ood_scores(pos_logits: Any, neg_logits: Any = None) -> dict[str, np.ndarray]:
    """Per-image OOD scores (higher = more in-distribution); see the module docstring.

    Without `neg_logits` (zero-shot CLIP) only `msp` is returned.
    """
    pos = torch.as_tensor(pos_logits).float()
    if pos.ndim != 2 or pos.shape[1] == 0:
        raise ValueError(f"pos_logits must be [N, C] with C >= 1, got shape {tuple(pos.shape)}")
    msp, pred = pos.softmax(-1).max(-1)
    scores = {"msp": msp}
    if neg_logits is not None:
        neg = torch.as_tensor(neg_logits).float()
        if neg.shape != pos.shape:
            raise ValueError(f"neg_logits {tuple(neg.shape)} and pos_logits {tuple(pos.shape)} differ in shape")
        scores["pos_neg_margin"] = pos.gather(1, pred[:, None])[:, 0] - neg.gather(1, pred[:, None])[:, 0]
        scores["msp_diff"] = msp - neg.softmax(-1).max(-1).values
    return {k: v.numpy().astype(np.float64) for k, v in scores.items()}


def ood_metrics(scores_in: Mapping[str, Any], scores_out: Mapping[str, Any], tpr: float = 0.95) -> dict[str, dict]:
    """AUROC and FPR at `tpr` (percent) of each score present in both dicts; ID is the positive class."""
    check_value("tpr", tpr, TPR)
    key = "fpr95" if tpr == 0.95 else f"fpr@{tpr:g}"
    out = {}
    for score in scores_in:
        if score in scores_out:
            out[score] = {"auroc": _pct(auroc(scores_in[score], scores_out[score])),
                          key: _pct(fpr_at_tpr(scores_in[score], scores_out[score], tpr=tpr))}
    if not out:
        raise ValueError("no OOD score is present in both scores_in and scores_out")
    return out


def _ood_from_images(model: Classifier, id_images: EncodedImages, ood_images: EncodedImages,
                     pos_text: torch.Tensor, class_names: Sequence[str], tpr: float) -> dict[str, Any]:
    neg_text = None if isinstance(model, ZeroShotCLIP) else _text_features(model, class_names, True, None)

    def scores(images: EncodedImages) -> dict[str, np.ndarray]:
        neg = None if neg_text is None else _logits(model, images, neg_text)
        return ood_scores(_logits(model, images, pos_text), neg)

    return {"num_in": len(id_images), "num_out": len(ood_images),
            "scores": ood_metrics(scores(id_images), scores(ood_images), tpr=tpr)}


# ---------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------


def _encode_kwargs(image_processor, batch_size, image_column, label_column, progress) -> dict[str, Any]:
    return dict(image_processor=image_processor, batch_size=batch_size, image_column=image_column,
                label_column=label_column, progress=progress)


def evaluate_base_to_novel(model, test_dataset, info: Union[DatasetInfo, str, None] = None, *, image_processor,
                           tokenizer=None, template: Optional[str] = None, batch_size: int = 64,
                           ood: bool = True, tpr: float = 0.95, progress: bool = True,
                           check_trained_classes: bool = True) -> dict[str, Any]:
    """The CoOp base-to-novel test of one dataset.

    Base-test images are scored among the base classes only and novel-test images among the
    novel classes only; `hm = 2BN / (B + N)`. `info` (registry name or `DatasetInfo`) supplies
    the class-name cleaning, excluded classes and, for zero-shot CLIP, the template (unless
    `template` is given). With `ood=True` the base-test images (ID) and novel-test images (OOD)
    are also scored against the base classes; see `ood_scores`.

    An adapter that records the classes it was trained on (`FDBPLConfig.class_names`, written by
    `FDBPLTrainer`) must have been trained on exactly these base classes, in this order: otherwise
    its "base" accuracy would be scored on classes it never trained on (and "novel" ones it did).
    `check_trained_classes=False` scores it anyway (e.g. names spelled differently).

    Returns `base_acc`, `novel_acc`, `hm` (percent), image counts, class names,
    `per_class_accuracy` {"base": {name: acc}, "novel": {...}} and, if asked, `ood`.
    """
    check_value("batch_size", batch_size, integer(1))
    check_value("ood", ood, flag())
    check_value("tpr", tpr, TPR)
    check_value("check_trained_classes", check_trained_classes, flag())
    _check_dataset("the test split", test_dataset)
    info = resolve_dataset(info) if info is not None else None
    label_column = info.label_column if info else "label"
    image_column = info.image_column if info else "image"
    template = template or (info.template if info else None)
    model = as_classifier(model, tokenizer, template)
    if len(test_dataset) == 0:
        raise ValueError("the test split has no rows")
    split = make_base_novel_test(test_dataset, label_column, info=info)
    base_names, novel_names = split["base_classnames"], split["novel_classnames"]
    if not novel_names:
        raise ValueError("the dataset has a single class: there are no novel classes")
    trained = model.fdbpl_config.class_names if isinstance(model, FDBPLCLIPModel) else None
    if check_trained_classes and trained:
        check_class_order("the adapter's training classes (its config.class_names)", trained,
                          "this test split's base classes", base_names,
                          fix="evaluate it on the dataset, split and class cleaning it was trained with (for other "
                              "classes use evaluate_cross_dataset), or pass check_trained_classes=False")
    # Text first (once per class list): bad class names fail before the slow image pass.
    base_text = _text_features(model, base_names, False, template)
    novel_text = _text_features(model, novel_names, False, template)
    kw = _encode_kwargs(image_processor, batch_size, image_column, label_column, progress)
    base_images = encode_images(model, split["base"], name="the base test split", **kw)
    novel_images = encode_images(model, split["novel"], name="the novel test split", **kw)
    base = _accuracy_block(_logits(model, base_images, base_text), base_images.labels, base_names,
                           "the base test split")
    novel = _accuracy_block(_logits(model, novel_images, novel_text), novel_images.labels, novel_names,
                            "the novel test split")
    result: dict[str, Any] = {
        "base_acc": base["accuracy"],
        "novel_acc": novel["accuracy"],
        "hm": harmonic_mean(base["accuracy"], novel["accuracy"]),
        "num_base_images": base["num_images"],
        "num_novel_images": novel["num_images"],
        "base_classnames": list(base_names),
        "novel_classnames": list(novel_names),
        "per_class_accuracy": {"base": base["per_class_accuracy"], "novel": novel["per_class_accuracy"]},
    }
    if ood:
        result["ood"] = {"in": "base test images", "out": "novel test images", "classes": "base",
                         **_ood_from_images(model, base_images, novel_images, base_text, base_names, tpr)}
    return result


_LABEL_ORDER_FIX = "give one name per class, in the label order (dataset.features[label_column].names)"


def _check_class_label(where: str, dataset, label_column: Optional[str], class_names: Sequence[str],
                       fix: str = _LABEL_ORDER_FIX) -> None:
    """Refuse class names that cannot be the dataset's `ClassLabel` classes in label order: another
    count, or the dataset's own names in another order (e.g. sorted), would score each image against
    the wrong class text (`fdbpl_hf.validation.label_order_difference`)."""
    names = label_names_of(dataset, label_column)
    if names is None:
        return
    check_class_order(f"the label column {label_column!r} of {where}", names, "the class names given",
                      class_names, labels=True, fix=fix)


def _target(where: str, spec) -> tuple[Any, list[str], Optional[str]]:
    """`(dataset, class_names, template)` of a target given as a tuple or a dict, each checked."""
    shape = "(dataset, class_names) or (dataset, class_names, template)"
    if isinstance(spec, Mapping):
        if "dataset" not in spec or "class_names" not in spec:
            raise TypeError(f"{where} is a dict with keys {sorted(map(str, spec))[:5]}: give {shape}, or a dict "
                            "with 'dataset' and 'class_names' (and optionally 'template')")
        dataset, names, template = spec["dataset"], spec["class_names"], spec.get("template")
    elif isinstance(spec, (tuple, list)) and len(spec) in (2, 3) and not isinstance(spec[0], Mapping):
        dataset, names, template = spec[0], spec[1], (spec[2] if len(spec) == 3 else None)
    else:
        rows = isinstance(spec, (tuple, list)) and spec and isinstance(spec[0], Mapping)
        raise TypeError(f"{where} must be {shape}, got a {type(spec).__name__}"
                        + (" of row dicts: build a datasets.Dataset from them (datasets.Dataset.from_list(rows)) and "
                           "pass it with its class names" if rows else ""))
    _check_dataset(where, dataset)
    if template is not None:
        check_template(f"{where} template", template)
    return dataset, check_class_names(f"{where} class_names", names), template


def evaluate_cross_dataset(model, targets: Mapping[str, Any], *, image_processor, tokenizer=None,
                           template: Optional[str] = None, batch_size: int = 64, image_column: str = "image",
                           label_column: str = "label", progress: bool = True) -> dict[str, dict[str, Any]]:
    """Top-1 accuracy (percent) on each target dataset, scored among that dataset's own classes.

    `targets`: {name: (dataset, class_names)} or {name: (dataset, class_names, template)}; the
    template is used by zero-shot CLIP only. Returns {name: {"accuracy", "num_images",
    "per_class_accuracy"}}.
    """
    if not targets:
        raise ValueError("no cross-dataset targets given")
    if not isinstance(targets, Mapping):
        raise TypeError(f"targets must be a dict {{name: (dataset, class_names)}}, got a {type(targets).__name__}")
    model = as_classifier(model, tokenizer, template)
    for name, spec in targets.items():  # every target's shape first, before the slow image passes
        _target(f"cross-dataset target {name!r}", spec)
    out = {}
    for name, spec in targets.items():
        dataset, class_names, target_template = _target(f"cross-dataset target {name!r}", spec)
        _check_class_label(f"cross-dataset target {name!r}", dataset, label_column, class_names)
        target_template = target_template or template
        text = _text_features(model, class_names, False, target_template)
        images = encode_images(model, dataset, name=f"cross-dataset target {name!r}",
                               **_encode_kwargs(image_processor, batch_size, image_column, label_column, progress))
        out[name] = _accuracy_block(_logits(model, images, text), images.labels, class_names,
                                    f"cross-dataset target {name!r}")
    return out


def _dg_target(name: str, spec, num_source_classes: int) -> tuple[Any, Optional[list[int]]]:
    where = f"domain-generalisation target {name!r}"
    if isinstance(spec, Mapping):
        if "dataset" not in spec:
            raise TypeError(f"{where} is a dict without 'dataset': give (dataset, class_ids), a dataset, or "
                            "{'dataset': ..., 'class_ids': ...}")
        dataset, ids = spec["dataset"], spec.get("class_ids")
    elif isinstance(spec, (tuple, list)) and len(spec) == 2 and not isinstance(spec[0], Mapping):
        dataset, ids = spec
    else:
        dataset, ids = spec, None
    _check_dataset(where, dataset)
    if ids is not None:
        ids = check_class_ids(f"{where} class_ids", ids)
        bad = [i for i in ids if not 0 <= i < num_source_classes]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"target {name!r}: class ids must be distinct source class ids in "
                             f"0..{num_source_classes - 1} (bad: {bad[:5]})")
    return dataset, ids


def evaluate_domain_generalization(model, source, targets: Mapping[str, Any], *, image_processor, tokenizer=None,
                                   template: Optional[str] = None, source_name: str = "source", batch_size: int = 64,
                                   image_column: str = "image", label_column: str = "label",
                                   progress: bool = True) -> dict[str, Any]:
    """Domain generalisation (CoOp's protocol): accuracy on the source test set and on each target.

    `source`: `(dataset, class_names)` (or with a template), e.g. ImageNet's test split and its
    cleaned class names. `targets`: `{name: (dataset, class_ids)}` where target label k is source
    class `class_ids[k]` (ImageNet-A/R: 200 ids; `None` or a bare dataset: the source's classes in
    the source's order, e.g. ImageNet-V2/Sketch). Each target is scored among its own classes,
    with the source's class names (as CoOp scores ImageNet-A/R among their 200 classes).

    Returns `{"source": {...}, "targets": {name: {...}}, "target_average": float, "table": {...}}`;
    `table` is the paper's row: source accuracy, each target's accuracy and the targets' average
    (percent). `DatasetInfo.class_ids_in_source` gives `class_ids` for the registered targets.
    """
    if not targets:
        raise ValueError("no domain-generalisation targets given")
    if not isinstance(targets, Mapping):
        raise TypeError(f"targets must be a dict {{name: (dataset, class_ids)}}, got a {type(targets).__name__}")
    model = as_classifier(model, tokenizer, template)
    dataset, class_names, source_template = _target(f"the source {source_name!r}", source)
    _check_class_label(f"source {source_name!r}", dataset, label_column, class_names)
    parsed = {name: _dg_target(name, spec, len(class_names)) for name, spec in targets.items()}
    source_template = source_template or template
    encode = _encode_kwargs(image_processor, batch_size, image_column, label_column, progress)
    text = _text_features(model, class_names, False, source_template)
    images = encode_images(model, dataset, name=f"source {source_name!r}", **encode)
    source_block = _accuracy_block(_logits(model, images, text), images.labels, class_names,
                                   f"source {source_name!r}")
    out: dict[str, Any] = {"source": {"name": source_name, **source_block}, "targets": {}}
    for name, (target, ids) in parsed.items():
        if ids is None:
            target_names, target_text = class_names, text
        else:
            target_names = [class_names[i] for i in ids]
            target_text = text[torch.as_tensor(ids, device=text.device)]
        _check_class_label(f"domain-generalisation target {name!r}", target, label_column, target_names,
                           fix="give its class ids in the source, one per class of its label column, in label order")
        images = encode_images(model, target, name=f"domain-generalisation target {name!r}", **encode)
        if images.labels is not None and len(images.labels) and int(images.labels.max()) >= len(target_names):
            raise ValueError(f"target {name!r} has label {int(images.labels.max())} but only {len(target_names)} "
                             "classes: give its class ids in the source")
        out["targets"][name] = {**_accuracy_block(_logits(model, images, target_text), images.labels, target_names,
                                                    f"target {name!r}"),
                                "num_classes": len(target_names)}
    accuracies = [t["accuracy"] for t in out["targets"].values()]
    out["target_average"] = float(np.mean(accuracies))
    out["table"] = {source_name: out["source"]["accuracy"], **{n: t["accuracy"] for n, t in out["targets"].items()},
                    "average": out["target_average"]}
    return out


def evaluate_ood(model, id_dataset, ood_dataset, class_names: Sequence[str], *, image_processor, tokenizer=None,
                 template: Optional[str] = None, batch_size: int = 64, image_column: str = "image",
                 tpr: float = 0.95, progress: bool = True) -> dict[str, Any]:
    """OOD detection of `ood_dataset` images against `id_dataset` images, scored over `class_names`.

    E.g. ID = a dataset's test images, OOD = another dataset. Labels are not needed. Returns
    {"num_in", "num_out", "scores": {score: {"auroc", "fpr95"}}} (percent).
    """
    if id_dataset is None or ood_dataset is None:
        raise ValueError("evaluate_ood needs an in-distribution and an OOD dataset, got None for the "
                         + ("in-distribution" if id_dataset is None else "OOD") + " one")
    check_value("tpr", tpr, TPR)
    class_names = check_class_names("class_names", class_names)
    if id_dataset is ood_dataset:
        raise ValueError("the in-distribution and OOD datasets are the same: the AUROC would measure nothing; "
                         "give images of other classes as the OOD set")
    model = as_classifier(model, tokenizer, template)
    text = _text_features(model, class_names, False, template)
    kw = _encode_kwargs(image_processor, batch_size, image_column, None, progress)
    id_images = encode_images(model, id_dataset, name="the in-distribution set", **kw)
    ood_images = encode_images(model, ood_dataset, name="the OOD set", **kw)
    if torch.equal(id_images.features, ood_images.features):
        raise ValueError("the in-distribution and OOD sets hold the same images: the AUROC would measure nothing; "
                         "give images of other classes as the OOD set")
    return _ood_from_images(model, id_images, ood_images, text, class_names, tpr)


# ---------------------------------------------------------------------------------------------
# Results files and summaries
# ---------------------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON has no NaN (a class with no test image)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if hasattr(obj, "to_dict"):
        return _jsonable(obj.to_dict())
    return str(obj)


def write_results(path: Union[str, os.PathLike], results: Mapping[str, Any], protocol: Mapping[str, Any]) -> str:
    """Write one run as JSON: `{"protocol": ..., "results": ..., "units": "percent", versions, time}`.

    `protocol` must name at least `dataset`, `method` and `seed`; record also the split, shots,
    class lists and model ids, so every number carries how it was made. Returns the path.
    """
    missing = [k for k in REQUIRED_PROTOCOL_KEYS if protocol.get(k) is None]
    if missing:
        raise ValueError(f"protocol is missing {missing}: every result must say how it was made")
    import transformers

    record = {
        "format_version": RESULTS_FORMAT_VERSION,
        "protocol": _jsonable(protocol),
        "results": _jsonable(results),
        "units": "percent",
        "fdbpl_hf_version": __version__,
        "transformers_version": transformers.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # a crash or a full disk never leaves a half-written results file
    return atomic_write(path, json.dumps(record, indent=1, allow_nan=False) + "\n")


def load_results(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """Read a file written by `write_results` (checks it has a protocol and results)."""
    record = read_json(path, "write the run's results again (rerun its evaluation)")
    if not isinstance(record, dict) or "protocol" not in record or "results" not in record:
        raise ValueError(f"{path} is not a results file (no 'protocol' and 'results')")
    if record.get("format_version", RESULTS_FORMAT_VERSION) > RESULTS_FORMAT_VERSION:
        raise ValueError(f"{path} has results format {record['format_version']}, newer than this library's")
    return record


# Per-class tables and bookkeeping are not seed metrics.
_SKIP_KEYS = {"per_class_accuracy", "num_base_images", "num_novel_images", "num_images", "num_in", "num_out"}


def _flatten_metrics(results: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in results.items():
        if key in _SKIP_KEYS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_metrics(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
            flat[name] = float(value)
    return flat


def summarize_runs(runs: Iterable[Union[str, os.PathLike, Mapping[str, Any]]], ddof: int = 1) -> dict[str, Any]:
    """Aggregate runs (results files or their dicts) over seeds, then over datasets.

    Runs are grouped by (method, dataset, shots); within a group each numeric metric gets
    mean, std (sample std, `ddof=1`; see `summarize_seeds`) and n. For each method with
    base-to-novel results on one or more datasets, `average` follows the literature: base and
    novel seed-means averaged over datasets, then the HM of those averages
    (`fdbpl_hf.metrics.average_base_novel`).

    Returns {"methods": {method: {"datasets": {dataset: {"seeds", "num_shots", "metrics"}},
    "average": {...} or None}}, "num_runs"}.
    """
    check_value("ddof", ddof, integer(0))
    records = [load_results(r) if isinstance(r, (str, os.PathLike)) else r for r in runs]
    if not records:
        raise ValueError("no runs to summarise")
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for rec in records:
        protocol = rec.get("protocol", {})
        missing = [k for k in REQUIRED_PROTOCOL_KEYS if protocol.get(k) is None]
        if missing:
            raise ValueError(f"a run's protocol is missing {missing}")
        key = (str(protocol["method"]), str(protocol["dataset"]), protocol.get("num_shots"))
        groups.setdefault(key, []).append(rec)
    methods: dict[str, Any] = {}
    for (method, dataset, shots), recs in groups.items():
        seeds = [r["protocol"]["seed"] for r in recs]
        if len(set(map(str, seeds))) != len(seeds):
            raise ValueError(f"{method!r} on {dataset!r} ({shots} shots) has several runs with the same seed: {seeds}")
        if dataset in methods.get(method, {}).get("datasets", {}):
            raise ValueError(f"{method!r} on {dataset!r} was run with different shot counts; summarise them apart")
        metrics = summarize_seeds([_flatten_metrics(r["results"]) for r in recs], ddof=ddof)
        entry = methods.setdefault(method, {"datasets": {}, "average": None})
        entry["datasets"][dataset] = {"seeds": sorted(seeds, key=str), "num_shots": shots, "metrics": metrics}
    for entry in methods.values():
        b2n = {d: (v["metrics"]["base_to_novel/base_acc"]["mean"], v["metrics"]["base_to_novel/novel_acc"]["mean"])
               for d, v in entry["datasets"].items()
               if "base_to_novel/base_acc" in v["metrics"] and "base_to_novel/novel_acc" in v["metrics"]}
        if b2n:
            entry["average"] = average_base_novel(b2n)
    return {"methods": methods, "num_runs": len(records)}


def _cell(stat: Optional[Mapping[str, float]]) -> str:
    if stat is None:
        return "–"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}" if stat.get("n", 1) > 1 else f"{stat['mean']:.2f}"


def _column_label(key: str) -> str:
    """'base_to_novel/ood/scores/msp/auroc' -> 'OOD msp AUROC', 'cross_dataset/dtd/accuracy' -> 'dtd acc'."""
    fixed = {"base_to_novel/base_acc": "Base", "base_to_novel/novel_acc": "Novel", "base_to_novel/hm": "HM"}
    if key in fixed:
        return fixed[key]
    parts = key.split("/")
    if parts[:3] == ["base_to_novel", "ood", "scores"]:
        parts = ["OOD"] + parts[3:]
    elif parts[0] in ("cross_dataset", "ood"):
        parts = parts[1:] if parts[0] == "cross_dataset" else ["OOD"] + parts[1:]
    short = {"auroc": "AUROC", "fpr95": "FPR95", "accuracy": "acc", "scores": ""}
    return " ".join(short.get(p, p) for p in parts if short.get(p, p))


def format_summary_markdown(summary: Mapping[str, Any], metrics: Optional[Sequence[str]] = None) -> str:
    """A markdown table of `summarize_runs` output: one row per method and dataset, mean ± std.

    Default columns: base, novel, HM, then every OOD AUROC/FPR and cross-dataset accuracy found.
    Each method with base-to-novel results on two or more datasets gets an "average" row
    (HM of the averaged base and novel).
    """
    methods = summary["methods"]
    if metrics is None:
        found: list[str] = []
        for entry in methods.values():
            for d in entry["datasets"].values():
                found += [k for k in d["metrics"] if k not in found]
        head = ["base_to_novel/base_acc", "base_to_novel/novel_acc", "base_to_novel/hm"]
        rest = [k for k in found if k not in head and (k.endswith(("auroc", "fpr95", "accuracy")))]
        metrics = [k for k in head if k in found] + rest
    lines = ["| Method | Dataset | Seeds | " + " | ".join(_column_label(m) for m in metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    for method, entry in methods.items():
        for dataset, d in entry["datasets"].items():
            cells = [_cell(d["metrics"].get(m)) for m in metrics]
            lines.append(f"| {method} | {dataset} | {len(d['seeds'])} | " + " | ".join(cells) + " |")
        avg = entry.get("average")
        if avg and avg["num_datasets"] > 1:
            values = {"base_to_novel/base_acc": avg["base"], "base_to_novel/novel_acc": avg["novel"],
                      "base_to_novel/hm": avg["hm"]}
            cells = [f"{values[m]:.2f}" if m in values else "–" for m in metrics]
            lines.append(f"| {method} | **average ({avg['num_datasets']})** | – | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def warn_if_classes_differ(model: Classifier, base_classnames: Sequence[str]) -> None:
    """Warn when an adapter was trained on other classes than this protocol's base classes
    (`evaluate_base_to_novel` refuses them unless `check_trained_classes=False`)."""
    base_classnames = check_class_names("base_classnames", base_classnames)
    if isinstance(model, FDBPLCLIPModel):
        trained = model.fdbpl_config.class_names
        if trained and list(trained) != list(base_classnames):
            warnings.warn(f"the adapter was trained on classes {list(trained)[:5]}... but this protocol's base "
                          f"classes are {list(base_classnames)[:5]}...: check dataset, split and class cleaning",
                          stacklevel=2)
