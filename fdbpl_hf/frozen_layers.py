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
prepared copy is rebuilt when any of them changes (a cast, a load, an in-place edit; an edit
through `.data`, which no version counter sees, needs `forget`, which `FDBPLCLIPModel` and
`CLIPTeacher` call on the CLIP they are given). It is refused (transformers' layers run instead,
the reason logged once) whenever the layers are not exactly transformers' CLIP layers on frozen
plain `nn.Linear`/`nn.LayerNorm` weights: a trainable weight, a LoRA or other adapter layer, a
forward or backward hook, a replaced forward (accelerate's offloading), a DataParallel replica,
dropout in training, gradient checkpointing, and inside `torch.compile`. The prepared weights are a
second copy of the encoder's (ViT-B/32 student, both towers: about 250 MB in bf16); the copy made
inside `precision.frozen_weights_in` is dropped when the block ends.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Iterator, NamedTuple, Optional

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


def _global_hooks() -> bool:
    module = nn.modules.module
    return any(getattr(module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


def _bypassed(module: nn.Module) -> Optional[str]:
    """What a call of `module` would run that the prepared weights bypass (None: nothing)."""
    if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
            or module._backward_pre_hooks):
        return "a hook"
    if getattr(module, "_hf_hook", None) is not None or "forward" in module.__dict__:
        return "a replaced forward (e.g. accelerate's offloading hook)"
    return None


def _why_not(encoder: nn.Module) -> Optional[str]:
    """Why `encoder`'s layers cannot be run from prepared weights (None when they can)."""
    from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer, CLIPMLP

    if getattr(encoder, "gradient_checkpointing", False) and encoder.training:
        return "gradient checkpointing is on"
    if getattr(encoder, "_is_replica", False):
        # nn.DataParallel's replicas hold their weights as plain attributes, made anew at every forward
        return "the encoder is a DataParallel replica"
    layers = getattr(encoder, "layers", None)
    if not layers:
        return "the encoder has no layers"
    for name, module in encoder.named_modules():
        why = _bypassed(module)
        if why is not None:
            return f"{name or 'the encoder'} ({type(module).__name__}) has {why}"
    for index, layer in enumerate(layers):
        expected = ((layer, CLIPEncoderLayer), (layer.self_attn, CLIPAttention), (layer.mlp, CLIPMLP),
                    *((getattr(layer.self_attn, n), nn.Linear) for n in _LINEARS),
                    (layer.mlp.fc1, nn.Linear), (layer.mlp.fc2, nn.Linear),
                    (layer.layer_norm1, nn.LayerNorm), (layer.layer_norm2, nn.LayerNorm))
        for module, cls in expected:
            if type(module) is not cls:  # a LoRA or quantised layer is a subclass or another type
                return f"layer {index} holds a {type(module).__name__} where transformers has a {cls.__name__}"
            if cls in (nn.Linear, nn.LayerNorm) and (module.weight is None or module.bias is None):
                return f"layer {index}'s {cls.__name__} has no weight or no bias"
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
    flag, hooks, a replaced forward), the settings `FrozenEncoder` reads (attention scale, heads,
    dropout, layer-norm eps, the activation's type) and the current contents of the weights
    (storage, in-place version, trainability). An edit through `.data` bypasses the version counter,
    as it bypasses autograd: call `forget` after one (peft's `merge_and_unload` makes such edits)."""
    stamp = [getattr(encoder, "gradient_checkpointing", False), getattr(encoder, "_is_replica", False)]
    add = stamp.extend
    for m in encoder.modules():  # read through __dict__: this runs at every call, on ~150 modules per tower
        d = m.__dict__
        add((id(m), d["training"], len(d["_forward_hooks"]), len(d["_forward_pre_hooks"]), len(d["_backward_hooks"]),
             len(d["_backward_pre_hooks"]), "forward" in d, d.get("_hf_hook") is not None))
        for p in d["_parameters"].values():
            if p is not None:  # a cast or a move gets new storage: the data pointer covers dtype and device
                add((p.data_ptr(), p._version, p.requires_grad))
    for layer in getattr(encoder, "layers", ()):
        attn = layer.self_attn
        stamp += (attn.scale, attn.dropout, attn.num_heads, attn.head_dim, layer.layer_norm1.eps,
                  layer.layer_norm2.eps, type(layer.mlp.activation_fn))
    return tuple(stamp)


class FrozenEncoder:
    """A CLIP encoder's layers run from weights prepared once (see the module doc). Get one with
    `frozen_encoder(encoder)`, which keeps it up to date; call it like the encoder."""

    def __init__(self, encoder: nn.Module):
        from transformers.activations import QuickGELUActivation

        layers = list(encoder.layers)
        self.num_heads = [layer.self_attn.num_heads for layer in layers]
        self.eps1 = [layer.layer_norm1.eps for layer in layers]
        self.eps2 = [layer.layer_norm2.eps for layer in layers]
        self.scales = [layer.self_attn.scale for layer in layers]
        # folded where the layer's activation is transformers' quick-GELU (not by config name: a module may be swapped)
        self.folded = [type(layer.mlp.activation_fn) is QuickGELUActivation for layer in layers]
        self.quick_gelu = all(self.folded)
        self.activations = [layer.mlp.activation_fn for layer in layers]
        # plain tensors even when first used inside torch.inference_mode (an evaluation): inference tensors
        # cannot be saved for a later training step's backward
        with torch.inference_mode(False), torch.no_grad():
            self.layers = [self._prepare(layer, folded) for layer, folded in zip(layers, self.folded)]

    def _prepare(self, layer, folded: bool) -> _LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        qkv_weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        qkv_bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        fc1_weight, fc1_bias, fc2_weight = mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight
        if folded:  # scaled in float32, rounded once to the tower's dtype
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
        for index, w in enumerate(self.layers):
            heads = self.num_heads[index]
            head_dim = width // heads
            x = F.layer_norm(hidden, (width,), w.ln1_weight, w.ln1_bias, self.eps1[index])
            # [N, L, 3D] split along the last dim into views [N, H, L, Dh]: backward joins their gradients in one cat
            q, k, v = (t.view(batch, length, heads, head_dim).transpose(1, 2)
                       for t in F.linear(x, w.qkv_weight, w.qkv_bias).split(width, dim=-1))
            x = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.scales[index])
            x = F.linear(x.transpose(1, 2).reshape(batch, length, width), w.out_weight, w.out_bias)
            hidden = hidden + x
            x = F.layer_norm(hidden, (width,), w.ln2_weight, w.ln2_bias, self.eps2[index])
            x = F.linear(x, w.fc1_weight, w.fc1_bias)
            x = F.silu(x) if self.folded[index] else self.activations[index](x)
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
    if _global_hooks():
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
    if _RECORDING and kept[1] is not None:
        _RECORDING[-1].append(encoder)
    return kept[1]


_RECORDING: list = []


@contextlib.contextmanager
def recording_encoders() -> Iterator[list]:
    """Within the block, every encoder that `frozen_encoder` serves from prepared weights is listed
    (a captured CUDA graph reads their memory: `fdbpl_hf.step` checks exactly those before a replay)."""
    used: list = []
    _RECORDING.append(used)
    try:
        yield used
    finally:
        _RECORDING.pop()


def forget(module: nn.Module) -> None:
    """Drop the prepared weights of every encoder inside `module` (made again at their next use):
    after an edit of the weights through `.data`, which no version counter sees (peft's
    `merge_and_unload` makes such edits), or to free their memory."""
    for m in module.modules():
        _PREPARED.pop(m, None)


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
