"""Evaluate FDBPL prompts (or zero-shot CLIP) base-to-novel, cross-dataset and as an OOD detector.

    python examples/evaluate.py --student openai/clip-vit-base-patch32 --adapter runs/eurosat_s1 \
        --dataset eurosat --num_shots 16 --split_seed 1 --output_dir evals/eurosat_s1
    # zero-shot CLIP (the baseline): leave out --adapter
    # cross-dataset: --cross_datasets dtd eurosat (each scored among its own classes)
    accelerate launch examples/evaluate.py ...   # only the main process evaluates

`--push_to_hub` records base / novel / HM accuracy in the adapter card's model-index on the Hub
(`--hub_model_id`, default --adapter); a local --adapter's README.md gets them in any case.

Writes `results.json` (results + protocol), `per_class.png`, `base_novel.png` and, with
`--train_log runs/x/trainer_state.json`, `loss_curves.png` into --output_dir. Summarise seeds and
datasets afterwards with `fdbpl_hf.evaluation.summarize_runs`.

Evaluation is one forward pass per test image, so under `accelerate launch` the main process
does it all on its device and the other processes exit at once (no collective is involved).
"""

import os
import warnings
from dataclasses import dataclass, field
from typing import Annotated, Optional, Sequence

from transformers import HfArgumentParser

from fdbpl_hf.data import kept_class_ids, resolve_dataset, subset_classes
from fdbpl_hf.evaluation import (evaluate_base_to_novel, evaluate_cross_dataset, format_summary_markdown,
                                 load_classifier, summarize_runs, write_results)
from fdbpl_hf.validation import Custom, check_fields, check_template, integer


def _template_or_none(where: str, value) -> None:
    if value is not None:
        check_template(where, value)


TEMPLATE = Custom(_template_or_none, "a template with one '{}' or None")

@dataclass
class EvalArguments:
    student: str = field(metadata={"help": "Student CLIP checkpoint (Hub id or folder)."})
    output_dir: str = field(metadata={"help": "Where results.json and the plots go."})
    adapter: Optional[str] = field(default=None, metadata={"help": "FDBPL adapter (folder or Hub id); omit for "
                                                                    "zero-shot CLIP."})
    dataset: str = field(default="digits", metadata={"help": "Registry name, Hub id, local folder (class folders or "
                                                             "save_to_disk) or DatasetInfo .json/.yaml file."})
    split: Optional[str] = field(default=None, metadata={"help": "Test split (default: the registry's)."})
    cross_datasets: list[str] = field(default_factory=list, metadata={"help": "Extra datasets scored among their "
                                                                              "own classes (cross-dataset)."})
    train_log: Optional[str] = field(default=None, metadata={"help": "trainer_state.json of the run (or a JSON list "
                                                                     "of log entries), for the loss plot."})
    num_shots: Annotated[Optional[int], integer(0, optional=True)] = field(default=None, metadata={
        "help": "Shots the adapter was trained with, recorded (default 16 with an adapter, 0 zero-shot)."})
    split_seed: Annotated[int, integer(0)] = field(default=1, metadata={
        "help": "Seed of the training run's few-shot draw (recorded)."})
    method: Optional[str] = field(default=None, metadata={"help": "Method label (default: FDBPL or CLIP zero-shot)."})
    template: Annotated[Optional[str], TEMPLATE] = field(default=None, metadata={
        "help": "Zero-shot prompt (default: the dataset's)."})
    batch_size: Annotated[int, integer(1)] = field(default=64, metadata={"help": "Images per forward pass."})
    max_eval_samples: Annotated[Optional[int], integer(1, optional=True)] = field(default=None, metadata={
        "help": "Score a seeded random subset of this many test rows (quick checks)."})
    no_ood: bool = field(default=False, metadata={"help": "Skip the OOD detection (base vs novel images)."})
    check_base_model_name: bool = field(default=True, metadata={"help": "Refuse an adapter whose recorded base "
                                                                        "model name differs from --student."})
    revision: Optional[str] = field(default=None, metadata={"help": "Revision of the test dataset."})
    push_to_hub: bool = field(default=False, metadata={"help": "Record the results in the adapter's Hub card "
                                                               "(model-index); a local --adapter's README.md is "
                                                               "updated in any case."})
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "Adapter repo whose card gets the results "
                                                                        "(default: --adapter when it is a Hub id)."})
    check_trained_classes: bool = field(default=True, metadata={
        "help": "Refuse an adapter trained on other classes than the base classes it is scored on "
                "(--no_check_trained_classes scores it anyway)."})

    def __post_init__(self) -> None:
        check_fields(self)  # the rules in the annotations: errors name the flag, the value and the range


def _limit(dataset, n: Optional[int]):
    if n is None or n >= len(dataset):
        return dataset
    # Shuffled so a prefix does not hold only the first classes of a sorted split.
    return dataset.shuffle(seed=0).select(range(n))


def _load_test(name: str, split: Optional[str], revision: Optional[str]):
    info = resolve_dataset(name)
    split = split or info.test_split
    data = info.load(split) if info.loader is not None else info.load(split, revision=revision)
    return info, split, data


def _record_on_card(args: EvalArguments, protocol: dict, b2n: dict, adapter_config=None) -> None:
    """Base, novel and HM accuracy into the adapter card's model-index: the local folder's
    README.md, and with --push_to_hub the Hub repo's card. A local adapter without a README.md gets
    fdbpl_hf's card of `adapter_config` (its `FDBPLConfig`), with the results."""
    from huggingface_hub import ModelCard

    from fdbpl_hf.prompts import ADAPTER_CARD_HEADINGS, adapter_card, record_eval_results
    from fdbpl_hf.saving import save_card_file, write_card

    local = os.path.isdir(args.adapter)
    repo_id = args.hub_model_id or (None if local else args.adapter)
    if args.push_to_hub and repo_id is None:
        raise SystemExit("--push_to_hub with a local --adapter needs --hub_model_id (the adapter's repo)")
    if not local and not args.push_to_hub:
        return
    local_card = os.path.join(args.adapter, "README.md")
    if local and not os.path.lexists(local_card) and adapter_config is not None:
        # ModelCard.load would take the missing file's path for a Hub id (HFValidationError)
        write_card(args.adapter, str(adapter_card(adapter_config, repo_id=repo_id)), ADAPTER_CARD_HEADINGS,
                   "the adapter")
    card = ModelCard.load(local_card if local else repo_id)
    common = {"dataset_id": protocol["dataset_id"], "dataset_name": protocol["dataset"], "split": protocol["split"]}
    rows = [{**common, "metric": "base accuracy", "metric_type": "accuracy", "value": b2n["base_acc"]},
            {**common, "metric": "novel accuracy", "metric_type": "accuracy", "value": b2n["novel_acc"]},
            {**common, "metric": "harmonic mean (base, novel)", "metric_type": "hm", "value": b2n["hm"]}]
    name = (repo_id or os.path.basename(os.path.normpath(args.adapter))).split("/")[-1]
    card = record_eval_results(card, rows, model_name=name)
    if local:  # fdbpl_hf's card stays fdbpl_hf's (its next save refreshes it); a user's stays the user's
        save_card_file(os.path.join(args.adapter, "README.md"), str(card), ADAPTER_CARD_HEADINGS)
    if args.push_to_hub:
        card.push_to_hub(repo_id, commit_message=f"Evaluation on {protocol['dataset']} ({protocol['split']})")
        print(f"results recorded on the card of {repo_id}")


def main(args: EvalArguments | Sequence[str] | None = None) -> Optional[dict]:
    """Evaluate and write results.json (and plots); returns `{"results": ..., "protocol": ...}` on
    the main process, None on the others. `args` is an `EvalArguments` or a command line (default
    `sys.argv[1:]`)."""
    from accelerate import PartialState

    if not isinstance(args, EvalArguments):
        (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(args=args)
    state = PartialState()
    if not state.is_main_process:
        return None
    info, split, test = _load_test(args.dataset, args.split, args.revision)
    num_test_rows = len(test)
    test = _limit(test, args.max_eval_samples)
    template = args.template or info.template
    model, processor = load_classifier(args.student, args.adapter, template=template, device=state.device,
                                       check_base_model=args.check_base_model_name)
    zero_shot = args.adapter is None
    method = args.method or ("CLIP zero-shot" if zero_shot else "FDBPL")

    b2n = evaluate_base_to_novel(model, test, info, image_processor=processor, template=template,
                                 batch_size=args.batch_size, ood=not args.no_ood,
                                 check_trained_classes=args.check_trained_classes)
    base_names, novel_names = b2n.pop("base_classnames"), b2n.pop("novel_classnames")
    results = {"base_to_novel": b2n}

    cross_protocol = {}
    if args.cross_datasets:
        targets = {}
        for name in args.cross_datasets:
            cinfo, csplit, cdata = _load_test(name, None, None)
            names = cdata.features[cinfo.label_column].names
            ids = kept_class_ids(names, cinfo.exclude_classes)
            if len(ids) < len(names):
                cdata = subset_classes(cdata, ids, cinfo.label_column)
            cdata = _limit(cdata, args.max_eval_samples)
            targets[cinfo.name] = (cdata, cinfo.clean_class_names([names[i] for i in ids]), cinfo.template)
            cross_protocol[cinfo.name] = {"dataset_id": cinfo.hub_id or name, "split": csplit, "rows": len(cdata)}
        # Columns follow the registry; a custom dataset with other column names needs the library API.
        results["cross_dataset"] = evaluate_cross_dataset(model, targets, image_processor=processor,
                                                          batch_size=args.batch_size)

    adapter_config = None if zero_shot else model.fdbpl_config
    protocol = {
        "method": method,
        "dataset": info.name,
        "dataset_id": info.hub_id or args.dataset,
        "dataset_config": info.config,
        "split": split,
        "revision": args.revision,
        "num_test_rows": num_test_rows,
        "max_eval_samples": args.max_eval_samples,
        "num_shots": args.num_shots if args.num_shots is not None else (0 if zero_shot else 16),
        "seed": args.split_seed,
        "classes": "base-to-novel (CoOp: base = first ceil(C/2) sorted class ids)",
        "base_classnames": base_names,
        "novel_classnames": novel_names,
        "student": args.student,
        "adapter": args.adapter,
        "template": template if zero_shot else None,
        "adapter_base_model": adapter_config.base_model_name_or_path if adapter_config else None,
        "adapter_trained_classnames": adapter_config.class_names if adapter_config else None,
        "adapter_training": adapter_config.training if adapter_config else None,
        "cross_datasets": cross_protocol or None,
        "ood": None if args.no_ood else "ID = base test images, OOD = novel test images, scored over base classes",
    }
    args.output_dir = os.path.expanduser(args.output_dir)  # a quoted "~/x" is the home folder's x, not ./~
    os.makedirs(args.output_dir, exist_ok=True)
    path = write_results(os.path.join(args.output_dir, "results.json"), results, protocol)

    try:
        from fdbpl_hf.plots import plot_base_novel, plot_loss_curves, plot_per_class_accuracy

        plot_per_class_accuracy(b2n["per_class_accuracy"], os.path.join(args.output_dir, "per_class.png"),
                                title=f"{method} on {info.name}: per-class accuracy")
        plot_base_novel({info.name: b2n}, os.path.join(args.output_dir, "base_novel.png"), title=method)
        if args.train_log:
            plot_loss_curves(args.train_log, os.path.join(args.output_dir, "loss_curves.png"))
    except ImportError as err:  # plots are optional; the numbers are already written
        warnings.warn(f"no plots: {err}")

    if not zero_shot:
        _record_on_card(args, protocol, b2n, model.fdbpl_config)

    print(format_summary_markdown(summarize_runs([{"protocol": protocol, "results": results}])))
    if "ood" in b2n:
        for score, m in b2n["ood"]["scores"].items():
            print(f"OOD {score:>15}: AUROC {m['auroc']:.2f}  FPR95 {m['fpr95']:.2f}")
    print(f"results written to {path}")
    return {"results": results, "protocol": protocol}


if __name__ == "__main__":
    main()
