"""CLIP's encoder layers for a frozen tower, run from weights prepared once with fewer kernels.

A launch-bound training step pays host time per kernel (issue 20), and transformers' CLIP layer
launches about 14 per forward and 20 per backward: three q/k/v matmuls, quick-GELU as three
element-wise kernels forward and five backward, and the sums of the three q/k/v input gradients.
When a tower's encoder is frozen, the same arithmetic runs here from weights prepared once:

- q, k and v as one matmul of the concatenated weights `[3D, D]` (exact: the same dot products);
- quick-GELU `u * sigmoid(1.702 u)` folded into the weights around it: `fc1` scaled by 1.702, then
  SiLU (one kernel forward, one backward), then `fc2` scaled by 1 / 1.702. Exact in real numbers;
  in floating point the scaled weights round once more (float32 towers: outputs within 1e-5 of
  transformers' layers; bf16 towers: RMS error against float32 1.00-1.06x that of transformers'
  own bf16 layers, measured in `tests/test_frozen_layers.py`);
- attention through `scaled_dot_product_attention` with `is_causal` (text) or no mask (image),
  which is what transformers' SDPA backend runs.

Per layer that is 10 kernels forward and about 11 backward. It reads the tower's own weights: the
prepared copy is rebuilt when any of them changes (a cast, a load, a resize), and it is refused
(transformers' layers run instead, with the reason logged once) whenever the layers are not
exactly transformers' CLIP layers on frozen plain `nn.Linear`/`nn.LayerNorm` weights: a trainable
weight, a LoRA or other adapter layer, a hook, dropout in training, or gradient checkpointing. The
prepared weights are a second copy of the encoder's (ViT-B/32 student, both towers: about 250 MB
in bf16).
"""

from __future__ import annotations

import logging
import weakref
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# quick-GELU's constant (transformers' QuickGELUActivation: x * sigmoid(1.702 x))
QUICK_GELU_SCALE = 1.702
_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj")


class _LayerWeights(NamedTuple):
    ln1_weight: torch.Tensor
    ln1_bias: torch.Tensor
    qkv_weight: torch.Tensor  # [3D, D]: q, k, v stacked
    qkv_bias: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor
    ln2_weight: torch.Tensor
    ln2_bias: torch.Tensor
    fc1_weight: torch.Tensor  # scaled by 1.702 when the activation is quick-GELU
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor  # scaled by 1 / 1.702 when the activation is quick-GELU
    fc2_bias: torch.Tensor


def _why_not(encoder: nn.Module) -> Optional[str]:
    """Why `encoder`'s layers cannot be run from prepared weights (None when they can)."""
    from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer, CLIPMLP

    if getattr(encoder, "gradient_checkpointing", False) and encoder.training:
        return "gradient checkpointing is on"
    if encoder._forward_hooks or encoder._forward_pre_hooks:
        return "the encoder has a forward hook"
    layers = getattr(encoder, "layers", None)
    if not layers:
        return "the encoder has no layers"
    for index, layer in enumerate(layers):
        expected = ((layer, CLIPEncoderLayer), (layer.self_attn, CLIPAttention), (layer.mlp, CLIPMLP),
                    *((getattr(layer.self_attn, n), nn.Linear) for n in _LINEARS),
                    (layer.mlp.fc1, nn.Linear), (layer.mlp.fc2, nn.Linear),
                    (layer.layer_norm1, nn.LayerNorm), (layer.layer_norm2, nn.LayerNorm))
        for module, cls in expected:
            if type(module) is not cls:  # a LoRA or quantised layer is a subclass or another type
                return f"layer {index} holds a {type(module).__name__} where transformers has a {cls.__name__}"
            if module._forward_hooks or module._forward_pre_hooks:
                return f"layer {index}'s {type(module).__name__} has a forward hook"
        if layer.training and layer.self_attn.dropout > 0:
            return f"layer {index} is in training mode with attention dropout {layer.self_attn.dropout}"
        for name, p in layer.named_parameters():
            if p.requires_grad:
                return f"layer {index}'s {name} is trainable"
            if not p.is_floating_point():
                return f"layer {index}'s {name} is {p.dtype}"
    return None


def _stamp(encoder: nn.Module) -> tuple:
    """What `_why_not` and the prepared weights depend on: the encoder's modules (identity, training
    flag, hook counts) and the current contents of their weights (storage, in-place version,
    trainability; an edit through `.data` bypasses the version counter, as it bypasses autograd)."""
    stamp = [getattr(encoder, "gradient_checkpointing", False)]
    for m in encoder.modules():
        stamp += (id(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks))
        for p in m._parameters.values():
            if p is not None:  # a cast or a move gets new storage: the data pointer covers dtype and device
                stamp += (p.data_ptr(), p._version, p.requires_grad)
    return tuple(stamp)


class FrozenEncoder:
    """A CLIP encoder's layers run from weights prepared once (see the module doc). Get one with
    `frozen_encoder(encoder)`, which keeps it up to date; call it like the encoder."""

    def __init__(self, encoder: nn.Module):
        config = encoder.config
        self.num_heads = config.num_attention_heads
        self.eps1 = [layer.layer_norm1.eps for layer in encoder.layers]
        self.eps2 = [layer.layer_norm2.eps for layer in encoder.layers]
        self.scales = [layer.self_attn.scale for layer in encoder.layers]
        self.quick_gelu = config.hidden_act == "quick_gelu"
        self.activations = [layer.mlp.activation_fn for layer in encoder.layers]
        with torch.no_grad():
            self.layers = [self._prepare(layer) for layer in encoder.layers]

    def _prepare(self, layer) -> _LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        qkv_weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        qkv_bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        fc1_weight, fc1_bias, fc2_weight = mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight
        if self.quick_gelu:  # scaled in float32, rounded once to the tower's dtype
            fc1_weight = (fc1_weight.float() * QUICK_GELU_SCALE).to(fc1_weight.dtype)
            fc1_bias = (fc1_bias.float() * QUICK_GELU_SCALE).to(fc1_bias.dtype)
            fc2_weight = (fc2_weight.float() / QUICK_GELU_SCALE).to(fc2_weight.dtype)
        return _LayerWeights(layer.layer_norm1.weight.detach(), layer.layer_norm1.bias.detach(), qkv_weight, qkv_bias,
                             attn.out_proj.weight.detach(), attn.out_proj.bias.detach(),
                             layer.layer_norm2.weight.detach(), layer.layer_norm2.bias.detach(),
                             fc1_weight.detach(), fc1_bias.detach(), fc2_weight.detach(), mlp.fc2.bias.detach())

    def __call__(self, hidden: torch.Tensor, causal: bool) -> torch.Tensor:
        """The last hidden state `[N, L, D]` of the layers on `hidden`; causal attention for text."""
        batch, length, width = hidden.shape
        heads = self.num_heads
        head_dim = width // heads
        for index, w in enumerate(self.layers):
            x = F.layer_norm(hidden, (width,), w.ln1_weight, w.ln1_bias, self.eps1[index])
            # [N, L, 3D] split along the last dim into views [N, H, L, Dh]: backward joins their gradients in one cat
            q, k, v = (t.view(batch, length, heads, head_dim).transpose(1, 2)
                       for t in F.linear(x, w.qkv_weight, w.qkv_bias).split(width, dim=-1))
            x = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.scales[index])
            x = F.linear(x.transpose(1, 2).reshape(batch, length, width), w.out_weight, w.out_bias)
            hidden = hidden + x
            x = F.layer_norm(hidden, (width,), w.ln2_weight, w.ln2_bias, self.eps2[index])
            x = F.linear(x, w.fc1_weight, w.fc1_bias)
            x = F.silu(x) if self.quick_gelu else self.activations[index](x)
            hidden = hidden + F.linear(x, w.fc2_weight, w.fc2_bias)
        return hidden


_PREPARED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_TOLD: set = set()


def frozen_encoder(encoder: nn.Module) -> Optional[FrozenEncoder]:
    """The prepared `FrozenEncoder` of a transformers CLIP encoder (`text_model.encoder`,
    `vision_model.encoder`), rebuilt when its modules or weights changed; None (the reason logged
    once) when its layers must run as transformers' own (see the module doc), and inside
    `torch.compile`, which fuses those layers itself."""
    if torch.compiler.is_compiling():
        return None  # a compiled graph fuses transformers' layers itself (and a stamp cannot be traced)
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None  # a global hook sees every module call: transformers' layers make them
    stamp = _stamp(encoder)
    kept = _PREPARED.get(encoder)
    if kept is None or kept[0] != stamp:
        why = _why_not(encoder)
        if why is not None and (id(encoder), why) not in _TOLD:
            _TOLD.add((id(encoder), why))
            logger.info("CLIP encoder run by transformers' layers, not from prepared frozen weights: %s", why)
        kept = (stamp, None if why is not None else FrozenEncoder(encoder))
        _PREPARED[encoder] = kept
    return kept[1]


def clip_image_features(clip: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """`clip.get_image_features(pixel_values).pooler_output` (projected, not normalised), with the
    image tower's encoder layers run by `frozen_encoder` where it can: its embeddings, layer norms and
    projection are the model's own modules."""
    vision = clip.vision_model
    layers = None if vision._forward_hooks or vision._forward_pre_hooks else frozen_encoder(vision.encoder)
    if layers is None:
        return clip.get_image_features(pixel_values=pixel_values).pooler_output
    hidden = layers(vision.pre_layrnorm(vision.embeddings(pixel_values)), causal=False)
    return clip.visual_projection(vision.post_layernorm(hidden[:, 0, :]))


_STALE = object()


def prepared_encoder(encoder: nn.Module):
    """The `FrozenEncoder` kept for `encoder` if it is current, without building one: None when none
    is kept, a stale marker when its modules or weights changed since (a captured CUDA graph compares
    this by identity before replaying kernels that read the prepared weights' memory)."""
    kept = _PREPARED.get(encoder)
    if kept is None or kept[1] is None:
        return None
    return kept[1] if kept[0] == _stamp(encoder) else _STALE
