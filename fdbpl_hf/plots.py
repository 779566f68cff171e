"""Evaluation and training plots as PNG files (matplotlib, optional).

Figures are drawn on an explicit Agg canvas, never through `pyplot`, so importing this module
does not change the global matplotlib backend of a notebook or GUI session.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Mapping, Sequence, Union

from .files import atomic_write, read_json

__all__ = ["plot_base_novel", "plot_loss_curves", "plot_per_class_accuracy"]

PathLike = Union[str, os.PathLike]
LOSS_KEYS = ("loss", "loss_pos", "loss_neg", "loss_sim", "loss_pcd")
_LOSS_LABELS = {"loss": "total", "loss_pos": "positive (RADP)", "loss_neg": "negative (RADP)",
                "loss_sim": "pos/neg similarity", "loss_pcd": "PCD", "loss_weight": "mean information weight"}


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # optional dependency
        raise ImportError("fdbpl_hf.plots needs matplotlib: pip install matplotlib") from err
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write(path, buffer.getvalue())  # a crash never leaves half a PNG


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def plot_per_class_accuracy(per_class: Mapping[str, Any], path: PathLike, *, title: str = "Per-class accuracy",
                            max_classes: int = 60) -> str:
    """Horizontal bars of per-class accuracy (percent); returns `path`.

    `per_class` is {class: acc} or grouped {group: {class: acc}} (e.g. base/novel, coloured by
    group). Classes without test images (None/NaN) are listed as "n/a". With more than
    `max_classes` classes only the worst and best halves are drawn (the title says so).
    """
    if not per_class:
        raise ValueError("per_class is empty: nothing to plot")
    grouped = all(isinstance(v, Mapping) for v in per_class.values())
    rows: list[tuple[str, Any, str]] = []  # (class, acc, group)
    if grouped:
        for group, accs in per_class.items():
            rows += [(str(name), acc, str(group)) for name, acc in accs.items()]
    else:
        rows = [(str(name), acc, "") for name, acc in per_class.items()]
    if not rows:
        raise ValueError("per_class has no classes: nothing to plot")
    note = ""
    if len(rows) > max_classes:
        # Keep the extremes: the classes a reader most wants to see on a large label set.
        known = sorted((r for r in rows if not _is_missing(r[1])), key=lambda r: r[1])
        half = max_classes // 2
        rows = known[:half] + known[-half:] if len(known) > 2 * half else known
        note = f" ({max_classes} of {len(known)}: lowest and highest)"
    groups = list(dict.fromkeys(g for _, _, g in rows))
    colours = {g: f"C{i}" for i, g in enumerate(groups)}
    fig = _figure(7.0, 1.2 + 0.24 * len(rows))
    ax = fig.add_subplot()
    y = list(range(len(rows)))[::-1]  # first class on top
    values = [0.0 if _is_missing(acc) else float(acc) for _, acc, _ in rows]
    ax.barh(y, values, color=[colours[g] for _, _, g in rows], height=0.7)
    for yi, (_, acc, _) in zip(y, rows):
        text = "n/a" if _is_missing(acc) else f"{float(acc):.1f}"
        ax.text((0 if _is_missing(acc) else float(acc)) + 1, yi, text, va="center", fontsize=8)
    ax.set_yticks(y, [name for name, _, _ in rows], fontsize=8)
    ax.set_xlim(0, 110)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("accuracy (%)")
    ax.set_title(title + note)
    if grouped and len(groups) > 1:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=colours[g], label=g) for g in groups], loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def _base_novel(values: Mapping[str, Any]) -> tuple[float, float, float]:
    base = values.get("base_acc", values.get("base"))
    novel = values.get("novel_acc", values.get("novel"))
    if base is None or novel is None:
        raise KeyError(f"expected base/novel accuracies ('base_acc'/'novel_acc' or 'base'/'novel'), got {list(values)}")
    hm = values.get("hm")
    if hm is None:
        from .metrics import harmonic_mean

        hm = harmonic_mean(base, novel)
    return float(base), float(novel), float(hm)


def plot_base_novel(results: Mapping[str, Mapping[str, Any]], path: PathLike, *,
                    title: str = "Base-to-novel accuracy") -> str:
    """Grouped bars, base vs novel accuracy (percent) per entry, HM written above each group.

    `results`: {label: {"base_acc", "novel_acc", ["hm"]}} with one label per dataset or method
    (`evaluate_base_to_novel` output works as is; "base"/"novel" keys too). Returns `path`.
    """
    if not results:
        raise ValueError("results is empty: nothing to plot")
    labels = list(results)
    triples = [_base_novel(results[k]) for k in labels]
    fig = _figure(max(4.5, 1.3 * len(labels) + 2), 4.0)
    ax = fig.add_subplot()
    width = 0.38
    xs = range(len(labels))
    ax.bar([x - width / 2 for x in xs], [t[0] for t in triples], width, label="base", color="C0")
    ax.bar([x + width / 2 for x in xs], [t[1] for t in triples], width, label="novel", color="C1")
    for x, (base, novel, hm) in zip(xs, triples):
        ax.text(x, max(base, novel) + 2, f"HM {hm:.1f}", ha="center", fontsize=9, fontweight="bold")
    ax.set_xticks(list(xs), labels, rotation=20 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    ax.set_ylim(0, 125)  # headroom above 100% for the HM labels and the legend
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="upper right", ncols=2, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_loss_curves(log_history: Union[Sequence[Mapping[str, Any]], PathLike], path: PathLike, *,
                     keys: Sequence[str] = LOSS_KEYS, title: str = "FDBPL training losses") -> str:
    """One panel per logged loss term vs step, from the trainer's `log_history` (or a JSON file of
    it, such as the `trainer_state.json` that `Trainer.save_state` writes).

    Terms live on different scales (the negative loss is a negative entropy), so each gets its
    own y axis. Evaluation entries (`eval_loss_*`) are drawn dashed when present. Returns `path`.
    """
    if isinstance(log_history, (str, os.PathLike)):
        log_history = read_json(log_history, "pass the trainer_state.json the Trainer wrote (in output_dir or a "
                                             "checkpoint folder) or its log_history list")
        if isinstance(log_history, Mapping) and "log_history" in log_history:  # the Trainer's trainer_state.json
            log_history = log_history["log_history"]
    if not isinstance(log_history, Sequence):
        raise TypeError("log_history must be the trainer's state.log_history (a list of dicts) or its JSON path")
    present = [k for k in keys if any(k in h or f"eval_{k}" in h for h in log_history)]
    if not present:
        raise ValueError(f"log_history has none of the loss keys {list(keys)}: was logging enabled (logging_steps)?")
    cols = min(3, len(present))
    rows = math.ceil(len(present) / cols)
    fig = _figure(4.0 * cols, 2.8 * rows)
    for i, key in enumerate(present):
        ax = fig.add_subplot(rows, cols, i + 1)
        for prefix, style in (("", "-"), ("eval_", "--")):
            points = [(h.get("step", j), h[prefix + key]) for j, h in enumerate(log_history)
                      if prefix + key in h and not _is_missing(h[prefix + key])]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="." if len(points) < 30 else None,
                        label="eval" if prefix else "train", color=f"C{i}")
        ax.set_title(f"{key} — {_LOSS_LABELS.get(key, key)}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if any(f"eval_{key}" in h for h in log_history):
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)
