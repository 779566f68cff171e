"""Build (and optionally publish) the RIL table of a protocol's training images.

    python examples/build_table.py --teacher openai/clip-vit-large-patch14 --dataset eurosat \
        --num_shots 16 --split_seed 1 --classes base --output_dir tables/eurosat_s1
    accelerate launch examples/build_table.py ...   # each process builds every n-th shard
    python examples/build_table.py args.json        # the same arguments as a JSON file
    # publish: --push_to_hub --hub_dataset_id user/eurosat-ril

The training images are chosen exactly as examples/train.py chooses them (same dataset,
shots, seed and classes), so the table and the training run line up; a mismatch fails loudly.
"""

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, HfArgumentParser

from fdbpl_hf import build_ril_table, push_ril_table, ril_metadata
from fdbpl_hf.data import training_set


@dataclass
class BuildArguments:
    teacher: str = field(metadata={"help": "Teacher CLIP checkpoint (Hub id or folder)."})
    output_dir: str = field(metadata={"help": "Where the finished table goes (resumes if interrupted)."})
    teacher_revision: Optional[str] = field(default=None, metadata={
        "help": "Teacher revision (branch, tag or commit), recorded in the table."})
    dataset: str = field(default="digits", metadata={"help": "Registry name, Hub id, local folder (class folders or "
                                                             "save_to_disk) or DatasetInfo .json/.yaml file."})
    split: Optional[str] = field(default=None, metadata={"help": "Training split (default: the registry's)."})
    num_shots: Optional[int] = field(default=16, metadata={"help": "Shots per class; 0 = every image."})
    split_seed: int = field(default=1, metadata={"help": "Seed of the few-shot draw (protocol seeds 1/2/3)."})
    classes: str = field(default="base", metadata={"help": "base (base-to-novel) or all (cross-dataset)."})
    num_regions: int = field(default=500, metadata={"help": "Regions per image, M."})
    top_k: Optional[int] = field(default=None, metadata={"help": "Teacher classes kept per region, K (20)."})
    seed: int = field(default=0, metadata={"help": "Seed of the region sampling."})
    template: Optional[str] = field(default=None, metadata={"help": "Teacher prompt (default: the dataset's)."})
    teacher_batch_size: int = field(default=256, metadata={"help": "Regions per teacher forward."})
    device: Optional[str] = field(default=None, metadata={"help": "Teacher device (default: cuda if available)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Publish the table to --hub_dataset_id (as "
                                                               "--push_to_hub --hub_model_id in train.py)."})
    hub_dataset_id: Optional[str] = field(default=None, metadata={"help": "Dataset repo the table is published to."})
    config_name: Optional[str] = field(default=None, metadata={"help": "Hub config (default <teacher>_k<K>_m<M>)."})


def main() -> None:
    import torch

    parser = HfArgumentParser(BuildArguments)
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):  # python examples/build_table.py args.json
        (args,) = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        (args,) = parser.parse_args_into_dataclasses()
    if args.push_to_hub and not args.hub_dataset_id:
        raise SystemExit("--push_to_hub needs --hub_dataset_id (the dataset repo to publish to)")
    data = training_set(args.dataset, num_shots=args.num_shots or None, seed=args.split_seed, classes=args.classes,
                        split=args.split)
    # one GPU per process under accelerate launch / torchrun
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    args.output_dir = os.path.expanduser(args.output_dir)  # a quoted "~/x" is the home folder's x, not ./~
    teacher = CLIPModel.from_pretrained(args.teacher, revision=args.teacher_revision).to(device)
    # the teacher's own normalisation, as the online baseline in examples/train.py uses it
    processor = CLIPImageProcessor.from_pretrained(args.teacher, revision=args.teacher_revision)
    table = build_ril_table(
        data["dataset"], teacher, teacher_tokenizer=AutoTokenizer.from_pretrained(args.teacher,
                                                                                  revision=args.teacher_revision),
        class_names=data["class_names"], template=args.template or data["template"], num_regions=args.num_regions,
        top_k=args.top_k, seed=args.seed, output_dir=args.output_dir, teacher_batch_size=args.teacher_batch_size,
        teacher_name=args.teacher, teacher_revision=args.teacher_revision,
        teacher_image_mean=processor.image_mean, teacher_image_std=processor.image_std,
        source_id=data["info"].hub_id or args.dataset,
    )
    stats = ril_metadata(table)["stats"]
    print(f"table: {len(table)} regions, {stats['disk_bytes'] / 1e6:.2f} MB ({stats['bytes_per_region']:.1f} B/region)"
          f" -> {args.output_dir}")
    if args.push_to_hub and int(os.environ.get("RANK", "0")) == 0:  # one publisher under accelerate/torchrun
        name = push_ril_table(table, args.hub_dataset_id, args.config_name)
        print(f"published as {args.hub_dataset_id} config {name}")


if __name__ == "__main__":
    main()
