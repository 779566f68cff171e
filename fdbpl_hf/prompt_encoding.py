"""Class prompts prepared once per class list, and CLIP's text tower run on them with the learnable
contexts injected by static-shape ops: no host sync and no data-dependent shape, in the forward
pass or the backward pass (a training step can be captured as a CUDA graph).

What is prepared once (per class list, and per state of the frozen embedding weights):

- the frozen token + position embeddings of `[SOS] <context slots + class name> . [EOS]`, with the
  context slots holding only their position embedding;
- a one-hot matrix `[C * L, n_ctx]` saying which context row fills each token (all zeros elsewhere):
  the injection is one matmul and one add, forward and backward (a masked scatter's backward is a
  masked select, i.e. `nonzero`: a host sync and a data-dependent shape);
- the pooling index of each prompt, by transformers' rule: the first EOS id, or for legacy configs
  whose `eos_token_id` is 2 the largest id (`argmax`);
- the attention mask: none for SDPA and flash attention (the causal fast path, `is_causal=True`),
  a causal `[1, 1, L, L]` additive mask for eager attention. Padding sits after EOS, attention is
  causal and pooling reads EOS, so the padding mask changes nothing that is read.

Then `encode_prompts` runs `text_model.encoder` (transformers' own layers), the final layer norm
on the EOS rows, and the text projection. It computes what `CLIPModel.get_text_features` computes
on the same tokens with the contexts in their slots (`tests/test_modeling.py` anchors it there).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .frozen_layers import frozen_encoder
from .precision import reduced_precision_block

# transformers' attention implementations that read `is_causal` (no mask tensor needed)
CAUSAL_FLAG_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")


def pooling_index(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Where `CLIPTextModel` pools each row: the first `eos_token_id`, or the largest id when the
    model's `eos_token_id` is the legacy 2 (transformers keeps that rule for old configs)."""
    ids = input_ids.to(torch.int)
    if eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


def _for_training():
    """Where tensors kept for later steps are made: outside `torch.inference_mode` even when first
    needed by an evaluation inside it (an inference tensor cannot be saved for a training step's
    backward)."""
    return torch.inference_mode(False)


def _stamp(*weights: torch.Tensor) -> tuple:
    """What identifies the current contents of frozen weights: storage, in-place version, dtype,
    device and shape. A load_state_dict, a cast or a resize changes it (an edit through `.data`
    bypasses the version counter, as it bypasses autograd)."""
    return tuple((w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape)) for w in weights)


class ClassPrompts:
    """The tokens of one class list (`input_ids`, `attention_mask`, `ctx_mask`, all `[C, L]`) and
    what the text tower needs of them, prepared on first use and kept (`encode_prompts`)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, ctx_mask: torch.Tensor,
                 slot_index: torch.Tensor):
        self.input_ids, self.attention_mask, self.ctx_mask = input_ids, attention_mask, ctx_mask
        # [C, L] long: which context row fills each slot (0 elsewhere; read only where ctx_mask)
        self.slot_index = slot_index
        self._onehot: dict[torch.dtype, torch.Tensor] = {}
        self._pool: dict[tuple, torch.Tensor] = {}
        self._masks: dict[tuple, torch.Tensor] = {}
        self._frozen: Optional[tuple[tuple, torch.Tensor]] = None

    @property
    def num_classes(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device) -> "ClassPrompts":
        """These prompts on `device` (themselves if already there; prepared tensors are rebuilt)."""
        if self.input_ids.device == device:
            return self
        return ClassPrompts(self.input_ids.to(device), self.attention_mask.to(device), self.ctx_mask.to(device),
                            self.slot_index.to(device))

    def slot_onehot(self, n_ctx: int, dtype: torch.dtype) -> torch.Tensor:
        """`[C * L, n_ctx]`: 1 where a token takes context row j, 0 elsewhere (whole rows of zeros
        outside the slots). `onehot @ contexts` puts each context row in its slots exactly
        (1 * x + 0 * y + ... = x in floating point), and its backward is a matmul too."""
        onehot = self._onehot.get(dtype)
        if onehot is None or onehot.shape[1] != n_ctx:
            with _for_training():
                hot = torch.nn.functional.one_hot(self.slot_index.reshape(-1), n_ctx).to(dtype)
                onehot = hot * self.ctx_mask.reshape(-1, 1).to(dtype)
            self._onehot[dtype] = onehot
        return onehot

    def pool_index(self, copies: int, eos_token_id: int) -> torch.Tensor:
        """Flat row indices `[copies * C]` of the pooled token in `[copies * C * L]` hidden rows."""
        key = (copies, eos_token_id)
        index = self._pool.get(key)
        if index is None:
            with _for_training():
                eos = pooling_index(self.input_ids, eos_token_id).to(torch.long)
                rows = torch.arange(copies * self.num_classes, device=eos.device)
                index = rows * self.length + eos.repeat(copies)
            self._pool[key] = index
        return index

    def causal_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """`[1, 1, L, L]` additive causal mask for eager attention (0 on and below the diagonal, the
        dtype's minimum above it), as transformers builds it for unpadded rows."""
        key = (dtype,)
        mask = self._masks.get(key)
        if mask is None:
            length = self.length
            with _for_training():
                upper = torch.ones(length, length, dtype=torch.bool, device=self.input_ids.device).triu(1)
                mask = torch.zeros(length, length, dtype=dtype, device=upper.device).masked_fill(
                    upper, torch.finfo(dtype).min).view(1, 1, length, length)
            self._masks[key] = mask
        return mask

    def frozen_embeddings(self, text_model) -> torch.Tensor:
        """`[C, L, D]` token + position embeddings of the prompts, context slots holding only their
        position embedding. Kept while the embedding weights are unchanged (`_stamp`); computed at
        every call, with gradients, if either embedding weight is trainable."""
        embeddings = text_model.embeddings
        token, position = embeddings.token_embedding.weight, embeddings.position_embedding.weight
        if token.requires_grad or position.requires_grad:
            return self._embed(embeddings)
        stamp = _stamp(token, position)
        if self._frozen is None or self._frozen[0] != stamp:
            with _for_training(), torch.no_grad():
                self._frozen = (stamp, self._embed(embeddings))
        return self._frozen[1]

    def _embed(self, embeddings) -> torch.Tensor:
        tokens = embeddings.token_embedding(self.input_ids)
        tokens = tokens.masked_fill(self.ctx_mask.unsqueeze(-1), 0.0)
        positions = embeddings.position_embedding(embeddings.position_ids[:, : self.length])
        return tokens + positions


def attention_mask_for(text_model, prompts: ClassPrompts, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The mask the encoder layers get: None where the attention takes `is_causal` (SDPA, flash),
    the prepared causal mask for eager attention; any other implementation is refused (its
    causal handling is unknown here, and a non-causal text tower would be silently wrong)."""
    implementation = text_model.config._attn_implementation
    if implementation in CAUSAL_FLAG_ATTENTION:
        return None
    if implementation == "eager":
        return prompts.causal_mask(dtype)
    raise ValueError(f"the CLIP text tower uses attn_implementation={implementation!r}, which FDBPL's prompt encoder "
                     f"does not drive (it supports {', '.join(CAUSAL_FLAG_ATTENTION)} and eager): load the CLIP "
                     "with attn_implementation='sdpa' (the default) or 'eager'")


class PreparedText(NamedTuple):
    """The tensors `encode_prepared` reads besides the contexts (all made once, `prepare_text`)."""

    base: torch.Tensor  # [C, L, D] frozen token + position embeddings, slots holding positions only
    onehot: torch.Tensor  # [C * L, n_ctx] which context row fills each token
    pool_index: torch.Tensor  # [S * C] flat index of the pooled (EOS) rows
    attention_mask: Optional[torch.Tensor]  # None (causal flag) or [1, 1, L, L] for eager attention


def prepare_text(clip, prompts: ClassPrompts, copies: int, n_ctx: int,
                 context_dtype: torch.dtype = torch.float32) -> PreparedText:
    """What `encode_prepared` needs for `copies` contexts of `n_ctx` rows: prepared once and kept by
    `prompts` (a dictionary lookup per call, no tensor work unless the frozen weights changed)."""
    text = clip.text_model
    base = prompts.frozen_embeddings(text)
    return PreparedText(base, prompts.slot_onehot(n_ctx, context_dtype), prompts.pool_index(copies, text.eos_token_id),
                        attention_mask_for(text, prompts, base.dtype))


def encode_prepared(clip, prepared: PreparedText, contexts: torch.Tensor) -> torch.Tensor:
    """Projected (not normalised) text features `[S * C, P]` of every class under each of the `S`
    contexts `[S, n_ctx, D]`, in the text tower's dtype: pure tensor work on prepared inputs (a
    compiled or captured step calls it as is).

    The contexts are injected into the prepared embeddings by a one-hot matmul, then transformers'
    encoder layers run causally, and the EOS rows go through the final layer norm and projection.
    The text tower computes in its weights' dtype; when that is bf16/fp16, an enclosing autocast
    is switched off inside it (it would only re-cast frozen weights and activations)."""
    text = clip.text_model
    copies, _, width = contexts.shape
    num_classes, length = prepared.base.shape[0], prepared.base.shape[1]
    dtype = prepared.base.dtype
    # autocast off: an enclosing one (--bf16 without cast_frozen_backbone) would run this matmul in bf16,
    # rounding the contexts before they reach a float32 embedding, and their gradient on the way back
    with torch.autocast(contexts.device.type, enabled=False):
        rows = torch.matmul(prepared.onehot, contexts)  # [S, C * L, D]
    embeds = (prepared.base.reshape(1, -1, width) + rows.to(dtype)).reshape(copies * num_classes, length, width)
    with reduced_precision_block(text, dtype):
        layers = frozen_encoder(text.encoder)
        if layers is not None:
            hidden = layers(embeds, causal=True)
        else:
            hidden = text.encoder(inputs_embeds=embeds, attention_mask=prepared.attention_mask,
                                  is_causal=True).last_hidden_state
        pooled = text.final_layer_norm(hidden.reshape(-1, width).index_select(0, prepared.pool_index))
        projection = clip.text_projection
        return projection(pooled.to(projection.weight.dtype))


def encode_prompts(clip, prompts: ClassPrompts, contexts: torch.Tensor) -> torch.Tensor:
    """`encode_prepared` of `prompts` (see there)."""
    prepared = prepare_text(clip, prompts, contexts.shape[0], contexts.shape[1], contexts.dtype)
    return encode_prepared(clip, prepared, contexts)
