"""fdbpl_hf.frozen_layers: a frozen CLIP encoder run from prepared weights computes what
transformers' layers compute, follows the weights, and steps aside for anything it does not run."""

import copy
import logging

import pytest
import torch
from transformers import CLIPModel

from fdbpl_hf.frozen_layers import clip_image_features, frozen_encoder
from fdbpl_hf.precision import frozen_weights_in
from fdbpl_hf.testing.worlds import clip_config


def frozen_clip(size="base", seed=0, **overrides):
    torch.manual_seed(seed)
    return CLIPModel(clip_config(size, **overrides)).eval().requires_grad_(False)


def transformers_text(encoder, x):
    return encoder(inputs_embeds=x, attention_mask=None, is_causal=True).last_hidden_state


def transformers_image(encoder, x):
    return encoder(inputs_embeds=x).last_hidden_state


def inputs(clip, batch=3, length=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, length, clip.config.text_config.hidden_size, generator=g)
    image = torch.randn(batch, 17, clip.config.vision_config.hidden_size, generator=g)
    return text, image


@pytest.mark.parametrize("size", ["base", "vit-b-32"])
def test_the_layers_compute_what_transformers_layers_compute(size):
    """Text (causal) and image towers, outputs and input gradients, in float32 (real ViT-B/32 shapes:
    8 and 12 heads of 64). The folded quick-GELU rounds its scaled weights once: ~1e-7 relative."""
    clip = frozen_clip(size)
    text, image = inputs(clip, batch=2 if size == "vit-b-32" else 3)
    layers = frozen_encoder(clip.text_model.encoder)
    assert layers is not None and layers.quick_gelu
    x = text.clone().requires_grad_(True)
    ours = layers(x, causal=True)
    y = text.clone().requires_grad_(True)
    reference = transformers_text(clip.text_model.encoder, y)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    probe = torch.randn_like(ours)
    (ours * probe).sum().backward()
    (reference * probe).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(frozen_encoder(clip.vision_model.encoder)(image, causal=False),
                                   transformers_image(clip.vision_model.encoder, image), atol=1e-5, rtol=1e-5)


def test_a_causal_text_tower_stays_causal():
    """A token's output depends on the tokens before it only (a padding token after EOS changes
    nothing that is read)."""
    clip = frozen_clip()
    text, _ = inputs(clip)
    layers = frozen_encoder(clip.text_model.encoder)
    changed = text.clone()
    changed[:, 7:] += 1.0 + torch.randn_like(changed[:, 7:])
    with torch.no_grad():
        a, b = layers(text, causal=True), layers(changed, causal=True)
    assert torch.equal(a[:, :7], b[:, :7]) and not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.numerics
def test_bf16_layers_are_as_close_to_float32_as_transformers_bf16_layers():
    """With the tower cast to bf16 once (`frozen_weights_in`), the scaled MLP weights round once more in
    bf16. Measured over 4 seeds, native and portable kernels: RMS error against float32 1.00-1.06x
    transformers' own bf16 layers', largest error 0.66-1.51x (one element). Tolerance: RMS 1.15x, max 2x."""
    clip = frozen_clip()
    text, image = inputs(clip)

    def rms(t):
        return t.float().pow(2).mean().sqrt().item()

    with torch.no_grad():
        exact_text = transformers_text(clip.text_model.encoder, text)
        exact_image = transformers_image(clip.vision_model.encoder, image)
        with frozen_weights_in([clip.text_model, clip.vision_model], torch.bfloat16):
            for name, encoder, x, exact, causal, run in (
                    ("text", clip.text_model.encoder, text, exact_text, True, transformers_text),
                    ("image", clip.vision_model.encoder, image, exact_image, False, transformers_image)):
                ours = frozen_encoder(encoder)(x.bfloat16(), causal=causal)
                assert ours.dtype == torch.bfloat16
                theirs = run(encoder, x.bfloat16())
                ours, theirs = ours.float() - exact, theirs.float() - exact
                assert 0 < rms(ours) <= 1.15 * rms(theirs), (name, rms(ours), rms(theirs))
                assert ours.abs().max() <= 2 * theirs.abs().max(), name


def test_other_activations_run_unfolded():
    """Only quick-GELU is folded into the weights; another activation runs as the layer's own."""
    torch.manual_seed(0)
    config = clip_config("base")
    config.text_config.hidden_act = "gelu"
    gelu = CLIPModel(config).eval().requires_grad_(False)
    layers = frozen_encoder(gelu.text_model.encoder)
    assert not layers.quick_gelu
    text, _ = inputs(gelu)
    with torch.no_grad():
        torch.testing.assert_close(layers(text, causal=True), transformers_text(gelu.text_model.encoder, text),
                                   atol=1e-5, rtol=1e-5)


def test_the_prepared_weights_follow_the_model():
    """A load, an in-place edit or a cast of the weights rebuilds them; the cast's end restores float32."""
    clip, other = frozen_clip(seed=0), frozen_clip(seed=5)
    text, _ = inputs(clip)
    encoder = clip.text_model.encoder
    first = frozen_encoder(encoder)
    assert frozen_encoder(encoder) is first  # kept while nothing changed
    with torch.no_grad():
        clip.load_state_dict(other.state_dict())
        torch.testing.assert_close(frozen_encoder(encoder)(text, causal=True),
                                   transformers_text(other.text_model.encoder, text), atol=1e-5, rtol=1e-5)
        encoder.layers[0].mlp.fc1.weight.mul_(2.0)
        torch.testing.assert_close(frozen_encoder(encoder)(text, causal=True), transformers_text(encoder, text),
                                   atol=1e-5, rtol=1e-5)
        with frozen_weights_in([clip.text_model], torch.bfloat16):
            assert frozen_encoder(encoder).layers[0].qkv_weight.dtype == torch.bfloat16
        assert frozen_encoder(encoder).layers[0].qkv_weight.dtype == torch.float32
        torch.testing.assert_close(frozen_encoder(encoder)(text, causal=True), transformers_text(encoder, text),
                                   atol=1e-5, rtol=1e-5)


def test_a_deep_copy_gets_its_own_prepared_weights():
    clip = frozen_clip()
    frozen_encoder(clip.text_model.encoder)
    twin = copy.deepcopy(clip)
    with torch.no_grad():
        twin.text_model.encoder.layers[1].self_attn.v_proj.weight.normal_()
    text, _ = inputs(clip)
    with torch.no_grad():
        torch.testing.assert_close(frozen_encoder(twin.text_model.encoder)(text, causal=True),
                                   transformers_text(twin.text_model.encoder, text), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(frozen_encoder(clip.text_model.encoder)(text, causal=True),
                                   transformers_text(clip.text_model.encoder, text), atol=1e-5, rtol=1e-5)


def _lora(clip):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(clip, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))


@pytest.mark.parametrize("change", ["trainable weight", "forward hook", "encoder hook", "backward hook",
                                    "activation hook", "replaced forward", "lora", "dropout in training",
                                    "gradient checkpointing", "DataParallel replica"])
def test_layers_it_does_not_run_are_left_to_transformers(change, caplog):
    """Anything the prepared weights would bypass: the layers run as transformers' own (None here), and
    the reason is logged once."""
    clip = frozen_clip()
    encoder = clip.text_model.encoder
    assert frozen_encoder(encoder) is not None
    called = []
    if change == "trainable weight":
        encoder.layers[1].layer_norm2.weight.requires_grad_(True)
    elif change == "forward hook":
        encoder.layers[0].mlp.fc2.register_forward_hook(lambda *args: called.append(1))
    elif change == "encoder hook":
        encoder.register_forward_pre_hook(lambda *args: called.append(1))
    elif change == "backward hook":
        encoder.layers[1].self_attn.register_full_backward_hook(lambda *args: called.append(1))
    elif change == "activation hook":  # quick-GELU is folded into the weights: its module is never called
        encoder.layers[0].mlp.activation_fn.register_forward_hook(lambda *args: called.append(1))
    elif change == "replaced forward":  # what accelerate's offloading hooks do (module._hf_hook, module.forward)
        fc1 = encoder.layers[0].mlp.fc1
        fc1.forward = fc1.forward
    elif change == "DataParallel replica":
        encoder._is_replica = True
    elif change == "lora":
        clip = _lora(clip).base_model.model
        encoder = clip.text_model.encoder
    elif change == "dropout in training":
        for layer in encoder.layers:
            layer.self_attn.dropout = 0.1
        encoder.train()
    else:
        encoder.gradient_checkpointing = True
        encoder.train()
    with caplog.at_level(logging.INFO, logger="fdbpl_hf.frozen_layers"):
        assert frozen_encoder(encoder) is None
        assert frozen_encoder(encoder) is None
    told = [r.getMessage() for r in caplog.records if "run by transformers' layers" in r.getMessage()]
    assert len(told) == 1
    if change == "dropout in training":  # back in eval mode, dropout is off: prepared again
        encoder.eval()
        assert frozen_encoder(encoder) is not None


def test_image_features_equal_clips_own():
    clip = frozen_clip()
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(clip_image_features(clip, pixels),
                                   clip.get_image_features(pixel_values=pixels).pooler_output, atol=1e-5, rtol=1e-5)
        called = []
        clip.vision_model.register_forward_hook(lambda *args: called.append(1))
        clip_image_features(clip, pixels)  # a hook on the tower: transformers' forward runs, and the hook
    assert called == [1]


def test_prepared_in_inference_mode_then_trained():
    """An evaluation (`torch.inference_mode`) may prepare the weights first: a training step's
    backward afterwards must not meet inference tensors."""
    clip = frozen_clip()
    text, _ = inputs(clip)
    with torch.inference_mode():
        frozen_encoder(clip.text_model.encoder)(text, causal=True)
    x = text.clone().requires_grad_(True)
    frozen_encoder(clip.text_model.encoder)(x, causal=True).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_a_swapped_activation_is_run_not_folded():
    """Folding follows the activation module, not the config's name for it."""
    clip = frozen_clip()
    encoder = clip.text_model.encoder
    assert frozen_encoder(encoder).folded[0]
    encoder.layers[0].mlp.activation_fn = torch.nn.GELU()
    layers = frozen_encoder(encoder)
    assert not layers.folded[0] and layers.folded[1]
    text, _ = inputs(clip)
    with torch.no_grad():
        torch.testing.assert_close(layers(text, causal=True), transformers_text(encoder, text), atol=1e-5, rtol=1e-5)


def test_forget_after_an_edit_no_version_counter_sees():
    """`.data` edits (peft's merge_and_unload) bypass the version counters: `forget` makes the layers
    anew, and wrapping the CLIP in an FDBPL model does it."""
    from fdbpl_hf import FDBPLConfig, get_fdbpl_model
    from fdbpl_hf.frozen_layers import forget
    from fdbpl_hf.testing.worlds import clip_tokenizer

    clip = frozen_clip()
    encoder = clip.text_model.encoder
    text, _ = inputs(clip)
    with torch.no_grad():
        frozen_encoder(encoder)(text, causal=True)
        encoder.layers[0].mlp.fc1.weight.data.add_(0.02 * torch.randn_like(encoder.layers[0].mlp.fc1.weight))
        assert not torch.allclose(frozen_encoder(encoder)(text, causal=True), transformers_text(encoder, text),
                                  atol=1e-3)  # stale: what forget is for
        forget(clip)
        torch.testing.assert_close(frozen_encoder(encoder)(text, causal=True), transformers_text(encoder, text),
                                   atol=1e-5, rtol=1e-5)
        encoder.layers[1].mlp.fc2.weight.data.add_(0.02 * torch.randn_like(encoder.layers[1].mlp.fc2.weight))
        get_fdbpl_model(clip, FDBPLConfig(), clip_tokenizer())
        torch.testing.assert_close(frozen_encoder(encoder)(text, causal=True), transformers_text(encoder, text),
                                   atol=1e-5, rtol=1e-5)


def test_the_bf16_copy_is_freed_when_the_cast_ends():
    from fdbpl_hf.frozen_layers import prepared_encoder

    clip = frozen_clip()
    text, _ = inputs(clip)
    with frozen_weights_in([clip.text_model], torch.bfloat16), torch.no_grad():
        frozen_encoder(clip.text_model.encoder)(text.bfloat16(), causal=True)
        assert prepared_encoder(clip.text_model.encoder) is not None
    assert prepared_encoder(clip.text_model.encoder) is None
