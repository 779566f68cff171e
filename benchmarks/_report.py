"""Shared printing helpers of the benchmark scripts (markdown tables, verdicts, machine facts)."""

import time


def now() -> float:
    return time.perf_counter()


def md_table(header: list, rows: list) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        return "?"


# Caltech101's 50 base classes (CoOp label order, underscores as spaces): a typical base split
# (Caltech101, Flowers102, Food101, FGVCAircraft and UCF101 all have 50-51 base classes).
CALTECH_BASE = [
    "face", "leopard", "motorbike", "accordion", "airplane", "anchor", "ant", "barrel", "bass", "beaver",
    "binocular", "bonsai", "brain", "brontosaurus", "buddha", "butterfly", "camera", "cannon", "car side",
    "ceiling fan", "cellphone", "chair", "chandelier", "cougar body", "cougar face", "crab", "crayfish",
    "crocodile", "crocodile head", "cup", "dalmatian", "dollar bill", "dolphin", "dragonfly", "electric guitar",
    "elephant", "emu", "euphonium", "ewer", "ferry", "flamingo", "flamingo head", "garfield", "gerenuk",
    "gramophone", "grand piano", "hawksbill", "headphone", "hedgehog", "helicopter",
]
