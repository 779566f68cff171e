"""Nothing silent (issue 12): corrupt, malformed or hostile adapter files are refused with errors
that name the file and the field; cards never show a local path. Written against the public API
only, so that the same file runs on 0.3 (where these tests fail)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_clip
from safetensors.torch import load_file, save_file

from fdbpl_hf import FDBPLCLIPModel, FDBPLConfig, FDBPLPromptLearner, get_fdbpl_model

FIXTURES = Path(__file__).parent / "fixtures"


def _copy_fixture(tmp_path) -> Path:
    """A copy of an adapter saved by 0.3 (config.json + model.safetensors)."""
    return Path(shutil.copytree(FIXTURES / "adapter_v0.3", tmp_path / "adapter"))


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory, tokenizer) -> Path:
    """An adapter saved by this version, on make_clip("tiny")."""
    folder = tmp_path_factory.mktemp("saved") / "adapter"
    get_fdbpl_model(make_clip("tiny"), FDBPLConfig(), tokenizer).save_pretrained(folder)
    return folder


def _files(folder: Path) -> tuple[Path, Path]:
    """(config file, weights file) of a saved adapter, whichever format wrote it."""
    config = folder / "fdbpl_config.json" if (folder / "fdbpl_config.json").exists() else folder / "config.json"
    return config, next(p for p in sorted(folder.glob("*.safetensors")))


def test_non_finite_weights_are_refused(tmp_path, tiny_clip, tokenizer, saved_adapter):
    legacy = _copy_fixture(tmp_path)
    state = load_file(legacy / "model.safetensors")
    state["ctx_neg"][1, 3] = float("nan")
    save_file(state, legacy / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'ctx_neg' holds 1 NaN or infinite"):
        FDBPLCLIPModel.from_pretrained(tiny_clip, legacy, tokenizer=tokenizer, check_base_model=False)
    folder = Path(shutil.copytree(saved_adapter, tmp_path / "new"))
    _, path = _files(folder)
    state = load_file(path)
    key = next(iter(state))
    state[key][0, 0] = float("inf")
    save_file(state, path)
    with pytest.raises(ValueError, match=f"{path}: tensor .* holds 1 NaN or infinite"):
        FDBPLCLIPModel.from_pretrained(make_clip("tiny"), folder, tokenizer=tokenizer)


@pytest.mark.parametrize("edit, field", [
    ('{"n_ctx": 4, "context_dim": ', None),  # truncated JSON
    ({"n_ctx": "4"}, "n_ctx"),
    ({"n_ctx": -2}, "n_ctx"),
    ({"context_dim": -32}, "context_dim"),
    ({"context_dim": 32.0}, "context_dim"),
    ({"class_names": "cat"}, "class_names"),
    ({"class_token_position": "left"}, "class_token_position"),
    ({"base_model_signature": {"hidden_size": "32"}}, "base_model_signature"),
    ({"training": []}, "training"),
])
def test_malformed_configs_name_the_file_and_field(tmp_path, tokenizer, saved_adapter, edit, field):
    for folder in (_copy_fixture(tmp_path), Path(shutil.copytree(saved_adapter, tmp_path / "new"))):
        path, _ = _files(folder)
        if isinstance(edit, str):
            path.write_text(edit)
        else:
            path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
        what = "is not valid JSON" if field is None else f"field '{field}' must be"
        with pytest.raises(ValueError, match=f"{path}.*{what}"):
            FDBPLCLIPModel.from_pretrained(make_clip("tiny"), folder, tokenizer=tokenizer, check_base_model=False)
        with pytest.raises(ValueError, match=f"{path}.*{what}"):
            FDBPLConfig.from_pretrained(folder)


def test_huge_n_ctx_is_refused_before_allocating(tmp_path, tiny_clip, tokenizer, monkeypatch):
    folder = _copy_fixture(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_ctx": 2_000_000, "base_model_signature": None}))

    def no_allocation(*args, **kwargs):
        raise AssertionError("contexts were allocated for a refused config")

    monkeypatch.setattr(FDBPLPromptLearner, "__init__", no_allocation)
    with pytest.raises(ValueError, match=r"config\.json.*field 'n_ctx' must be an integer from 1 to 512"):
        FDBPLCLIPModel.from_pretrained(tiny_clip, folder, tokenizer=tokenizer, check_base_model=False)
    # within the cap but beyond the model's 77 positions: refused by the model, still before allocation
    (folder / "config.json").write_text(json.dumps({**config, "n_ctx": 100, "base_model_signature": None}))
    with pytest.raises(ValueError, match="n_ctx 100 does not fit the base model's 77 text positions"):
        FDBPLCLIPModel.from_pretrained(tiny_clip, folder, tokenizer=tokenizer, check_base_model=False)


def test_cards_never_show_a_local_base_model_path(tmp_path, tiny_clip, tokenizer):
    model = get_fdbpl_model(tiny_clip, FDBPLConfig(), tokenizer)
    cases = [("../ckpt/student", None), ("/data/models/clip", None), ("./clip", None), ("C:\\models\\clip", None),
             ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32"),
             ("/cache/hub/models--openai--clip-vit-base-patch32/snapshots/0123abcd", "openai/clip-vit-base-patch32")]
    for i, (base, shown) in enumerate(cases):
        model.fdbpl_config.base_model_name_or_path = base
        model.save_pretrained(tmp_path / str(i))
        card = (tmp_path / str(i) / "README.md").read_text()
        if shown is None:
            assert "base_model:" not in card and base not in card, base
        else:
            assert f"base_model: {shown}" in card and "snapshots" not in card, base
        peft_config = json.loads((tmp_path / str(i) / "adapter_config.json").read_text())
        assert peft_config["base_model_name_or_path"] == shown, base
