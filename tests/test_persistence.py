"""Adapter persistence: KB-sized files, exact restore, Hub round trip, refusals."""

import json
import os

import huggingface_hub
import pytest
import torch
from conftest import make_clip
from safetensors.torch import load_file

from fdbpl_hf import FDBPLCLIPModel, FDBPLConfig, get_fdbpl_model


def trained_like(model):
    with torch.no_grad():
        model.prompts.ctx_pos.add_(torch.randn_like(model.prompts.ctx_pos))
        model.prompts.ctx_neg.mul_(-2.0)
    return model


def test_save_writes_a_peft_adapter(tokenizer, tmp_path):
    # after 0.3.0 the format became peft's TrainableTokens (was config.json + model.safetensors)
    clip = make_clip("vit-b-32")
    model = trained_like(get_fdbpl_model(clip, FDBPLConfig(base_model_name_or_path="openai/clip-vit-base-patch32"),
                                         tokenizer))
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "fdbpl_config.json",
                     "tokenizer.json", "tokenizer_config.json"]
    weights = load_file(tmp_path / "adapter_model.safetensors")
    rows = weights["base_model.model.text_model.embeddings.token_embedding.trainable_tokens_delta"]
    assert len(weights) == 1 and rows.shape == (8, 512)
    assert torch.equal(rows, torch.cat([model.prompts.ctx_pos, model.prompts.ctx_neg]))
    adapter = [f for f in files if not f.startswith("tokenizer")]
    total = sum(os.path.getsize(tmp_path / f) for f in adapter)
    assert total < 32_000, total  # two 4 x 512 contexts, not a CLIP (the tokenizer is the base one + 8 tokens)
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "TRAINABLE_TOKENS" and peft_config["target_modules"] == ["token_embedding"]
    assert peft_config["token_indices"] == list(range(49408, 49416))
    assert peft_config["base_model_name_or_path"] == "openai/clip-vit-base-patch32"
    config = json.loads((tmp_path / "fdbpl_config.json").read_text())
    assert config["base_model_name_or_path"] == "openai/clip-vit-base-patch32"
    assert config["context_dim"] == 512 and config["n_ctx"] == 4
    card = (tmp_path / "README.md").read_text()
    assert "base_model: openai/clip-vit-base-patch32" in card and "library_name: peft" in card
    assert "pipeline_tag: zero-shot-image-classification" in card and "base_model:adapter:openai/" in card
    assert "arxiv.org/abs/2505.18053" in card and "FDBPLCLIPModel.from_pretrained" in card
    assert "PeftModel.from_pretrained" in card and "<fdbpl_pos_0><fdbpl_pos_1><fdbpl_pos_2><fdbpl_pos_3> {}." in card
    import peft
    import transformers

    assert f"- peft {peft.__version__}" in card and f"- transformers {transformers.__version__}" in card


def test_from_pretrained_restores_exactly(tiny_clip, tokenizer, tmp_path):
    model = trained_like(get_fdbpl_model(tiny_clip, FDBPLConfig(), tokenizer))
    model.save_pretrained(tmp_path)
    fresh = make_clip("tiny")  # same seed: the same base weights, loaded afresh
    loaded = FDBPLCLIPModel.from_pretrained(fresh, tmp_path, tokenizer=tokenizer)
    assert torch.equal(loaded.prompts.ctx_pos, model.prompts.ctx_pos)
    assert torch.equal(loaded.prompts.ctx_neg, model.prompts.ctx_neg)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(pixels, class_names=["cat", "dog"]), loaded(pixels, class_names=["cat", "dog"])
    torch.testing.assert_close(a.pos_logits, b.pos_logits, atol=0, rtol=0)
    torch.testing.assert_close(a.neg_logits, b.neg_logits, atol=0, rtol=0)


def test_push_and_pull_through_the_hub(fake_hub, tiny_clip, tokenizer, tmp_path):
    model = trained_like(get_fdbpl_model(tiny_clip, FDBPLConfig(base_model_name_or_path="tiny-clip"), tokenizer))
    model.push_to_hub("tester/fdbpl-adapter")
    assert sorted(fake_hub.list_files("tester/fdbpl-adapter")) == [
        ".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors", "fdbpl_config.json",
        "tokenizer.json", "tokenizer_config.json"]
    card = fake_hub.read_file("tester/fdbpl-adapter", "README.md").decode()
    assert "hf_fake_token" not in card and "base_model: tiny-clip" in card
    assert 'from_pretrained(clip, "tester/fdbpl-adapter"' in card  # the loading snippet names this repo
    with pytest.raises(FileNotFoundError, match="no folder .*runs/missing, and no fdbpl_config.json could be read"):
        FDBPLCLIPModel.from_pretrained(tiny_clip, "runs/missing", tokenizer=tokenizer)
    model.push_to_hub("short-name")  # no owner: the Hub adds the user's, and so does the card
    owner = huggingface_hub.HfApi().whoami()["name"]
    assert f'from_pretrained(clip, "{owner}/short-name"' in fake_hub.read_file(f"{owner}/short-name",
                                                                             "README.md").decode()
    remote = FDBPLConfig.from_pretrained("tester/fdbpl-adapter")  # the config alone, as with peft
    assert remote == model.fdbpl_config and remote.base_model_name_or_path == "tiny-clip"
    tiny_clip.config._name_or_path = "tiny-clip"
    loaded = FDBPLCLIPModel.from_pretrained(tiny_clip, "tester/fdbpl-adapter", tokenizer=tokenizer)
    assert torch.equal(loaded.prompts.ctx_pos, model.prompts.ctx_pos)
    assert torch.equal(loaded.prompts.ctx_neg, model.prompts.ctx_neg)


def test_loaded_for_inference_unless_trainable(tiny_clip, tokenizer, tmp_path, capsys):
    model = trained_like(get_fdbpl_model(tiny_clip, FDBPLConfig(), tokenizer))
    model.save_pretrained(tmp_path / "a", model_card_kwargs={"repo_id": "me/a"})
    assert 'from_pretrained(clip, "me/a"' in (tmp_path / "a" / "README.md").read_text()
    model.save_pretrained(tmp_path / "b", is_main_process=False)
    assert not (tmp_path / "b").exists()
    assert FDBPLConfig.from_pretrained(tmp_path / "a") == model.fdbpl_config
    served = FDBPLCLIPModel.from_pretrained(make_clip("tiny"), tmp_path / "a", tokenizer=tokenizer)
    assert not served.training and served.get_nb_trainable_parameters()[0] == 0
    tuned = FDBPLCLIPModel.from_pretrained(make_clip("tiny"), tmp_path / "a", tokenizer=tokenizer, is_trainable=True)
    trainable, total = tuned.get_nb_trainable_parameters()
    assert trainable == 2 * 4 * 32 and total == trainable + sum(p.numel() for p in tuned.get_base_model().parameters())
    tuned.print_trainable_parameters()
    assert f"trainable params: {trainable:,} || all params: {total:,}" in capsys.readouterr().out


def test_refuses_mismatched_base_models(tiny_clip, tokenizer, tmp_path):
    get_fdbpl_model(tiny_clip, FDBPLConfig(), tokenizer).save_pretrained(tmp_path / "tiny")
    with pytest.raises(ValueError, match="context width 32 does not match the base model's text width 64"):
        FDBPLCLIPModel.from_pretrained(make_clip("small"), tmp_path / "tiny", tokenizer=tokenizer)
    deeper = make_clip("tiny")
    deeper_cfg = deeper.config
    deeper_cfg.text_config.num_hidden_layers = 3
    from transformers import CLIPModel

    with pytest.raises(ValueError, match="num_hidden_layers: adapter 2 vs model 3"):
        FDBPLCLIPModel.from_pretrained(CLIPModel(deeper_cfg), tmp_path / "tiny", tokenizer=tokenizer)
    named = get_fdbpl_model(tiny_clip, FDBPLConfig(base_model_name_or_path="org/clip-a"), tokenizer)
    named.save_pretrained(tmp_path / "named")
    other = make_clip("tiny")
    other.config._name_or_path = "org/clip-b"
    with pytest.raises(ValueError, match="trained on 'org/clip-a'"):
        FDBPLCLIPModel.from_pretrained(other, tmp_path / "named", tokenizer=tokenizer)
    FDBPLCLIPModel.from_pretrained(other, tmp_path / "named", tokenizer=tokenizer, check_base_model=False)
    other.config._name_or_path = "/local/copy/of/clip-a"  # same model, other place: accepted
    FDBPLCLIPModel.from_pretrained(other, tmp_path / "named", tokenizer=tokenizer)
    other.config._name_or_path = "/cache/hub/models--org--clip-a/snapshots/0123abcd"  # a Hub-cache snapshot
    FDBPLCLIPModel.from_pretrained(other, tmp_path / "named", tokenizer=tokenizer)


def test_never_unpickles(tiny_clip, tokenizer, tmp_path):
    model = get_fdbpl_model(tiny_clip, FDBPLConfig(), tokenizer)
    model.save_pretrained(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    torch.save(model.prompts.state_dict(), tmp_path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        FDBPLCLIPModel.from_pretrained(tiny_clip, tmp_path, tokenizer=tokenizer)


def test_config_is_forward_compatible():
    cfg = FDBPLConfig.from_dict({"n_ctx": 8, "positive_init": None, "a_future_option": 1})
    assert cfg.n_ctx == 8 and not hasattr(cfg, "a_future_option")


def test_revision_recorded_from_the_loaded_commit(tokenizer):
    clip = make_clip("tiny")
    clip.config._commit_hash = "0123abcd"  # what transformers sets on a Hub download
    assert get_fdbpl_model(clip, FDBPLConfig(), tokenizer).fdbpl_config.revision == "0123abcd"
    assert get_fdbpl_model(clip, FDBPLConfig(revision="v1"), tokenizer).fdbpl_config.revision == "v1"
    assert get_fdbpl_model(make_clip("tiny"), FDBPLConfig(), tokenizer).fdbpl_config.revision is None


def test_save_pretrained_takes_peft_safe_serialization(tiny_clip, tokenizer, tmp_path):
    """`save_pretrained(dir, safe_serialization=True)` as written for peft models used to be a TypeError."""
    model = get_fdbpl_model(tiny_clip, FDBPLConfig(), tokenizer)
    model.save_pretrained(tmp_path / "safe", safe_serialization=True)
    assert (tmp_path / "safe" / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="only written as safetensors"):
        model.save_pretrained(tmp_path / "pickle", safe_serialization=False)
    assert not (tmp_path / "pickle").exists()
