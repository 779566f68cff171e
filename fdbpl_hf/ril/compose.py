"""Composed tables: several teachers' RIL tables over the same regions, mixed per region at replay.

A table's regions depend only on its source images, region spec, seed and M (`region_rng(seed, row)`
draws them), never on its teacher or K: tables built by different teachers with those settings
alike hold the same boxes and flips in the same rows. Their *region key* (`region_key`, stored in
the metadata from 0.7 on and recomputed for older tables) hashes exactly these settings and the
class names in order, so two tables compose when their keys are equal; `check_composable` names
the first setting in which they differ.

Mixing follows `EnsembleTeacher` (the joint build, both teachers run together): per region,
table t gets `weights[t]`, times its confidence for "max_prob" (its top probability) or
"entropy" (its information weight 1 - H/log C), renormalised over tables. Both confidences are
exact from a table at any K: the top probability is its first stored log-probability and H its
stored full-distribution entropy. The mixed distribution is approximate at K < C: it mixes each
table's top-K rebuild (`dense_teacher_logits`), which misses each teacher's probability mass
outside its top K. Its entropy, which the information weights need, is
`sum_t w_t H_t + sum_t w_t KL(p_t || m)` (exactly H(m) for the full distributions): the first term
from the stored entropies (exact), the second, the mixture's divergence term, from the rebuilds.
docs/ril-tables.md gives the measured distances to the joint build.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..integrity import json_digest
from .regions import RegionSpec

# how several teachers' distributions mix per region; "confidence" is another name of "max_prob"
TEACHER_WEIGHTINGS = ("fixed", "max_prob", "entropy")
WEIGHTING_ALIASES = {"confidence": "max_prob"}
REGION_KEY = "region_key"  # where a table's metadata keeps its region key (tables from 0.7 on)


def resolve_weighting(weighting: str) -> str:
    """`weighting` as one of `TEACHER_WEIGHTINGS` ("confidence" is "max_prob"); other names raise."""
    resolved = WEIGHTING_ALIASES.get(weighting, weighting)
    if resolved not in TEACHER_WEIGHTINGS:
        raise ValueError(f"teacher weighting must be one of {TEACHER_WEIGHTINGS + tuple(WEIGHTING_ALIASES)}, got "
                         f"{weighting!r}")
    return resolved


def fixed_weights(weights: Optional[Sequence[float]], count: int, what: str = "teachers") -> torch.Tensor:
    """`weights` (default equal) as a float32 tensor summing to 1; refused unless `count` finite
    non-negative numbers with a positive sum."""
    try:  # a number or a string (e.g. one JSON value for the list) is not a list of weights
        values = [1.0] * count if weights is None else \
            None if isinstance(weights, (str, bytes)) else [float(v) for v in weights]
    except (TypeError, ValueError):
        values = None
    w = torch.tensor(values if values is not None else [], dtype=torch.float32)
    if w.shape != (count,) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {count} finite non-negative numbers (one per {what[:-1]}) with a positive "
                         f"sum, got {weights!r}")
    return w / w.sum()


def region_confidence(weighting: str, max_prob: torch.Tensor, entropy: Optional[torch.Tensor],
                      num_classes: int) -> Optional[torch.Tensor]:
    """Each member's confidence per region `[members, B]`: its top probability ("max_prob") or its
    information weight 1 - H/log C ("entropy"); None for "fixed". `max_prob` and `entropy` are
    `[members, B]` (entropy in nats, of each member's full distribution)."""
    if weighting == "fixed":
        return None
    if weighting == "max_prob":
        return max_prob
    if entropy is None:
        raise ValueError("entropy weighting needs each member's entropy")
    if num_classes <= 1:
        return torch.ones_like(entropy)
    return (1 - entropy / math.log(num_classes)).clamp(0.0, 1.0)


def mixing_weights(fixed: torch.Tensor, confidence: Optional[torch.Tensor], batch: int) -> torch.Tensor:
    """Per-region mixing weights `[members, B]`, summing to 1 over members: `fixed[m] * confidence[m, b]`
    renormalised (the fixed weights alone without a confidence, and where every member's confidence
    is 0, never 0/0)."""
    fixed = fixed.to(confidence.device if confidence is not None else fixed.device).view(-1, 1)
    if confidence is None:
        return fixed.expand(-1, batch)
    raw = fixed * confidence
    total = raw.sum(0, keepdim=True)
    return torch.where(total > 0, raw / total.clamp_min(1e-12), fixed.expand_as(raw))


def mix_soft_labels(log_probs: torch.Tensor, fixed: torch.Tensor, weighting: str, max_log_probs: torch.Tensor,
                    entropies: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Mix several tables' soft labels of the same regions.

    Args:
        log_probs: `[T, B, C]` each table's rebuilt log-probabilities (log-softmax of its
            `dense_teacher_logits`).
        fixed: `[T]` fixed weights summing to 1 (`fixed_weights`).
        weighting: "fixed", "max_prob" or "entropy" (`resolve_weighting`).
        max_log_probs: `[T, B]` each table's largest stored log-probability (its top class's,
            exact at any K).
        entropies: `[T, B]` each table's stored full-distribution entropy (nats), or None (tables
            of 0.3): then no mixture entropy is returned and "entropy" weighting is refused.

    Returns:
        `(log_mix [B, C], entropy [B] or None, weights [T, B])`: the log of the weighted mixture of
        the rebuilt distributions, the mixture's entropy estimated as
        `sum_t w_t H_t + sum_t w_t KL(p_t || mix)` (stored entropies, divergence from the rebuilds;
        clamped to [0, log C]) and the per-region mixing weights.
    """
    if log_probs.ndim != 3:
        raise ValueError(f"log_probs must be [tables, B, C], got {tuple(log_probs.shape)}")
    num_tables, batch, num_classes = log_probs.shape
    confidence = region_confidence(weighting, max_log_probs.exp(), entropies, num_classes)
    weights = mixing_weights(fixed, confidence, batch)  # [T, B]
    log_w = weights.clamp_min(0).log().unsqueeze(-1)  # log 0 = -inf: a table without a say drops out
    log_mix = torch.logsumexp(log_probs + log_w, dim=0)  # [B, C], no clamp: exact in log space
    entropy = None
    if entropies is not None:
        p = log_probs.exp()
        # KL(p_t || mix) with 0 log 0 = 0 (a dense table may hold p = 0 exactly)
        term = torch.where(p > 0, p * (log_probs - log_mix.unsqueeze(0)), torch.zeros_like(p)).sum(-1)  # [T, B]
        entropy = (weights * (entropies + term.clamp_min(0))).sum(0)
        entropy = entropy.clamp(0.0, math.log(num_classes)) if num_classes > 1 else torch.zeros_like(entropy)
    return log_mix, entropy, weights


# ---- which tables compose --------------------------------------------------------------------------
def source_identity(source: dict) -> str:
    """What identifies a table's source images and labels, in row order: the per-image digests
    (tables from 0.4 on), else the 0.3 fingerprint, which hashed a sample of the images."""
    digests = source.get("image_digests")
    if digests is not None:
        return "digests:" + json_digest(digests, 32)
    return "fingerprint-0.3:" + str(source.get("fingerprint"))


def region_settings(metadata: dict) -> dict:
    """The settings that decide a table's regions and the meaning of its class ids: source images
    (and labels) in order, region spec, seed, M, class names in order. Not the teacher, K, fill or
    library version. The region spec is read as replay reads it (fields older tables lack take the
    values they were built with)."""
    source = metadata["source"]
    try:
        regions = RegionSpec.from_dict(metadata["regions"]).to_dict()
    except (ValueError, TypeError):  # settings replay refuses (it says so); as stored, to compare them
        regions = dict(metadata["regions"])
    return {
        "source": {"num_rows": int(source["num_rows"]), "images": source_identity(source)},
        "regions": regions,
        "seed": int(metadata["seed"]),
        "class_names": list(metadata["class_names"]),
        "num_regions": int(metadata["num_regions"]),
    }


def region_key(metadata: dict) -> str:
    """The composability key of a table: equal keys, equal regions row for row and the same
    classes (`region_settings`). Computed from any table's metadata (0.1 on)."""
    return json_digest(region_settings(metadata), 16)


def region_difference(first: dict, other: dict) -> Optional[str]:
    """The first setting in which two tables' regions or classes differ (source images, region
    spec, seed, class names and order, M), as a sentence; None when they compose."""
    a, b = region_settings(first), region_settings(other)
    if a["source"]["num_rows"] != b["source"]["num_rows"]:
        return (f"source dataset: built on {a['source']['num_rows']} vs {b['source']['num_rows']} images (another "
                "dataset, split or few-shot draw)")
    if a["source"]["images"] != b["source"]["images"]:
        kinds = {s.split(":")[0] for s in (a["source"]["images"], b["source"]["images"])}
        hint = (" (one table predates per-image digests, fdbpl_hf < 0.4, and records its source another way: "
                "rebuild it)" if len(kinds) > 1 else " (another dataset, few-shot draw or order of the same size)")
        return (f"source dataset: the images or labels differ (fingerprints {first['source'].get('fingerprint')} vs "
                f"{other['source'].get('fingerprint')}){hint}")
    if a["regions"] != b["regions"]:
        fields = [k for k in a["regions"] if a["regions"][k] != b["regions"].get(k)]
        return "region spec: " + ", ".join(f"{k} {a['regions'][k]!r} vs {b['regions'].get(k)!r}" for k in fields)
    if a["seed"] != b["seed"]:
        return f"region seed: {a['seed']} vs {b['seed']}"
    if a["class_names"] != b["class_names"]:
        na, nb = a["class_names"], b["class_names"]
        if len(na) != len(nb):
            return f"class names: {len(na)} vs {len(nb)} classes"
        i = next(i for i, (x, y) in enumerate(zip(na, nb)) if x != y)
        order = " (the same classes in another order)" if sorted(na) == sorted(nb) else ""
        return f"class names and order: class {i} is {na[i]!r} vs {nb[i]!r}{order}"
    if a["num_regions"] != b["num_regions"]:
        return f"regions per image M: {a['num_regions']} vs {b['num_regions']}"
    return None


def check_composable(metadatas: Sequence[dict], names: Optional[Sequence[str]] = None) -> None:
    """Refuse tables whose rows do not align: a `ValueError` naming the first table that differs
    from the first one, and the first setting in which it differs."""
    names = list(names) if names is not None else [f"table {i}" for i in range(len(metadatas))]
    for i in range(1, len(metadatas)):
        difference = region_difference(metadatas[0], metadatas[i])
        if difference is not None:
            raise ValueError(f"{names[i]} cannot be composed with {names[0]}: their regions do not align. First "
                             f"difference: {difference}. Tables compose when built on the same dataset with the same "
                             "region spec, seed, class names (in order) and M (region key "
                             f"{region_key(metadatas[0])} vs {region_key(metadatas[i])}); rebuild one with the "
                             "other's settings.")
