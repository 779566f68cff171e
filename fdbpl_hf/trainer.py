"""`FDBPLTrainer`: a `transformers.Trainer` that distils from an RIL table (or, as a baseline, a live teacher)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Annotated, Optional

import numpy as np
import torch
from accelerate.utils import DistributedType
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback, TrainingArguments

from .acceleration import (CUDA_GRAPH_MODES, PixelRenormaliser, TeacherRunner, autocast_factory, compile_options,
                           compiled)
from .losses import PCD_REDUCTIONS, WEIGHT_MODES, coop_loss, fdbpl_loss
from .modeling import FDBPLCLIPModel
from .files import write_json
from .precision import frozen_weights_in
from .prompts import (ADAPTER_CARD_HEADINGS, ADAPTER_COMPANION_FILES, ADAPTER_FILES, FDBPLPromptLearner, adapter_card,
                      adapter_file_owner)
from .ril.features import check_feature_cache
from .ril.device_replay import collate_device_replay, render_batch
from .ril.replay import TEACHER_LOG_PROBS, RILDataset, dense_teacher_logits
from .ril.table import ENTROPY_COLUMN
from .ril.teachers import Teacher
from .validation import (at_least, between, check_class_order, check_fields, check_value, flag, greater_than,
                         integer, one_of, probability)
from .saving import refuse_conflicts, save_files, write_card
from .step import LOGGED_TERMS, STEP_MODES, FusedStep, FusedStepSGD

logger = logging.getLogger(__name__)

# what compute_loss logs (as loss_<term>, LOGGED_TERMS): the four loss terms, then "weight", the
# batch's mean information weight, which is not a loss but scales the distillation terms
LOSS_TERMS = LOGGED_TERMS  # the pre-0.5 name
# written last into a checkpoint folder, once everything else in it is saved: a checkpoint without
# it was interrupted while being written (or comes from fdbpl_hf <= 0.3)
CHECKPOINT_COMPLETE = "fdbpl_checkpoint_complete.json"


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The newest `checkpoint-<step>` folder of `output_dir` that was completely written; newer
    incomplete ones are skipped with a warning. None when there is none."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps.append((int(match.group(1)), os.path.join(output_dir, name)))
    for _, path in sorted(steps, reverse=True):
        if os.path.isfile(os.path.join(path, CHECKPOINT_COMPLETE)):
            return path
        logger.warning("skipping checkpoint %s: it is incomplete (no %s; its writing was interrupted, or an older "
                       "fdbpl_hf wrote it). Pass its path as resume_from_checkpoint to use it anyway.",
                       path, CHECKPOINT_COMPLETE)
    return None
_PLAIN_DDP = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
# Rules for numeric TrainingArguments fields that transformers accepts unchecked (a NaN beta, a zero
# batch size or accumulation); FDBPL's own fields carry theirs in their annotations.
INHERITED_TRAINING_RULES = {
    "adam_beta1": between(0, 1, high_open=True),
    "adam_beta2": between(0, 1, high_open=True),
    "adam_epsilon": greater_than(0),
    "per_device_eval_batch_size": integer(1),
    "gradient_accumulation_steps": integer(1),
    "max_steps": integer(-1),
    "warmup_steps": at_least(0),
    "logging_steps": greater_than(0),
    "seed": integer(0),
    "data_seed": integer(0, optional=True),
}


@dataclass
class FDBPLTrainingArguments(TrainingArguments):
    """`TrainingArguments` with FDBPL's loss weights and the paper's optimisation defaults
    (SGD lr 0.002, momentum 0.9, weight decay 5e-4, no gradient clipping, cosine schedule after
    one constant warm-up epoch at 1e-5, batch 32, 50 epochs). Every field can be overridden, on
    the command line too: `--optim adamw_torch` (any Trainer optimiser) replaces the SGD, and
    `--warmup_epochs 0` hands the schedule back to the Trainer (`--warmup_steps`,
    `--lr_scheduler_kwargs`)."""

    learning_rate: Annotated[float, greater_than(0)] = field(default=0.002, metadata={
        "help": "SGD learning rate (paper: 0.002)."})
    weight_decay: Annotated[float, at_least(0)] = field(default=5e-4, metadata={"help": "Weight decay (paper: 5e-4)."})
    num_train_epochs: Annotated[float, at_least(0)] = field(default=50.0, metadata={"help": "Epochs (paper: 50)."})
    per_device_train_batch_size: Annotated[int, integer(1)] = field(default=32, metadata={
        "help": "Regions per device per step."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule after the warm-up."})
    optim: str = field(default="sgd", metadata={"help": "sgd: the paper's SGD with --momentum; any other "
                                                        "Trainer optimiser name is built by the Trainer."})
    max_grad_norm: Annotated[float, at_least(0)] = field(default=0.0, metadata={
        "help": "Gradient clipping norm; 0 = none (paper)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the teacher columns."})
    label_names: Optional[list[str]] = field(default_factory=lambda: ["labels"], metadata={"help": "Label keys."})
    ddp_find_unused_parameters: Optional[bool] = field(default=False, metadata={"help": "Both contexts are always used."})
    momentum: Annotated[float, between(0, 1, high_open=True)] = field(default=0.9, metadata={
        "help": "SGD momentum (paper: 0.9)."})
    warmup_epochs: Annotated[float, at_least(0)] = field(default=1.0, metadata={
        "help": "Constant warm-up epochs at warmup_lr."})
    warmup_lr: Annotated[float, at_least(0)] = field(default=1e-5, metadata={
        "help": "Learning rate during the warm-up (CoOp: 1e-5)."})
    lambda_neg: Annotated[float, at_least(0)] = field(default=1.0, metadata={
        "help": "Weight of the negative-prompt loss."})
    lambda_sim: Annotated[float, at_least(0)] = field(default=0.001, metadata={
        "help": "Weight of the positive/negative dissimilarity."})
    lambda_pcd: Annotated[float, at_least(0)] = field(default=1.0, metadata={
        "help": "Weight of the PCD ranking loss (1.0: the measured winner, docs/ablations.md; spec's 0.1 was inert)."})
    pcd_margin: Annotated[float, at_least(0)] = field(default=0.2, metadata={"help": "Margin of the PCD ranking loss."})
    use_pcd: Annotated[bool, flag()] = field(default=True, metadata={
        "help": "False reproduces the released code (PCD off)."})
    pcd_reduction: Annotated[str, one_of(*PCD_REDUCTIONS)] = field(default="mean", metadata={
        "help": "PCD over region pairs: mean (measured winner) or sum (the authors' commented form; far worse, "
                "docs/ablations.md)."})
    weight_mode: Annotated[str, one_of(*WEIGHT_MODES)] = field(default="soft", metadata={
        "help": "Region information weight: soft or threshold."})
    entropy_threshold: Annotated[float, probability()] = field(default=0.5, metadata={
        "help": "Normalised entropy cut for threshold mode."})
    weight_entropy: Annotated[str, one_of("full", "topk")] = field(default="full", metadata={
        "help": "Entropy behind the region weights: full (the table's stored entropy of the teacher's full "
                "distribution, or the live teacher's; the paper's weights) or topk (of the top-K rebuild, "
                "as fdbpl_hf 0.3 did; for ablations)."})
    loss_type: Annotated[str, one_of("fdbpl", "coop")] = field(default="fdbpl", metadata={
        "help": "fdbpl (distillation) or coop (labels, baseline)."})
    compile_loss: Annotated[bool, flag()] = field(default=True, metadata={
        "help": "With --torch_compile: compile the FDBPL loss with the student's backend and mode too (the online "
                "teacher always is). False: a shorter compile, more kernel launches per step (standard step only: "
                "the fused step compiles its forward and loss as one graph)."})
    logging_nan_inf_filter: Annotated[bool, flag()] = field(default=False, metadata={
        "help": "The Trainer's filter replaces a NaN/inf step loss by the running mean in the logged loss: it "
                "hides a broken step and costs a host sync per step. Off: such a loss shows in the logs."})
    train_step: Annotated[str, one_of(*STEP_MODES)] = field(default="standard", metadata={
        "help": "standard: the Trainer's own step. fused: forward, loss, the contexts' gradients, the SGD update "
                "and the logged sums as one function of tensors (fdbpl_hf.step; any device; with --torch_compile its "
                "forward and loss compile as one graph). cuda_graph: the fused step captured once as a CUDA graph "
                "and replayed (CUDA only). fused and cuda_graph need the default SGD, one process, no gradient "
                "accumulation and no --fp16."})
    cast_frozen_backbone: Annotated[bool, flag()] = field(default=True, metadata={
        "help": "With --bf16/--fp16: cast the frozen towers (student, and a CLIP teacher's image tower) once to "
                "that precision for train/evaluate/predict, run them without autocast, and restore the float32 "
                "weights afterwards (autocast re-casts every frozen weight at every call). The contexts, their "
                "gradients, the logits and the loss stay float32. False: autocast as before."})

    def replay_epochs(self, num_items: int) -> int:
        """How many epochs of replay a run over `num_items` images starts (`max_steps` included):
        the `epochs` a student-feature cache must cover."""
        if self.max_steps > 0:
            per_step = self.per_device_train_batch_size * self.gradient_accumulation_steps * max(self.world_size, 1)
            return math.ceil(self.max_steps / max(1, math.ceil(num_items / per_step)))
        return max(1, math.ceil(self.num_train_epochs))

    def _check_fused_step(self) -> None:
        why = None
        if self.optim != "sgd":
            optim = getattr(self.optim, "value", self.optim)
            why = f"optim={optim!r} (the fused step applies the paper's SGD update itself)"
        elif self.gradient_accumulation_steps != 1:
            why = f"gradient_accumulation_steps={self.gradient_accumulation_steps} (one update per batch)"
        elif self.fp16:
            why = "fp16 (its gradient scaler checks for inf on the host at every step): use bf16"
        elif self.torch_compile and not self.compile_loss:
            why = "compile_loss=False (with torch_compile the step's forward and loss compile as one graph)"
        elif self.train_step == "cuda_graph" and self.torch_compile and self.torch_compile_mode in CUDA_GRAPH_MODES:
            why = (f"torch_compile_mode={self.torch_compile_mode!r}, which captures CUDA graphs of its own inside "
                   "the step's graph: leave the mode unset")
        if why:
            raise ValueError(f"train_step={self.train_step!r} does not support {why}; use train_step='standard'")

    def __post_init__(self):
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
            # torchrun / `accelerate launch --multi_gpu` on a machine without GPUs: without use_cpu each
            # process would train alone (world size 1) into the same output_dir; with it they form one
            # gloo process group (real DDP)
            logger.info("WORLD_SIZE=%s and no GPU: training on CPU processes over gloo (use_cpu=True)",
                        os.environ["WORLD_SIZE"])
            self.use_cpu = True
        # every rule in the annotations above (and INHERITED_TRAINING_RULES), before transformers computes
        # with the values: type, finiteness, range (fdbpl_hf.validation)
        check_fields(self, INHERITED_TRAINING_RULES)
        if self.max_steps <= 0:
            check_value("FDBPLTrainingArguments.num_train_epochs (without max_steps)", self.num_train_epochs,
                        greater_than(0))
        non_blocking_unset = self.accelerator_config is None
        super().__post_init__()
        if non_blocking_unset and self.dataloader_pin_memory:
            # pinned batches copied without blocking the host (accelerate's DataLoaderShard); a no-op on CPU
            self.accelerator_config.non_blocking = True
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must stay False: the trainer needs the teacher columns")
        for flag_name in ("bf16_full_eval", "fp16_full_eval"):
            if getattr(self, flag_name):
                # transformers casts the whole model for a standalone evaluate() and leaves it so: the learned
                # contexts would be rounded to half precision for the rest of the user's session
                raise ValueError(f"{flag_name}=True makes the Trainer cast the whole model to half precision, the "
                                 "learned contexts and logit scale included, and leave it so: use --bf16 (or --fp16) "
                                 "instead, under which evaluate() and predict() run the frozen towers in that "
                                 "precision and give the float32 weights back (cast_frozen_backbone)")
        if self.optim == "sgd" and self.optim_args:
            raise ValueError("optim_args is not read by FDBPL's SGD: set --momentum and --weight_decay instead")
        if self.train_step != "standard":
            self._check_fused_step()
        if self.warmup_epochs > 0 and self.lr_scheduler_type == "cosine" and (
                self.warmup_steps or self.lr_scheduler_kwargs):
            raise ValueError("warmup_steps and lr_scheduler_kwargs belong to the Trainer's own schedules, and the "
                             "default one is CoOp's constant warm-up (warmup_epochs at warmup_lr, then cosine): "
                             "pass warmup_epochs=0 to use them")


def _stats(data: RILDataset) -> tuple:
    """A dataset's pixel statistics as comparable numbers (they are kept as given: lists or tuples)."""
    return tuple(float(v) for v in data.image_mean), tuple(float(v) for v in data.image_std)


def _has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(xpu and xpu.is_available()) or bool(mps and mps.is_available())


class _EpochToDataset(TrainerCallback):
    """Tell the replay dataset the epoch: accelerate's seedable sampler swallows `set_epoch`."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(math.floor((state.epoch or 0) + 1e-6)))


class FDBPLTrainer(Trainer):
    """Distils a teacher into the prompts of an `FDBPLCLIPModel`.

    Offline (the FDBPL way): `train_dataset` is an `RILDataset` over a table; soft labels come from
    the table and no teacher runs. Online (the PromptKD/KDPL baseline): pass `teacher=` and an
    `RILDataset.online(...)`; the teacher scores each replayed region at every step.
    Only the two contexts are optimised; checkpoints and pushes hold only the adapter.
    """

    loss_is_scaled_for_ga = False  # our losses are per-batch means

    def __init__(self, model: FDBPLCLIPModel, args: FDBPLTrainingArguments, train_dataset: RILDataset,
                 teacher: Optional[Teacher] = None, **kwargs):
        if not isinstance(model, FDBPLCLIPModel):
            raise TypeError(f"FDBPLTrainer trains an FDBPLCLIPModel, got {type(model).__name__}")
        if not isinstance(args, FDBPLTrainingArguments):
            raise TypeError("pass FDBPLTrainingArguments (they carry the FDBPL loss settings)")
        if not isinstance(train_dataset, RILDataset):
            raise TypeError("train_dataset must be an RILDataset (RILDataset(...) or RILDataset.online(...))")
        if teacher is not None and not isinstance(teacher, Teacher):
            raise TypeError(f"teacher must be a fdbpl_hf Teacher (CLIPTeacher, CallableTeacher, EnsembleTeacher), got "
                            f"{type(teacher).__name__}")
        if args.loss_type == "fdbpl" and train_dataset.is_online and teacher is None:
            raise ValueError("an online RILDataset has no soft labels: pass teacher= (the online baseline)")
        if teacher is not None and teacher.num_classes != train_dataset.num_classes:
            raise ValueError(f"teacher scores {teacher.num_classes} classes, the data has {train_dataset.num_classes}")
        if teacher is not None and teacher.input_size != train_dataset.spec.output_size:
            raise ValueError(f"the teacher takes {teacher.input_size}px inputs but the regions are rendered at "
                             f"{train_dataset.spec.output_size}px")
        if teacher is not None and teacher.class_names is not None:
            check_class_order(f"the teacher ({teacher.name})", teacher.class_names, "the training data",
                              train_dataset.class_names, fix="build the teacher with the training classes")
        if args.loss_type == "coop":
            labels = train_dataset.label_array()
            if labels is None:
                raise ValueError("loss_type='coop' trains on labels, but the dataset has no label column")
            if (labels < 0).any():
                row = int(np.flatnonzero(labels < 0)[0])
                raise ValueError(f"loss_type='coop' trains on labels, but row {row} of the training dataset has none "
                                 f"(column {train_dataset.label_column!r}: None or -1; {int((labels < 0).sum())} "
                                 "such rows): drop the unlabelled rows (dataset.filter) or distil them with "
                                 "loss_type='fdbpl'")
        if args.dataloader_persistent_workers and args.dataloader_num_workers > 0:
            raise ValueError("dataloader_persistent_workers would freeze the replayed region at epoch 0: "
                             "persistent workers never see the new epoch")
        if getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing:
            raise ValueError("activation (gradient) checkpointing is not supported: the frozen backbone runs in "
                             "eval mode, where transformers does not checkpoint; only the text tower's activations "
                             "over the class prompts are kept for the backward pass")
        if args.n_gpu > 1:
            raise ValueError("several GPUs in one process (DataParallel) are not supported: launch one process per "
                             "GPU with `accelerate launch` or torchrun (DDP)")
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and args.world_size == 1:
            # each process would train alone on the whole data and write the same output_dir
            raise RuntimeError(f"the launcher started {launched} processes (WORLD_SIZE={launched}) but this one trains "
                               "alone (the Trainer's world size is 1), so every process would run its own training "
                               f"into {args.output_dir}. On a machine without GPUs pass --use_cpu (use_cpu=True) so "
                               "the processes join one gloo process group, or launch a single process.")
        model_size = model.clip.config.vision_config.image_size
        if model_size != train_dataset.spec.output_size:
            raise ValueError(f"the student's image size {model_size} differs from the table's region size "
                             f"{train_dataset.spec.output_size}: the table was built for another input size")
        if train_dataset.feature_cache is not None:
            if teacher is not None:
                raise ValueError("the online teacher scores pixels: a dataset with a student-feature cache has none")
            cached = int(train_dataset.cache_metadata["epochs"])
            needed = min(args.replay_epochs(len(train_dataset)), train_dataset.num_regions)
            if needed > cached:
                raise ValueError(f"the student-feature cache covers {cached} epochs of replay, training asks for "
                                 f"{needed}: rebuild it with build_feature_cache(..., epochs={needed})")
            check_feature_cache(train_dataset, model)
        if not any(p.requires_grad for p in model.prompts.parameters()):
            raise ValueError("the model's prompts are frozen (FDBPLCLIPModel.from_pretrained loads for inference): "
                             "load it with is_trainable=True to train it further")
        processor = kwargs.get("processing_class")
        if processor is not None and (hasattr(processor, "convert_tokens_to_ids") or
                                      getattr(processor, "tokenizer", None) is not None):
            # the Trainer saves it into output_dir before each push, over the adapter's tokenizer
            # (the base one plus the context tokens): the pushed adapter would lose its tokens
            raise ValueError("processing_class holds a tokenizer, which the Trainer would save over the adapter's own "
                             "(the base tokenizer plus the context tokens): leave processing_class out (the adapter "
                             "saves its tokenizer itself), or pass only the image processor")
        # the adapter is saved into output_dir at the end: a folder holding a model's files is refused
        # now, not after the training (fdbpl_hf.saving)
        refuse_conflicts(args.output_dir, ADAPTER_FILES, adapter_file_owner,
                         "the trained adapter (FDBPLTrainer saves it into output_dir)")
        eval_data = kwargs.get("eval_dataset")
        if eval_data is not None:
            self._check_eval_dataset(eval_data, train_dataset, teacher, args.loss_type)
        stores = [d for d in (train_dataset, eval_data) if isinstance(d, RILDataset) and d.image_store is not None]
        if stores:
            if args.dataloader_num_workers > 0:
                raise ValueError("a dataset with an image store renders on the device in the training step: it needs "
                                 "no DataLoader workers (set dataloader_num_workers=0)")
            kwargs.setdefault("data_collator", collate_device_replay)
        model.set_class_names(train_dataset.class_names)
        callbacks = list(kwargs.pop("callbacks", None) or []) + [_EpochToDataset(train_dataset)]
        super().__init__(model=model, args=args, train_dataset=train_dataset, callbacks=callbacks, **kwargs)
        self.teacher = teacher.to(self.args.device) if teacher is not None else None
        for data in stores:  # the evaluation set's store too: its regions are rendered in the step, beside the model
            if data.image_store.device != self.args.device:
                data.use_image_store(data.image_store.to(self.args.device))
        # --torch_compile: accelerate compiles the student; the loss and the online teacher get the same options,
        # and the teacher runs under the student's autocast (fdbpl_hf.acceleration)
        self._compile_options = compile_options(self.args)
        self._fdbpl_loss = compiled(fdbpl_loss, self._compile_options if self.args.compile_loss else None)
        # the fused step compiles the teacher with the rest of its forward (one graph)
        fused = self.args.train_step != "standard"
        self._autocast = autocast_factory(self.accelerator, self.args.device.type)
        self._run_teacher = (TeacherRunner(self.teacher, self._autocast, None if fused else self._compile_options)
                             if self.teacher is not None else None)
        if self.args.train_step == "cuda_graph" and self.args.device.type != "cuda":
            raise ValueError("train_step='cuda_graph' captures CUDA graphs, and this run is on "
                             f"{self.args.device.type}: use train_step='fused' (the same step, not captured) off CUDA")
        if fused and self.args.world_size > 1:
            raise ValueError(f"train_step={self.args.train_step!r} runs in one process (its update does not all-reduce "
                             "gradients): use train_step='standard' under DDP")
        self._fused: Optional[FusedStep] = None
        self._renormalise = None
        if self.teacher is not None and (tuple(self.teacher.image_mean), tuple(self.teacher.image_std)) != (
                train_dataset.image_mean, train_dataset.image_std):
            self._renormalise = PixelRenormaliser(train_dataset.image_mean, train_dataset.image_std,
                                                  self.teacher.image_mean, self.teacher.image_std, self.args.device)
        # per mode: term sums, batches with a non-finite live teacher, batch count
        self._metrics: dict[str, Optional[torch.Tensor]] = {}
        self._metric_keys: dict[str, set] = {}
        self._reset_metrics()

    @staticmethod
    def _check_eval_dataset(eval_data, train_dataset: RILDataset, teacher: Optional[Teacher] = None,
                            loss_type: str = "fdbpl") -> None:
        """An evaluation set is replayed and scored like the training set: an RILDataset over the
        training classes, in their order (the model scores every batch against them), with soft labels
        where the loss needs them: a table's without a teacher; pixels normalised as the training
        data's with a live one (its renormalisation is made for the training data's statistics)."""
        named = eval_data.items() if isinstance(eval_data, dict) else [(None, eval_data)]
        for name, data in named:
            what = "eval_dataset" if name is None else f"eval_dataset[{name!r}]"
            if not isinstance(data, RILDataset):
                raise TypeError(f"{what} is a {type(data).__name__}, not an RILDataset: FDBPLTrainer evaluates the "
                                "loss on replayed regions with their soft labels, like training. Wrap it: "
                                "RILDataset(dataset, its_table, image_mean=..., image_std=...) (or RILDataset.online "
                                "with a teacher); for accuracy on test images use fdbpl_hf.evaluation")
            check_class_order("the training data", train_dataset.class_names, what, data.class_names,
                              fix="an evaluation set is scored against the training classes: evaluate other classes "
                                  "with fdbpl_hf.evaluation (evaluate_cross_dataset)")
            if loss_type != "fdbpl":
                continue
            if teacher is None and data.is_online:
                raise ValueError(f"{what} is an online RILDataset (no RIL table), so its regions have no soft labels, "
                                 "and this trainer has no teacher to score them: evaluate on an RILDataset over an RIL "
                                 "table of the evaluation images")
            if teacher is not None and data.feature_cache is not None:
                raise ValueError(f"{what} reads a student-feature cache, which holds no pixels for the online "
                                 "teacher: evaluate on the same RILDataset without the cache")
            if teacher is not None and _stats(data) != _stats(train_dataset):
                raise ValueError(f"{what} normalises its regions with image_mean/image_std {_stats(data)}, the "
                                 f"training data with {_stats(train_dataset)}; the online teacher's pixels are "
                                 "renormalised from the training data's statistics, so its soft labels would be "
                                 "computed on wrongly normalised pixels: build the evaluation set with the training "
                                 "data's image_mean and image_std")

    # ---- optimisation -------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.args.optim != "sgd" or getattr(self, "optimizer_cls_and_kwargs", None) is not None:
            return super().create_optimizer(model)  # the Trainer's optimisers see only the contexts
        if self.optimizer is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            # the fused step applies the same SGD update itself, on this optimiser's state
            cls = torch.optim.SGD if self.args.train_step == "standard" else FusedStepSGD
            self.optimizer = cls(params, lr=self.args.learning_rate, momentum=self.args.momentum,
                                 weight_decay=self.args.weight_decay)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        if self.args.warmup_epochs <= 0 or self.args.lr_scheduler_type != "cosine":
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = optimizer or self.optimizer
        per_step = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        steps_per_epoch = max(1, math.ceil(len(self.train_dataset) / per_step))
        warmup = min(int(round(self.args.warmup_epochs * steps_per_epoch)), max(num_training_steps - 1, 0))
        ratio = self.args.warmup_lr / self.args.learning_rate

        def factor(step: int) -> float:
            # CoOp's schedule: a constant low rate, then cosine from the base rate to 0.
            if step < warmup:
                return ratio
            progress = (step - warmup) / max(1, num_training_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        self.lr_scheduler = LambdaLR(optimizer, factor)
        self._created_lr_scheduler = True  # lets a second train() build a fresh schedule
        return self.lr_scheduler

    def _optimized_parameters(self) -> Optional[list]:
        """The optimiser's parameters (the contexts) where accelerate can take a plain list."""
        if self.accelerator.distributed_type not in _PLAIN_DDP or self.optimizer is None:
            return None  # sharded set-ups need the model itself
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # Only the contexts have gradients: hand accelerate those instead of every backbone parameter,
    # which it would walk and type-check at every step. Same norm, same clipping.
    def _clip_grad_norm(self, model):
        if self._fused is not None:  # clipped inside the fused step
            return self._fused.grad_norm
        params = self._optimized_parameters()
        if params is None:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if self._fused is not None:  # a device tensor the step wrote, valid until the next step
            return self._fused.grad_norm
        params = self._optimized_parameters()
        if grad_norm is None and params is not None:  # no clipping: the norm is still logged
            grad_norm = self.accelerator.clip_grad_norm_(params, float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    # ---- the fused step ---------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step, or with `train_step` "fused"/"cuda_graph" the whole step as one function
        (`fdbpl_hf.step`): forward, loss, backward and the SGD update; the Trainer's optimizer.step()
        call that follows finds the update done."""
        if self.args.train_step == "standard":
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if self._fused is None:
            self._fused = self._fused_step()
        return self._fused(inputs)

    def _fused_step(self) -> FusedStep:
        args = self.args
        loss_kwargs = dict(lambda_neg=args.lambda_neg, lambda_sim=args.lambda_sim, lambda_pcd=args.lambda_pcd,
                           pcd_margin=args.pcd_margin, use_pcd=args.use_pcd, weight_mode=args.weight_mode,
                           entropy_threshold=args.entropy_threshold, pcd_reduction=args.pcd_reduction)
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        step = FusedStep(
            self.accelerator.unwrap_model(self.model), optimizer, loss_kwargs=loss_kwargs,
            teacher_logits=self.teacher_logits, teacher_entropy=self.teacher_entropy,
            autocast=self._autocast,
            render=lambda inputs: render_batch(self.train_dataset, inputs), loss_type=args.loss_type,
            max_grad_norm=args.max_grad_norm, capture=args.train_step == "cuda_graph",
            compile_options=self._compile_options, live_teacher=self.teacher is not None,
            class_names=self.train_dataset.class_names)
        self._metric_keys["train"] = set(step.terms)
        return step

    # ---- the loss -----------------------------------------------------------------------------
    def teacher_logits(self, inputs: dict, pixel_values: Optional[torch.Tensor]) -> torch.Tensor:
        """Dense `[B, C]` teacher logits of the batch: rebuilt from the table's top-K columns, mixed
        from composed tables by the dataset (`teacher_log_probs`), or (online baseline) computed by
        the teacher on the replayed pixels, renormalised for it."""
        dataset: RILDataset = self.train_dataset
        if self.teacher is None:
            if TEACHER_LOG_PROBS in inputs:  # composed tables: mixed per region on the CPU (fdbpl_hf.ril.compose)
                return inputs[TEACHER_LOG_PROBS]
            return dense_teacher_logits(inputs["topk_indices"], inputs["topk_logits"], dataset.num_classes,
                                        fill=dataset.fill)
        pixels = pixel_values.float()
        if self._renormalise is not None:
            pixels = self._renormalise(pixels)
        return self._run_teacher(pixels)

    def teacher_entropy(self, inputs: dict) -> Optional[torch.Tensor]:
        """The entropy behind the region weights: the table's stored full-distribution entropy, or
        `None` (the loss computes it from the dense teacher logits): for a live teacher, whose
        logits are full, for tables of 0.3 without the column, and for `weight_entropy="topk"`
        (the top-K rebuild's entropy, 0.3's weights, kept for ablations)."""
        if self.teacher is not None or self.args.weight_entropy == "topk":
            return None
        return inputs.get(ENTROPY_COLUMN)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # image_features: the student-feature cache (no image tower); else the replayed pixels
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None and "region_crop" in inputs:  # device-resident replay: render here, batched
            pixel_values = render_batch(self._store_dataset(model), inputs)
        # the training classes, whatever set_class_names() was called with since (the soft labels' columns)
        outputs = model(pixel_values=pixel_values, image_features=inputs.get("image_features"),
                        class_names=self.train_dataset.class_names)
        args = self.args
        if args.loss_type == "coop":
            losses = {"total": coop_loss(outputs.pos_logits, inputs["labels"])}
        else:
            teacher = self.teacher_logits(inputs, pixel_values)
            losses = self._fdbpl_loss(
                outputs.pos_logits, outputs.neg_logits, teacher, outputs.image_features,
                outputs.pos_text_features, outputs.neg_text_features, lambda_neg=args.lambda_neg,
                lambda_sim=args.lambda_sim, lambda_pcd=args.lambda_pcd, pcd_margin=args.pcd_margin,
                use_pcd=args.use_pcd, weight_mode=args.weight_mode, entropy_threshold=args.entropy_threshold,
                teacher_entropy=self.teacher_entropy(inputs), pcd_reduction=args.pcd_reduction,
            )
            if self.teacher is not None:
                # Table values are checked by the dataset, on the CPU. A live teacher's are counted on
                # the device and checked at the next log (which syncs anyway), not here: a check per
                # step would stall the host while the GPU runs the teacher.
                losses["nonfinite_teacher"] = (~torch.isfinite(teacher).all()).float()
        mode = "train" if model.training else "eval"
        terms = [key for key in LOGGED_TERMS if key in losses]
        if terms:
            # Sums and a batch count, kept on the device and gathered in log(): the loss logging adds
            # no host sync to the step (the Trainer's own logging_nan_inf_filter still has one).
            zero = losses["total"].detach().new_zeros((), dtype=torch.float32)
            row = torch.stack([losses[key].detach().float() if key in losses else zero for key in LOGGED_TERMS]
                              + [losses.get("nonfinite_teacher", zero), zero + 1.0])  # no index tensor to copy
            # from host memory (a hidden sync)
            sums = self._metrics[mode]
            self._metrics[mode] = row if sums is None else sums + row
            self._metric_keys[mode].update(terms)
        return (losses["total"], outputs) if return_outputs else losses["total"]

    def _store_dataset(self, model) -> RILDataset:
        """The dataset whose image store a device-replay batch indexes."""
        if model.training:
            return self.train_dataset
        if isinstance(self.eval_dataset, RILDataset) and self.eval_dataset.image_store is not None:
            return self.eval_dataset
        raise ValueError("an evaluation batch carries device-replay regions, but eval_dataset is not an RILDataset "
                         "with an image store (several evaluation datasets with stores are not supported)")

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Add the mean of every loss term since the last log (over all ranks) to `logs`.

        Under DDP this is a collective: like the Trainer's own logging, call it on every rank.
        """
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        sums = self._metrics[mode]
        if mode == "train" and self._fused is not None:
            sums = self._fused.take_sums()
        if sums is None:
            sums = torch.zeros(len(LOGGED_TERMS) + 2, device=self.args.device)
        if self.args.world_size > 1:
            # One fixed-shape gather per call on every rank, even with nothing recorded, so ranks
            # with different numbers of batches (uneven evaluation) still match up.
            sums = self.accelerator.gather(sums.unsqueeze(0)).sum(0)
        totals = sums.tolist()
        if totals[-2] > 0:  # every rank sees the gathered count, so every rank stops here
            self._metrics[mode] = None
            raise ValueError(f"the online teacher returned NaN or inf logits in {int(totals[-2])} batch(es) since the "
                             f"last log (step {self.state.global_step}): the teacher is broken, and this run's "
                             "prompts are not to be trusted")
        if totals[-1] > 0:
            keys = self._metric_keys[mode]
            logs.update({f"{prefix}loss_{key}": totals[i] / totals[-1]
                         for i, key in enumerate(LOGGED_TERMS) if key in keys})
        self._metrics[mode] = None
        super().log(logs, start_time)

    def _reset_metrics(self, mode: Optional[str] = None) -> None:
        for m in ("train", "eval") if mode is None else (mode,):
            self._metrics[m], self._metric_keys[m] = None, set()
        if mode in (None, "train") and getattr(self, "_fused", None) is not None:
            self._fused.take_sums()
            self._metric_keys["train"] = set(self._fused.terms)

    @contextlib.contextmanager
    def frozen_precision(self):
        """Under `--bf16`/`--fp16` with `cast_frozen_backbone` (the default): the student's frozen towers and
        a CLIP teacher's image tower in that precision, cast once for the block and restored after it
        (`fdbpl_hf.precision.frozen_weights_in`). `train`, `evaluate` and `predict` run inside it."""
        args = self.args
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        if dtype is None or not args.cast_frozen_backbone:
            yield
            return
        student = self.accelerator.unwrap_model(self.model)
        with contextlib.ExitStack() as stack:
            stack.enter_context(frozen_weights_in(student.frozen_towers(), dtype))
            if self.teacher is not None and self.teacher.frozen_modules():
                stack.enter_context(frozen_weights_in(self.teacher.frozen_modules(), dtype))
            yield

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` resumes from the newest *complete*
        checkpoint (one killed while being written is skipped with a warning)."""
        self._reset_metrics("train")  # nothing left over from an earlier run or evaluation
        self._fused = None  # built at the first step, over this run's optimiser
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint in {self.args.output_dir} to resume from (a checkpoint is "
                                 f"complete once {CHECKPOINT_COMPLETE} is written into it, last)")
        with self.frozen_precision():
            return super().train(resume_from_checkpoint, *args, **kwargs)

    def evaluate(self, eval_dataset=None, *args, **kwargs):
        """`Trainer.evaluate`; an `eval_dataset` given here is checked as the constructor checks one,
        and the frozen towers run at the training precision (`frozen_precision`)."""
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            self._check_eval_dataset(eval_dataset, self.train_dataset, self.teacher, self.args.loss_type)
        with self.frozen_precision():
            return super().evaluate(eval_dataset, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        # The Trainer removes older checkpoints (save_total_limit) at the end of its save: the new one
        # must be marked complete first, or a kill in between leaves no complete checkpoint to resume
        # from. So its rotation is held back and run here, after the marker.
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            run_dir = self._get_output_dir(trial=trial)
            folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            if os.path.isdir(folder):
                write_json(os.path.join(folder, CHECKPOINT_COMPLETE), {"global_step": self.state.global_step})
            self._rotate_checkpoints_after_marker(run_dir)

    def _rotate_checkpoints_after_marker(self, run_dir: str) -> None:
        """The Trainer's own rotation of `run_dir`'s checkpoints, as its `_save_checkpoint` runs it
        (a method up to transformers 5.x's early releases, a function of `trainer_utils` later)."""
        if hasattr(Trainer, "_rotate_checkpoints"):
            self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
            return
        from transformers.trainer_utils import rotate_checkpoints

        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def evaluation_loop(self, *args, **kwargs):
        self._reset_metrics("eval")
        return super().evaluation_loop(*args, **kwargs)

    def predict(self, test_dataset, *args, **kwargs):
        self._check_eval_dataset(test_dataset, self.train_dataset, self.teacher, self.args.loss_type)
        try:
            with self.frozen_precision():
                return super().predict(test_dataset, *args, **kwargs)
        finally:
            self._reset_metrics("eval")  # predict() never logs: drop its terms

    # ---- persistence: the adapter only --------------------------------------------------------
    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        if not self.args.should_save:  # the Trainer calls this on every rank: only the writer writes
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self._adapter_prompts()  # the training record goes into the adapter's config
        self.accelerator.unwrap_model(self.model).save_pretrained(
            output_dir, model_card_kwargs={"repo_id": self._hub_repo_id()})

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The Trainer copies peft's two adapter files from the checkpoint before a mid-training
        # push; the rest of the adapter (our config, the tokenizer with the context tokens, the
        # card) must go with them, or the pushed repo mixes two saves.
        # The Trainer skips this push while the previous one still uploads output_dir (unless
        # hub_always_push): then output_dir must not change either, or that upload mixes two saves.
        pushing = not self.args.hub_always_push and self.push_in_progress is not None and \
            not self.push_in_progress.is_done()
        if self.is_world_process_zero() and self.args.hub_strategy != "end" and not pushing:
            def write(staging: str) -> None:
                for name in ADAPTER_COMPANION_FILES:
                    src = os.path.join(checkpoint_folder, name)
                    if os.path.isfile(src):
                        shutil.copyfile(src, os.path.join(staging, name))

            # by the saving rules: only fdbpl_hf's files in output_dir are replaced, a user's card is kept
            save_files(self.args.output_dir, write, adapter_file_owner, what=f"the adapter of {checkpoint_folder}")
        super()._push_from_checkpoint(checkpoint_folder)

    def _restore_prompts(self, checkpoint_dir: str, model=None) -> None:
        loaded = FDBPLPromptLearner.from_pretrained(checkpoint_dir)
        target = self.accelerator.unwrap_model(model if model is not None else self.model).prompts
        if loaded.ctx_pos.shape != target.ctx_pos.shape:
            raise ValueError(f"checkpoint {checkpoint_dir} holds contexts of shape {tuple(loaded.ctx_pos.shape)}, "
                             f"the model has {tuple(target.ctx_pos.shape)}")
        with torch.no_grad():
            target.ctx_pos.copy_(loaded.ctx_pos)
            target.ctx_neg.copy_(loaded.ctx_neg)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self._restore_prompts(resume_from_checkpoint, model)

    def _load_best_model(self):
        if self.state.best_model_checkpoint:
            self._restore_prompts(self.state.best_model_checkpoint)

    def _adapter_prompts(self) -> FDBPLPromptLearner:
        """The prompts with the training record (summary, classes) written into their config."""
        prompts = self.accelerator.unwrap_model(self.model).prompts
        prompts.config.training = self._training_summary()
        prompts.config.class_names = list(self.train_dataset.class_names)
        return prompts

    def _training_summary(self) -> dict:
        data: RILDataset = self.train_dataset
        meta = data.metadata
        tables = data.table_records()
        summary = {
            "method": "CoOp (labels)" if self.args.loss_type == "coop" else
            ("FDBPL, online teacher" if self.teacher is not None else
             f"FDBPL, {len(tables)} composed RIL tables" if data.is_composed else "FDBPL, offline RIL table"),
            "teacher": (self.teacher.name if self.teacher is not None else
                        " + ".join(str(t["teacher"]) for t in tables) if tables else None),
            "table": None if data.is_online else
            f"M={meta['num_regions']}, K={', '.join(str(t['top_k']) for t in tables)}, seed {meta['seed']}",
            # every table learned from: where it came from, teacher, K, M, seed, build key
            "tables": tables or None,
            "teacher weighting": None if not data.is_composed else
            f"{data.teacher_weighting}, weights {[round(w, 4) for w in data.teacher_weights.tolist()]}",
            "student-feature cache": None if data.feature_cache is None else
            f"{data.cache_metadata['epochs']} epochs, {data.cache_metadata['dtype']}",
            "source dataset": meta.get("source", {}).get("id"),
            "images": len(data),
            "classes": data.num_classes,
            "epochs": self.args.num_train_epochs,
            "steps": self.state.global_step,
            "batch size per device": self.args.per_device_train_batch_size,
            "learning rate": self.args.learning_rate,
            "optimizer": self._optimizer_description(),
            "gradient clipping": self.args.max_grad_norm if self.args.max_grad_norm > 0 else "none",
            "lambdas (neg, sim, pcd)": f"{self.args.lambda_neg}, {self.args.lambda_sim}, {self.args.lambda_pcd}",
            "PCD": f"{self.args.pcd_reduction} over region pairs" if self.args.use_pcd else "off",
            "region weights": self._weight_source(),
        }
        history = [h for h in self.state.log_history if "loss" in h]
        if history:
            summary["final train loss"] = round(history[-1]["loss"], 4)
        return {k: v for k, v in summary.items() if v is not None}

    def _weight_source(self) -> str:
        data: RILDataset = self.train_dataset
        if self.args.loss_type == "coop":
            return "none (CoOp trains on labels)"
        if self.teacher is None and (self.args.weight_entropy == "topk" or data.is_online
                                     or not data.has_full_entropy):
            return "entropy of the top-K rebuild" + (" mixture" if data.is_composed else "")
        if data.is_composed:
            return ("entropy of the tables' mixture: their stored full-distribution entropies, weighted, plus the "
                    "mixture's divergence term from the top-K rebuilds")
        return "entropy of the teacher's full distribution"

    def _optimizer_description(self) -> str:
        args = self.args
        if args.optim == "sgd" and getattr(self, "optimizer_cls_and_kwargs", None) is None:
            return f"SGD, momentum {args.momentum}, weight decay {args.weight_decay}"
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        return type(optimizer).__name__ if optimizer is not None else str(args.optim)

    def _hub_repo_id(self) -> Optional[str]:
        # the Trainer resolves the repo (namespace included) when pushing; before that, the argument
        return getattr(self, "hub_model_id", None) or self.args.hub_model_id

    def create_model_card(self, *args, **kwargs) -> None:
        """Write the adapter's card (base model, table, hyper-parameters, final losses) to output_dir."""
        if not self.is_world_process_zero():
            return
        prompts = self._adapter_prompts()
        card = adapter_card(prompts.config, repo_id=self._hub_repo_id())
        write_card(self.args.output_dir, str(card), ADAPTER_CARD_HEADINGS, "the trained adapter")
