"""Train FDBPL prompts from an RIL table (or, as the baseline, from a live teacher).

    python examples/train.py --student openai/clip-vit-base-patch32 --table tables/eurosat_s1 \
        --dataset eurosat --num_shots 16 --split_seed 1 --output_dir runs/eurosat_s1
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml --num_processes 4 examples/train.py ...
    # several teachers' tables of the same regions, mixed per region:
    #   --table a --table b --teacher_weighting confidence
    # the online-teacher baseline: --teacher openai/clip-vit-large-patch14 instead of --table
    # the CoOp baseline: --loss_type coop (labels, no teacher)
    # no images at train time: --feature_cache caches/eurosat_s1 (built on first use, next to --table)
    python examples/train.py args.json   # the same arguments as a JSON file (HfArgumentParser)

Any FDBPLTrainingArguments / TrainingArguments field is a flag (--num_train_epochs, --bf16,
--push_to_hub --hub_model_id user/name, ...). Besides the adapter, output_dir gets the Trainer's
`train_results.json` / `all_results.json` (save_metrics), `trainer_state.json` (save_state, with the
log history for `examples/evaluate.py --train_log`) and `few_shot_split.json`.
"""

import os
import sys
from dataclasses import dataclass, field
from typing import Annotated, Optional, Sequence

from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, HfArgumentParser

from fdbpl_hf import FDBPLConfig, RILDataset, get_fdbpl_model, load_ril_table
from fdbpl_hf.data import training_set
from fdbpl_hf.pipeline import train_prompts
from fdbpl_hf.ril import CLIPTeacher, RegionSpec
from fdbpl_hf.trainer import FDBPLTrainer, FDBPLTrainingArguments
from fdbpl_hf.validation import check_fields, integer, one_of


@dataclass
class ScriptArguments:
    student: str = field(metadata={"help": "Student CLIP checkpoint (Hub id or folder)."})
    table: Optional[list[str]] = field(default=None, metadata={
        "action": "extend", "help": "RIL table folder or Hub dataset id; repeat it (--table a --table b) to train from "
                                    "several teachers' tables of the same regions, mixed per region."})
    table_config: Optional[list[str]] = field(default=None, metadata={
        "action": "extend", "help": "Hub config of the table (repeated: one per --table; '-' for a folder or a repo "
                                    "with one config)."})
    teacher_weighting: str = field(default="fixed", metadata={
        "help": "How several tables mix per region: fixed (--teacher_weights), max_prob, entropy, or confidence "
                "(= max_prob), as EnsembleTeacher mixes its members."})
    teacher_weights: Optional[list[float]] = field(default=None, metadata={
        "action": "extend", "help": "Fixed weight of each table (default equal), one per --table."})
    teacher: Optional[str] = field(default=None, metadata={"help": "Online baseline: teacher checkpoint."})
    dataset: str = field(default="digits", metadata={"help": "Registry name, Hub id, local folder (class folders or "
                                                             "save_to_disk) or DatasetInfo .json/.yaml file."})
    split: Optional[str] = field(default=None, metadata={"help": "Training split (default: the registry's)."})
    num_shots: Annotated[Optional[int], integer(0, optional=True)] = field(default=16, metadata={
        "help": "Shots per class; 0 = every image."})
    split_seed: Annotated[int, integer(0)] = field(default=1, metadata={"help": "Seed of the few-shot draw."})
    classes: Annotated[str, one_of("base", "all")] = field(default="base", metadata={"help": "base (base-to-novel) "
                                                                                             "or all."})
    num_regions: Annotated[int, integer(1)] = field(default=500, metadata={"help": "Online baseline: regions per "
                                                                                   "image."})
    region_seed: Annotated[int, integer(0)] = field(default=0, metadata={"help": "Online baseline: seed of the "
                                                                                 "regions."})
    n_ctx: Annotated[int, integer(1)] = field(default=4, metadata={"help": "Context tokens per prompt."})
    feature_cache: Optional[str] = field(default=None, metadata={
        "help": "Student-feature cache folder (needs --table): loaded if built, else built first. Training "
                "then reads the student's stored image features instead of decoding and cropping images."})

    def __post_init__(self) -> None:
        check_fields(self)  # the rules in the annotations: errors name the flag, the value and the range


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[ScriptArguments, FDBPLTrainingArguments]:
    """The script's arguments from `argv` (default `sys.argv[1:]`): flags, or one JSON file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ScriptArguments, FDBPLTrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):  # python examples/train.py args.json
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def main(script: ScriptArguments | Sequence[str] | None = None,
         args: Optional[FDBPLTrainingArguments] = None) -> FDBPLTrainer:
    """Train and save (or push) the adapter; returns the trainer. `script` is a `ScriptArguments`
    (then `args` the training arguments) or a command line (default `sys.argv[1:]`)."""
    if not isinstance(script, ScriptArguments):
        script, args = parse_args(script)
    if (script.table is None) == (script.teacher is None) and args.loss_type == "fdbpl":
        raise SystemExit("give exactly one of --table (FDBPL) or --teacher (online baseline)")
    if script.feature_cache and script.table is None:
        raise SystemExit("--feature_cache stores features of an RIL table's regions: give --table too")
    tables = [script.table] if isinstance(script.table, str) else list(script.table or [])
    configs = [script.table_config] if isinstance(script.table_config, str) else list(script.table_config or [])
    if configs and len(configs) != len(tables):
        raise SystemExit(f"--table_config names {len(configs)} config(s) for {len(tables)} --table(s): give one per "
                         "table, in the same order")
    data = training_set(script.dataset, num_shots=script.num_shots or None, seed=script.split_seed,
                        classes=script.classes, split=script.split)
    clip = CLIPModel.from_pretrained(script.student)
    tokenizer = AutoTokenizer.from_pretrained(script.student)
    processor = CLIPImageProcessor.from_pretrained(script.student)
    size = clip.config.vision_config.image_size
    teacher = None
    if tables:
        loaded = [load_ril_table(t, None if c == "-" else c) for t, c in zip(tables, configs or [None] * len(tables))]
        # one table as is; several composed (RILDataset refuses a weighting for a single table)
        train_data = RILDataset(data["dataset"], loaded if len(loaded) > 1 else loaded[0],
                                image_mean=processor.image_mean, image_std=processor.image_std, image_size=size,
                                class_names=data["class_names"], teacher_weighting=script.teacher_weighting,
                                teacher_weights=script.teacher_weights)
    else:
        train_data = RILDataset.online(
            data["dataset"], class_names=data["class_names"], image_mean=processor.image_mean,
            image_std=processor.image_std, region_spec=RegionSpec(output_size=size),
            num_regions=script.num_regions, seed=script.region_seed)
        if script.teacher is not None:
            teacher_clip = CLIPModel.from_pretrained(script.teacher)
            teacher_processor = CLIPImageProcessor.from_pretrained(script.teacher)
            teacher = CLIPTeacher(teacher_clip, AutoTokenizer.from_pretrained(script.teacher), data["class_names"],
                                  data["template"], teacher_processor.image_mean, teacher_processor.image_std,
                                  name=script.teacher)
    model = get_fdbpl_model(clip, FDBPLConfig(n_ctx=script.n_ctx, base_model_name_or_path=script.student,
                                              template=data["template"]), tokenizer)
    trainer, result, _ = train_prompts(model, args, train_data, teacher=teacher, feature_cache_dir=script.feature_cache,
                                       cache_device=str(args.device))
    # written first, so that a push uploads them with the adapter; both write on the main process only
    trainer.save_metrics("train", result.metrics)  # train_results.json, all_results.json
    trainer.save_state()  # trainer_state.json, with the log history (the loss curves' input)
    if trainer.is_world_process_zero() and data["few_shot_split"] is not None:
        os.makedirs(args.output_dir, exist_ok=True)
        data["few_shot_split"].to_json(os.path.join(args.output_dir, "few_shot_split.json"))
    if args.push_to_hub:
        trainer.push_to_hub()  # saves the adapter and uploads output_dir in one commit
    else:
        trainer.save_model()
    if trainer.is_world_process_zero():
        print(f"adapter saved to {args.output_dir}" + (f" and pushed to {trainer.hub_model_id}"
                                                       if args.push_to_hub else ""))
    return trainer


if __name__ == "__main__":
    main()
