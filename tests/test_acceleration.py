"""Speed options with a fair baseline: no host sync in a training step, the online teacher at the
student's precision and compilation, compiled runs training the same contexts, device-resident replay
training the same contexts as the CPU replay."""

import contextlib

import pytest
import torch
from conftest import make_clip

from fdbpl_hf import (CallableTeacher, CLIPTeacher, FDBPLConfig, RegionSpec, RILDataset, build_ril_table,
                      get_fdbpl_model)
from fdbpl_hf.testing.worlds import DIGIT_NAMES
from fdbpl_hf.ril.device_replay import DeviceImageStore
from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN as MEAN
from fdbpl_hf.ril.teachers import OPENAI_CLIP_STD as STD
from fdbpl_hf.trainer import FDBPLTrainer, FDBPLTrainingArguments
from transformers import TrainerCallback

# Tensor methods that make the host wait for the device when the tensor lives on an accelerator
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def train_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=8, logging_steps=1,
                save_strategy="no", use_cpu=True, report_to="none", disable_tqdm=True, seed=3, warmup_epochs=0.5,
                learning_rate=0.05, dataloader_drop_last=True)
    base.update(kw)
    return FDBPLTrainingArguments(**base)


def student(tokenizer):
    return get_fdbpl_model(make_clip("tiny", seed=2), FDBPLConfig(), tokenizer)


def online_data(digits_small, mean=MEAN, std=STD):
    return RILDataset.online(digits_small, class_names=DIGIT_NAMES, image_mean=mean, image_std=std,
                             region_spec=RegionSpec(output_size=32), num_regions=5, seed=0)


class _SyncCounter(TrainerCallback):
    """Counts host-sync tensor calls made between on_step_begin and on_step_end (the step itself:
    data loading is before, logging after), with where they came from; from the second step on (the
    first builds what is prepared once, e.g. the text tower's attention mask). Tensors made from host
    data for a device (`torch.tensor(..., device=...)`, `torch.as_tensor(..., device=...)`) count too:
    on a GPU each is a copy from host memory the step waits for."""

    def __init__(self):
        self.active, self.calls = False, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step >= 1

    def on_step_end(self, args, state, control, **kwargs):
        self.active = False

    @contextlib.contextmanager
    def patched(self):
        originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

        def wrap(name, fn):
            def counted(tensor, *a, **k):
                if self.active:
                    import traceback

                    self.calls.append((name, traceback.extract_stack(limit=4)[0]))
                return fn(tensor, *a, **k)
            return counted

        makers = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}

        def wrap_maker(name, fn):
            def counted(*a, **k):
                if self.active and k.get("device") is not None:
                    import traceback

                    self.calls.append((f"torch.{name}(device=)", traceback.extract_stack(limit=3)[0]))
                return fn(*a, **k)
            return counted

        try:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, wrap(name, fn))
            for name, fn in makers.items():
                setattr(torch, name, wrap_maker(name, fn))
            yield self
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)
            for name, fn in makers.items():
                setattr(torch, name, fn)


@pytest.fixture(scope="module")
def second_table(digits_small, tokenizer, tmp_path_factory):
    """Another teacher's table of the same regions (composed tables, issue 23)."""
    return build_ril_table(digits_small, make_clip("tiny", seed=3), teacher_tokenizer=tokenizer, num_regions=5,
                           top_k=2, output_dir=str(tmp_path_factory.mktemp("tables") / "t2"))


@pytest.mark.parametrize("mode", ["offline", "online", "online-renormalised", "device-replay", "composed",
                                  "fused-offline", "fused-online", "fused-device-replay", "fused-composed"])
def test_a_training_step_has_no_host_sync(digits_small, table, teacher_clip, tokenizer, tmp_path, mode, request):
    """No `.item()`, `bool(tensor)`, `.cpu()`, ... anywhere in a step (Trainer, accelerate, model, loss,
    teacher), in every mode, the fused step (`train_step="fused"`) too: on a GPU each would stop the host
    from queuing the next kernels."""
    teacher = None
    step = "fused" if mode.startswith("fused-") else "standard"
    mode = mode.removeprefix("fused-")
    if mode == "offline":
        data = RILDataset(digits_small, table, image_mean=MEAN, image_std=STD)
    elif mode == "composed":  # the tables' soft labels are mixed by the dataset, on the CPU
        data = RILDataset(digits_small, [table, request.getfixturevalue("second_table")], image_mean=MEAN,
                          image_std=STD, teacher_weighting="entropy")
    elif mode == "device-replay":
        data = RILDataset(digits_small, table, image_mean=MEAN, image_std=STD).use_image_store(
            DeviceImageStore.from_dataset(digits_small))
    else:
        # renormalised: the student's normalisation differs from the teacher's (constants stay on the device)
        data = online_data(digits_small, *(((0.5,) * 3, (0.25,) * 3) if mode == "online-renormalised" else ()))
        teacher = CLIPTeacher(teacher_clip, tokenizer, DIGIT_NAMES)
    counter = _SyncCounter()
    trainer = FDBPLTrainer(model=student(tokenizer), args=train_args(tmp_path, logging_steps=100, max_steps=3,
                                                                     train_step=step),
                           train_dataset=data, teacher=teacher, callbacks=[counter])
    with counter.patched():
        trainer.train()
    assert trainer.state.global_step == 3
    assert counter.calls == [], counter.calls
    if step == "fused":
        return  # the NaN filter below is the Trainer's, the same in both steps
    # the counter sees syncs: the Trainer's NaN filter (off by default now) makes one per step
    counter = _SyncCounter()
    trainer = FDBPLTrainer(model=student(tokenizer), args=train_args(tmp_path, logging_steps=100, max_steps=3,
                                                                     logging_nan_inf_filter=True),
                           train_dataset=data, teacher=teacher, callbacks=[counter])
    with counter.patched():
        trainer.train()
    # steps 2 and 3, each `torch.isnan(loss) or torch.isinf(loss)`
    assert [(name, frame.filename.endswith("transformers/trainer.py")) for name, frame in counter.calls] == [
        ("__bool__", True)] * 4


def test_the_online_teacher_runs_at_the_students_precision(digits_small, tokenizer, tmp_path):
    """accelerate's bf16 autocast wraps the student's forward only; the live teacher runs under it too."""
    seen = []
    weights = torch.randn(3 * 4 * 4, 10, generator=torch.Generator().manual_seed(0))

    def teacher(pixels):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return torch.nn.functional.adaptive_avg_pool2d(pixels, 4).flatten(1) @ weights

    for bf16 in (False, True):
        seen.clear()
        FDBPLTrainer(model=student(tokenizer), args=train_args(tmp_path, max_steps=2, bf16=bf16),
                     train_dataset=online_data(digits_small), teacher=CallableTeacher(teacher, 10, 32)).train()
        assert len(seen) == 2 and all(on == bf16 for on, _ in seen)
        if bf16:
            assert all(dtype == torch.bfloat16 for _, dtype in seen)


@pytest.mark.numerics
def test_compiled_online_run_trains_the_same_contexts(digits_small, teacher_clip, tokenizer, tmp_path):
    """`torch_compile` compiles the student (transformers/accelerate), the FDBPL loss and the online
    teacher's forward with the same backend. Backend aot_eager: the graphs are captured (dynamo +
    AOTAutograd, forward and backward) without inductor's C++ build, which costs minutes on CPU (the
    inductor run of the student is test_trainer.py's test_torch_compile_trains_the_same_prompts).
    Tolerance: 1e-5 absolute on the contexts after 6 SGD steps (measured: 3.9e-7; eager runs the
    frozen towers from prepared weights, fdbpl_hf.frozen_layers, compiled runs transformers' layers)."""
    runs = {}
    for name, extra in (("eager", {}), ("compiled", {"torch_compile": True, "torch_compile_backend": "aot_eager"})):
        model = student(tokenizer)
        trainer = FDBPLTrainer(model=model, args=train_args(tmp_path / name, **extra),
                               train_dataset=online_data(digits_small),
                               teacher=CLIPTeacher(teacher_clip, tokenizer, DIGIT_NAMES))
        trainer.train()
        runs[name] = (model, trainer)
    (eager, _), (compiled, trainer) = runs["eager"], runs["compiled"]
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)  # the student ran compiled
    for fn in (trainer._run_teacher._logits, trainer._fdbpl_loss):  # and so did the teacher and the loss
        assert hasattr(fn, "_torchdynamo_orig_callable"), fn
    assert trainer.state.global_step == 6
    start = student(tokenizer).prompts.contexts()
    assert not torch.allclose(eager.prompts.contexts(), start)  # the comparison is not of two untrained models
    torch.testing.assert_close(compiled.prompts.contexts(), eager.prompts.contexts(), atol=1e-5, rtol=0)


def test_cuda_graph_modes_are_refused_off_cuda(digits_small, table, tokenizer, tmp_path):
    data = RILDataset(digits_small, table, image_mean=MEAN, image_std=STD)
    with pytest.raises(ValueError, match="captures CUDA graphs, and this run is on cpu"):
        FDBPLTrainer(model=student(tokenizer), train_dataset=data,
                     args=train_args(tmp_path, torch_compile=True, torch_compile_mode="reduce-overhead"))


@pytest.mark.numerics
def test_device_replay_trains_the_same_contexts(digits_small, table, teacher_clip, tokenizer, tmp_path):
    """A store-backed dataset (regions rendered in the step, batched) trains exactly what the CPU
    replay trains, on the CPU: same pixels, so the same contexts bit for bit; the online baseline too
    (on CUDA the pixels agree within one float32 ulp, docs/gpu-speed.md)."""
    runs = {}
    for name in ("cpu", "store", "online-cpu", "online-store"):
        model = student(tokenizer)
        online = name.startswith("online")
        data = online_data(digits_small) if online else RILDataset(digits_small, table, image_mean=MEAN,
                                                                  image_std=STD)
        if name.endswith("store"):
            data.use_image_store(DeviceImageStore.from_dataset(digits_small))
        teacher = CLIPTeacher(teacher_clip, tokenizer, DIGIT_NAMES) if online else None
        FDBPLTrainer(model=model, args=train_args(tmp_path / name, dataloader_drop_last=False),
                     train_dataset=data, teacher=teacher).train()
        runs[name] = model.prompts.contexts().detach()
    assert torch.equal(runs["store"], runs["cpu"])
    assert torch.equal(runs["online-store"], runs["online-cpu"])
    assert not torch.equal(runs["store"], runs["online-store"])


def test_device_replay_refuses_workers(digits_small, table, tokenizer, tmp_path):
    data = RILDataset(digits_small, table, image_mean=MEAN, image_std=STD).use_image_store(
        DeviceImageStore.from_dataset(digits_small))
    with pytest.raises(ValueError, match="needs no DataLoader workers"):
        FDBPLTrainer(model=student(tokenizer), args=train_args(tmp_path, dataloader_num_workers=1),
                     train_dataset=data)


@pytest.mark.numerics
def test_an_evaluation_sets_image_store_follows_the_model(digits_small, table, tokenizer, tmp_path):
    """Only the training set's store was moved to the training device, and the device-replay collation
    was set only for it: an evaluation set with a store (its regions rendered in the step) failed on a
    GPU (store left on the CPU) and, beside a training set without one, had no `region_pad`."""
    class Elsewhere(DeviceImageStore):  # a store left on another device than the run's
        device = property(lambda self: torch.device("cuda", 0))

    store = DeviceImageStore.from_dataset(digits_small)
    evaluation = RILDataset(digits_small, table, image_mean=MEAN, image_std=STD).use_image_store(
        Elsewhere(store.pixels, store.heights, store.widths))
    trainer = FDBPLTrainer(model=student(tokenizer), args=train_args(tmp_path, per_device_eval_batch_size=8),
                           train_dataset=RILDataset(digits_small, table, image_mean=MEAN, image_std=STD),
                           eval_dataset=evaluation)
    assert type(evaluation.image_store) is DeviceImageStore and evaluation.image_store.device == trainer.args.device
    plain = trainer.evaluate(RILDataset(digits_small, table, image_mean=MEAN, image_std=STD))["eval_loss"]
    assert trainer.evaluate()["eval_loss"] == pytest.approx(plain, rel=1e-5)  # same pixels, same loss
