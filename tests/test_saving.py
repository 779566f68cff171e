"""Saving writes only fdbpl_hf's own files (issue 21): a model, a tokenizer or a card the user put in
the folder is never deleted or overwritten; a save that would is refused with the folder untouched."""

import hashlib
import os
import shutil

import pytest
import torch
from conftest import make_clip

from fdbpl_hf import FDBPLCLIPModel, FDBPLConfig, RegionSpec, RILDataset, get_fdbpl_model
from fdbpl_hf.files import atomic_write, file_mode, read_json, write_json
from fdbpl_hf.saving import STAGING_PREFIX
from fdbpl_hf.testing.worlds import DIGIT_NAMES, image_processor_for
from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN as MEAN
from fdbpl_hf.ril.teachers import OPENAI_CLIP_STD as STD

USER_CARD = "---\nlicense: mit\n---\n\n# My notes\n\nWritten by hand.\n"


def snapshot(folder) -> dict:
    """Every file of a folder (recursively) with the sha256 of its bytes and its mode."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mode)
    return out


@pytest.fixture(scope="module")
def context_tokenizer(tokenizer):
    """The base tokenizer plus the context tokens, made once: each save would otherwise copy it (1 s)."""
    from fdbpl_hf.prompts import adapter_tokenizer

    return adapter_tokenizer(tokenizer, 4)[0]


def trained(tokenizer, seed=0):
    model = get_fdbpl_model(make_clip("tiny"), FDBPLConfig(base_model_name_or_path="tiny-clip"), tokenizer)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.prompts.ctx_pos.add_(torch.randn(model.prompts.ctx_pos.shape, generator=g))
    return model


def model_folder(path, tokenizer, with_tokenizer=True):
    """A folder holding a CLIP checkpoint as transformers saves one (a student's own folder)."""
    make_clip("tiny", seed=5).save_pretrained(path)
    if with_tokenizer:
        tokenizer.save_pretrained(path)
    return path


def test_an_adapter_saved_into_a_model_folder_leaves_the_model(context_tokenizer, tokenizer, tmp_path):
    # 0.6 deleted config.json and model.safetensors here (its cleanup of "stale 0.3 files")
    folder = model_folder(tmp_path / "student", tokenizer, with_tokenizer=False)
    before = snapshot(folder)
    trained(context_tokenizer).save_pretrained(folder)
    after = snapshot(folder)
    assert {k: before[k] for k in before} == {k: after[k] for k in before}  # every byte of the model kept
    assert {"adapter_config.json", "adapter_model.safetensors", "fdbpl_config.json"} <= set(after)
    loaded = FDBPLCLIPModel.from_pretrained(make_clip("tiny"), folder, check_base_model=False)
    torch.testing.assert_close(loaded.prompts.ctx_pos, trained(context_tokenizer).prompts.ctx_pos, atol=0, rtol=0)


def test_a_save_that_would_overwrite_a_models_tokenizer_is_refused_untouched(context_tokenizer, tokenizer, tmp_path):
    folder = model_folder(tmp_path / "student", tokenizer)
    before = snapshot(folder)
    model = trained(context_tokenizer)
    with pytest.raises(ValueError, match=r"tokenizer\.json \(the tokenizer of a model, without FDBPL's context tokens\)"
                                         r".*Nothing was changed"):
        model.save_pretrained(folder)
    assert snapshot(folder) == before and not any(n.startswith(STAGING_PREFIX) for n in os.listdir(folder))
    processor = image_processor_for(make_clip("tiny").config)
    processor.save_pretrained(folder)
    before = snapshot(folder)
    with pytest.raises(ValueError, match=r"config\.json \(a model fdbpl_hf did not save\)"):
        model.save_merged(folder, processor)
    assert snapshot(folder) == before


def test_a_save_killed_while_staging_is_cleaned_up_by_the_next(context_tokenizer, tmp_path):
    import socket
    import subprocess
    import sys

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    folder = tmp_path / "adapter"
    left = folder / f"{STAGING_PREFIX}{socket.gethostname()}-{dead}-x1"  # a save killed with kill -9
    other = folder / f"{STAGING_PREFIX}otherhost-{dead}-x2"  # another host's: cannot be checked, stays
    for path in (left, other):
        path.mkdir(parents=True)
        (path / "adapter_model.safetensors").write_bytes(b"half")
    trained(context_tokenizer).save_pretrained(folder)
    assert not left.exists() and other.exists()  # a leftover would be uploaded by the next push of the folder


def test_a_card_the_user_wrote_is_kept_and_ours_is_refreshed(context_tokenizer, tmp_path):
    folder = tmp_path / "adapter"
    model = trained(context_tokenizer, seed=0)
    model.save_pretrained(folder)
    ours = (folder / "README.md").read_text()
    model.fdbpl_config.training = {"steps": 7}  # a later checkpoint: our card is refreshed
    model.save_pretrained(folder)
    refreshed = (folder / "README.md").read_text()
    assert refreshed != ours and "| steps | 7 |" in refreshed
    (folder / "README.md").write_text(refreshed.replace("| steps | 7 |", "| steps | 7 (my note) |"))
    edited = snapshot(folder)["README.md"]
    with pytest.warns(UserWarning, match="a card written by fdbpl_hf and edited since"):
        model.save_pretrained(folder)
    assert snapshot(folder)["README.md"] == edited
    (folder / "README.md").write_text(USER_CARD)
    with pytest.warns(UserWarning, match="kept .*README.md: it is a card fdbpl_hf did not write"):
        model.save_pretrained(folder)
    assert (folder / "README.md").read_text() == USER_CARD
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "README.md").write_text(USER_CARD)
    with pytest.warns(UserWarning, match="kept"):
        model.save_merged(merged)
    assert (merged / "README.md").read_text() == USER_CARD and (merged / "model.safetensors").is_file()


def test_save_merged_replaces_its_own_earlier_save_only(context_tokenizer, tmp_path):
    folder = tmp_path / "merged"
    model = trained(context_tokenizer, seed=0)
    model.save_merged(folder)
    first = snapshot(folder)
    with torch.no_grad():
        model.prompts.ctx_pos.add_(1.0)
    model.save_merged(folder)  # its own earlier save: replaced
    second = snapshot(folder)
    assert set(first) == set(second) and first["model.safetensors"] != second["model.safetensors"]
    # a sharded earlier save of ours: the shards it no longer writes go, with their index
    for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json"):
        shutil.copy(folder / "model.safetensors", folder / name)
    model.save_merged(folder)
    assert set(os.listdir(folder)) == set(first)


def test_a_0_3_adapter_is_replaced_but_a_model_beside_an_adapter_is_not(context_tokenizer, tokenizer, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "mixed"
    model_folder(folder, tokenizer, with_tokenizer=False)
    # a 0.3 FDBPL config but the model's weights: not a 0.3 adapter, nothing is removed
    config = read_json(folder / "config.json", "")
    trained(context_tokenizer).save_pretrained(folder)
    assert read_json(folder / "config.json", "") == config and (folder / "model.safetensors").is_file()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    write_json(legacy / "config.json", {**trained(context_tokenizer).fdbpl_config.to_dict(), "fdbpl_version": "0.3.0"})
    save_file({"ctx_pos": torch.zeros(4, 32), "ctx_neg": torch.zeros(4, 32)}, str(legacy / "model.safetensors"))
    trained(context_tokenizer).save_pretrained(legacy)
    assert not (legacy / "config.json").exists() and not (legacy / "model.safetensors").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_follow_the_umask(context_tokenizer, tmp_path, umask):
    # 0.6 wrote adapter_model.safetensors and merged model.safetensors with mode 0600 (safetensors' own)
    old = os.umask(umask)
    try:
        trained(context_tokenizer).save_pretrained(tmp_path / "adapter")
        trained(context_tokenizer).save_merged(tmp_path / "merged")
        atomic_write(tmp_path / "x.json", "{}")
        assert file_mode() == 0o666 & ~umask
    finally:
        os.umask(old)
    modes = {name: mode & 0o777 for name, (_, mode) in snapshot(tmp_path).items()}
    assert modes and set(modes.values()) == {0o666 & ~umask}, modes


def test_training_into_a_models_folder_is_refused_before_it_starts(tiny_checkpoints, tokenizer, digits_small,
                                                                   tmp_path):
    from transformers import CLIPModel

    from fdbpl_hf.trainer import FDBPLTrainer, FDBPLTrainingArguments

    folder = tmp_path / "student"
    shutil.copytree(tiny_checkpoints["student"], folder)
    before = snapshot(folder)
    data = RILDataset.online(digits_small, class_names=DIGIT_NAMES, image_mean=MEAN, image_std=STD,
                             region_spec=RegionSpec(output_size=32), num_regions=2)
    model = get_fdbpl_model(CLIPModel.from_pretrained(folder), FDBPLConfig(), tokenizer)

    def args(out, **kw):
        return FDBPLTrainingArguments(output_dir=str(out), loss_type="coop", max_steps=1, report_to="none",
                                      use_cpu=True, disable_tqdm=True, save_strategy="no", warmup_epochs=0, **kw)

    with pytest.raises(ValueError, match=r"tokenizer\.json \(the tokenizer of a model"):
        FDBPLTrainer(model=model, args=args(folder), train_dataset=data)
    assert snapshot(folder) == before
    with pytest.raises(ValueError, match="processing_class holds a tokenizer"):
        FDBPLTrainer(model=model, args=args(tmp_path / "run"), train_dataset=data, processing_class=tokenizer)
    run = tmp_path / "run"
    run.mkdir()
    (run / "README.md").write_text(USER_CARD)
    trainer = FDBPLTrainer(model=model, args=args(run), train_dataset=data)
    trainer.train()
    with pytest.warns(UserWarning, match="kept"):
        trainer.save_model()
        trainer.create_model_card()
    assert (run / "README.md").read_text() == USER_CARD and (run / "adapter_model.safetensors").is_file()


def test_a_push_skipped_while_the_last_one_uploads_leaves_output_dir_alone(fake_hub, tokenizer, digits_small,
                                                                          tmp_path):
    """The Trainer skips a mid-training push while the previous upload of output_dir still runs; our
    copy of the adapter's other files into output_dir ran anyway, under that upload (and left
    output_dir with one save's config beside another save's weights)."""
    from fdbpl_hf.trainer import FDBPLTrainer, FDBPLTrainingArguments

    data = RILDataset.online(digits_small, class_names=DIGIT_NAMES, image_mean=MEAN, image_std=STD,
                             region_spec=RegionSpec(output_size=32), num_regions=2)
    run = tmp_path / "run"
    args = FDBPLTrainingArguments(output_dir=str(run), loss_type="coop", max_steps=1, report_to="none", use_cpu=True,
                                  disable_tqdm=True, warmup_epochs=0, push_to_hub=True, hub_model_id="tester/busy")
    trainer = FDBPLTrainer(model=trained(tokenizer), args=args, train_dataset=data)
    trainer.save_model(str(run / "checkpoint-1"), _internal_call=True)
    before = snapshot(run)

    class Uploading:  # the previous push's upload_folder, still running
        def is_done(self):
            return False

    trainer.push_in_progress = Uploading()
    trainer._push_from_checkpoint(str(run / "checkpoint-1"))
    assert snapshot(run) == before


def test_evaluate_records_results_on_a_local_adapter_without_a_card(context_tokenizer, tmp_path):
    """examples/evaluate.py read the local adapter's README.md with ModelCard.load, which takes a missing
    file's path for a Hub id: the run ended in an HFValidationError after its evaluation."""
    import importlib.util
    import sys

    from fdbpl_hf.prompts import ADAPTER_CARD_HEADINGS
    from fdbpl_hf.saving import card_owner

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "evaluate.py")
    spec = importlib.util.spec_from_file_location("fdbpl_example_evaluate_cards", path)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses look their module up there
    spec.loader.exec_module(script)
    model = trained(context_tokenizer)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    os.remove(folder / "README.md")
    args = script.EvalArguments(student="tiny-clip", output_dir=str(tmp_path / "eval"), adapter=str(folder))
    protocol = {"dataset_id": "digits", "dataset": "digits", "split": "test"}
    script._record_on_card(args, protocol, {"base_acc": 91.0, "novel_acc": 80.0, "hm": 85.1}, model.fdbpl_config)
    card = (folder / "README.md").read_text()
    assert "# FDBPL adapter" in card and "value: 91.0" in card
    assert card_owner(str(folder / "README.md"), ADAPTER_CARD_HEADINGS) is None  # ours: the next save refreshes it


def test_the_demo_clears_only_what_its_runs_wrote(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "demo", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = tmp_path / "coop" / "seed1"
    for folder in ("table", "run", "feature_cache.incomplete"):
        (out / folder).mkdir(parents=True)
    (out / "results.json").write_text("{}")
    (out / "notes.txt").write_text("mine")  # 0.6 deleted the whole run folder
    demo.clear_earlier_run(str(out))
    assert os.listdir(out) == ["notes.txt"]
