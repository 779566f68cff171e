"""The offline model zoo: contrastive pretraining, Hub-style save/load, the build cache."""

import functools
import json
import math
import os

import datasets
import pytest
import torch

from fdbpl_hf.testing import zoo
from fdbpl_hf.testing.worlds import DIGIT_NAMES, load_digits

datasets.disable_progress_bars()

# One-layer towers on 28px digits with 7px patches: a few milliseconds per step.
TINY = dict(text_width=32, text_layers=1, text_heads=2, vision_width=32, vision_layers=1, vision_heads=2,
            patch_size=7, image_size=28, projection_dim=16, max_position_embeddings=32)


@pytest.fixture(scope="module")
def digits60():
    """60 real MNIST digits, 6 per class."""
    return load_digits(num_per_class=6)


def _pretrain(tokenizer, dataset, history=None, seed=0, steps=60):
    # One caption per class and no crops: the quickest setting in which a tiny CLIP really learns.
    spec = zoo.ZooModelSpec(**dict(TINY, text_width=64, vision_width=64))
    return zoo.pretrain_clip(spec.config(), tokenizer, dataset, epochs=1000, max_steps=steps, batch_size=20, lr=1e-3,
                             seed=seed, captions=("{}",), class_names=DIGIT_NAMES, crop_scale=None,
                             loss_history=history, warmup_fraction=0.1, num_threads=1)


def test_pretrain_learns_deterministically(tokenizer, digits60):
    rng_before = torch.get_rng_state()
    history = []
    model = _pretrain(tokenizer, digits60, history)
    assert len(history) == 60
    # Below log(batch size), the loss of uniform logits: the embeddings really tell classes apart.
    assert sum(history[-5:]) / 5 < 0.7 * math.log(20)
    assert zoo.zero_shot_accuracy(model, tokenizer, (zoo.OPENAI_CLIP_MEAN, zoo.OPENAI_CLIP_STD), digits60,
                                  DIGIT_NAMES, "{}") > 0.5
    assert not model.training
    # The caller's global RNG is left as it was; the same seed gives the same weights.
    assert torch.equal(torch.get_rng_state(), rng_before)
    again = _pretrain(tokenizer, digits60)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other = _pretrain(tokenizer, digits60, seed=1, steps=3)
    assert not torch.equal(other.visual_projection.weight, model.visual_projection.weight)


def test_pretrain_checks_its_inputs(tokenizer, digits60):
    config = zoo.ZooModelSpec(**{**TINY, "patch_size": 5}).config()
    with pytest.raises(ValueError, match="must divide"):
        zoo.pretrain_clip(config, tokenizer, digits60, epochs=1, batch_size=10, lr=1e-3, seed=0)
    config = zoo.ZooModelSpec(**TINY).config()
    with pytest.raises(ValueError, match="differs"):
        zoo.pretrain_clip(config, tokenizer, digits60, epochs=1, batch_size=10, lr=1e-3, seed=0, image_size=32)
    with pytest.raises(ValueError, match="labels"):
        zoo.pretrain_clip(config, tokenizer, digits60, epochs=1, batch_size=10, lr=1e-3, seed=0,
                          class_names=DIGIT_NAMES[:5])


@pytest.mark.numerics
def test_random_resized_crop_keeps_shape_and_identity_at_full_scale():
    x = torch.rand(4, 3, 28, 28)
    g = torch.Generator().manual_seed(0)
    assert zoo._random_resized_crop(x, g, (0.08, 1.0)).shape == x.shape
    full = zoo._random_resized_crop(x, g, (1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(full, x, atol=1e-5)


def test_contrastive_loss_treats_same_class_captions_as_positives():
    labels = torch.tensor([0, 0, 1])
    # Perfect class separation: plain InfoNCE still pushes same-class pairs apart, multi-positive is at rest.
    logits = torch.tensor([[10.0, 10.0, -10.0], [10.0, 10.0, -10.0], [-10.0, -10.0, 10.0]], requires_grad=True)
    (grad_multi,) = torch.autograd.grad(zoo._contrastive_loss(logits, labels, multi_positive=True), logits)
    (grad_plain,) = torch.autograd.grad(zoo._contrastive_loss(logits, labels, multi_positive=False), logits)
    assert grad_multi.abs().max() < 1e-6
    assert grad_plain.abs().max() > 0.1
    # Without duplicate classes both are CLIP's loss.
    logits = torch.randn(4, 4)
    labels = torch.arange(4)
    assert torch.isclose(zoo._contrastive_loss(logits, labels, True), zoo._contrastive_loss(logits, labels, False))


def test_save_and_load_round_trip_from_a_local_directory(tmp_path, tokenizer, digits60, fake_hub):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    model = _pretrain(tokenizer, digits60, steps=5)
    processor = zoo.image_processor_for(model.config, mean=zoo.OPENAI_CLIP_MEAN, std=zoo.OPENAI_CLIP_STD)
    path = str(tmp_path / "tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)

    loaded = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    loaded_tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    loaded_proc = CLIPImageProcessorPil.from_pretrained(path, local_files_only=True)
    processors = [loaded_proc]
    try:
        processors.append(AutoImageProcessor.from_pretrained(path, local_files_only=True))
    except ImportError as error:
        # transformers 5.17 (the floor) refuses AutoImageProcessor without torchvision, even for a PIL
        # processor; the tested release (constraints/tested.txt) loads it, and must
        from packaging.version import Version
        from transformers import __version__ as transformers_version
        from transformers.utils import is_torchvision_available

        if "Torchvision" not in str(error) or is_torchvision_available() or Version(transformers_version) >= Version(
                "5.25"):
            raise
    assert fake_hub.requests == []  # everything came from the directory, nothing from a Hub

    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    prompts = [zoo.EVAL_TEMPLATE.format(n) for n in DIGIT_NAMES]
    assert loaded_tok(prompts)["input_ids"] == tokenizer(prompts)["input_ids"]
    assert len(loaded_tok) == 49408
    images = digits60["image"][:4]
    ref = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    for proc in processors:
        got = proc(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        assert torch.allclose(got, ref)
    # Training pixels (mean/std path) are the processor's pixels, so both evaluations agree.
    by_norm = zoo.zero_shot_accuracy(model, tokenizer, (zoo.OPENAI_CLIP_MEAN, zoo.OPENAI_CLIP_STD), digits60,
                                     DIGIT_NAMES)
    by_proc = zoo.zero_shot_accuracy(loaded, loaded_tok, loaded_proc, digits60, DIGIT_NAMES)
    assert by_norm == by_proc
    assert 0.0 <= by_proc <= 1.0


TINY_TEACHER = dict(TINY, epochs=1, batch_size=25, train_rows_per_class=5, seed=0)
TINY_STUDENT = dict(TINY, epochs=1, batch_size=25, train_rows_per_class=3, seed=1)


def test_build_zoo_caches_and_writes_atomically(tmp_path, monkeypatch):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    # Loading the digits once keeps the repeated (failing) builds below fast.
    monkeypatch.setattr(zoo, "digits_splits", functools.lru_cache(maxsize=1)(zoo.digits_splits))
    root = tmp_path / "zoo"
    threads = torch.get_num_threads()
    captions_used = []
    real_pretrain = zoo.pretrain_clip

    def recording_pretrain(*args, **kwargs):
        captions_used.append(tuple(kwargs["captions"]))
        return real_pretrain(*args, **kwargs)

    monkeypatch.setattr(zoo, "pretrain_clip", recording_pretrain)
    paths = zoo.build_zoo(root, teacher_kwargs=TINY_TEACHER, student_kwargs=TINY_STUDENT, num_threads=1)
    # Each model is pretrained on its own caption family (teacher: all templates, student: the narrow one).
    assert captions_used == [zoo.CAPTION_TEMPLATES, zoo.STUDENT_CAPTION_TEMPLATES]
    assert torch.get_num_threads() == threads
    assert set(paths) == {"teacher", "student"}
    zoo_dir = os.path.dirname(paths["teacher"])
    assert os.path.dirname(paths["student"]) == zoo_dir and os.path.dirname(zoo_dir) == str(root)
    assert os.listdir(root) == [os.path.basename(zoo_dir)]  # no temporary directories left behind
    for role in ("teacher", "student"):
        model = CLIPModel.from_pretrained(paths[role], local_files_only=True)
        assert model.config.vision_config.image_size == 28
        AutoTokenizer.from_pretrained(paths[role], local_files_only=True)
        CLIPImageProcessorPil.from_pretrained(paths[role], local_files_only=True)
    marker = zoo.read_zoo_marker(paths)
    assert marker == zoo.read_zoo_marker(zoo_dir) == zoo.read_zoo_marker(paths["student"])
    assert marker["settings"]["teacher"]["train_rows_per_class"] == 5
    assert marker["settings"]["teacher"]["captions"] is None  # None: CAPTION_TEMPLATES
    assert marker["settings"]["student"]["captions"] == list(zoo.STUDENT_CAPTION_TEMPLATES)
    assert marker["eval"]["num_rows"] == 1000
    assert all(0.0 <= marker["zero_shot_accuracy"][r] <= 1.0 for r in ("teacher", "student"))
    marker_mtime = os.path.getmtime(os.path.join(zoo_dir, zoo.MARKER_NAME))

    def refuse(*args, **kwargs):
        raise AssertionError("pretrain_clip must not run on a cache hit")

    monkeypatch.setattr(zoo, "pretrain_clip", refuse)
    assert zoo.build_zoo(root, teacher_kwargs=TINY_TEACHER, student_kwargs=TINY_STUDENT) == paths
    assert os.path.getmtime(os.path.join(zoo_dir, zoo.MARKER_NAME)) == marker_mtime

    # A forced rebuild that dies midway leaves the previous zoo intact and no temporary files.
    with pytest.raises(AssertionError, match="cache hit"):
        zoo.build_zoo(root, force=True, teacher_kwargs=TINY_TEACHER, student_kwargs=TINY_STUDENT)
    assert os.listdir(root) == [os.path.basename(zoo_dir)]
    assert zoo.read_zoo_marker(paths) == marker

    # Other settings are another zoo (so they would need training).
    with pytest.raises(AssertionError, match="cache hit"):
        zoo.build_zoo(root, teacher_kwargs=dict(TINY_TEACHER, seed=5), student_kwargs=TINY_STUDENT)

    # A zoo directory whose marker no longer matches its settings is not a cache hit.
    with open(os.path.join(zoo_dir, zoo.MARKER_NAME), "w") as f:
        json.dump({"settings": {"stale": True}}, f)
    with pytest.raises(AssertionError, match="cache hit"):
        zoo.build_zoo(root, teacher_kwargs=TINY_TEACHER, student_kwargs=TINY_STUDENT)


def test_student_captions_leave_the_eval_prompt_misphrased():
    # The student never reads the hand-crafted prompt's words, so a learned prompt has headroom.
    assert zoo.STUDENT_SPEC.captions == zoo.STUDENT_CAPTION_TEMPLATES
    assert zoo.TEACHER_SPEC.captions is None
    eval_words = {"photo", "of", "digit"}
    assert eval_words <= set(zoo.EVAL_TEMPLATE.rstrip(".").split())
    for template in zoo.STUDENT_CAPTION_TEMPLATES:
        assert "{}" in template and not eval_words & set(template.rstrip(".").split()), template
    # Captions enter the cache key, as a list; replace() takes any sequence but not a bare string.
    spec = zoo.STUDENT_SPEC.replace(captions=["{}", "the number {}"])
    assert spec.captions == ("{}", "the number {}")
    assert spec.to_dict()["captions"] == ["{}", "the number {}"]
    assert zoo._settings_key(zoo._zoo_settings(zoo.TEACHER_SPEC, spec)) != zoo._settings_key(
        zoo._zoo_settings(zoo.TEACHER_SPEC, zoo.STUDENT_SPEC))
    with pytest.raises(TypeError, match="sequence"):
        zoo.STUDENT_SPEC.replace(captions="{}")


def test_build_zoo_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="image size"):
        zoo.build_zoo(tmp_path, teacher_kwargs=TINY_TEACHER, student_kwargs=dict(TINY_STUDENT, image_size=35))
    with pytest.raises(TypeError, match="unknown"):
        zoo.build_zoo(tmp_path, teacher_kwargs=dict(TINY_TEACHER, hidden=3))


def test_default_root_follows_hf_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert zoo.default_zoo_root() == os.path.join(str(tmp_path), "fdbpl_hf", "zoo")


def test_digits_splits_are_disjoint_and_fixed():
    train, test = zoo.digits_splits()
    assert (len(train), len(test)) == (4000, 1000)
    again, _ = zoo.digits_splits()
    assert train["label"] == again["label"]
    pixels = lambda ds: {im.tobytes() for im in ds["image"]}  # noqa: E731
    assert not pixels(train) & pixels(test)
