"""Build (and optionally publish) the RIL table of a protocol's training images.

    python examples/build_table.py --teacher openai/clip-vit-large-patch14 --dataset eurosat \
        --num_shots 16 --split_seed 1 --classes base --output_dir tables/eurosat_s1
    accelerate launch examples/build_table.py ...   # each process builds every n-th shard
    python examples/build_table.py args.json        # the same arguments as a JSON file
    # publish: --push_to_hub --hub_dataset_id user/eurosat-ril

The training images are chosen exactly as examples/train.py chooses them (same dataset,
shots, seed and classes), so the table and the training run line up; a mismatch fails loudly.
"""

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Annotated, Optional, Sequence

from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, HfArgumentParser

from fdbpl_hf import RILTableConfig, build_ril_table, push_ril_table, ril_metadata
from fdbpl_hf.data import training_set
from fdbpl_hf.validation import check_fields, integer, one_of


@dataclass
class BuildArguments:
    """What to build from and where to; the build settings are `RILTableConfig`'s flags."""

    teacher: str = field(metadata={"help": "Teacher CLIP checkpoint (Hub id or folder)."})
    output_dir: str = field(metadata={"help": "Where the finished table goes (resumes if interrupted)."})
    dataset: str = field(default="digits", metadata={"help": "Registry name, Hub id, local folder (class folders or "
                                                             "save_to_disk) or DatasetInfo .json/.yaml file."})
    split: Optional[str] = field(default=None, metadata={"help": "Training split (default: the registry's)."})
    num_shots: Annotated[Optional[int], integer(0, optional=True)] = field(default=16, metadata={
        "help": "Shots per class; 0 = every image."})
    split_seed: Annotated[int, integer(0)] = field(default=1, metadata={
        "help": "Seed of the few-shot draw (protocol seeds 1/2/3)."})
    classes: Annotated[str, one_of("base", "all")] = field(default="base", metadata={
        "help": "base (base-to-novel) or all (cross-dataset)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Publish the table to --hub_dataset_id (as "
                                                               "--push_to_hub --hub_model_id in train.py)."})
    hub_dataset_id: Optional[str] = field(default=None, metadata={"help": "Dataset repo the table is published to."})
    config_name: Optional[str] = field(default=None, metadata={"help": "Hub config (default <teacher>_k<K>_m<M>)."})

    def __post_init__(self) -> None:
        check_fields(self)  # the rules in the annotations: errors name the flag, the value and the range


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[BuildArguments, RILTableConfig]:
    """The script's arguments from `argv` (default `sys.argv[1:]`): flags, or one JSON file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((BuildArguments, RILTableConfig))
    if len(argv) == 1 and argv[0].endswith(".json"):  # python examples/build_table.py args.json
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def teacher_device(config: RILTableConfig) -> Optional[str]:
    """Where the teacher runs: `--device`; else, with `--num_proc`, None (map worker r moves it to GPU r,
    and the parent must not start CUDA before the workers fork); else this process's GPU, or the CPU."""
    import torch

    if config.device:
        return config.device
    if config.num_proc:
        return None
    # one GPU per process under accelerate launch / torchrun
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"


def main(args: BuildArguments | Sequence[str] | None = None, config: Optional[RILTableConfig] = None):
    """Build (and optionally publish) the table; returns it. `args` is a `BuildArguments` (then
    `config` the settings, default `RILTableConfig()`) or a command line (default `sys.argv[1:]`)."""
    if not isinstance(args, BuildArguments):
        args, config = parse_args(args)
    config = config or RILTableConfig()
    if args.push_to_hub and not args.hub_dataset_id:
        raise SystemExit("--push_to_hub needs --hub_dataset_id (the dataset repo to publish to)")
    data = training_set(args.dataset, num_shots=args.num_shots or None, seed=args.split_seed, classes=args.classes,
                        split=args.split)
    device = teacher_device(config)
    output_dir = os.path.expanduser(args.output_dir)  # a quoted "~/x" is the home folder's x, not ./~
    revision = config.teacher_revision
    teacher = CLIPModel.from_pretrained(args.teacher, revision=revision)
    if device is not None:
        teacher = teacher.to(device)
    # the teacher's own normalisation, as the online baseline in examples/train.py uses it
    processor = CLIPImageProcessor.from_pretrained(args.teacher, revision=revision)
    config = dataclasses.replace(
        config, device=device, template=config.template or data["template"],
        teacher_name=config.teacher_name or args.teacher,
        teacher_image_mean=config.teacher_image_mean or list(processor.image_mean),
        teacher_image_std=config.teacher_image_std or list(processor.image_std),
        source_id=config.source_id or data["info"].hub_id or args.dataset,
    )
    table = build_ril_table(data["dataset"], teacher, config, class_names=data["class_names"], output_dir=output_dir,
                            teacher_tokenizer=AutoTokenizer.from_pretrained(args.teacher, revision=revision))
    stats = ril_metadata(table)["stats"]
    print(f"table: {len(table)} regions, {stats['disk_bytes'] / 1e6:.2f} MB ({stats['bytes_per_region']:.1f} B/region)"
          f" -> {output_dir}")
    if args.push_to_hub and int(os.environ.get("RANK", "0")) == 0:  # one publisher under accelerate/torchrun
        name = push_ril_table(table, args.hub_dataset_id, args.config_name)
        print(f"published as {args.hub_dataset_id} config {name}")
    return table


if __name__ == "__main__":
    main()
