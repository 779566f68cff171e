"""The dual-prompt CLIP adapter: the correctness anchor, gradients, shapes and bad input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_clip

from fdbpl_hf import FDBPLCLIPModel, FDBPLConfig, get_fdbpl_model

NAMES = ["cat", "golden retriever", "x-ray", "yahoo!", "St. Bernard's dog", "a"]


def reference_features(clip, tokenizer, texts):
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return clip.get_text_features(**tokens).pooler_output


@pytest.mark.numerics
@pytest.mark.parametrize("eos_token_id", [49407, 2])  # 2 = legacy configs pooling at argmax
def test_anchor_tiny(tokenizer, eos_token_id):
    clip = make_clip("tiny")
    if eos_token_id == 2:
        clip.text_model.eos_token_id = 2
    model = get_fdbpl_model(clip, FDBPLConfig(), tokenizer)
    with torch.no_grad():
        ours = model.get_text_features(NAMES)
    ref = reference_features(clip, tokenizer, [f"a photo of a {c}." for c in NAMES])
    assert ours.shape == (len(NAMES), clip.config.projection_dim)
    # the prompt's embeddings go in through the hook instead of the token lookup: the same values through
    # the same ops (measured equal bit for bit under default, avx2 and avx512), but another code path, which
    # a transformers release may batch or pad differently: 1e-5 allows float32 rounding through 2-12 layers
    # of features of size ~1; a wrong context or pooling position moves them by 1e-2 or more
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.numerics
def test_anchor_real_size_vit_b32(tokenizer):
    clip = make_clip("vit-b-32")
    model = get_fdbpl_model(clip, FDBPLConfig(), tokenizer)
    names = ["tabby cat", "Boeing 737-800", "x-ray"]
    with torch.no_grad():
        ours = model.get_text_features(names)
    ref = reference_features(clip, tokenizer, [f"a photo of a {c}." for c in names])
    assert ours.shape == (3, 512)
    # as in test_anchor_tiny (12 layers of width 512 here)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.numerics
def test_negative_prompt_anchor(tiny_clip, tokenizer):
    model = get_fdbpl_model(tiny_clip, FDBPLConfig(), tokenizer)
    with torch.no_grad():
        ours = model.get_text_features(NAMES, negative=True)
    ref = reference_features(tiny_clip, tokenizer, [f"a photo of no {c}." for c in NAMES])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.numerics
@pytest.mark.parametrize("position,template", [("front", "{} a photo of a."), ("middle", "a photo {} of a.")])
def test_class_token_positions(tiny_clip, tokenizer, position, template):
    model = get_fdbpl_model(tiny_clip, FDBPLConfig(class_token_position=position), tokenizer)
    with torch.no_grad():
        ours = model.get_text_features(["cat", "golden retriever"])
    ref = reference_features(tiny_clip, tokenizer, [template.format(c) for c in ["cat", "golden retriever"]])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_prompts_padded_to_longest_not_77(tiny_clip, tokenizer):
    model = get_fdbpl_model(tiny_clip, FDBPLConfig(), tokenizer)
    prompts = model._tokenize(["cat", "dog"])
    # [SOS] + 4 ctx + "cat" + "." + [EOS]
    assert prompts.input_ids.shape == (2, 8)
    assert prompts.ctx_mask.sum(1).tolist() == [4, 4]


def test_forward_logits_and_gradients(tiny_clip, tokenizer):
    model = get_fdbpl_model(tiny_clip, FDBPLConfig(), tokenizer)
    model.train()
    pixels = torch.randn(5, 3, 32, 32)
    out = model(pixels, class_names=NAMES)
    assert out.pos_logits.shape == out.neg_logits.shape == (5, len(NAMES))
    expected = tiny_clip.logit_scale.exp() * F.normalize(out.image_features, dim=-1) @ F.normalize(
        out.pos_text_features, dim=-1).t()
    torch.testing.assert_close(out.pos_logits, expected)
    (out.pos_logits.logsumexp(-1).mean() + out.neg_logits.logsumexp(-1).mean()).backward()
    assert model.prompts.ctx_pos.grad is not None and model.prompts.ctx_pos.grad.abs().sum() > 0
    assert model.prompts.ctx_neg.grad is not None and model.prompts.ctx_neg.grad.abs().sum() > 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompts.ctx_pos", "prompts.ctx_neg"]
    assert not tiny_clip.training  # the frozen backbone stays in eval mode


def test_train_eval_modes_keep_the_backbone_in_eval(tiny_clip, tokenizer):
    model = get_fdbpl_model(tiny_clip, FDBPLConfig(), tokenizer)
    model.train()
    assert model.training and model.prompts.training
    assert not any(m.training for m in tiny_clip.modules())
    tiny_clip.train()  # something switched the backbone on: the next train() puts all of it back
    model.train()
    assert not any(m.training for m in tiny_clip.modules())
    tiny_clip.text_model.encoder.train()  # only a part of it, under a top level still in eval mode
    model.train()
    assert not any(m.training for m in tiny_clip.modules())
    calls = []
    original_train = torch.nn.Module.train

    def counting_train(module, mode=True):
        calls.append(module)
        return original_train(module, mode)

    torch.nn.Module.train = counting_train
    try:
        model.train()  # the per-step call: nothing to switch in the backbone, so nothing walks it
    finally:
        torch.nn.Module.train = original_train
    assert not any(any(c is m for m in tiny_clip.modules()) for c in calls)
    model.eval()
    assert not model.training and not model.prompts.training
    with pytest.raises(ValueError, match="boolean"):
        model.train("yes")


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_clears_contexts_and_unfrozen_backbone(tiny_clip, tokenizer, set_to_none):
    model = get_fdbpl_model(tiny_clip, FDBPLConfig(), tokenizer)
    unfrozen = tiny_clip.text_projection.weight
    unfrozen.requires_grad_(True)  # a user experiment: the clear must reach it too
    out = model(torch.randn(2, 3, 32, 32), class_names=["cat", "dog"])
    (out.pos_logits.sum() + out.neg_logits.sum()).backward()
    grads = [model.prompts.ctx_pos, model.prompts.ctx_neg, unfrozen]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in grads)
    model.zero_grad(set_to_none=set_to_none)
    for p in grads:
        assert p.grad is None if set_to_none else (p.grad is not None and not p.grad.any())
    assert all(p.grad is None for n, p in tiny_clip.named_parameters() if p is not unfrozen)
    tiny_clip.text_projection = torch.nn.Linear(32, 16, bias=False)  # a module swapped in after wrapping
    (model(torch.randn(2, 3, 32, 32), class_names=["cat"]).pos_logits.sum()).backward()
    assert tiny_clip.text_projection.weight.grad is not None
    model.zero_grad(set_to_none=set_to_none)
    grad = tiny_clip.text_projection.weight.grad
    assert grad is None if set_to_none else not grad.any()


def test_deepcopy_keeps_its_own_prompts(tiny_clip, tokenizer):
    import copy

    model = get_fdbpl_model(tiny_clip, FDBPLConfig(), tokenizer)
    model.set_class_names(NAMES)
    twin = copy.deepcopy(model)
    assert twin.clip is not model.clip and twin.class_names == NAMES and twin.training == model.training
    with torch.no_grad():
        # a deep copy runs the same ops on equal weights in this process: bit-equal
        torch.testing.assert_close(twin.get_text_features(NAMES), model.get_text_features(NAMES), atol=0, rtol=0)
        twin.prompts.ctx_pos.add_(torch.randn_like(twin.prompts.ctx_pos))  # drives the copy, and only the copy
        changed, original = twin.get_text_features(NAMES), model.get_text_features(NAMES)
    assert not torch.allclose(changed, original)
    torch.testing.assert_close(original, reference_features(tiny_clip, tokenizer, [f"a photo of a {c}." for c in NAMES]),
                               atol=1e-5, rtol=0)
    twin.unload()  # unloads the copy only
    with torch.no_grad():
        torch.testing.assert_close(model.get_text_features(NAMES), original, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="unloaded"):
        copy.deepcopy(twin)


def test_the_clip_called_directly_is_unaffected(tiny_clip, tokenizer):
    before = reference_features(tiny_clip, tokenizer, ["X X X X cat."])
    model = get_fdbpl_model(tiny_clip, FDBPLConfig(positive_init=None, negative_init=None), tokenizer)
    model.get_text_features(["cat"])
    after = reference_features(tiny_clip, tokenizer, ["X X X X cat."])
    torch.testing.assert_close(before, after, atol=0, rtol=0)


def test_set_class_names_used_by_forward(tiny_clip, tokenizer):
    model = get_fdbpl_model(tiny_clip, FDBPLConfig(), tokenizer)
    with pytest.raises(ValueError, match="no class names"):
        model(torch.randn(1, 3, 32, 32))
    model.set_class_names(["cat", "dog"])
    assert model(torch.randn(1, 3, 32, 32)).pos_logits.shape == (1, 2)


def test_bad_input(tiny_clip, tokenizer):
    model = get_fdbpl_model(tiny_clip, FDBPLConfig(), tokenizer)
    with pytest.raises(ValueError, match="empty"):
        model.get_text_features([])
    with pytest.raises(TypeError, match="list of strings"):
        model.get_text_features("cat")
    with pytest.raises(ValueError, match="non-empty strings"):
        model.get_text_features(["cat", ""])
    short = make_clip("tiny", max_position_embeddings=12)
    short_model = get_fdbpl_model(short, FDBPLConfig(), tokenizer)
    with pytest.raises(ValueError, match="more than the text encoder's 12"):
        short_model.get_text_features(["a very long class name that cannot possibly fit"])
    with pytest.raises(ValueError, match="is 3 tokens but n_ctx is 4"):
        get_fdbpl_model(tiny_clip, FDBPLConfig(positive_init="a photo of"), tokenizer)
    with pytest.raises(ValueError, match="class_token_position"):
        FDBPLConfig(class_token_position="left")
    with pytest.raises(TypeError, match="CLIPModel"):
        FDBPLCLIPModel(torch.nn.Linear(2, 2), model.prompts, tokenizer)


def test_wrappers_do_not_leak_and_unload(tiny_clip, tokenizer):
    """Wrapping registers nothing on the backbone (no hook: the contexts go into prepared embeddings),
    so collected wrappers leave nothing behind; unload() hands back the plain CLIP model."""
    import gc

    from fdbpl_hf import get_fdbpl_model

    embedding = tiny_clip.text_model.embeddings.token_embedding
    before = len(embedding._forward_hooks)
    ids = tokenizer(["a photo of a cat."], return_tensors="pt")
    with torch.no_grad():
        reference = tiny_clip.get_text_features(**ids).pooler_output
    for _ in range(3):
        get_fdbpl_model(tiny_clip, tokenizer=tokenizer)
    gc.collect()
    assert len(embedding._forward_hooks) == before
    model = get_fdbpl_model(tiny_clip, tokenizer=tokenizer)
    with torch.no_grad():
        model.prompts.ctx_pos.add_(1.0)  # trained-looking contexts change the prompted features
        prompted = model.get_text_features(["cat"])
    clip = model.unload()
    assert clip is tiny_clip and len(embedding._forward_hooks) == before
    with torch.no_grad():
        plain = clip.get_text_features(**ids).pooler_output
    assert torch.equal(plain, reference) and not torch.allclose(prompted, plain)
    with pytest.raises(RuntimeError, match="unloaded"):
        model.get_text_features(["cat"])


def test_classes_with_identical_prompts_are_refused(tiny_clip, tokenizer):
    """"cat" and "Cat " tokenise alike: same text features, the later class never predicted."""
    from fdbpl_hf.evaluation import ZeroShotCLIP

    model = get_fdbpl_model(tiny_clip, FDBPLConfig(), tokenizer)
    with pytest.raises(ValueError, match=r"classes 0 \('cat'\) and 2 \('Cat '\) give the same prompt tokens"):
        model.set_class_names(["cat", "dog", "Cat "])
    with pytest.raises(ValueError, match=r"classes 1 \('maillot'\) and 2 \('maillot'\) give the same prompt"):
        ZeroShotCLIP(tiny_clip, tokenizer).get_text_features(["crane", "maillot", "maillot"])


def test_a_tokenizer_with_another_eos_is_refused(tiny_clip):
    """The text tower pools at the model's EOS id: a tokenizer ending prompts with another token made
    every class the same feature (pooled at position 0), with no error."""
    from transformers import CLIPTokenizer

    from fdbpl_hf.evaluation import ZeroShotCLIP
    from fdbpl_hf.testing.worlds import _clip_vocab_and_merges

    vocab, merges = _clip_vocab_and_merges()
    other = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), unk_token="<|endoftext|>",
                          bos_token="<|startoftext|>", eos_token="!", pad_token="!")
    with pytest.raises(ValueError, match=r"BOS/EOS ids \(49406, 0\) are not the CLIP model's \(EOS 49407"):
        get_fdbpl_model(tiny_clip, FDBPLConfig(), other)
    with pytest.raises(ValueError, match="pass the model's own tokenizer"):
        ZeroShotCLIP(tiny_clip, other)
