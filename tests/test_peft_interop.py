"""The adapter is peft's, the merged model is plain transformers: both run without fdbpl_hf."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_clip
from safetensors.torch import load_file, save_file
from stock_process import run_without_fdbpl_hf

from fdbpl_hf import FDBPLCLIPModel, FDBPLConfig, FDBPLPromptLearner, get_fdbpl_model
from fdbpl_hf.offline import clip_config, image_processor_for
from fdbpl_hf.prompts import PEFT_WEIGHTS_KEY, adapter_tokenizer, hypothesis_template

FIXTURES = Path(__file__).parent / "fixtures"
CLASSES = ["cat", "dog", "a red bird", "X ray"]  # "X" is the training placeholder word: no clash


def trained_like(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.prompts.ctx_pos.add_(torch.randn(model.prompts.ctx_pos.shape, generator=g))
        model.prompts.ctx_neg.mul_(-2.0)
    return model


def legacy_eos(clip):
    """OpenAI's checkpoints keep eos_token_id = 2: transformers then pools at the largest token id."""
    clip.config.text_config.eos_token_id = 2
    clip.text_model.config.eos_token_id = 2
    clip.text_model.eos_token_id = 2
    return clip


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_template_tokenises_like_the_model(tiny_clip, tokenizer, position):
    model = get_fdbpl_model(tiny_clip, FDBPLConfig(class_token_position=position), tokenizer)
    tok, first = adapter_tokenizer(tokenizer, 4)
    ours = model._tokenize(CLASSES)
    template = hypothesis_template(model.fdbpl_config)
    for i, name in enumerate(CLASSES):
        ids = ours.input_ids[i][ours.attention_mask[i].bool()].clone()
        ids[ours.ctx_mask[i][: len(ids)]] = torch.arange(first, first + 4)  # context slots -> context tokens
        assert tok(template.format(name))["input_ids"] == ids.tolist(), (position, name)
    assert len(tokenizer) == 49408  # the caller's tokenizer is not changed


def test_stock_peft_loads_the_adapter(tmp_path, tokenizer):
    clip = legacy_eos(make_clip("tiny"))
    clip.save_pretrained(tmp_path / "base")
    model = trained_like(get_fdbpl_model(clip, FDBPLConfig(), tokenizer))
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = {"pos": model.get_text_features(CLASSES), "neg": model.get_text_features(CLASSES, negative=True)}
    run_without_fdbpl_hf(f'''
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPModel

adapter = {str(tmp_path / "adapter")!r}
tokenizer = AutoTokenizer.from_pretrained(adapter)
clip = CLIPModel.from_pretrained({str(tmp_path / "base")!r})
assert clip.text_model.eos_token_id == 2
clip.text_model.resize_token_embeddings(len(tokenizer))
clip.text_model.eos_token_id = clip.config.text_config.eos_token_id = tokenizer.eos_token_id
model = PeftModel.from_pretrained(clip, adapter).eval()
pos = "".join(f"<fdbpl_pos_{{k}}>" for k in range(4)) + " {{}}."
neg = "".join(f"<fdbpl_neg_{{k}}>" for k in range(4)) + " {{}}."
def features(m, template):
    text = tokenizer([template.format(c) for c in {CLASSES!r}], padding=True, return_tensors="pt")
    with torch.no_grad():
        return m.get_text_features(**text).pooler_output.contiguous()
out = {{"pos": features(model, pos), "neg": features(model, neg)}}
plain = model.merge_and_unload()
assert type(plain) is CLIPModel
out["merged_pos"] = features(plain, pos)
save_file(out, {str(tmp_path / "stock.safetensors")!r})
''')
    stock = load_file(tmp_path / "stock.safetensors")
    for key, want in (("pos", expected["pos"]), ("neg", expected["neg"]), ("merged_pos", expected["pos"])):
        torch.testing.assert_close(stock[key], want, atol=1e-5, rtol=0, msg=key)
    assert not torch.allclose(expected["pos"], expected["neg"], atol=1e-3)  # the two contexts differ


def test_adapters_saved_by_0_3_still_load(tmp_path, tokenizer):
    # tests/fixtures/adapter_v0.3 was written by 0.3's code (tests/fixtures/make_adapter_v0_3.py at 186ff20)
    old = FIXTURES / "adapter_v0.3"
    assert sorted(os.listdir(old)) == ["README.md", "config.json", "model.safetensors"]
    expected = load_file(FIXTURES / "adapter_v0.3_expected.safetensors")
    clip = make_clip("tiny")
    clip.config._name_or_path = "tiny-clip"
    model = FDBPLCLIPModel.from_pretrained(clip, old, tokenizer=tokenizer)
    assert FDBPLConfig.from_pretrained(old) == model.fdbpl_config
    names = ["cat", "dog", "a red bird"]
    with torch.no_grad():
        torch.testing.assert_close(model.get_text_features(names), expected["pos_text_features"], atol=0, rtol=0)
        torch.testing.assert_close(model.get_text_features(names, negative=True), expected["neg_text_features"],
                                   atol=0, rtol=0)
    # saved again, it is a peft adapter holding the same contexts; no stale 0.3 files remain
    shutil.copytree(old, tmp_path / "resaved")
    model.save_pretrained(tmp_path / "resaved")
    assert not (tmp_path / "resaved" / "config.json").exists()
    again = FDBPLCLIPModel.from_pretrained(make_clip("tiny"), tmp_path / "resaved", check_base_model=False)
    assert torch.equal(again.prompts.ctx_pos, model.prompts.ctx_pos)
    assert torch.equal(again.prompts.ctx_neg, model.prompts.ctx_neg)


def _pipeline_check(tmp_path, clip, tokenizer, images, classes):
    """save_merged, then the stock pipeline in a process without fdbpl_hf; returns both results."""
    model = trained_like(get_fdbpl_model(clip, FDBPLConfig(), tokenizer), seed=1)
    processor = image_processor_for(clip.config)
    template = model.save_merged(tmp_path / "merged", image_processor=processor)
    assert template == "<fdbpl_pos_0><fdbpl_pos_1><fdbpl_pos_2><fdbpl_pos_3> {}."
    card = (tmp_path / "merged" / "README.md").read_text()
    assert template in card and "pipeline_tag: zero-shot-image-classification" in card
    for i, image in enumerate(images):
        image.save(tmp_path / f"image{i}.png")
    with torch.no_grad():
        pixels = processor(images, return_tensors="pt")["pixel_values"]
        probs = model(pixels, class_names=classes).pos_logits.softmax(-1)
    run_without_fdbpl_hf(f'''
import json
from PIL import Image
from transformers import pipeline

classifier = pipeline("zero-shot-image-classification", model={str(tmp_path / "merged")!r})
images = [Image.open({str(tmp_path)!r} + f"/image{{i}}.png") for i in range({len(images)})]
out = classifier(images, candidate_labels={classes!r}, hypothesis_template={template!r})
json.dump(out, open({str(tmp_path / "pipeline.json")!r}, "w"))
''')
    results = json.loads((tmp_path / "pipeline.json").read_text())
    assert len(results) == len(images)
    for row, p in zip(results, probs):
        assert row[0]["label"] == classes[int(p.argmax())]  # the same prediction
        scores = {r["label"]: r["score"] for r in row}
        torch.testing.assert_close(torch.tensor([scores[c] for c in classes]), p, atol=1e-4, rtol=0)
    return model


def test_save_merged_runs_in_the_stock_pipeline(tmp_path, tokenizer, digits_small):
    clip = make_clip("tiny")
    images = [digits_small[i]["image"].convert("RGB") for i in range(0, 30, 3)]
    model = _pipeline_check(tmp_path, clip, tokenizer, images, [str(d) for d in range(10)])
    assert clip.text_model.embeddings.token_embedding.num_embeddings == 49408  # the model itself is untouched
    with torch.no_grad():
        model.get_text_features(["cat"])  # and still works


def test_save_merged_real_size_text_tower_with_legacy_eos(tmp_path, tokenizer, digits_small):
    # the real ViT-B/32 text tower (random weights), the real tokenizer, OpenAI's legacy eos_token_id = 2;
    # a tiny vision tower keeps it cheap
    config = clip_config("vit-b-32")
    config.vision_config = clip_config("tiny").vision_config
    from transformers import CLIPModel

    torch.manual_seed(0)
    clip = legacy_eos(CLIPModel(config).eval())
    images = [digits_small[i]["image"].convert("RGB") for i in range(0, 30, 6)]
    _pipeline_check(tmp_path, clip, tokenizer, images, ["cat", "dog", "a red bird", "an airplane", "X ray"])
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged["text_config"]["eos_token_id"] == 49407 and merged["text_config"]["vocab_size"] == 49416


# ---- nothing silent (issue 12): corrupt or hostile adapter files --------------------------------------
def _copy_fixture(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURES / "adapter_v0.3", tmp_path / "adapter"))


def test_non_finite_weights_are_refused(tmp_path, tiny_clip, tokenizer):
    legacy = _copy_fixture(tmp_path)
    state = load_file(legacy / "model.safetensors")
    state["ctx_neg"][1, 3] = float("nan")
    save_file(state, legacy / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'ctx_neg' holds 1 NaN or infinite"):
        FDBPLCLIPModel.from_pretrained(tiny_clip, legacy, tokenizer=tokenizer, check_base_model=False)
    model = get_fdbpl_model(tiny_clip, FDBPLConfig(), tokenizer)
    model.save_pretrained(tmp_path / "new")
    path = tmp_path / "new" / "adapter_model.safetensors"
    state = load_file(path)
    state[PEFT_WEIGHTS_KEY][0, 0] = float("inf")
    save_file(state, path)
    with pytest.raises(ValueError, match=f"{path}: tensor .* holds 1 NaN or infinite"):
        FDBPLCLIPModel.from_pretrained(make_clip("tiny"), tmp_path / "new")


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
def test_malformed_configs_name_the_file_and_field(tmp_path, tiny_clip, tokenizer, edit, field):
    for name, folder in (("config.json", _copy_fixture(tmp_path)), ("fdbpl_config.json", tmp_path / "new")):
        if name == "fdbpl_config.json":
            get_fdbpl_model(tiny_clip, FDBPLConfig(), tokenizer).save_pretrained(folder)
        path = folder / name
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


@pytest.mark.parametrize("base, shown", [
    ("../ckpt/student", None), ("/data/models/clip", None), ("./clip", None), ("C:\\\\models\\\\clip", None),
    ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32"),
    ("/cache/hub/models--openai--clip-vit-base-patch32/snapshots/0123abcd", "openai/clip-vit-base-patch32"),
])
def test_cards_never_show_a_local_base_model_path(tmp_path, tiny_clip, tokenizer, base, shown):
    model = get_fdbpl_model(tiny_clip, FDBPLConfig(base_model_name_or_path=base), tokenizer)
    model.save_pretrained(tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    peft_config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == shown
    if shown is None:
        assert "base_model:" not in card and "ckpt" not in card and "/data/" not in card and "models\\\\" not in card
    else:
        assert f"base_model: {shown}" in card
    model.save_merged(tmp_path / "m")
    merged_card = (tmp_path / "m" / "README.md").read_text()
    assert ("base_model:" in merged_card) == (shown is not None) and "ckpt" not in merged_card
