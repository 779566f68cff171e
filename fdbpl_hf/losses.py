"""FDBPL training losses (spec §4 RADP and §5 PCD), as pure functions of tensors.

Nothing here knows about models: callers pass student logits for the positive and negative
prompts, the rebuilt dense teacher logits, and the features the logits were made from.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PCD_REDUCTIONS", "WEIGHT_MODES", "coop_loss", "fdbpl_loss", "fdbpl_objective", "kd_weights", "pcd_loss",
           "shannon_entropy"]

WEIGHT_MODES = ("soft", "threshold")
PCD_REDUCTIONS = ("mean", "sum")


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # Softmax/entropy in bf16/fp16 loses too much; float64 is kept so gradcheck stays exact.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def shannon_entropy(log_p: Tensor) -> Tensor:
    """Shannon entropy (nats) per row, from log-probabilities (0·log 0 = 0)."""
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, 0.0).sum(dim=-1)


def _weights_from(num_classes: int, log_p_t: Tensor, p_t: Tensor, weight_mode: str, entropy_threshold: float,
                  entropy: Optional[Tensor]) -> Tensor:
    """kd_weights on an already computed teacher distribution (`log_p_t`, `p_t`: `[B, C]`, detached)."""
    if num_classes <= 1:
        return torch.ones_like(p_t[:, 0])
    if entropy is None:
        h = -torch.where(p_t > 0, p_t * log_p_t, 0.0).sum(dim=-1)
    else:
        h = entropy.detach().to(p_t.dtype)
    norm_entropy = (h * (1.0 / math.log(num_classes))).clamp(0.0, 1.0)
    if weight_mode == "threshold":
        return (norm_entropy < entropy_threshold).to(p_t.dtype)
    return 1.0 - norm_entropy


def kd_weights(teacher_logits: Tensor, weight_mode: str = "soft", entropy_threshold: float = 0.5,
               entropy: Optional[Tensor] = None) -> Tensor:
    """Per-region information weight w_n from the teacher's confidence, detached, shape `[B]`.

    "soft": w = 1 − H(p_T)/log C (1 for a one-hot teacher, 0 for a uniform one);
    "threshold": w = 1 where H(p_T)/log C < entropy_threshold, else 0. With C == 1 w = 1.

    `entropy` `[B]` (nats) is H(p_T) of the teacher's full distribution, as an RIL table stores
    it; without it H is computed from `teacher_logits`. Pass it whenever `teacher_logits` are a
    top-K rebuild: a rebuild's entropy is at most log K, so its weight never falls below
    1 − log K / log C and regions the teacher cannot read would still be distilled.
    """
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {weight_mode!r}")
    if teacher_logits.ndim != 2:
        raise ValueError(f"teacher_logits must be [B, C], got {tuple(teacher_logits.shape)}")
    z = teacher_logits.detach().to(_compute_dtype(teacher_logits))
    if entropy is not None and tuple(entropy.shape) != (z.shape[0],):
        raise ValueError(f"entropy must be [B] = [{z.shape[0]}], got {tuple(entropy.shape)}")
    log_p = F.log_softmax(z, dim=-1)
    return _weights_from(z.shape[1], log_p, log_p.exp(), weight_mode, entropy_threshold, entropy)


def _pcd(image_unit: Tensor, diff: Tensor, labels: Tensor, weights: Tensor, margin: float, reduction: str) -> Tensor:
    """PCD on unit image features `[B, D]` and class differences d_c = t+_c − t-_c `[C, D]`.

    g[n, k] = f_n · d_{y_k}: every pairwise dot product comes from this one [B, B] matmul, so the
    cost is O(B²·D) and never touches a [C, C] table. With Δ = d_{y_n} − d_{y_m}, the hinge's
    argument f_m·Δ − f_n·Δ is g[m, n] − g[m, m] − g[n, n] + g[n, m]."""
    g = image_unit @ diff.index_select(0, labels).T
    diag = g.diagonal()
    hinge = F.relu((g + g.T) - (diag[:, None] + diag[None, :]) + margin)
    valid = labels[:, None] != labels[None, :]  # implies n ≠ m
    total = torch.where(valid, hinge * (weights[:, None] * weights[None, :]), 0.0).sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(total.dtype)


def pcd_loss(image_features: Tensor, pos_text_features: Tensor, neg_text_features: Tensor,
             teacher_labels: Tensor, weights: Tensor, margin: float = 0.2, reduction: str = "mean") -> Tensor:
    """Pairwise class-difference ranking loss (spec §5) on already L2-normalised features.

    With d_c = t+_c − t-_c and, for each ordered region pair (n, m) with y_n ≠ y_m,
    Δ = d_{y_n} − d_{y_m}: loss w_n w_m max(0, f_m·Δ − f_n·Δ + margin), averaged over the valid
    pairs (`reduction="mean"`) or summed over them (`"sum"`, the authors' commented-out form);
    0 (still attached to the graph) when there are none.
    """
    if reduction not in PCD_REDUCTIONS:
        raise ValueError(f"reduction must be one of {PCD_REDUCTIONS}, got {reduction!r}")
    return _pcd(image_features, pos_text_features - neg_text_features, teacher_labels, weights, margin, reduction)


def _check_shapes(pos_logits: Tensor, neg_logits: Tensor, teacher_logits: Tensor, image_features: Tensor,
                  pos_text_features: Tensor, neg_text_features: Tensor) -> None:
    for name, t in (("pos_logits", pos_logits), ("neg_logits", neg_logits), ("teacher_logits", teacher_logits),
                    ("image_features", image_features), ("pos_text_features", pos_text_features),
                    ("neg_text_features", neg_text_features)):
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if pos_logits.shape[0] == 0 or pos_logits.shape[1] == 0:
        raise ValueError(f"pos_logits must be a non-empty [B, C], got {tuple(pos_logits.shape)}")
    b, c = pos_logits.shape
    for name, t in (("neg_logits", neg_logits), ("teacher_logits", teacher_logits)):
        if t.shape != pos_logits.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must match pos_logits [B, C] = {(b, c)}")
    if image_features.shape[0] != b:
        raise ValueError(f"image_features has {image_features.shape[0]} rows but the logits have B = {b}")
    d = image_features.shape[1]
    for name, t in (("pos_text_features", pos_text_features), ("neg_text_features", neg_text_features)):
        if t.shape[0] != c:
            raise ValueError(f"{name} has {t.shape[0]} classes but the logits have C = {c}")
        if t.shape[1] != d:
            raise ValueError(f"{name} has feature dim {t.shape[1]} but image_features has D = {d}")


def fdbpl_loss(pos_logits: Tensor, neg_logits: Tensor, teacher_logits: Tensor, image_features: Tensor,
               pos_text_features: Tensor, neg_text_features: Tensor, *, lambda_neg: float = 1.0,
               lambda_sim: float = 0.001, lambda_pcd: float = 1.0, pcd_margin: float = 0.2, use_pcd: bool = True,
               weight_mode: str = "soft", entropy_threshold: float = 0.5, teacher_entropy: Optional[Tensor] = None,
               pcd_reduction: str = "mean") -> dict[str, Tensor]:
    """FDBPL objective: RADP (spec §4) plus PCD (spec §5).

    Args:
        pos_logits, neg_logits: student logits `[B, C]` from the positive / negative prompts.
        teacher_logits: rebuilt dense teacher logits `[B, C]`; treated as a fixed target.
        teacher_entropy: `[B]` entropy (nats) of the teacher's full distribution, which the
            information weights use (an RIL table stores it); `None` computes it from
            `teacher_logits`, exact only when they are the full logits (online, or K = C).
        image_features: student image features `[B, D]` (normalised here).
        pos_text_features, neg_text_features: student text features `[C, D]` (normalised here).
        use_pcd: False reproduces the released code, whose PCD term is identically zero.
        pcd_reduction: "mean" averages the PCD hinge over valid region pairs, "sum" sums it.
        lambda_pcd: 1.0 with the mean, the ablations' winner (docs/ablations.md; the spec's 0.1
            left PCD inert); the defaults equal `FDBPLTrainingArguments`'.

    Returns:
        Scalar tensors `pos`, `neg`, `sim`, `pcd`, `total` and the detached mean weight `weight`,
        all in float32 (float64 if any input is float64).
    """
    _check_shapes(pos_logits, neg_logits, teacher_logits, image_features, pos_text_features, neg_text_features)
    dtype = _compute_dtype(pos_logits, neg_logits, teacher_logits, image_features, pos_text_features,
                           neg_text_features)
    logits = torch.stack([pos_logits.to(dtype), neg_logits.to(dtype)], dim=1)
    image_unit = F.normalize(image_features.to(dtype), dim=-1)
    text_unit = F.normalize(torch.cat([pos_text_features.to(dtype), neg_text_features.to(dtype)]), dim=-1)
    return fdbpl_objective(logits, teacher_logits, image_unit, text_unit, lambda_neg=lambda_neg,
                           lambda_sim=lambda_sim, lambda_pcd=lambda_pcd, pcd_margin=pcd_margin, use_pcd=use_pcd,
                           weight_mode=weight_mode, entropy_threshold=entropy_threshold,
                           teacher_entropy=teacher_entropy, pcd_reduction=pcd_reduction)


def fdbpl_objective(logits: Tensor, teacher_logits: Tensor, image_unit: Tensor, text_unit: Tensor, *,
                    lambda_neg: float = 1.0, lambda_sim: float = 0.001, lambda_pcd: float = 1.0,
                    pcd_margin: float = 0.2, use_pcd: bool = True, weight_mode: str = "soft",
                    entropy_threshold: float = 0.5, teacher_entropy: Optional[Tensor] = None,
                    pcd_reduction: str = "mean") -> dict[str, Tensor]:
    """`fdbpl_loss` on the forward pass's own layout, with few kernels (a training step calls it):
    `logits` `[B, 2, C]` (positive prompts, then negative), L2-normalised `image_unit` `[B, D]`
    and `text_unit` `[2 * C, D]` (the C positive prompts' features, then the C negative ones).
    Shapes are not checked here (`fdbpl_loss` checks them). Same terms, same dtypes."""
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {weight_mode!r}")
    if pcd_reduction not in PCD_REDUCTIONS:
        raise ValueError(f"pcd_reduction must be one of {PCD_REDUCTIONS}, got {pcd_reduction!r}")
    dtype = _compute_dtype(logits, teacher_logits, image_unit, text_unit)
    s = logits.to(dtype)
    num_classes = s.shape[-1]
    if teacher_entropy is not None and tuple(teacher_entropy.shape) != (s.shape[0],):
        raise ValueError(f"entropy must be [B] = [{s.shape[0]}], got {tuple(teacher_entropy.shape)}")
    # The teacher is frozen (its logits come from the RIL table); no loss term trains it.
    z_t = teacher_logits.detach().to(dtype)
    log_p_t = F.log_softmax(z_t, dim=-1)
    p_t = log_p_t.exp()
    w = _weights_from(num_classes, log_p_t, p_t, weight_mode, entropy_threshold, teacher_entropy)
    log_p = F.log_softmax(s, dim=-1)  # both prompts' distributions at once
    p = log_p.exp()
    p_pos, log_p_pos, p_neg, log_p_neg = p[:, 0], log_p[:, 0], p[:, 1], log_p[:, 1]
    # symmetric KL: ½ Σ p_t (log p_t − log p_s) + ½ Σ p_s (log p_s − log p_t)
    #             = ½ Σ (p_t − p_s)(log p_t − log p_s), with 0·(anything) = 0 where both are 0 (so −inf teacher logits don't give NaN; a NaN teacher still does)
    kl = torch.where((p_t > 0) | (p_pos > 0), (p_t - p_pos) * (log_p_t - log_p_pos), 0.0)
    l_pos = 0.5 * kl.sum(dim=-1)
    l_neg = torch.where(p_neg > 0, p_neg * log_p_neg, 0.0).sum(dim=-1)  # −H(p_neg)
    # cosine similarity of the two logit rows (as F.cosine_similarity: each row over its norm, eps 1e-8)
    unit = s / torch.linalg.vector_norm(s, dim=-1, keepdim=True).clamp_min(1e-8)
    l_sim = (unit[:, 0] * unit[:, 1]).sum(dim=-1)
    weighted = torch.stack([w * l_pos, (1.0 - w) * l_neg, w * l_sim]).mean(dim=-1)
    pos, neg, sim = weighted.unbind()
    total = pos + lambda_neg * neg + lambda_sim * sim
    if use_pcd:
        text = text_unit.to(dtype)
        diff = text[:num_classes] - text[num_classes:]
        pcd = _pcd(image_unit.to(dtype), diff, z_t.argmax(dim=-1), w, pcd_margin, pcd_reduction)
        total = total + lambda_pcd * pcd
    else:
        pcd = torch.zeros((), dtype=dtype, device=s.device)
    return {"total": total, "pos": pos, "neg": neg, "sim": sim, "pcd": pcd, "weight": w.mean().detach()}


def coop_loss(pos_logits: Tensor, labels: Tensor) -> Tensor:
    """CoOp baseline: plain cross-entropy of the positive-prompt logits, in float32."""
    if pos_logits.ndim != 2:
        raise ValueError(f"pos_logits must be [B, C], got {tuple(pos_logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != pos_logits.shape[0]:
        raise ValueError(f"labels must be [B] with B = {pos_logits.shape[0]}, got {tuple(labels.shape)}")
    return F.cross_entropy(pos_logits.to(_compute_dtype(pos_logits)), labels.long())
