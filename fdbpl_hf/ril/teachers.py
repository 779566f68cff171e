"""Teachers: anything that maps a batch of normalised region pixels to class logits.

The table stores logits, not features, so any model can teach: a `transformers.CLIPModel` with
one hand-crafted template per dataset (the paper's ViT-L/14 setting), an arbitrary callable,
or an ensemble that averages its members' distributions.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..clip_ops import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, check_tokenizer,  # constants re-exported
                        prompt_text_features, refuse_identical_prompts)
from .compose import TEACHER_WEIGHTINGS, fixed_weights, mixing_weights, region_confidence, resolve_weighting
from ..validation import (check_class_names, check_class_order, check_image_stats, check_templates, check_value,
                          integer, text)
from ..frozen_layers import clip_image_features, forget
from ..precision import module_dtype, reduced_precision_block

if TYPE_CHECKING:
    from transformers import CLIPModel, PreTrainedTokenizerBase



class Teacher:
    """Base class. Subclasses set `input_size`, `image_mean`, `image_std`, `num_classes` and
    implement `logits(pixel_values) -> [B, C]`.

    `class_names` are the classes the logits' columns stand for, in order (None: not known, e.g.
    a plain function). Where they are known, every combination compares them: a table build with
    its classes, the online trainer with the data's, an ensemble's members with each other; a
    mismatch is refused naming the first differing position.
    """

    input_size: int
    image_mean: Sequence[float]
    image_std: Sequence[float]
    num_classes: int
    class_names: Optional[list[str]] = None
    name: str = "teacher"
    revision: Optional[str] = None

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.logits(pixel_values)

    @property
    def device(self) -> torch.device:
        """Where the teacher runs (the builder moves pixels here)."""
        return torch.device("cpu")

    def to(self, device) -> "Teacher":
        """Move the teacher to `device`, in place; returns it."""
        return self

    def frozen_modules(self) -> list:
        """The frozen modules that compute the teacher's logits, which a trainer may cast once to its
        reduced precision (`fdbpl_hf.precision.frozen_weights_in`); none by default (a callable
        keeps the dtypes it was given, under the trainer's autocast)."""
        return []

    def weights_fingerprint(self) -> Optional[str]:
        """A content hash of what the teacher computes with (all its weights:
        `fdbpl_hf.integrity.tensor_fingerprint`), or None when it cannot be known (a plain
        function). Tables key on it: two teachers of the same name and shapes never share a table."""
        return None

    def basic_description(self) -> dict:
        """The facts every teacher records: type, name, revision, input size, normalisation, classes."""
        return {"type": type(self).__name__, "name": self.name, "revision": self.revision,
                "input_size": self.input_size, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std), "num_classes": self.num_classes}

    def describe(self) -> dict:
        """What the table's metadata records about this teacher (its weights' digest is computed here,
        once per call: describe once per build)."""
        return {**self.basic_description(), "weights": self.weights_fingerprint()}


class CLIPTeacher(Teacher):
    """A frozen `CLIPModel` classifying with `template.format(class_name)` prompts.

    Text features are computed once, here. Logits = logit_scale x cosine (100 x cos for OpenAI CLIP).
    `templates` may hold several templates, whose normalised features are averaged (CLIP's
    prompt ensembling).
    """

    def __init__(self, clip_model: "CLIPModel", tokenizer: "PreTrainedTokenizerBase", class_names: Sequence[str],
                 templates: str | Sequence[str] = "a photo of a {}.",
                 image_mean: Sequence[float] = OPENAI_CLIP_MEAN, image_std: Sequence[float] = OPENAI_CLIP_STD,
                 name: Optional[str] = None, revision: Optional[str] = None):
        self.templates = check_templates("CLIPTeacher templates", templates)
        # identical names are refused below with the other identical prompts
        self.class_names = check_class_names("CLIPTeacher class_names", class_names, unique=False)
        # as given (numpy values as Python numbers): the build key records them
        self.image_mean, self.image_std = check_image_stats("CLIPTeacher image_mean", image_mean, "CLIPTeacher image_std",
                                                            image_std)
        check_value("CLIPTeacher name", name, text(optional=True))
        check_value("CLIPTeacher revision", revision, text(optional=True))
        self.model = clip_model.eval().requires_grad_(False)
        forget(clip_model)  # prepared layers from before (e.g. a peft merge's .data edits since): made anew
        self.num_classes = len(self.class_names)
        self.input_size = clip_model.config.vision_config.image_size
        self.name = name or getattr(clip_model.config, "_name_or_path", "") or "CLIPModel"
        self.revision = revision
        self.logit_scale = float(clip_model.logit_scale.exp())
        check_tokenizer(clip_model, tokenizer)
        context = clip_model.config.text_config.max_position_embeddings
        rows = [[] for _ in self.class_names]
        for template in self.templates:
            for name, row in zip(self.class_names, rows):
                ids = tokenizer(template.format(name))["input_ids"]
                if len(ids) > context:
                    raise ValueError(f"the prompt {template.format(name)!r} of class {name!r} is {len(ids)} tokens "
                                     f"long, more than the teacher's {context}-token context: shorten the class name "
                                     "(or the template)")
                row.extend(ids + [-1])  # -1 separates the templates' prompts
        # identical prompts under every template: identical text features, soft labels split between them
        refuse_identical_prompts(self.class_names, rows)
        # the templates' normalised features averaged, then renormalised (CLIP's prompt ensembling)
        feats = prompt_text_features(clip_model, tokenizer, self.class_names, self.templates)
        self.text_features = F.normalize(feats.mean(0), dim=-1)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device) -> "CLIPTeacher":
        self.model.to(device)
        self.text_features = self.text_features.to(device)
        return self

    def weights_fingerprint(self) -> str:
        from ..integrity import tensor_fingerprint

        return tensor_fingerprint({"clip": self.model})

    def frozen_modules(self) -> list:
        """The image tower and its projection (the class texts are encoded once, at construction)."""
        return [self.model.vision_model, self.model.visual_projection]

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, C]` = logit_scale x cosine(image, class text) for normalised pixels `[B, 3, S, S]`.
        The image tower computes in its weights' dtype (`fdbpl_hf.precision`); the cosine in float32."""
        vision = self.model.vision_model
        dtype = module_dtype(vision)
        with reduced_precision_block(vision, dtype):
            image = clip_image_features(self.model, pixel_values.to(self.device, dtype))
        with torch.autocast(image.device.type, enabled=False):
            return self.logit_scale * F.normalize(image.float(), dim=-1) @ self.text_features.t()

    def describe(self) -> dict:
        return {**super().describe(), "templates": self.templates, "logit_scale": self.logit_scale}


class CallableTeacher(Teacher):
    """Wraps `fn(pixel_values [B, 3, S, S]) -> logits [B, C]` with its input size and normalisation.

    `class_names` (optional) are the classes of `fn`'s logit columns, in order: given, they are
    compared with the classes of every table built and every run trained with this teacher."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], num_classes: int, input_size: int,
                 image_mean: Sequence[float] = OPENAI_CLIP_MEAN, image_std: Sequence[float] = OPENAI_CLIP_STD,
                 name: Optional[str] = None, revision: Optional[str] = None, device="cpu",
                 class_names: Optional[Sequence[str]] = None):
        if not callable(fn):
            raise TypeError(f"CallableTeacher fn must be a callable pixel_values -> logits, got {type(fn).__name__}")
        check_value("CallableTeacher num_classes", num_classes, integer(1))
        check_value("CallableTeacher input_size", input_size, integer(1))
        check_value("CallableTeacher name", name, text(optional=True))
        check_value("CallableTeacher revision", revision, text(optional=True))
        if class_names is not None:
            class_names = check_class_names("CallableTeacher class_names", class_names)
            if len(class_names) != num_classes:
                raise ValueError(f"CallableTeacher has num_classes={num_classes} but {len(class_names)} class_names: "
                                 "give one name per logit column, in column order")
        self.fn = fn
        self.class_names = class_names
        self.num_classes, self.input_size = int(num_classes), int(input_size)  # numpy ints as JSON-able ints
        # as given (numpy values as Python numbers): the build key records them
        self.image_mean, self.image_std = check_image_stats("CallableTeacher image_mean", image_mean, "CallableTeacher image_std",
                                                            image_std)
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.revision = revision
        self._device = torch.device(device)

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device) -> "CallableTeacher":
        if isinstance(self.fn, torch.nn.Module):
            self.fn.to(device)
        self._device = torch.device(device)
        return self

    def weights_fingerprint(self) -> Optional[str]:
        """The module's weights when `fn` is a `torch.nn.Module` (or a bound method of one); None for
        other callables, whose content cannot be known."""
        from ..integrity import tensor_fingerprint

        module = self.fn if isinstance(self.fn, torch.nn.Module) else getattr(self.fn, "__self__", None)
        return tensor_fingerprint({"fn": module}) if isinstance(module, torch.nn.Module) else None

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`fn`'s float logits `[B, C]`, the pixels moved to the teacher's device first."""
        return self.fn(pixel_values.to(self.device)).float()


ENSEMBLE_WEIGHTINGS = TEACHER_WEIGHTINGS  # the rule lives in compose.py: composed tables mix alike


class EnsembleTeacher(Teacher):
    """Averages the members' class distributions; its "logits" are the log of that average.

    Members must agree on class count and input size, and members that know their class names
    (`CLIPTeacher`, a `CallableTeacher` given `class_names`) on those names and their order; each
    keeps its own normalisation. The ensemble's `class_names` are its named members' (None when
    none is named).
    `weighting` says how members are mixed per region:
    - "fixed": the constant `weights` (default equal), the same for every region;
    - "max_prob": per region, member m gets `weights[m] * max_c p_m(c)`, renormalised over members
      (a member sure of a region outweighs one that is not);
    - "entropy": per region, `weights[m] * (1 - H(p_m) / log C)`, renormalised, i.e. each member's
      own FDBPL information weight (a member at uniform gets no say; if every member is uniform
      on a region, the fixed weights are used);
    - "confidence": another name of "max_prob" (recorded as "max_prob").
    Composed tables (`RILDataset(dataset, [table_a, table_b], teacher_weighting=...)`) mix their
    stored soft labels with the same rule (`fdbpl_hf.ril.compose`).
    """

    def __init__(self, members: Sequence[Teacher], weights: Optional[Sequence[float]] = None,
                 weighting: str = "fixed"):
        self.weighting = resolve_weighting(weighting)
        if isinstance(members, Teacher) or not isinstance(members, Sequence):
            raise TypeError(f"EnsembleTeacher takes a list of teachers, got {type(members).__name__}")
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one teacher")
        for i, member in enumerate(members):
            if not isinstance(member, Teacher):
                raise TypeError(f"ensemble member {i} is a {type(member).__name__}, not a Teacher: wrap a CLIPModel in "
                                "CLIPTeacher(model, tokenizer, class_names) and a function in CallableTeacher")
        named = [(i, m) for i, m in enumerate(members) if m.class_names is not None]
        for i, member in named[1:]:
            j, first = named[0]
            check_class_order(f"ensemble member {j} ({first.name})", first.class_names,
                              f"ensemble member {i} ({member.name})", member.class_names,
                              fix="build every member with the same class list")
        self.class_names = list(named[0][1].class_names) if named else None
        sizes = {m.input_size for m in members}
        counts = {m.num_classes for m in members}
        if len(sizes) != 1 or len(counts) != 1:
            raise ValueError(f"ensemble members disagree: input sizes {sorted(sizes)}, class counts {sorted(counts)}")
        self.members = list(members)
        self.weights = fixed_weights(weights, len(members), "members")
        self.input_size, self.num_classes = sizes.pop(), counts.pop()
        # Pixels arrive unnormalised-by-member: the builder renders [0, 1] pixels with identity
        # normalisation and each member normalises for itself.
        self.image_mean, self.image_std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        self.name = " + ".join(m.name for m in self.members)

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def to(self, device) -> "EnsembleTeacher":
        for m in self.members:
            m.to(device)
        return self

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Log of the weighted mean of the members' softmaxes; takes [0, 1] pixels (each member
        normalises for itself)."""
        from .regions import normalize

        member_probs = torch.stack([
            member.logits(normalize(pixel_values, member.image_mean, member.image_std)).float().softmax(-1)
            for member in self.members
        ])  # [members, B, C]
        mix = self.region_weights(member_probs)  # [members, B]
        probs = (mix.unsqueeze(-1) * member_probs).sum(0)
        return probs.clamp_min(1e-12).log()

    def frozen_modules(self) -> list:
        return [module for member in self.members for module in member.frozen_modules()]

    def weights_fingerprint(self) -> Optional[str]:
        prints = [m.weights_fingerprint() for m in self.members]
        if any(p is None for p in prints):
            return None
        import hashlib

        return hashlib.sha256("+".join(prints).encode()).hexdigest()[:16]

    def region_weights(self, member_probs: torch.Tensor) -> torch.Tensor:
        """Per-region mixing weights `[members, B]` (summing to 1 over members) for the members'
        distributions `[members, B, C]`, by `self.weighting` (`fdbpl_hf.ril.compose.mixing_weights`)."""
        entropy = None
        if self.weighting == "entropy":
            entropy = -(member_probs * member_probs.clamp_min(1e-12).log()).sum(-1)
        confidence = region_confidence(self.weighting, member_probs.max(-1).values, entropy, member_probs.shape[-1])
        return mixing_weights(self.weights.to(member_probs.device), confidence, member_probs.shape[1])

    def describe(self) -> dict:
        # "weights" holds the mixing weights here (as before 0.7); the members' descriptions carry
        # their weights' digests, each computed once
        return {**self.basic_description(), "members": [m.describe() for m in self.members],
                "weights": self.weights.tolist(), "weighting": self.weighting}


def as_teacher(teacher, class_names: Sequence[str], tokenizer=None, template: str | Sequence[str] = "a photo of a {}.",
               input_size: Optional[int] = None, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD) -> Teacher:
    """Turn what the user passed (a Teacher, a CLIPModel, or a callable) into a `Teacher`."""
    from transformers import CLIPModel

    if isinstance(teacher, Teacher):
        if teacher.class_names is not None:
            check_class_order(f"the teacher ({teacher.name})", teacher.class_names, "the dataset", class_names,
                              fix="build the teacher with the dataset's classes, in label order")
        if teacher.num_classes != len(class_names):
            raise ValueError(f"teacher scores {teacher.num_classes} classes but the dataset has {len(class_names)}")
        return teacher
    if isinstance(teacher, CLIPModel):
        if tokenizer is None:
            raise ValueError("a CLIPModel teacher needs its tokenizer: pass teacher_tokenizer=")
        return CLIPTeacher(teacher, tokenizer, class_names, template, image_mean, image_std)
    if callable(teacher):
        if input_size is None:
            raise ValueError("a callable teacher needs teacher_input_size= (the region size it expects)")
        device = "cpu"
        if isinstance(teacher, torch.nn.Module):  # run where its weights are (e.g. a CUDA module)
            tensor = next(itertools.chain(teacher.parameters(), teacher.buffers()), None)
            device = tensor.device if tensor is not None else device
        return CallableTeacher(teacher, len(class_names), input_size, image_mean, image_std, device=device)
    raise TypeError(f"cannot use {type(teacher).__name__} as a teacher: give a CLIPModel, a Teacher or a callable")
