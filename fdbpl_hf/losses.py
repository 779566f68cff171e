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

__all__ = ["PCD_REDUCTIONS", "WEIGHT_MODES", "coop_loss", "fdbpl_loss", "kd_weights", "pcd_loss", "shannon_entropy"]

WEIGHT_MODES = ("soft", "threshold")
PCD_REDUCTIONS = ("mean", "sum")


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # Softmax/entropy in bf16/fp16 loses too much; float64 is kept so gradcheck stays exact.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _xlogy_diff(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """Σ_c p (log p − log q) with 0·(anything) = 0, so −inf teacher logits don't give NaN."""
    term = p * (log_p - log_q)
    return torch.where(p > 0, term, torch.zeros_like(term)).sum(dim=-1)


def shannon_entropy(log_p: Tensor) -> Tensor:
    """Shannon entropy (nats) per row, from log-probabilities (0·log 0 = 0)."""
    p = log_p.exp()
    plogp = p * log_p
    return -torch.where(p > 0, plogp, torch.zeros_like(plogp)).sum(dim=-1)


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
    num_classes = z.shape[1]
    if entropy is not None and tuple(entropy.shape) != (z.shape[0],):
        raise ValueError(f"entropy must be [B] = [{z.shape[0]}], got {tuple(entropy.shape)}")
    if num_classes <= 1:
        return torch.ones(z.shape[0], dtype=z.dtype, device=z.device)
    h = shannon_entropy(F.log_softmax(z, dim=-1)) if entropy is None else entropy.detach().to(z.dtype)
    norm_entropy = (h / math.log(num_classes)).clamp(0.0, 1.0)
    if weight_mode == "threshold":
        return (norm_entropy < entropy_threshold).to(z.dtype)
    return 1.0 - norm_entropy


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
    d_y = (pos_text_features - neg_text_features)[teacher_labels]  # [B, D]
    # g[n, k] = f_n · d_{y_k}; every pairwise dot product comes from this one [B, B] matmul,
    # so the cost is O(B²·D) and never touches a [C, C] table.
    g = image_features @ d_y.T
    diag = g.diagonal()
    a_n = diag[:, None] - g                 # f_n·(d_{y_n} − d_{y_m}) at [n, m]
    a_m = g.T - diag[None, :]               # f_m·(d_{y_n} − d_{y_m}) at [n, m]
    valid = teacher_labels[:, None] != teacher_labels[None, :]  # implies n ≠ m
    pair_w = weights[:, None] * weights[None, :]
    hinge = F.relu(a_m - a_n + margin) * pair_w
    total = torch.where(valid, hinge, torch.zeros_like(hinge)).sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(total.dtype)


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
    s_pos = pos_logits.to(dtype)
    s_neg = neg_logits.to(dtype)
    # The teacher is frozen (its logits come from the RIL table); no loss term trains it.
    z_t = teacher_logits.detach().to(dtype)

    w = kd_weights(z_t, weight_mode=weight_mode, entropy_threshold=entropy_threshold, entropy=teacher_entropy)

    log_p_t = F.log_softmax(z_t, dim=-1)
    log_p_pos = F.log_softmax(s_pos, dim=-1)
    log_p_neg = F.log_softmax(s_neg, dim=-1)

    l_pos = 0.5 * _xlogy_diff(log_p_t.exp(), log_p_t, log_p_pos) + 0.5 * _xlogy_diff(log_p_pos.exp(), log_p_pos,
                                                                                     log_p_t)
    l_neg = -shannon_entropy(log_p_neg)
    l_sim = F.cosine_similarity(s_pos, s_neg, dim=-1, eps=1e-8)

    pos = (w * l_pos).mean()
    neg = ((1.0 - w) * l_neg).mean()
    sim = (w * l_sim).mean()
    total = pos + lambda_neg * neg + lambda_sim * sim

    if use_pcd:
        pcd = pcd_loss(F.normalize(image_features.to(dtype), dim=-1),
                       F.normalize(pos_text_features.to(dtype), dim=-1),
                       F.normalize(neg_text_features.to(dtype), dim=-1),
                       z_t.argmax(dim=-1), w, margin=pcd_margin, reduction=pcd_reduction)
        total = total + lambda_pcd * pcd
    else:
        pcd = torch.zeros((), dtype=dtype, device=s_pos.device)

    return {"total": total, "pos": pos, "neg": neg, "sim": sim, "pcd": pcd, "weight": w.mean().detach()}


def coop_loss(pos_logits: Tensor, labels: Tensor) -> Tensor:
    """CoOp baseline: plain cross-entropy of the positive-prompt logits, in float32."""
    if pos_logits.ndim != 2:
        raise ValueError(f"pos_logits must be [B, C], got {tuple(pos_logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != pos_logits.shape[0]:
        raise ValueError(f"labels must be [B] with B = {pos_logits.shape[0]}, got {tuple(labels.shape)}")
    return F.cross_entropy(pos_logits.to(_compute_dtype(pos_logits)), labels.long())
