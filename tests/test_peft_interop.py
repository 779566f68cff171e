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
from fdbpl_hf.testing.worlds import clip_config, image_processor_for
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


@pytest.mark.numerics
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
    # The expected features were computed by 0.3's code in another process, possibly on another CPU:
    # the same float32 arithmetic, but not necessarily the same kernels (AVX2 / AVX-512 / default
    # reductions round differently). A 2-layer, 64-wide text tower accumulates a few float32 ulps
    # per layer (measured 8e-7 between kernel sets), so 1e-5 bounds the rounding while a wrong
    # context, position or pooling moves the features by 1e-2 or more.
    with torch.no_grad():
        torch.testing.assert_close(model.get_text_features(names), expected["pos_text_features"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.get_text_features(names, negative=True), expected["neg_text_features"],
                                   atol=1e-5, rtol=1e-5)
    # saved again, it is a peft adapter holding the same contexts; no stale 0.3 files remain
    shutil.copytree(old, tmp_path / "resaved")
    model.save_pretrained(tmp_path / "resaved")
    assert not (tmp_path / "resaved" / "config.json").exists()
    again = FDBPLCLIPModel.from_pretrained(make_clip("tiny"), tmp_path / "resaved", check_base_model=False)
    assert torch.equal(again.prompts.ctx_pos, model.prompts.ctx_pos)
    assert torch.equal(again.prompts.ctx_neg, model.prompts.ctx_neg)


STOCK_SCRIPT = '''
import json
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPModel, pipeline

root, classes, labels, n_images = ROOT, CLASSES, LABELS, N_IMAGES

# 1. the adapter, with peft: the documented stock steps, then PeftModel.from_pretrained
tokenizer = AutoTokenizer.from_pretrained(root + "/adapter")
clip = CLIPModel.from_pretrained(root + "/base")
assert clip.text_model.eos_token_id == 2  # the legacy config
clip.text_model.resize_token_embeddings(len(tokenizer))
clip.text_model.eos_token_id = clip.config.text_config.eos_token_id = tokenizer.eos_token_id
model = PeftModel.from_pretrained(clip, root + "/adapter").eval()
pos = "".join(f"<fdbpl_pos_{k}>" for k in range(4)) + " {}."
neg = "".join(f"<fdbpl_neg_{k}>" for k in range(4)) + " {}."
def features(m, template):
    text = tokenizer([template.format(c) for c in classes], padding=True, return_tensors="pt")
    with torch.no_grad():
        return m.get_text_features(**text).pooler_output.contiguous()
out = {"pos": features(model, pos), "neg": features(model, neg)}
plain = model.merge_and_unload()
assert type(plain) is CLIPModel
out["merged_pos"] = features(plain, pos)
save_file(out, root + "/peft.safetensors")

# 2. merged folders, with the stock zero-shot pipeline and the template save_merged returned
results = {}
for name in ("tiny", "vit-b-32"):
    folder = root + "/" + name
    template = open(folder + "/template.txt").read()
    classifier = pipeline("zero-shot-image-classification", model=folder + "/merged")
    images = [Image.open(f"{folder}/image{i}.png") for i in range(n_images[name])]
    results[name] = classifier(images, candidate_labels=labels[name], hypothesis_template=template)
json.dump(results, open(root + "/pipeline.json", "w"))
'''
LABELS = {"tiny": [str(d) for d in range(10)], "vit-b-32": ["cat", "dog", "a red bird", "an airplane", "X ray"]}


def _real_size_text_tower():
    """The real ViT-B/32 text tower (random weights) under OpenAI's legacy eos_token_id = 2; a tiny
    vision tower keeps it cheap."""
    from transformers import CLIPModel

    config = clip_config("vit-b-32")
    config.vision_config = clip_config("tiny").vision_config
    torch.manual_seed(0)
    return legacy_eos(CLIPModel(config).eval())


@pytest.fixture(scope="module")
def stock(tmp_path_factory, tokenizer):
    """Everything fdbpl_hf writes for stock libraries, and what one process without fdbpl_hf makes of it."""
    from datasets import load_dataset  # noqa: F401  (digits come through fdbpl_hf.testing.worlds)
    from fdbpl_hf.testing.worlds import load_digits

    root = tmp_path_factory.mktemp("stock")
    digits = load_digits(num_per_class=1)
    made = {"root": root}
    clip = legacy_eos(make_clip("tiny"))
    clip.save_pretrained(root / "base")
    model = trained_like(get_fdbpl_model(clip, FDBPLConfig(), tokenizer))
    model.save_pretrained(root / "adapter")
    with torch.no_grad():
        made["peft_expected"] = {"pos": model.get_text_features(CLASSES),
                                 "neg": model.get_text_features(CLASSES, negative=True)}
    n_images = {}
    for name, clip in (("tiny", make_clip("tiny")), ("vit-b-32", _real_size_text_tower())):
        folder = root / name
        model = trained_like(get_fdbpl_model(clip, FDBPLConfig(), tokenizer), seed=1)
        processor = image_processor_for(clip.config)
        template = model.save_merged(folder / "merged", image_processor=processor)
        (folder / "template.txt").write_text(template)
        images = [digits[i]["image"].convert("RGB") for i in range(0, 10, 2 if name == "tiny" else 5)]
        for i, image in enumerate(images):
            image.save(folder / f"image{i}.png")
        n_images[name] = len(images)
        with torch.no_grad():
            pixels = processor(images, return_tensors="pt")["pixel_values"]
            made[name] = {"template": template, "model": model,
                          "probs": model(pixels, class_names=LABELS[name]).pos_logits.softmax(-1)}
    script = (STOCK_SCRIPT.replace("ROOT", repr(str(root))).replace("CLASSES", repr(CLASSES))
              .replace("LABELS", repr(LABELS)).replace("N_IMAGES", repr(n_images)))
    run_without_fdbpl_hf(script)
    made["peft"] = load_file(root / "peft.safetensors")
    made["pipeline"] = json.loads((root / "pipeline.json").read_text())
    return made


def test_stock_peft_loads_the_adapter(stock):
    expected = stock["peft_expected"]
    for key, want in (("pos", expected["pos"]), ("neg", expected["neg"]), ("merged_pos", expected["pos"])):
        torch.testing.assert_close(stock["peft"][key], want, atol=1e-5, rtol=0, msg=key)
    assert not torch.allclose(expected["pos"], expected["neg"], atol=1e-3)  # the two contexts differ


@pytest.mark.parametrize("name", ["tiny", "vit-b-32"])
def test_save_merged_runs_in_the_stock_pipeline(stock, name):
    made, results = stock[name], stock["pipeline"][name]
    assert made["template"] == "<fdbpl_pos_0><fdbpl_pos_1><fdbpl_pos_2><fdbpl_pos_3> {}."
    folder = stock["root"] / name / "merged"
    card = (folder / "README.md").read_text()
    assert made["template"] in card and "pipeline_tag: zero-shot-image-classification" in card
    labels = LABELS[name]
    assert len(results) == len(made["probs"])
    for row, p in zip(results, made["probs"]):
        assert row[0]["label"] == labels[int(p.argmax())]  # the same prediction as the positive prompt
        scores = {r["label"]: r["score"] for r in row}
        torch.testing.assert_close(torch.tensor([scores[c] for c in labels]), p, atol=1e-4, rtol=0)
    merged = json.loads((folder / "config.json").read_text())
    assert merged["text_config"]["eos_token_id"] == 49407 and merged["text_config"]["vocab_size"] == 49416
    model = made["model"]  # the wrapped model itself is untouched by save_merged
    assert model.clip.text_model.embeddings.token_embedding.num_embeddings == 49408
    assert model.clip.text_model.eos_token_id == (2 if name == "vit-b-32" else 49407)


HUB_PIPELINE_SCRIPT = '''
import json
from huggingface_hub import ModelCard
from PIL import Image
from transformers import pipeline

card = ModelCard.load("tester/merged-prompt")
template = TEMPLATE
assert template in card.text and card.data.pipeline_tag == "zero-shot-image-classification"
classifier = pipeline("zero-shot-image-classification", model="tester/merged-prompt")
images = [Image.open(FOLDER + f"/image{i}.png") for i in range(N)]
json.dump(classifier(images, candidate_labels=LABELS, hypothesis_template=template), open(OUT, "w"))
'''


def test_merged_folder_runs_from_the_hub_in_the_stock_pipeline(fake_hub, stock):
    """A save_merged folder pushes like any model; the stock pipeline runs it by Hub id."""
    from huggingface_hub import HfApi

    folder, made = stock["root"] / "tiny", stock["tiny"]
    api = HfApi()
    api.create_repo("tester/merged-prompt")
    api.upload_folder(repo_id="tester/merged-prompt", folder_path=str(folder / "merged"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "README.md"} <= set(
        fake_hub.list_files("tester/merged-prompt"))
    out = folder / "from_hub.json"
    script = (HUB_PIPELINE_SCRIPT.replace("TEMPLATE", repr(made["template"])).replace("FOLDER", repr(str(folder)))
              .replace("N)", f"{len(made['probs'])})").replace("LABELS", repr(LABELS["tiny"]))
              .replace("OUT", repr(str(out))))
    run_without_fdbpl_hf(script, offline=False)
    results = json.loads(out.read_text())
    assert len(results) == len(made["probs"])
    for row, p in zip(results, made["probs"]):
        scores = {r["label"]: r["score"] for r in row}
        torch.testing.assert_close(torch.tensor([scores[c] for c in LABELS["tiny"]]), p, atol=1e-4, rtol=0)


def test_merged_card_never_shows_a_local_base_model_path(tmp_path, tiny_clip, tokenizer):
    model = get_fdbpl_model(tiny_clip, FDBPLConfig(base_model_name_or_path="../ckpt/student"), tokenizer)
    model.save_merged(tmp_path / "local")
    card = (tmp_path / "local" / "README.md").read_text()
    assert "base_model:" not in card and "ckpt" not in card and "library_name: transformers" in card
    model.fdbpl_config.base_model_name_or_path = "openai/clip-vit-base-patch32"
    model.save_merged(tmp_path / "hub")
    assert "base_model: openai/clip-vit-base-patch32" in (tmp_path / "hub" / "README.md").read_text()


def test_saving_refuses_a_clip_holding_peft_layers(tmp_path, tiny_clip, tokenizer):
    """A merged folder's LoRA keys would load into a stock CLIPModel as freshly initialised
    projections; an adapter would be loaded onto the base model without the LoRA layers."""
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_clip, LoraConfig(target_modules=["q_proj", "v_proj"], r=2, init_lora_weights=False))
    with pytest.raises(TypeError, match=r"got PeftModel: merge its adapters .*merge_and_unload"):
        get_fdbpl_model(lora, FDBPLConfig(), tokenizer)
    model = get_fdbpl_model(lora.get_base_model(), FDBPLConfig(), tokenizer)
    with pytest.raises(ValueError, match=r"holds 8 peft adapter layers .*stock CLIP .*merge_and_unload"):
        model.save_merged(tmp_path / "lora")
    # the adapter alone, loaded onto the plain base model, scored differently (no error)
    with pytest.raises(ValueError, match=r"holds 8 peft adapter layers .*only the prompts.*merge_and_unload"):
        model.save_pretrained(tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    merged = get_fdbpl_model(lora.merge_and_unload(), FDBPLConfig(), tokenizer)
    merged.save_merged(tmp_path / "merged")  # the way out the message names
    assert (tmp_path / "merged" / "model.safetensors").exists()
