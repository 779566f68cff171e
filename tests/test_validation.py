"""Issue 21 (part B): one validation layer for the settings, one class-order comparison for every
combination of objects that carry class names, and the inputs that used to give a silently wrong
result or an error that did not say what to do. Each test failed (or passed silently) before the fix."""

import math
import re

import datasets
import numpy as np
import pytest
import torch
from conftest import make_clip

from fdbpl_hf import (CallableTeacher, CLIPTeacher, EnsembleTeacher, FDBPLConfig, RegionSpec, RILDataset,
                      RILTableConfig, build_feature_cache, build_ril_table, get_fdbpl_model)
from fdbpl_hf.data import DatasetInfo, few_shot_indices, kept_class_ids, subset_classes
from fdbpl_hf.evaluation import (ZeroShotCLIP, encode_images, evaluate_base_to_novel, evaluate_cross_dataset,
                                 evaluate_domain_generalization, evaluate_ood, ood_metrics, predict_logits,
                                 summarize_runs)
from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN as MEAN
from fdbpl_hf.ril.teachers import OPENAI_CLIP_STD as STD
from fdbpl_hf.testing.worlds import DIGIT_NAMES, image_processor_for
from fdbpl_hf.trainer import FDBPLTrainer, FDBPLTrainingArguments
from fdbpl_hf.validation import (check_class_names, check_template, class_order_difference,
                                 label_order_difference)

SIZE = 32  # the tiny CLIP's image size


def pooled_teacher(class_names=None, seed=0):
    """A 10-class callable teacher on pooled pixels (its weights are fingerprinted)."""
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 10))
    return CallableTeacher(module, 10, SIZE, class_names=class_names)


@pytest.fixture(scope="module")
def table(digits_small, tmp_path_factory):
    return build_ril_table(digits_small, pooled_teacher(DIGIT_NAMES), num_regions=2, top_k=3,
                           output_dir=str(tmp_path_factory.mktemp("validation") / "table"))


@pytest.fixture(scope="module")
def clip():
    return make_clip("tiny", seed=2)


@pytest.fixture(scope="module")
def processor(clip):
    return image_processor_for(clip.config)


def args(tmp_path, **kw):
    return FDBPLTrainingArguments(**{"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none",
                                     "save_strategy": "no", "disable_tqdm": True, **kw})


def reordered(dataset, names):
    """The dataset with its ClassLabel's names replaced (the integer labels and images unchanged)."""
    return dataset.cast_column("label", datasets.ClassLabel(names=list(names)))


# ---- 1. the settings layer ---------------------------------------------------------------------


@pytest.mark.parametrize("setting, value, message", [
    ("lambda_neg", float("nan"), "lambda_neg must be a finite number >= 0, got nan"),
    ("lambda_pcd", float("inf"), "lambda_pcd must be a finite number >= 0, got inf"),
    ("lambda_sim", -0.1, "lambda_sim must be a finite number >= 0, got -0.1"),
    ("pcd_margin", float("nan"), "pcd_margin must be a finite number >= 0, got nan"),
    ("learning_rate", 0.0, "learning_rate must be a finite number > 0, got 0.0"),
    ("warmup_lr", float("nan"), "warmup_lr must be a finite number >= 0, got nan"),
    ("warmup_epochs", -1.0, "warmup_epochs must be a finite number >= 0, got -1.0"),
    ("momentum", 1.5, "momentum must be a finite number in [0, 1), got 1.5"),
    ("weight_decay", float("nan"), "weight_decay must be a finite number >= 0, got nan"),
    ("max_grad_norm", -1.0, "max_grad_norm must be a finite number >= 0, got -1.0"),
    ("entropy_threshold", 50, "entropy_threshold must be a finite number in [0, 1], got 50 (50 looks like a "
                              "percentage: give the fraction, 0.5)"),
    ("adam_beta2", float("nan"), "adam_beta2 must be a finite number in [0, 1), got nan"),
    ("per_device_train_batch_size", 0, "per_device_train_batch_size must be an integer >= 1, got 0"),
    ("gradient_accumulation_steps", 0, "gradient_accumulation_steps must be an integer >= 1, got 0"),
    ("use_pcd", "False", "use_pcd must be True or False, got 'False'"),
    ("num_train_epochs", float("nan"), "num_train_epochs must be a finite number >= 0, got nan"),
])
def test_training_arguments_refuse_bad_numbers_naming_setting_value_and_range(tmp_path, setting, value, message):
    """All of these were accepted and trained to a NaN or meaningless adapter (or crashed later)."""
    with pytest.raises(ValueError, match=re.escape(f"FDBPLTrainingArguments.{message}")):
        args(tmp_path, **{setting: value})


def test_zero_epochs_need_max_steps_and_the_parser_still_parses(tmp_path):
    from transformers import HfArgumentParser

    with pytest.raises(ValueError, match=re.escape("num_train_epochs (without max_steps) must be a finite number > 0")):
        args(tmp_path, num_train_epochs=0)
    assert args(tmp_path, num_train_epochs=0, max_steps=2).max_steps == 2
    parser = HfArgumentParser(FDBPLTrainingArguments)
    line = ["--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu", "--lambda_neg", "0.5", "--no_use_pcd"]
    (parsed,) = parser.parse_args_into_dataclasses(line)
    assert (parsed.lambda_neg, parsed.use_pcd) == (0.5, False)
    with pytest.raises(ValueError, match=re.escape("FDBPLTrainingArguments.lambda_neg must be a finite number >= 0, "
                                                   "got nan")):
        parser.parse_args_into_dataclasses(line[:-3] + ["--lambda_neg", "nan"])


@pytest.mark.parametrize("settings, message", [
    (dict(ratio=(1, float("inf"))), "RegionSpec.ratio must be two finite numbers (min, max) with min <= max, each > 0, "
                                    "got (1, inf)"),
    (dict(ratio=(0.5, float("nan"))), "RegionSpec.ratio must be two finite numbers"),
    (dict(scale=(0.5,)), "RegionSpec.scale must be two finite numbers (min, max) with min <= max, each in (0, 1]"),
    (dict(scale=(0.0, 1.0)), "RegionSpec.scale must be two finite numbers"),
    (dict(flip_prob=50), "RegionSpec.flip_prob must be a finite number in [0, 1], got 50 (50 looks like a percentage"),
    (dict(flip_prob=float("nan")), "RegionSpec.flip_prob must be a finite number in [0, 1], got nan"),
    (dict(output_size=224.0), "RegionSpec.output_size must be an integer >= 1, got 224.0"),
    (dict(interpolation="nearest", renderer="float"), "RegionSpec.interpolation must be one of 'bilinear', 'bicubic'"),
    (dict(antialias="yes", renderer="float"), "RegionSpec.antialias must be True or False, got 'yes'"),
])
def test_region_spec_settings(settings, message):
    """ratio=(1, inf) drew inf-sized boxes (every region the fallback crop); nearest passed and then failed
    mid-build in F.interpolate."""
    with pytest.raises(ValueError, match=re.escape(message)):
        RegionSpec(**settings)


@pytest.mark.parametrize("settings, message", [
    (dict(num_regions=0), "RILTableConfig.num_regions must be an integer >= 1, got 0"),
    (dict(num_regions=2.5), "RILTableConfig.num_regions must be an integer >= 1, got 2.5"),
    (dict(top_k=True), "RILTableConfig.top_k must be an integer >= 1 or None, got True"),
    (dict(images_per_batch=0), "RILTableConfig.images_per_batch must be an integer >= 1, got 0"),
    (dict(shard_size=-5), "RILTableConfig.shard_size must be an integer >= 1, got -5"),
    (dict(fill="sparse"), "RILTableConfig.fill must be one of 'mr', 'dense', got 'sparse'"),
    (dict(template="a {} of a {}"), "RILTableConfig.template 'a {} of a {}' has 2 fields"),
    (dict(teacher_image_mean=[123.7, 116.3, 103.5]), "RILTableConfig.teacher_image_mean must be 3 numbers in [0, 1] "
                                                     "(pixels are in [0, 1]), got [123.7, 116.3, 103.5]: these look "
                                                     "like values on the 0-255 pixel scale"),
    (dict(teacher_image_std=[0.2, 0.2]), "RILTableConfig.teacher_image_std must be 3 numbers (one per RGB channel), "
                                         "got [0.2, 0.2] (2 values)"),
])
def test_table_config_settings(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RILTableConfig(**settings)


def test_replay_settings(digits_small, table):
    """A 2-value mean broadcast into a bare shape error at the first item; a 0-255 mean trained on pixels
    normalised to about -450; num_regions=0 failed at the first item with a modulo by zero."""
    spec = RegionSpec(output_size=SIZE)
    with pytest.raises(ValueError, match=re.escape("RILDataset image_mean must be 3 numbers (one per RGB channel), "
                                                   "got [0.5, 0.5] (2 values)")):
        RILDataset(digits_small, table, image_mean=[0.5, 0.5], image_std=STD)
    with pytest.raises(ValueError, match=re.escape("RILDataset image_mean must be 3 numbers in [0, 1] (pixels are in "
                                                   "[0, 1]), got [122.8, 116.7, 104.1]: these look like values on the "
                                                   "0-255 pixel scale; pixels are normalised in [0, 1], so divide them "
                                                   "by 255")):
        RILDataset(digits_small, table, image_mean=[122.8, 116.7, 104.1], image_std=STD)
    with pytest.raises(ValueError, match=re.escape("RILDataset image_std must be 3 numbers in (0, 1]")):
        RILDataset(digits_small, table, image_mean=MEAN, image_std=[0.0, 0.2, 0.2])
    with pytest.raises(ValueError, match=re.escape("RILDataset image_std must be 3 finite numbers, got "
                                                   "[0.2, nan, 0.2]")):
        RILDataset(digits_small, table, image_mean=MEAN, image_std=[0.2, float("nan"), 0.2])
    with pytest.raises(ValueError, match=re.escape("RILDataset.online num_regions must be an integer >= 1, got 0")):
        RILDataset.online(digits_small, class_names=DIGIT_NAMES, image_mean=MEAN, image_std=STD, region_spec=spec,
                          num_regions=0)
    with pytest.raises(TypeError, match="region_spec must be a RegionSpec, got dict"):
        RILDataset.online(digits_small, class_names=DIGIT_NAMES, image_mean=MEAN, image_std=STD,
                          region_spec=spec.to_dict())


def test_image_statistics_from_numpy_are_recorded_as_python_numbers(digits_small, clip, tokenizer, tmp_path):
    """np.float32 statistics passed the checks, then every build and cache failed on its JSON key
    ("Object of type float32 is not JSON serializable"). Python ints stay ints: earlier keys hold."""
    mean, std = np.array(MEAN, dtype=np.float32), np.array(STD, dtype=np.float32)
    teacher = CLIPTeacher(clip, tokenizer, DIGIT_NAMES, image_mean=mean, image_std=list(std))  # array, list of scalars
    assert teacher.image_mean == tuple(mean.tolist()) and all(type(v) is float for v in teacher.image_std)
    table = build_ril_table(digits_small.select(range(4)), pooled_teacher(), teacher_image_mean=mean,
                            teacher_image_std=std, class_names=DIGIT_NAMES, num_regions=1, top_k=2,
                            output_dir=str(tmp_path / "t"))
    data = RILDataset(digits_small.select(range(4)), table, image_mean=mean, image_std=std)
    assert data.image_mean == tuple(mean.tolist())
    build_feature_cache(data, clip, epochs=1, output_dir=str(tmp_path / "c"), progress=False)
    assert RILDataset(digits_small.select(range(4)), table, image_mean=MEAN, image_std=[1, 1, 1]).image_std == (1, 1, 1)


def test_teacher_settings(clip, tokenizer):
    with pytest.raises(ValueError, match=re.escape("CallableTeacher num_classes must be an integer >= 1, got 0")):
        CallableTeacher(lambda x: x, 0, SIZE)
    with pytest.raises(ValueError, match=re.escape("CallableTeacher image_mean must be 3 numbers in [0, 1]")):
        CallableTeacher(lambda x: x, 10, SIZE, image_mean=(123.7, 116.3, 103.5))
    with pytest.raises(ValueError, match=re.escape("CallableTeacher has num_classes=10 but 3 class_names")):
        CallableTeacher(lambda x: x, 10, SIZE, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=re.escape("CLIPTeacher image_std must be 3 numbers (one per RGB channel)")):
        CLIPTeacher(clip, tokenizer, DIGIT_NAMES, image_std=(0.2, 0.2))
    with pytest.raises(TypeError, match="ensemble member 1 is a function, not a Teacher"):
        EnsembleTeacher([pooled_teacher(), lambda x: x])


def test_evaluation_settings(clip, tokenizer, processor, digits_small):
    model = get_fdbpl_model(clip, FDBPLConfig(), tokenizer)
    kw = dict(image_processor=processor, progress=False)
    with pytest.raises(ValueError, match=re.escape("tpr must be a finite number in (0, 1], got 95 (95 looks like a "
                                                   "percentage: give the fraction, 0.95)")):
        evaluate_ood(model, digits_small, digits_small.select(range(3)), DIGIT_NAMES, tpr=95, **kw)
    with pytest.raises(ValueError, match=re.escape("tpr must be a finite number in (0, 1], got nan")):
        ood_metrics({"msp": [0.9]}, {"msp": [0.1]}, tpr=float("nan"))
    with pytest.raises(ValueError, match=re.escape("batch_size must be an integer >= 1, got 0")):
        encode_images(model, digits_small, batch_size=0, **kw)
    with pytest.raises(ValueError, match=re.escape("ddof must be an integer >= 0, got -1")):
        summarize_runs([{"protocol": {"dataset": "d", "method": "m", "seed": 1}, "results": {}}], ddof=-1)


def test_protocol_runs_refuse_zero_regions(tmp_path):
    """num_regions=0 silently meant "the default" (`num_regions or epochs`)."""
    from fdbpl_hf.protocol import run_base_to_novel

    with pytest.raises(ValueError, match=re.escape("run_base_to_novel num_regions must be an integer >= 1 or None, "
                                                   "got 0")):
        run_base_to_novel("fdbpl-offline", student="s", teacher="t", num_regions=0, output_dir=str(tmp_path))


def _example(name: str):
    """An example script as a module, by its path (the `evaluate` package would shadow a plain import)."""
    import importlib.util
    import os
    import sys

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"fdbpl_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and typing look their module up there
    spec.loader.exec_module(module)
    return module


def test_example_scripts_check_their_own_settings(tmp_path):
    build_table, evaluate_script, train_script = _example("build_table"), _example("evaluate"), _example("train")

    with pytest.raises(ValueError, match=re.escape("EvalArguments.batch_size must be an integer >= 1, got 0")):
        evaluate_script.EvalArguments(student="s", output_dir=str(tmp_path), batch_size=0)
    with pytest.raises(ValueError, match=re.escape("ScriptArguments.num_regions must be an integer >= 1, got 0")):
        train_script.parse_args(["--student", "s", "--output_dir", str(tmp_path), "--report_to", "none",
                                 "--num_regions", "0"])
    with pytest.raises(ValueError, match=re.escape("RILTableConfig.teacher_image_mean must be 3 numbers in [0, 1]")):
        build_table.parse_args(["--teacher", "t", "--output_dir", str(tmp_path), "--teacher_image_mean", "123", "117",
                                "104"])


# ---- 2. class order ------------------------------------------------------------------------------


def test_the_comparison_names_the_first_differing_position():
    assert class_order_difference("a", ["x", "y"], "b", ["x", "y"]) is None
    assert class_order_difference("the teacher", ["cat", "dog", "emu"], "the table", ["cat", "emu", "dog"]) == \
        "class 1 is 'dog' in the teacher but 'emu' in the table"
    assert class_order_difference("a", ["x", "y", "z"], "b", ["x", "y"]) == \
        "a has 3 classes, b 2: they agree up to class 1, then a goes on with class 2 'z'"
    # a ClassLabel's raw names and cleaned prompt names: spelling may differ, a reordering may not
    raw = ["AnnualCrop", "Forest", "SeaLake"]
    assert label_order_difference("labels", raw, "given", ["Annual Crop Land", "forest", "Sea or Lake"]) is None
    assert label_order_difference("labels", raw, "given", ["Annual Crop Land", "Sea Lake", "Forest"]) == \
        "class 1 is 'Forest' in labels but 'Sea Lake' in given, which is class 2 ('SeaLake') in labels"


def test_teacher_and_table_classes_are_compared_at_the_build(digits_small, clip, tokenizer, tmp_path):
    """A teacher built for the classes in another order scored every region's columns as the wrong class."""
    shuffled = DIGIT_NAMES[1:] + DIGIT_NAMES[:1]
    with pytest.raises(ValueError, match=re.escape("class 0 is 'one' in the teacher (Sequential) but 'zero' in the "
                                                   "dataset")):
        build_ril_table(digits_small, pooled_teacher(shuffled), num_regions=2, output_dir=str(tmp_path / "a"))
    clip_teacher = CLIPTeacher(clip, tokenizer, shuffled, name="tiny")
    with pytest.raises(ValueError, match=re.escape("class 0 is 'one' in the teacher (tiny) but 'zero' in the dataset")):
        build_ril_table(digits_small, clip_teacher, num_regions=2, output_dir=str(tmp_path / "b"))
    # class names given in another order than the dataset's ClassLabel: every prompt named another class
    with pytest.raises(ValueError, match=re.escape("class 0 is 'zero' in the label column 'label' (ClassLabel) but "
                                                   "'one' in class_names, which is class 1 ('one')")):
        build_ril_table(digits_small, pooled_teacher(), class_names=shuffled, num_regions=2,
                        output_dir=str(tmp_path / "c"))


def test_ensemble_members_must_agree_on_the_class_order():
    a, b = pooled_teacher(DIGIT_NAMES), pooled_teacher(DIGIT_NAMES[::-1])
    with pytest.raises(ValueError, match=re.escape("class 0 is 'zero' in ensemble member 0 (Sequential) but 'nine' in "
                                                   "ensemble member 1 (Sequential)")):
        EnsembleTeacher([a, b])
    assert EnsembleTeacher([a, pooled_teacher()]).class_names == DIGIT_NAMES  # an unnamed member takes no side
    assert EnsembleTeacher([pooled_teacher(), pooled_teacher()]).class_names is None


def test_table_and_dataset_classlabel_are_compared(digits_small, table):
    """Same images and integer labels under a ClassLabel in another order: replay trained each image towards
    the soft label of another class name."""
    swapped = reordered(digits_small, DIGIT_NAMES[::-1])
    with pytest.raises(ValueError, match=re.escape("class 0 is 'nine' in the dataset's label column 'label' "
                                                   "(ClassLabel) but 'zero' in the RIL table, which is class 9 "
                                                   "('zero')")):
        RILDataset(swapped, table, image_mean=MEAN, image_std=STD)
    with pytest.raises(ValueError, match=re.escape("in the dataset's label column 'label' (ClassLabel) but 'zero' in "
                                                   "class_names")):
        RILDataset.online(swapped, class_names=DIGIT_NAMES, image_mean=MEAN, image_std=STD,
                          region_spec=RegionSpec(output_size=SIZE), num_regions=2)
    assert RILDataset(digits_small, table, image_mean=MEAN, image_std=STD).class_names == DIGIT_NAMES


def test_online_teacher_and_eval_sets_are_compared_with_the_training_classes(digits_small, table, tokenizer, tmp_path):
    model = get_fdbpl_model(make_clip("tiny", seed=2), FDBPLConfig(), tokenizer)
    online = RILDataset.online(digits_small, class_names=DIGIT_NAMES, image_mean=MEAN, image_std=STD,
                               region_spec=RegionSpec(output_size=SIZE), num_regions=2)
    with pytest.raises(ValueError, match=re.escape("class 0 is 'nine' in the teacher (Sequential) but 'zero' in the "
                                                   "training data")):
        FDBPLTrainer(model=model, args=args(tmp_path), train_dataset=online, teacher=pooled_teacher(DIGIT_NAMES[::-1]))
    with pytest.raises(TypeError, match="teacher must be a fdbpl_hf Teacher .* got CLIPModel"):  # was AttributeError
        FDBPLTrainer(model=model, args=args(tmp_path), train_dataset=online, teacher=make_clip("tiny"))
    train = RILDataset(digits_small, table, image_mean=MEAN, image_std=STD)
    # an evaluation set over other classes was scored against the training classes
    others = RILDataset.online(reordered(digits_small, [f"class {i}" for i in range(10)]),
                               class_names=[f"class {i}" for i in range(10)], image_mean=MEAN, image_std=STD,
                               region_spec=RegionSpec(output_size=SIZE), num_regions=2)
    with pytest.raises(ValueError, match=re.escape("class 0 is 'zero' in the training data but 'class 0' in "
                                                   "eval_dataset")):
        FDBPLTrainer(model=model, args=args(tmp_path), train_dataset=train, eval_dataset=others)
    # a plain datasets.Dataset as eval_dataset failed inside the collator with a KeyError
    with pytest.raises(TypeError, match=re.escape("eval_dataset is a Dataset, not an RILDataset")):
        FDBPLTrainer(model=model, args=args(tmp_path), train_dataset=train, eval_dataset=digits_small)
    with pytest.raises(TypeError, match=re.escape("eval_dataset['digits'] is a Dataset, not an RILDataset")):
        FDBPLTrainer(model=model, args=args(tmp_path), train_dataset=train, eval_dataset={"digits": digits_small})
    trainer = FDBPLTrainer(model=model, args=args(tmp_path), train_dataset=train)
    with pytest.raises(TypeError, match="not an RILDataset"):
        trainer.evaluate(eval_dataset=digits_small)
    with pytest.raises(ValueError, match="in eval_dataset"):
        trainer.predict(others)


def test_coop_with_an_unlabelled_row_names_it(digits_small, table, tokenizer, tmp_path):
    """A None label became -1 and failed in cross_entropy as "Target -1 is out of bounds"."""
    model = get_fdbpl_model(make_clip("tiny", seed=2), FDBPLConfig(), tokenizer)
    holes = digits_small.cast_column("label", datasets.Value("int64")).map(
        lambda row, i: {"label": None if i == 4 else row["label"]}, with_indices=True)
    data = RILDataset.online(holes, class_names=DIGIT_NAMES, image_mean=MEAN, image_std=STD,
                             region_spec=RegionSpec(output_size=SIZE), num_regions=2)
    with pytest.raises(ValueError, match=re.escape("loss_type='coop' trains on labels, but row 4 of the training "
                                                   "dataset has none (column 'label': None or -1; 1 such rows)")):
        FDBPLTrainer(model=model, args=args(tmp_path, loss_type="coop"), train_dataset=data)


def test_an_adapter_is_scored_base_to_novel_only_on_its_training_classes(clip, tokenizer, processor, digits_small):
    """An adapter trained on other classes got a "base" accuracy on classes it never saw (a warning in the
    example script only)."""
    model = get_fdbpl_model(clip, FDBPLConfig(class_names=["cat", "dog", "emu", "fox", "gnu"]), tokenizer)
    kw = dict(image_processor=processor, progress=False, ood=False)
    test = digits_small
    with pytest.raises(ValueError, match=re.escape("class 0 is 'cat' in the adapter's training classes (its "
                                                   "config.class_names) but 'zero' in this test split's base classes")):
        evaluate_base_to_novel(model, test, **kw)
    assert "base_acc" in evaluate_base_to_novel(model, test, check_trained_classes=False, **kw)
    model.fdbpl_config.class_names = DIGIT_NAMES[:5]
    assert "base_acc" in evaluate_base_to_novel(model, test, **kw)


def test_evaluation_sets_are_compared_with_the_classes_given(clip, tokenizer, processor, digits_small):
    model = get_fdbpl_model(clip, FDBPLConfig(), tokenizer)
    kw = dict(image_processor=processor, progress=False)
    rows = digits_small.select(range(4))
    with pytest.raises(ValueError, match=re.escape("class 0 is 'zero' in the label column 'label' of dataset but "
                                                   "'nine' in the class names given, which is class 9")):
        predict_logits(model, rows, DIGIT_NAMES[::-1], **kw)
    logits, labels = predict_logits(model, rows, ["cat", "dog"], label_column=None, **kw)
    assert logits.shape == (4, 2) and labels is None
    plain = digits_small.cast_column("label", datasets.Value("int64"))
    with pytest.raises(ValueError, match=re.escape("class 0 is 'zero' in the label column 'label' of "
                                                   "domain-generalisation target 't' but 'nine'")):
        evaluate_domain_generalization(model, (plain, DIGIT_NAMES[::-1]), {"t": digits_small}, **kw)


# ---- 3. silently wrong inputs: strings for lists, templates ----------------------------------------


def test_a_string_where_a_class_list_belongs_is_refused(digits_small, table, clip, tokenizer, processor, tmp_path):
    message = "not the single string 'cat' (which would be read as its characters"
    with pytest.raises(TypeError, match=re.escape(message)):
        check_class_names("class_names", "cat")
    with pytest.raises(TypeError, match=re.escape("class_names must be a list of strings (class names), not the "
                                                  "single string 'zeroone'")):
        build_ril_table(digits_small.cast_column("label", datasets.Value("int64")), pooled_teacher(),
                        class_names="zeroone", num_regions=2, output_dir=str(tmp_path / "t"))
    with pytest.raises(TypeError, match="RILDataset class_names must be a list"):
        RILDataset(digits_small, table, image_mean=MEAN, image_std=STD, class_names="zero")
    with pytest.raises(TypeError, match="RILDataset.online class_names must be a list"):
        RILDataset.online(digits_small, class_names="cat", image_mean=MEAN, image_std=STD,
                          region_spec=RegionSpec(output_size=SIZE))
    with pytest.raises(TypeError, match="CLIPTeacher class_names must be a list"):
        CLIPTeacher(clip, tokenizer, "cat")
    with pytest.raises(TypeError, match="CallableTeacher class_names must be a list"):
        CallableTeacher(lambda x: x, 3, SIZE, class_names="cat")
    kw = dict(image_processor=processor, progress=False)
    model = get_fdbpl_model(clip, FDBPLConfig(), tokenizer)
    with pytest.raises(TypeError, match="cross-dataset target 'd' class_names must be a list"):
        evaluate_cross_dataset(model, {"d": (digits_small, "zero")}, **kw)
    with pytest.raises(TypeError, match="class_names must be a list"):
        evaluate_ood(model, digits_small, digits_small.select(range(3)), "zero", **kw)
    # class ids and excluded classes: "012" was [0, 1, 2], exclude="BACKGROUND" dropped classes named "b", "a", ...
    with pytest.raises(TypeError, match=re.escape("classes must be a list of integers (class ids), not the single "
                                                  "string '01'")):
        few_shot_indices(digits_small, 1, 0, classes="01")
    with pytest.raises(TypeError, match="class_ids must be a list of integers"):
        subset_classes(digits_small, "01")
    with pytest.raises(TypeError, match="exclude must be a list of strings"):
        kept_class_ids(["a", "b", "Background"], exclude="Background")
    with pytest.raises(TypeError, match="exclude_classes must be a list of strings"):
        DatasetInfo.custom(hub_id="x/y", exclude_classes="BACKGROUND_Google")
    with pytest.raises(TypeError, match="class names must be a list of strings"):
        DatasetInfo.custom(hub_id="x/y").prompts("cat")


@pytest.mark.parametrize("template, what", [
    ("a {} of a {}.", "has 2 fields ({}, {}), and only one class name fills it"),
    ("a photo of a {name}.", "has the field {name}, which format(class_name) cannot fill"),
    ("a photo.", "has no '{}' field, so every class would get the same prompt"),
    ("a photo of {.", "is not a valid format string"),
])
def test_templates_need_exactly_one_field(template, what, clip, tokenizer):
    """Two fields raised IndexError deep in a build, a named one KeyError; CLIPTeacher accepted '{name}'
    only to fail in format()."""
    assert check_template("t", "a {{literal}} photo of a {}.") == "a {{literal}} photo of a {}."
    for make in (lambda: CLIPTeacher(clip, tokenizer, DIGIT_NAMES, templates=["a photo of a {}.", template]),
                 lambda: ZeroShotCLIP(clip, tokenizer, template),
                 lambda: DatasetInfo.custom(template=template, hub_id="x/y"),
                 lambda: FDBPLConfig(template=template),
                 lambda: RILTableConfig(template=template)):
        with pytest.raises(ValueError, match=re.escape(what)):
            make()


# ---- 4. unhelpful errors -------------------------------------------------------------------------


def test_evaluation_labels_must_be_class_ids(clip, tokenizer, processor, digits_small):
    """A None label failed in torch.as_tensor with a bare TypeError, a string one with "too many dimensions"."""
    model = get_fdbpl_model(clip, FDBPLConfig(), tokenizer)
    kw = dict(image_processor=processor, progress=False, batch_size=4)
    plain = digits_small.select(range(6)).cast_column("label", datasets.Value("int64"))
    holes = plain.map(lambda row, i: {"label": None if i == 5 else row["label"]}, with_indices=True)
    with pytest.raises(ValueError, match=re.escape("row 5 of dataset has no label (None in column 'label')")):
        encode_images(model, holes, **kw)
    words = plain.map(lambda row: {"word": DIGIT_NAMES[row["label"]]})
    with pytest.raises(ValueError, match=re.escape("row 0 of dataset has the label 'zero' in column 'word', a string: "
                                                   "labels must be class ids; turn the column into a ClassLabel")):
        encode_images(model, words, label_column="word", **kw)


def test_an_evaluation_target_must_be_a_dataset(clip, tokenizer, processor, digits_small):
    """A list of row dicts failed with "list indices must be integers or slices, not str"."""
    model = get_fdbpl_model(clip, FDBPLConfig(), tokenizer)
    kw = dict(image_processor=processor, progress=False)
    rows = [digits_small[i] for i in range(3)]
    with pytest.raises(TypeError, match=re.escape("cross-dataset target 'd' must be a datasets.Dataset, got list: "
                                                  "build one from the rows with datasets.Dataset.from_list(rows)")):
        evaluate_cross_dataset(model, {"d": (rows, DIGIT_NAMES)}, **kw)
    with pytest.raises(TypeError, match=re.escape("cross-dataset target 'd' must be (dataset, class_names) or "
                                                  "(dataset, class_names, template), got a list of row dicts")):
        evaluate_cross_dataset(model, {"d": rows}, **kw)
    with pytest.raises(TypeError, match="domain-generalisation target 't' must be a datasets.Dataset, got list"):
        evaluate_domain_generalization(model, (digits_small, DIGIT_NAMES), {"t": rows[:2]}, **kw)
    with pytest.raises(TypeError, match="must be a datasets.Dataset, got dict: build one from the columns"):
        encode_images(model, {"image": [], "label": []}, **kw)
    with pytest.raises(TypeError, match=re.escape("pick a split, e.g. dataset['test']")):
        encode_images(model, datasets.DatasetDict({"test": digits_small}), **kw)


def test_settings_objects_given_as_dicts_are_refused(digits_small, clip, tokenizer, tmp_path):
    """A dict for a RegionSpec failed on `.output_size`, a dict for an FDBPLConfig on `.context_dim`."""
    with pytest.raises(TypeError, match="region_spec must be a RegionSpec, got dict"):
        build_ril_table(digits_small, pooled_teacher(), num_regions=2, region_spec={"output_size": SIZE},
                        output_dir=str(tmp_path / "t"))
    with pytest.raises(TypeError, match=re.escape("config must be an FDBPLConfig, got dict: build it with "
                                                  "FDBPLConfig.from_dict(settings)")):
        get_fdbpl_model(clip, {"n_ctx": 4}, tokenizer)


def test_validation_messages_are_finite_safe():
    """The rules never call float() on what is not a number, and accept numpy scalars."""
    assert RegionSpec(output_size=np.int64(32), flip_prob=np.float32(0.5)).output_size == 32
    assert math.isclose(RILTableConfig(num_regions=np.int32(3)).num_regions, 3)
    with pytest.raises(ValueError, match=re.escape("RegionSpec.flip_prob must be a finite number in [0, 1], got "
                                                   "'0.5'")):
        RegionSpec(flip_prob="0.5")


# ---- review of 0.7's merged trainer: evaluation sets and precision flags ---------------------------

def test_evaluation_sets_the_loss_cannot_score_are_refused(digits_small, table, tokenizer, tmp_path):
    """Evaluation sets whose soft labels the loss cannot get: an online set without a teacher (a bare
    `KeyError: 'topk_indices'` at evaluate), a feature-cache set with a live teacher (`AttributeError`
    on the missing pixels), and a set normalised otherwise than the training data with a live teacher
    (silently another loss: the teacher's pixels are renormalised from the training data's statistics)."""
    from fdbpl_hf import build_feature_cache

    model = get_fdbpl_model(make_clip("tiny", seed=2), FDBPLConfig(), tokenizer)
    offline = RILDataset(digits_small, table, image_mean=MEAN, image_std=STD)

    def online(mean=MEAN, std=STD):
        return RILDataset.online(digits_small, class_names=DIGIT_NAMES, image_mean=mean, image_std=std,
                                 region_spec=RegionSpec(output_size=SIZE), num_regions=2)

    with pytest.raises(ValueError, match=re.escape("eval_dataset is an online RILDataset (no RIL table), so its "
                                                   "regions have no soft labels, and this trainer has no teacher")):
        FDBPLTrainer(model=model, args=args(tmp_path), train_dataset=offline, eval_dataset=online())
    trainer = FDBPLTrainer(model=model, args=args(tmp_path), train_dataset=offline)
    with pytest.raises(ValueError, match=re.escape("eval_dataset['o'] is an online RILDataset")):
        trainer.evaluate(eval_dataset={"o": online()})
    # CoOp scores labels: an online evaluation set serves
    FDBPLTrainer(model=model, args=args(tmp_path, loss_type="coop"), train_dataset=offline, eval_dataset=online())

    cache = build_feature_cache(offline, model, epochs=1, dtype="float32", output_dir=str(tmp_path / "cache"),
                                progress=False)
    cached = RILDataset(digits_small, table, image_mean=MEAN, image_std=STD, feature_cache=cache)
    with pytest.raises(ValueError, match=re.escape("eval_dataset reads a student-feature cache, which holds no "
                                                   "pixels for the online teacher")):
        FDBPLTrainer(model=model, args=args(tmp_path), train_dataset=online(), teacher=pooled_teacher(DIGIT_NAMES),
                     eval_dataset=cached)
    half = (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match=re.escape("eval_dataset normalises its regions with image_mean/image_std "
                                                   "((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), the training data with")):
        FDBPLTrainer(model=model, args=args(tmp_path), train_dataset=online(), teacher=pooled_teacher(DIGIT_NAMES),
                     eval_dataset=online(half, half))
    trainer = FDBPLTrainer(model=model, args=args(tmp_path), train_dataset=online(list(MEAN), list(STD)),
                           teacher=pooled_teacher(DIGIT_NAMES), eval_dataset=online())  # as lists: the same numbers
    with pytest.raises(ValueError, match="normalises its regions with image_mean/image_std"):
        trainer.predict(online(half, half))


@pytest.mark.parametrize("flag_name", ["bf16_full_eval", "fp16_full_eval"])
def test_half_precision_full_evaluation_is_refused(tmp_path, flag_name):
    """transformers casts the whole model for a standalone evaluate() under these flags and leaves it so:
    the trained contexts came back in bf16 (rounded) after `trainer.evaluate()`."""
    with pytest.raises(ValueError, match=re.escape(f"{flag_name}=True makes the Trainer cast the whole model")):
        args(tmp_path, **{flag_name: True})
