#!/usr/bin/env python
"""Speed claim (spec §1, §6): offline FDBPL (RIL table) vs the online-teacher baseline, same student.

    python benchmarks/speed.py                            # full run (about 100 s on 2 idle CPU cores)
    python benchmarks/speed.py --quick                    # smoke run (< 1 minute)
    python benchmarks/speed.py --threads 1 --clock cpu    # on a shared, busy machine (about 3 minutes)

The paper claims 2.2x faster training than online distillation (PromptKD/KDPL) because the
ViT-L/14 teacher runs once, offline, instead of at every step. This script:

1. counts the FLOPs of the *real* models (teacher ViT-L/14 image tower, student ViT-B/32 image
   tower, student text tower forward + backward per class prompt) and derives the per-step cost
   of both modes and the theoretical speed-up limit (online step / offline step);
2. builds scaled-down random-weight CLIPs that keep the real cost ratios (every tower at 1/4 of its
   width, about half its depth; image 112 px with patches 7 and 16 so the teacher still sees 257
   tokens and the student 50), measures the three costs here, compares their ratios with the real
   FLOP ratios and recalibrates the teacher's and the text tower's depths from the measurement
   (GFLOP/s differ between these shapes, and between machines and thread counts);
3. builds the RIL table once (timed, not counted in the steps) and runs `FDBPLTrainer` in both
   modes on the same images and regions, plus a pure student step (forward + loss + backward +
   SGD on pre-rendered batches, no data loading, no Trainer) that gives the measured limit.
   The modes run in interleaved rounds so that load from other processes hits them alike.

Timings: `torch.set_num_threads(2)` (change with --threads), `dataloader_num_workers=0` (the
replay runs in the training process, so the offline step pays for it in full). A step is the
time between two consecutive `on_step_end` callbacks: it includes fetching and collating the
batch, which the Trainer does before `on_step_begin`. Nothing is asserted on timings; goals are
printed as PASS/MISS. All weights are random (nothing is downloaded): costs do not depend on them.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass, field, replace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# first: sets the offline environment and puts the checkout's fdbpl_hf on the path
from common import (  # noqa: E402
    CALTECH_BASE, CLOCKS, StepTimer, cpu_now, cpu_share_probe, load_average, machine_facts as common_facts, md_table,
    now, scaled_clip_config, section, torch_threads, verdict,
)
import datasets  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402
from flops import Tower, real_models, step_flops, text_tower, vit  # noqa: E402
from fdbpl_hf import (  # noqa: E402
    CLIPTeacher, FDBPLConfig, RegionSpec, RILDataset, build_feature_cache, build_ril_table, dense_teacher_logits,
    get_fdbpl_model,
)
from fdbpl_hf.losses import fdbpl_loss  # noqa: E402
from fdbpl_hf.testing.worlds import clip_tokenizer, load_digits  # noqa: E402
from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402
from fdbpl_hf.trainer import FDBPLTrainer, FDBPLTrainingArguments  # noqa: E402


TEACHER_PATCH_TOKENS, STUDENT_PATCH_TOKENS = 16, 7  # patches per side: 257 and 50 tokens, as at 224 px


# ---------------------------------------------------------------------------------------------
# helpers




def gf(flops: float) -> str:
    return f"{flops / 1e9:,.2f}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def machine_facts(args) -> float:
    share = cpu_share_probe()
    common_facts(
        ["dataloader_num_workers", "0 (replay runs in the training process, in every mode)"],
        ["CPU share probe (GEMM on all threads)", f"{share:.2f} CPU-s/s of {torch.get_num_threads()}"],
        ["mode", ("quick (smoke run)" if args.quick else "full") + f", {args.clock} clock"],
    )
    if args.clock == "wall" and share < 0.8 * torch.get_num_threads():
        print(f"\n**WARNING: the machine is busy** (load average {load_average():.2f}, this process gets "
              f"{share:.2f} of {torch.get_num_threads()} threads' CPU): wall times with several threads will be "
              "inflated and scattered. For numbers on a shared machine use `--threads 1 --clock cpu`.")
    return share


# ---------------------------------------------------------------------------------------------
# 1. FLOP accounting of the real models

def flop_section(args, prompt_tokens: int) -> dict:
    section("1. FLOPs of the real models (analytic)")
    print("Counting: 1 multiply-add = 2 FLOPs; every matrix product (patch embedding, QKV/output "
          "projections, MLP, attention scores and attention x values, final projection); LayerNorm, "
          "softmax, GELU, embeddings and the loss are left out (< 1%). Image towers run without "
          "gradients (forward only). The student text tower is frozen but the contexts at its input "
          "need gradients: backward = activation gradients only, i.e. 1x forward for every weight "
          "GEMM (autograd skips the weight-gradient GEMM of a `requires_grad=False` weight) and 2x "
          "for the two attention products (both operands are activations), so text fwd+bwd ~ 2x fwd.\n")
    print(f"Text sequence length: our prompts are padded to the longest class prompt, "
          f"`[SOS] ctx x4 <name> . [EOS]` = **{prompt_tokens} tokens** for the {args.classes} classes used "
          f"below; CoOp/KDPL-style code pads every prompt to 77, shown for reference.\n")
    rows, result = [], {}
    for tokens in (prompt_tokens, 77):
        m = real_models(tokens)
        t, s = m["teacher_image"].forward(), m["student_image"].forward()
        x = m["student_text"].forward_backward_frozen()
        if tokens == prompt_tokens:
            result = {"teacher": t, "student_image": s, "text": x, "towers": m}
        for c in sorted({args.classes, 50, 500}):
            f = step_flops(t, s, x, args.batch, c)
            rows.append([tokens, c, gf(t), gf(s), gf(x), gf(f.teacher), gf(f.student_image), gf(f.student_text),
                         gf(f.online), gf(f.offline), f"{f.limit:.2f}x"])
    print(md_table(["text tokens", "C", "teacher img fwd GF/img", "student img fwd GF/img",
                    "text fwd+bwd GF/class prompt", f"teacher x{args.batch}", f"student img x{args.batch}",
                    "text x 2C", "online step GF", "offline step GF", "limit online/offline"], rows))
    t, s, x = result["teacher"], result["student_image"], result["text"]
    print(f"\nTowers: teacher {result['towers']['teacher_image'].tokens} tokens x 1024 x 24 layers "
          f"(MLP 4096); student image {result['towers']['student_image'].tokens} tokens x 768 x 12; text "
          f"{prompt_tokens} tokens x 512 x 12 (8 heads). Per step: online = B x teacher + B x student image "
          f"+ 2C x text (positive and negative prompt of every class); offline = the same minus the teacher.")
    print(f"\nReal cost ratios to keep: teacher : student image : text per class prompt = "
          f"{t / x:.1f} : {s / x:.2f} : 1  (teacher/student image = {t / s:.2f}, student image/text = {s / x:.2f}).")
    result["ratio_ts"], result["ratio_sx"] = t / s, s / x
    return result


# ---------------------------------------------------------------------------------------------
# 2. scaled-down models

@dataclass
class Scaled:
    image_size: int
    teacher_width: int
    teacher_layers: int
    student_width: int
    student_layers: int
    text_width: int
    text_layers: int

    @property
    def teacher_patch(self) -> int:
        return self.image_size // TEACHER_PATCH_TOKENS

    @property
    def student_patch(self) -> int:
        return self.image_size // STUDENT_PATCH_TOKENS

    def towers(self, prompt_tokens: int) -> dict[str, Tower]:
        return {
            "teacher_image": vit("teacher image", self.image_size, self.teacher_patch, self.teacher_width,
                                 self.teacher_layers, self.text_width),
            "student_image": vit("student image", self.image_size, self.student_patch, self.student_width,
                                 self.student_layers, self.text_width),
            "student_text": text_tower("student text", prompt_tokens, self.text_width, self.text_layers,
                                       self.text_width),
        }


def build_models(cfg: Scaled, class_names: list[str], tokenizer):
    from transformers import CLIPModel

    if cfg.image_size % TEACHER_PATCH_TOKENS or cfg.image_size % STUDENT_PATCH_TOKENS:
        raise SystemExit(f"--image-size must be a multiple of 112 (patches {TEACHER_PATCH_TOKENS} and "
                         f"{STUDENT_PATCH_TOKENS} per side), got {cfg.image_size}")
    torch.manual_seed(1)
    # The teacher's text tower only embeds the C class prompts once; its size does not matter.
    teacher_clip = CLIPModel(scaled_clip_config(64, 1, cfg.teacher_width, cfg.teacher_layers, cfg.teacher_patch,
                                         cfg.image_size, cfg.text_width)).eval()
    teacher = CLIPTeacher(teacher_clip, tokenizer, class_names, name="scaled ViT-L/14 (random weights)")
    torch.manual_seed(2)
    student_clip = CLIPModel(scaled_clip_config(cfg.text_width, cfg.text_layers, cfg.student_width, cfg.student_layers,
                                         cfg.student_patch, cfg.image_size, cfg.text_width)).eval()
    student = get_fdbpl_model(student_clip, FDBPLConfig(), tokenizer)  # once: it hooks the token embedding
    student.set_class_names(class_names)
    return teacher, student


class PromptLength:
    """Records the [rows, tokens] of the ids the student's text tower actually encodes."""

    def __init__(self, student):
        self.shape = None
        emb = student.clip.text_model.embeddings.token_embedding
        self.handle = emb.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.shape = tuple(args[0].shape)

    def close(self):
        self.handle.remove()


def measure_pieces(args, teacher, student, image_size: int, num_classes: int, reps: int) -> dict:
    """Per-image / per-class-prompt costs of the three pieces, interleaved `reps` times."""
    b, c = args.batch, num_classes
    pixels = torch.randn(b, 3, image_size, image_size)
    with torch.no_grad():
        features = student.get_image_features(pixels)
    student.train()

    def teacher_fwd():
        with torch.no_grad():
            teacher(pixels)

    def student_fwd():
        student.get_image_features(pixels)

    def text_fwd_bwd():  # exactly the text half of a training step: 2C prompts, gradients to the contexts
        out = student(image_features=features)
        (out.pos_logits.sum() + out.neg_logits.sum()).backward()
        student.zero_grad(set_to_none=True)

    pieces = {"teacher": (teacher_fwd, b), "student_image": (student_fwd, b), "text": (text_fwd_bwd, 2 * c)}
    for fn, _ in pieces.values():  # warm-up
        fn()
    walls = {k: [] for k in pieces}
    cpus = {k: [] for k in pieces}
    for _ in range(reps):  # interleaved, so a burst of outside load hits all three alike
        for key, (fn, _) in pieces.items():
            c0, t0 = cpu_now(), now()
            fn()
            walls[key].append(now() - t0)
            cpus[key].append(cpu_now() - c0)
    times = cpus if args.clock == "cpu" else walls
    best = {k: min(v) / pieces[k][1] for k, v in times.items()}
    median = {k: statistics.median(v) / pieces[k][1] for k, v in times.items()}
    share = {k: statistics.median(cp / max(t, 1e-9) for cp, t in zip(cpus[k], walls[k])) for k in pieces}
    return {"best": best, "median": median, "cpu_share": share,
            "ts": best["teacher"] / best["student_image"], "sx": best["student_image"] / best["text"]}


def depth_for(points: list[tuple[int, float]], target: float) -> int:
    """The depth whose cost is closest to `target`, from (depth, cost) measurements: cost proportional to
    depth from one depth; a straight line (intercept = embeddings, projections, loss) from two or more."""
    by_depth: dict[int, list[float]] = {}
    for depth, cost in points:
        by_depth.setdefault(depth, []).append(cost)
    xs = sorted(by_depth)
    ys = [statistics.mean(by_depth[x]) for x in xs]
    if len(xs) == 1:
        slope, intercept = ys[0] / xs[0], 0.0
    else:
        mx, my = statistics.mean(xs), statistics.mean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        intercept = my - slope * mx
        if slope <= 0:  # noise: fall back to proportional from the deepest point
            slope, intercept = ys[-1] / xs[-1], 0.0
    best = max(1, round((target - intercept) / slope))
    return min(best, 2 * max(xs))  # a wild measurement must not build a huge model


def piece_section(args, cfg: Scaled, teacher, student, class_names, tokenizer, real: dict,
                  prompt_tokens: int) -> tuple:
    section("2. Scaled-down models: measured costs vs the real FLOP ratios")
    print(f"Widths at 1/4 of the real ones; image {cfg.image_size} px with patches {cfg.teacher_patch} (teacher) "
          f"and {cfg.student_patch} (student), so the token counts stay those of 224 px with patches 14 and 32. "
          "Heads of 64 dims, MLP = 4 x width, random weights. Depths are set from *measured* costs, not FLOPs: "
          "GFLOP/s differ between the teacher's 257-token attention, the student's 50-token GEMMs and the small "
          "text batches, and between thread counts. The student image tower is the anchor "
          f"({cfg.student_layers} of 12 layers); the teacher's and the text tower's depths are recalibrated "
          f"from the measured ratios (up to {args.calibrate} recalibration(s), cost fitted linearly in depth) until "
          f"both are within {args.ratio_tolerance / 2:.1%} of the real ones; the closest config is kept "
          "(--calibrate 0 keeps the given depths).\n")
    c = len(class_names)
    rows, tried = [], []
    for it in range(args.calibrate + 1):
        m = measure_pieces(args, teacher, student, cfg.image_size, c, args.piece_reps)
        dev = (m["ts"] / real["ratio_ts"] - 1, m["sx"] / real["ratio_sx"] - 1)
        rows.append([it, f"{cfg.teacher_layers} / {cfg.student_layers} / {cfg.text_layers}", f"{m['ts']:.2f}",
                     f"{dev[0]:+.0%}", f"{m['sx']:.2f}", f"{dev[1]:+.0%}"])
        tried.append((max(abs(d) for d in dev), cfg, teacher, student, m, dev))
        if max(abs(d) for d in dev) <= args.ratio_tolerance / 2 or it == args.calibrate:
            break
        # the student image tower is fixed: average its cost over the iterations; fit the others' cost vs depth
        student_cost = statistics.mean(t[4]["best"]["student_image"] for t in tried)
        t_layers = depth_for([(t[1].teacher_layers, t[4]["best"]["teacher"]) for t in tried],
                             student_cost * real["ratio_ts"])
        x_layers = depth_for([(t[1].text_layers, t[4]["best"]["text"]) for t in tried],
                             student_cost / real["ratio_sx"])
        if any((t.teacher_layers, t.text_layers) == (t_layers, x_layers) for _, t, *_ in tried):
            break  # nothing new to try
        cfg = replace(cfg, teacher_layers=t_layers, text_layers=x_layers)
        teacher, student = build_models(cfg, class_names, tokenizer)
    _, cfg, teacher, student, m, (dev_ts, dev_sx) = min(tried, key=lambda t: t[0])  # the closest config
    del tried
    if len(rows) > 1:
        print(md_table(["iteration", "layers teacher / student img / text", "teacher / student img", "vs real",
                        "student img / text", "vs real"], rows))
        print(f"\nKept: {cfg.teacher_layers} / {cfg.student_layers} / {cfg.text_layers} (the closest).\n")
    scaled = cfg.towers(prompt_tokens)
    analytic = {"teacher": scaled["teacher_image"].forward(), "student_image": scaled["student_image"].forward(),
                "text": scaled["student_text"].forward_backward_frozen()}
    print(md_table(["tower", "real", "scaled here (width x layers)", "tokens", "analytic GFLOPs (real -> scaled)"], [
        ["teacher image (fwd)", "ViT-L/14: 1024 x 24", f"{cfg.teacher_width} x {cfg.teacher_layers}",
         scaled["teacher_image"].tokens, f"{gf(real['teacher'])} -> {gf(analytic['teacher'])}"],
        ["student image (fwd)", "ViT-B/32: 768 x 12", f"{cfg.student_width} x {cfg.student_layers}",
         scaled["student_image"].tokens, f"{gf(real['student_image'])} -> {gf(analytic['student_image'])}"],
        ["student text (fwd+bwd)", "512 x 12", f"{cfg.text_width} x {cfg.text_layers}", prompt_tokens,
         f"{gf(real['text'])} -> {gf(analytic['text'])}"],
    ]))
    best, median, b = m["best"], m["median"], args.batch
    labels = {"teacher": "teacher image fwd / image", "student_image": "student image fwd / image",
              "text": "student text fwd+bwd / class prompt"}
    print(f"\nMeasured ({args.clock} time; {args.piece_reps} interleaved repetitions of a batch of {b} images / "
          f"of all 2C = {2 * c} prompts; best = least disturbed by other processes, used below):\n")
    print(md_table(["piece", "best ms", "median ms", "GFLOP/s (best)", "CPU time / wall (median)"], [
        [labels[k], f"{best[k] * 1e3:.3f}", f"{median[k] * 1e3:.3f}", f"{analytic[k] / best[k] / 1e9:.1f}",
         f"{m['cpu_share'][k]:.2f}"] for k in labels]))
    ts_m, sx_m = median["teacher"] / median["student_image"], median["student_image"] / median["text"]
    ok = abs(dev_ts) <= args.ratio_tolerance and abs(dev_sx) <= args.ratio_tolerance
    print()
    print(md_table(["ratio", "real models (FLOPs)", "scaled (FLOPs)", "scaled measured (best)", "measured (median)",
                    "measured vs real"], [
        ["teacher img / student img", f"{real['ratio_ts']:.2f}",
         f"{analytic['teacher'] / analytic['student_image']:.2f}", f"{m['ts']:.2f}", f"{ts_m:.2f}", f"{dev_ts:+.0%}"],
        ["student img / text per class prompt", f"{real['ratio_sx']:.2f}",
         f"{analytic['student_image'] / analytic['text']:.2f}", f"{m['sx']:.2f}", f"{sx_m:.2f}", f"{dev_sx:+.0%}"],
    ]))
    f_real = step_flops(real["teacher"], real["student_image"], real["text"], b, c)
    predicted = (b * best["teacher"] + b * best["student_image"] + 2 * c * best["text"]) / (
        b * best["student_image"] + 2 * c * best["text"])
    print(f"\nGoal: measured cost ratios within {args.ratio_tolerance:.0%} of the real FLOP ratios: "
          f"**{verdict(ok)}**. Limit predicted from these pieces at B={b}, C={c}: {predicted:.2f}x "
          f"(real models, FLOPs: {f_real.limit:.2f}x).")
    pieces = {"best": best, "median": median, "ok": ok, "predicted_limit": predicted, "real_limit": f_real.limit,
              "dev": (dev_ts, dev_sx)}
    return cfg, teacher, student, pieces


# ---------------------------------------------------------------------------------------------
# 3. data, table, training runs

def make_dataset(num_images: int, class_names: list[str]) -> datasets.Dataset:
    """Real MNIST digits (28 x 28 PNG) relabelled round-robin over `class_names` (labels are unused)."""
    digits = load_digits(num_per_class=math.ceil(num_images / 10)).select(range(num_images))
    labels = [i % len(class_names) for i in range(num_images)]
    ds = digits.remove_columns("label").add_column("label", labels)
    return ds.cast_column("label", datasets.ClassLabel(names=class_names))


class PreRendered(RILDataset):
    """An `RILDataset` whose items were rendered beforehand: the Trainer without the replay."""

    def __init__(self, base: RILDataset, count: int):  # reuses the base's state
        self.__dict__.update(base.__dict__)
        self.items = [base[i] for i in range(count)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[int(index)]


@dataclass
class Samples:
    """Per timed step: wall and process-CPU seconds of the whole step and of its compute part
    (on_step_begin -> on_step_end: forward, loss, backward, optimizer)."""

    step_wall: list = field(default_factory=list)
    step_cpu: list = field(default_factory=list)
    compute_wall: list = field(default_factory=list)
    compute_cpu: list = field(default_factory=list)

    def add(self, step_wall: float, step_cpu: float, compute_wall: float, compute_cpu: float) -> None:
        self.step_wall.append(step_wall)
        self.step_cpu.append(step_cpu)
        self.compute_wall.append(compute_wall)
        self.compute_cpu.append(compute_cpu)

    def extend(self, other: "Samples") -> None:
        for name in ("step_wall", "step_cpu", "compute_wall", "compute_cpu"):
            getattr(self, name).extend(getattr(other, name))


def trainer_run(args, student, dataset, teacher, workdir: str, steps: int) -> Samples:
    from transformers.trainer_callback import PrinterCallback

    targs = FDBPLTrainingArguments(
        output_dir=workdir, max_steps=steps, per_device_train_batch_size=args.batch, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=0,
        logging_steps=500,  # the Trainer's default: no log line inside these short runs
    )
    timer = StepTimer()
    trainer = FDBPLTrainer(model=student, args=targs, train_dataset=dataset, teacher=teacher, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    skip = 1 + args.warmup  # the first step has no previous end; then `warmup` warm-up steps
    out = Samples()
    for i in range(skip, len(timer.end)):
        out.add(timer.end[i] - timer.end[i - 1], timer.cpu_end[i] - timer.cpu_end[i - 1],
                timer.end[i] - timer.begin[i], timer.cpu_end[i] - timer.cpu_begin[i])
    return out


def pure_run(args, student, batches: list[dict], num_classes: int, fill: str, steps: int) -> Samples:
    """Forward + FDBPL loss + backward + SGD step on pre-rendered, pre-collated batches."""
    a = FDBPLTrainingArguments(output_dir=tempfile.gettempdir(), report_to="none", use_cpu=True)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=a.learning_rate, momentum=a.momentum, weight_decay=a.weight_decay)
    prepared = [(bt["pixel_values"], dense_teacher_logits(bt["topk_indices"], bt["topk_logits"], num_classes,
                                                          fill=fill)) for bt in batches]
    student.train()
    out = Samples()
    for i in range(1 + args.warmup + steps):
        pixels, target = prepared[i % len(prepared)]
        c0, t0 = cpu_now(), now()
        o = student(pixel_values=pixels)
        losses = fdbpl_loss(o.pos_logits, o.neg_logits, target, o.image_features, o.pos_text_features,
                            o.neg_text_features, lambda_neg=a.lambda_neg, lambda_sim=a.lambda_sim,
                            lambda_pcd=a.lambda_pcd, pcd_margin=a.pcd_margin, use_pcd=a.use_pcd,
                            weight_mode=a.weight_mode, entropy_threshold=a.entropy_threshold)
        losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        wall, cpu = now() - t0, cpu_now() - c0
        if i >= 1 + args.warmup:
            out.add(wall, cpu, wall, cpu)
    return out


def replay_costs(args, datasets_: dict[str, RILDataset]) -> tuple[list[list], dict]:
    """Fetch + collate of one batch of B items, in the training process, at all threads and at 1."""
    rows, best = [], {}
    threads = torch.get_num_threads()
    clock = CLOCKS[args.clock]
    for th in sorted({threads, 1}, reverse=True):
        with torch_threads(th):
            for name, data in datasets_.items():
                samples = []
                for r in range(args.replay_reps + 1):
                    t0 = clock()
                    default_collate([data[i] for i in range(args.batch)])
                    if r:
                        samples.append(clock() - t0)
                rows.append([name, th, ms(min(samples)), ms(statistics.median(samples)),
                             f"{min(samples) / args.batch * 1e3:.2f}"])
                if th == threads:
                    best[name] = min(samples)
    return rows, best


def summarise(samples: Samples, clock: str) -> dict:
    step = samples.step_cpu if clock == "cpu" else samples.step_wall
    compute = samples.compute_cpu if clock == "cpu" else samples.compute_wall
    s = sorted(step)
    q = lambda p: s[min(len(s) - 1, max(0, int(round(p * (len(s) - 1)))))]  # noqa: E731
    return {"median": statistics.median(s), "q1": q(0.25), "q3": q(0.75), "best": s[0], "n": len(s),
            "compute": statistics.median(compute),
            "cpu": statistics.median(c / max(w, 1e-9) for c, w in zip(samples.step_cpu, samples.step_wall))}


def training_section(args, cfg: Scaled, teacher, student, class_names, pieces: dict, workdir: str) -> dict:
    steps_per_run = 1 + args.warmup + args.steps
    num_images = args.batch * steps_per_run  # one epoch per run: every run replays the same regions
    section("3. RIL table (one-off, not counted in the steps)")
    ds = make_dataset(num_images, class_names)
    spec = RegionSpec(output_size=cfg.image_size)
    t0 = now()
    table = build_ril_table(ds, teacher, num_regions=args.regions, top_k=min(20, len(class_names)), seed=0,
                            region_spec=spec, output_dir=os.path.join(workdir, "table"),
                            images_per_batch=args.batch, teacher_batch_size=args.batch)
    build_s = now() - t0
    regions = num_images * args.regions
    bare = pieces["best"]["teacher"]
    print(f"{num_images} MNIST images (28 x 28 PNG) x M={args.regions} regions = {regions} teacher forwards, "
          f"K={min(20, len(class_names))}, C={len(class_names)}: built in **{build_s:.1f} s** = "
          f"{build_s / regions * 1e3:.1f} ms/region (bare teacher forward: {bare * 1e3:.1f} ms/region, "
          f"so {build_s / regions / bare:.2f}x with rendering, top-K and writing).")
    print(f"\nThe build is the teacher's whole cost moved out of training: a table with M regions per image "
          f"costs M teacher forwards per image, an online run E forwards per image (one per epoch). At the "
          f"paper's M=500, E=50 one table costs the teacher time of {500 / 50:.0f} online runs and pays off "
          f"from the {500 // 50 + 1}th run on the same data (seeds, hyper-parameters, students of the same "
          f"input size); a single run breaks even at M <= E. M={args.regions} here: only the regions the runs "
          f"replay (one epoch).")

    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    offline_data = RILDataset(ds, table, image_mean=mean, image_std=std, image_size=cfg.image_size)
    online_data = RILDataset.online(ds, class_names=class_names, image_mean=mean, image_std=std, region_spec=spec,
                                    num_regions=args.regions, seed=0)
    t0 = now()
    cache = build_feature_cache(offline_data, student, epochs=1, output_dir=os.path.join(workdir, "cache"),
                                batch_size=args.batch, progress=False)
    cache_s = now() - t0
    print(f"\nStudent-feature cache of the same regions (`build_feature_cache`, one-off): {cache_s:.1f} s.")
    cached_data = RILDataset(ds, table, image_mean=mean, image_std=std, image_size=cfg.image_size,
                             feature_cache=cache)
    rendered = PreRendered(offline_data, num_images)
    batches = [default_collate(rendered.items[i : i + args.batch]) for i in range(0, num_images, args.batch)]

    section("4. Training steps: FDBPLTrainer offline vs online, and the pure student step")
    print(f"B={args.batch}, C={len(class_names)}, {args.rounds} interleaved round(s); per run {steps_per_run} "
          f"steps: the first (no previous step end) and {args.warmup} warm-up step(s) are discarded, "
          f"{args.steps} are timed. Modes:\n")
    print("- **offline**: `FDBPLTrainer` on `RILDataset(table)` (FDBPL);")
    print("- **online**: `FDBPLTrainer(teacher=...)` on `RILDataset.online(...)`, the teacher scores every "
          "batch (PromptKD/KDPL baseline);")
    print("- **cached**: `FDBPLTrainer` on `RILDataset(table, feature_cache=...)`: stored student image features, "
          "no images and no image tower (beyond the paper);")
    print("- **offline, pre-rendered**: the Trainer on items rendered beforehand (no replay, no table read);")
    print("- **pure student step**: forward + loss + backward + SGD on pre-collated batches (no Trainer, "
          "no data): the floor of any distillation step, so online / pure is the measured limit.\n")
    modes = {
        "offline": lambda d: trainer_run(args, student, offline_data, None, d, steps_per_run),
        "online": lambda d: trainer_run(args, student, online_data, teacher, d, steps_per_run),
        "cached": lambda d: trainer_run(args, student, cached_data, None, d, steps_per_run),
        "offline, pre-rendered": lambda d: trainer_run(args, student, rendered, None, d, steps_per_run),
        "pure student step": lambda d: pure_run(args, student, batches, len(class_names), offline_data.fill,
                                                args.steps),
    }
    collected = {k: Samples() for k in modes}
    order = list(modes)
    for r in range(args.rounds):
        t_round = now()
        for key in order[r % len(order):] + order[: r % len(order)]:  # rotate the order every round
            run_dir = os.path.join(workdir, f"run-{r}-{key.split(',')[0]}")
            collected[key].extend(modes[key](run_dir))
            shutil.rmtree(run_dir, ignore_errors=True)
        print(f"round {r + 1}/{args.rounds}: {now() - t_round:.0f} s (load average {load_average():.2f})",
              flush=True)
    stats = {k: summarise(v, args.clock) for k, v in collected.items()}
    print(f"\nStep costs in {args.clock} time:\n")
    print(md_table(["mode", "step ms (median)", "IQR ms", "best ms", "compute ms (begin->end)", "fetch+other ms",
                    "CPU time / wall", "steps timed"], [
        [k, ms(s["median"]), f"{ms(s['q1'])} - {ms(s['q3'])}", ms(s["best"]), ms(s["compute"]),
         ms(max(s["median"] - s["compute"], 0.0)), f"{s['cpu']:.2f}", s["n"]] for k, s in stats.items()]))
    print(f"\nReplay cost of one batch ({args.clock} time of fetch + collate of B items in this process; best / "
          f"median of {args.replay_reps}):\n")
    online_default = RILDataset.online(ds, class_names=class_names, image_mean=mean, image_std=std,
                                       region_spec=spec, num_regions=500, seed=0)
    rows, replay = replay_costs(args, {"offline (table read)": offline_data,
                                       f"online, M={args.regions} (as timed above)": online_data,
                                       "online, M=500 (library default: draws 500 boxes per item)": online_default})
    print(md_table(["dataset", "torch threads", "best ms", "median ms", "best ms / item"], rows))
    return {"stats": stats, "build_s": build_s, "replay": replay["offline (table read)"]}


# ---------------------------------------------------------------------------------------------

def results_section(args, real: dict, pieces: dict, train: dict, cfg: Scaled, elapsed: float) -> bool:
    section("Result")
    st = train["stats"]
    off, on, pure = st["offline"]["median"], st["online"]["median"], st["pure student step"]["median"]
    speedup, limit = on / off, on / pure
    share = speedup / limit
    print(md_table(["figure", "value"], [
        ["offline step (FDBPL, RIL table)", f"{ms(off)} ms"],
        ["online step (teacher every step)", f"{ms(on)} ms"],
        ["pure student step", f"{ms(pure)} ms"],
        ["**speed-up** online / offline", f"**{speedup:.2f}x**"],
        ["limit online / pure student step (measured)", f"{limit:.2f}x"],
        ["speed-up as share of the limit", f"{share:.1%}"],
        ["limit predicted from the measured pieces", f"{pieces['predicted_limit']:.2f}x"],
        ["cached step (RIL table + student-feature cache)", f"{ms(st['cached']['median'])} ms"],
        ["**speed-up with the feature cache** online / cached", f"**{on / st['cached']['median']:.2f}x**"],
        ["limit of the real models (FLOPs, same B and C)", f"{pieces['real_limit']:.2f}x"],
        ["table build (one-off, not in the steps)", f"{train['build_s']:.1f} s"],
    ]))
    trainer_extra = st["offline, pre-rendered"]["median"] - pure
    print(f"\nWhere the offline step loses to the pure step: {ms(off - pure)} ms per step "
          f"({off / pure - 1:+.1%}); the replay of a batch (fetch + collate, measured alone) costs "
          f"{ms(train['replay'])} ms, the Trainer itself (pre-rendered items vs pure step) {ms(trainer_extra)} ms. "
          f"Reaching 90% of the limit needs offline <= pure x {1 / 0.9:.3f}, i.e. <= {ms(pure / 0.9 - pure)} ms "
          "of overhead per step.")
    goals = [
        ("speed-up >= 2.2x (paper's claim)", speedup >= 2.2),
        ("speed-up >= 90% of the measured limit", share >= 0.90),
        (f"scaled cost ratios within {args.ratio_tolerance:.0%} of the real FLOP ratios", pieces["ok"]),
    ]
    print()
    print(md_table(["goal", "verdict"], [[g, verdict(ok)] for g, ok in goals]))
    busy = st["pure student step"]["cpu"] < 0.75 * torch.get_num_threads()
    if busy and args.clock == "wall":
        print(f"\n**WARNING: the machine was busy.** The pure student step got "
              f"{st['pure student step']['cpu']:.2f} CPU-seconds per second with {torch.get_num_threads()} "
              "threads: other processes took the cores. With 2+ threads every parallel op then waits for a "
              "descheduled OpenMP thread, which inflates small ops (the replay, the text tower) far more than "
              "large GEMMs, so these ratios are not the machine's. Rerun on an idle machine, or use "
              "`--threads 1 --clock cpu` (process CPU time of one thread barely depends on other load).")
    print(f"\nTimes are {args.clock} time. Config: image {cfg.image_size} px; teacher {cfg.teacher_width} x {cfg.teacher_layers} (patch "
          f"{cfg.teacher_patch}); student image {cfg.student_width} x {cfg.student_layers} (patch "
          f"{cfg.student_patch}); text {cfg.text_width} x {cfg.text_layers}; B={args.batch}, C={args.classes}; "
          f"torch threads {torch.get_num_threads()}, dataloader_num_workers=0. Total time {elapsed:.0f} s; "
          f"load average at the end {load_average():.2f} (other processes on the machine slow and scatter "
          "every timing; the rounds are interleaved so that they hit all modes alike).")
    return all(ok for _, ok in goals)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run (< 1 minute): 1 round, 3 timed steps")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (needs --threads 1: with more threads "
                        "OpenMP spin-waits count as CPU time). cpu is robust to other load on a shared machine")
    p.add_argument("--pieces-only", action="store_true",
                   help="stop after the piece costs (to iterate on the scaled configs)")
    p.add_argument("--batch", type=int, default=32, help="regions per step (paper: 32)")
    p.add_argument("--classes", type=int, default=50, help="classes C (<= 50: Caltech101 base names)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all modes")
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode and round")
    p.add_argument("--warmup", type=int, default=1, help="extra discarded steps per run")
    p.add_argument("--regions", type=int, default=1, help="M, regions per image in the benchmark table")
    p.add_argument("--piece-reps", type=int, default=10, help="repetitions of each piece measurement")
    p.add_argument("--replay-reps", type=int, default=5, help="repetitions of the replay measurement")
    p.add_argument("--ratio-tolerance", type=float, default=0.15)
    p.add_argument("--calibrate", type=int, default=2,
                   help="at most this many re-calibrations of the teacher and text depths (0: keep them)")
    p.add_argument("--image-size", type=int, default=112, help="shared input size (a multiple of 112)")
    p.add_argument("--teacher-width", type=int, default=256)
    p.add_argument("--teacher-layers", type=int, default=11)
    p.add_argument("--student-width", type=int, default=192)
    p.add_argument("--student-layers", type=int, default=8)
    p.add_argument("--text-width", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=6)
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.piece_reps, args.replay_reps = 1, 3, 0, 3, 2
        args.calibrate = min(args.calibrate, 1)
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu needs --threads 1 (spinning OpenMP threads count as CPU time)")
    if not 1 <= args.classes <= len(CALTECH_BASE):
        p.error(f"--classes must be between 1 and {len(CALTECH_BASE)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = now()
    machine_facts(args)
    cfg = Scaled(args.image_size, args.teacher_width, args.teacher_layers, args.student_width,
                 args.student_layers, args.text_width, args.text_layers)
    class_names = CALTECH_BASE[: args.classes]
    tokenizer = clip_tokenizer()
    teacher, student = build_models(cfg, class_names, tokenizer)
    probe = PromptLength(student)
    with torch.no_grad():
        student.get_text_features(class_names)
    prompt_tokens = probe.shape[1]
    probe.close()
    real = flop_section(args, prompt_tokens)
    cfg, teacher, student, pieces = piece_section(args, cfg, teacher, student, class_names, tokenizer, real,
                                                  prompt_tokens)
    if args.pieces_only:
        return 0
    workdir = args.workdir or tempfile.mkdtemp(prefix="fdbpl_speed_")
    try:
        train = training_section(args, cfg, teacher, student, class_names, pieces, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results_section(args, real, pieces, train, cfg, now() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
