"""The capturable training step (issue 20): prepared prompts equal to CLIP's own text features, no
data-dependent op in the step's forward and backward graphs, the fused step training what the
Trainer's step trains in every mode (eager and compiled), the frozen towers cast once under bf16
and given back unchanged."""

import contextlib
import copy

import pytest
import torch
from conftest import make_clip
from torch._dynamo.backends.common import aot_autograd

from fdbpl_hf import (CLIPTeacher, FDBPLConfig, RegionSpec, RILDataset, build_feature_cache, build_ril_table,
                      dense_teacher_logits, get_fdbpl_model)
from fdbpl_hf.precision import frozen_weights_in
from fdbpl_hf.ril.device_replay import DeviceImageStore
from fdbpl_hf.ril.teachers import OPENAI_CLIP_MEAN as MEAN
from fdbpl_hf.ril.teachers import OPENAI_CLIP_STD as STD
from fdbpl_hf.step import FusedStep, FusedStepSGD
from fdbpl_hf.testing.worlds import DIGIT_NAMES
from fdbpl_hf.trainer import FDBPLTrainer, FDBPLTrainingArguments
from transformers import TrainerCallback

NAMES = ["cat", "golden retriever", "x-ray", "St. Bernard's dog"]


def student(tokenizer, **config):
    return get_fdbpl_model(make_clip("tiny", seed=2), FDBPLConfig(**config), tokenizer)


def train_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=8, logging_steps=100,
                save_strategy="no", use_cpu=True, report_to="none", disable_tqdm=True, seed=3, warmup_epochs=0.5,
                learning_rate=0.05, dataloader_drop_last=True)
    base.update(kw)
    return FDBPLTrainingArguments(**base)


# ---- prepared prompts = CLIP's own text features ------------------------------------------------

def hook_reference(model, names, negative=False):
    """The pre-0.7 injection, as the oracle: CLIP's own `get_text_features` on the prompt tokens, padding
    mask included, with the context rows scattered into the token embeddings by a forward hook."""
    clip, prompts = model.clip, model.class_prompts(names)
    ctx = (model.prompts.ctx_neg if negative else model.prompts.ctx_pos).detach()
    rows = ctx.repeat(len(names), 1)

    def inject(module, args, output):
        return output.masked_scatter(prompts.ctx_mask.unsqueeze(-1), rows.to(output.dtype))

    handle = clip.text_model.embeddings.token_embedding.register_forward_hook(inject)
    try:
        with torch.no_grad():
            return clip.get_text_features(input_ids=prompts.input_ids,
                                          attention_mask=prompts.attention_mask).pooler_output
    finally:
        handle.remove()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("eos_token_id", [49407, 2])  # 2: legacy configs pool at the largest id
def test_prepared_prompts_equal_clips_own_text_features(tokenizer, attention, position, eos_token_id):
    """No padding mask (padding sits after EOS, attention is causal, pooling reads EOS), the contexts put
    in by a one-hot matmul, pooling by transformers' rule: the features of CLIP's own forward with the
    padding mask. Tolerance 2e-6 absolute: features of magnitude ~1 in float32 through 2 layers, where
    the two runs differ only in which kernel computes the attention (SDPA with `is_causal` vs a padded
    mask) and in the final layer norm's row count, each a few float32 ulps."""
    clip = make_clip("tiny", attn_implementation=attention)
    if eos_token_id == 2:
        clip.text_model.eos_token_id = 2
    model = get_fdbpl_model(clip, FDBPLConfig(class_token_position=position), tokenizer)
    with torch.no_grad():
        model.prompts.ctx_pos.add_(torch.randn_like(model.prompts.ctx_pos))  # contexts no token has
        for negative in (False, True):
            ours = model.get_text_features(NAMES, negative=negative)
            torch.testing.assert_close(ours, hook_reference(model, NAMES, negative), atol=2e-6, rtol=0)
    assert model.class_prompts(NAMES).attention_mask.min() == 0  # the class list has padded prompts


def test_other_attention_implementations_are_refused(tokenizer):
    clip = make_clip("tiny")
    model = get_fdbpl_model(clip, FDBPLConfig(), tokenizer)
    clip.text_model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation='flex_attention'.*'sdpa'"):
        model.get_text_features(NAMES)


def test_prepared_embeddings_follow_the_weights(tokenizer):
    """The prepared token + position embeddings are kept per class list: a load into the embedding
    weights, a cast or an unfrozen embedding must show in the features, not a stale copy."""
    model = student(tokenizer)
    embedding = model.clip.text_model.embeddings.token_embedding
    with torch.no_grad():
        before = model.get_text_features(NAMES)
        embedding.weight.mul_(1.5)  # in place, as load_state_dict does
        after = model.get_text_features(NAMES)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, hook_reference(model, NAMES), atol=2e-6, rtol=0)
    embedding.weight.requires_grad_(True)  # a user experiment: gradients must reach it
    model.get_text_features(NAMES).sum().backward()
    assert embedding.weight.grad is not None and embedding.weight.grad.abs().sum() > 0


# ---- the step's graphs: no data-dependent op -----------------------------------------------------

class GraphRecorder:
    """An aot_eager backend that keeps the forward and backward graphs AOTAutograd traces."""

    def __init__(self):
        self.graphs = []

        def keep(graph, example_inputs):
            self.graphs.append(graph)
            return graph.forward

        self.backend = aot_autograd(fw_compiler=keep, bw_compiler=keep)

    def data_dependent_ops(self) -> list[str]:
        found = []
        for graph in self.graphs:
            for node in graph.graph.nodes:
                if node.op == "call_function" and data_dependent(node):
                    found.append(str(node.target))
        return found


def data_dependent(node) -> bool:
    """An op whose output shape or value needs the host to read device data (nonzero, masked_select,
    _local_scalar_dense, unique, ...), or whose backward does (masked_scatter)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    name = target.name()
    if name.startswith(("aten::masked_scatter", "aten::is_nonzero", "aten::_assert_async")):
        return True
    tags = set(target.tags)
    if torch.Tag.data_dependent_output in tags:
        return True
    if torch.Tag.dynamic_output_shape in tags:
        if name == "aten::index.Tensor":  # static unless an index is a boolean mask
            return any(i is not None and i.meta["val"].dtype == torch.bool for i in node.args[1])
        return True
    return False


def inspected_step(step: FusedStep, batch: dict) -> GraphRecorder:
    """Trace the step's forward + loss with the recorder (fullgraph: a graph break is an error), run its
    backward, and return the recorder holding both graphs."""
    from fdbpl_hf.prompt_encoding import prepare_text

    recorder = GraphRecorder()
    compiled = torch.compile(step._forward_loss, backend=recorder.backend, fullgraph=True)
    prepared = prepare_text(step.model.clip, step.class_prompts, 2, 4)
    contexts = torch.stack(step.params)
    total, _ = compiled(batch, prepared, contexts)
    torch.autograd.grad(total, [contexts])
    assert len(recorder.graphs) == 2  # forward and backward
    return recorder


def test_the_steps_forward_and_backward_graphs_have_no_data_dependent_op(tokenizer, teacher_clip):
    """Captured in a CUDA graph, a step may not read device data on the host (a sync) or size a tensor
    by data. The step's forward + loss is traced whole (fullgraph) by AOTAutograd, backward included,
    and every op of both graphs is checked. One trace covers every mode's parts: the student's image
    tower (offline, online), the table's top-K rebuild and stored entropy (offline, cached) and the
    live teacher (online), averaged into one target. The same check flags the pre-0.7 injection
    (masked_scatter, whose backward is masked_select, i.e. nonzero): the positive control below."""
    model = student(tokenizer)
    model.set_class_names(DIGIT_NAMES)
    teacher = CLIPTeacher(teacher_clip, tokenizer, DIGIT_NAMES)

    def both_teachers(batch, pixels):
        table = dense_teacher_logits(batch["topk_indices"], batch["topk_logits"], len(DIGIT_NAMES))
        return 0.5 * (table + teacher.logits(pixels).float())

    params = [model.prompts.ctx_pos, model.prompts.ctx_neg]
    step = FusedStep(model, FusedStepSGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4), loss_kwargs={},
                     teacher_logits=both_teachers, teacher_entropy=lambda b: b["teacher_entropy"],
                     autocast=contextlib.nullcontext, live_teacher=True)
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(6, 3, 32, 32, generator=g),
             "topk_indices": torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(6)]),
             "topk_logits": torch.randn(6, 4, generator=g).sort(-1, descending=True).values,
             "teacher_entropy": torch.rand(6, generator=g)}
    recorder = inspected_step(step, batch)
    assert recorder.data_dependent_ops() == []
    ops = {str(n.target) for graph in recorder.graphs for n in graph.graph.nodes}
    assert {"aten.convolution.default", "aten.scatter.src", "aten.mm.default"} <= ops, ops  # every part is there

    # positive control: the hook injection this replaced is flagged by the same check
    control = GraphRecorder()
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[:, 1:5] = True

    def scatter_injection(tokens, ctx):
        return tokens.masked_scatter(mask.unsqueeze(-1), ctx.repeat(4, 1)).square().sum()

    ctx = torch.randn(4, 3, requires_grad=True)
    total = torch.compile(scatter_injection, backend=control.backend, fullgraph=True)(torch.randn(4, 8, 3), ctx)
    torch.autograd.grad(total, [ctx])
    assert "aten.masked_scatter_backward.default" in control.data_dependent_ops()


# ---- the fused step trains what the Trainer's step trains -----------------------------------------

def run(tmp_path, tokenizer, data, teacher, **kw):
    model = student(tokenizer)
    trainer = FDBPLTrainer(model=model, args=train_args(tmp_path, **kw), train_dataset=data, teacher=teacher)
    trainer.train()
    return model.prompts.contexts().detach(), trainer


def mode_data(mode, digits_small, table, teacher_clip, tokenizer, tmp_path):
    teacher = None
    if mode == "online":
        data = online_data(digits_small)
        teacher = CLIPTeacher(teacher_clip, tokenizer, DIGIT_NAMES)
    else:
        data = RILDataset(digits_small, table, image_mean=MEAN, image_std=STD)
    if mode == "device replay":
        data.use_image_store(DeviceImageStore.from_dataset(digits_small))
    if mode == "cached":
        cache = build_feature_cache(data, student(tokenizer), epochs=2, dtype="float32",
                                    output_dir=str(tmp_path / "cache"), progress=False)
        data = RILDataset(digits_small, table, image_mean=MEAN, image_std=STD, feature_cache=cache)
    return data, teacher


def online_data(digits_small):
    return RILDataset.online(digits_small, class_names=DIGIT_NAMES, image_mean=MEAN, image_std=STD,
                             region_spec=RegionSpec(output_size=32), num_regions=5, seed=0)


@pytest.mark.parametrize("mode", ["offline", "cached", "online", "device replay"])
def test_the_fused_step_trains_the_same_contexts(digits_small, table, teacher_clip, tokenizer, tmp_path, mode):
    """`train_step="fused"` (eager in every mode; compiled with aot_eager where the compiled graph
    differs) against the Trainer's own step, 6 SGD steps at lr 0.05 with momentum. Same loss and gradients; the update
    rounds differently (p - lr * v as a product then a difference, vs torch's fused p + (-lr) * v)
    and the gradient of the stacked contexts sums in another order: a few float32 ulps of the
    contexts (|c| < 1, ulp 6e-8) per step, amplified by the steps after it. Tolerance 2e-6
    absolute; measured up to 3e-7 here (and 3e-6 over 100 steps)."""
    data, teacher = mode_data(mode, digits_small, table, teacher_clip, tokenizer, tmp_path)
    reference, _ = run(tmp_path / "standard", tokenizer, data, teacher)
    start = student(tokenizer).prompts.contexts()
    assert not torch.allclose(reference, start)  # the runs train
    variants = {"fused": {}}
    # compiled (aot_eager, ~5-15 s per compile on CPU) where the graph differs: offline (image tower, table)
    # and online (both towers, live teacher). The cached graph is offline's without the image tower, the
    # device-replay graph is offline's (its regions render before the compiled forward).
    if mode in ("offline", "online"):
        variants["fused compiled"] = {"torch_compile": True, "torch_compile_backend": "aot_eager"}
    for name, extra in variants.items():
        contexts, trainer = run(tmp_path / name, tokenizer, data, teacher, train_step="fused", **extra)
        assert trainer.state.global_step == 6 and trainer._fused is not None
        torch.testing.assert_close(contexts, reference, atol=2e-6, rtol=0, msg=name)


def assert_same_logs(standard, fused) -> list:
    """The two trainers logged the same keys and values (2 logged steps each); returns the first's logs."""
    a = [h for h in standard.state.log_history if "loss" in h]
    b = [h for h in fused.state.log_history if "loss" in h]
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-7), key
    return a


def test_the_fused_step_logs_what_the_trainers_step_logs(digits_small, table, tokenizer, tmp_path):
    """Loss terms, gradient norm and learning rate in the logs, as the Trainer's step logs them."""
    data = RILDataset(digits_small, table, image_mean=MEAN, image_std=STD)
    _, standard = run(tmp_path / "s", tokenizer, data, None, logging_steps=3)
    _, fused = run(tmp_path / "f", tokenizer, data, None, logging_steps=3, train_step="fused")
    assert_same_logs(standard, fused)


def test_fused_and_captured_steps_refuse_what_they_cannot_do(digits_small, table, tokenizer, tmp_path):
    data = RILDataset(digits_small, table, image_mean=MEAN, image_std=STD)
    with pytest.raises(ValueError, match="train_step must be one of"):
        train_args(tmp_path, train_step="graph")
    with pytest.raises(ValueError, match="optim='adamw_torch'"):
        train_args(tmp_path, train_step="fused", optim="adamw_torch")
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        train_args(tmp_path, train_step="fused", gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="compile_loss=False"):  # it would be ignored: one graph
        train_args(tmp_path, train_step="fused", torch_compile=True, compile_loss=False)
    train_args(tmp_path, train_step="fused", compile_loss=False)  # without torch_compile it means nothing either way
    with pytest.raises(ValueError, match="captures CUDA graphs, and this run is on cpu"):
        FDBPLTrainer(model=student(tokenizer), args=train_args(tmp_path, train_step="cuda_graph"), train_dataset=data)
    model = student(tokenizer)
    model.set_class_names(DIGIT_NAMES)
    with pytest.raises(ValueError, match="captures CUDA graphs, and the contexts are on cpu"):
        FusedStep(model, FusedStepSGD(model.prompts.parameters(), lr=0.1), loss_kwargs={}, teacher_logits=None,
                  teacher_entropy=None, autocast=contextlib.nullcontext, capture=True)


def test_the_fused_step_resumes_from_a_checkpoint(digits_small, table, tokenizer, tmp_path):
    """The update runs on the Trainer's SGD state: a checkpoint's optimizer.pt holds the momentum, and
    a resumed fused run ends where an uninterrupted one does."""
    data = RILDataset(digits_small, table, image_mean=MEAN, image_std=STD)
    whole, _ = run(tmp_path, tokenizer, data, None, train_step="fused", save_strategy="steps", save_steps=3)
    model = student(tokenizer)
    trainer = FDBPLTrainer(model=model, args=train_args(tmp_path, train_step="fused"), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert trainer.state.global_step == 6
    # the same computation from the same state: only the update's kernels on the same inputs
    torch.testing.assert_close(model.prompts.contexts().detach(), whole, atol=0, rtol=0)


class FakeGraph:
    """What a CUDA graph does, where none can run: the capture records `fn` without running it, each
    replay runs it and writes its results into the same output tensors (a mock: the real capture is
    in benchmarks/gpu_measurement.sh). Python-side values read by `fn` would be re-read here but baked
    in a real graph: the step reads none (its learning rate is a device tensor)."""

    captures = 0

    def __init__(self, fn):
        self.fn, self.outputs, self.replays = fn, (torch.zeros(()), torch.zeros(())), 0
        FakeGraph.captures += 1

    def replay(self):
        for out, new in zip(self.outputs, self.fn()):
            out.copy_(new)
        self.replays += 1


def test_the_captured_steps_bookkeeping(tokenizer, monkeypatch):
    """The cuda_graph step's logic around the graph, with a FakeGraph: eager warm-up steps, one capture,
    each step's batch copied into the graph's inputs and its learning rate into the device tensor, a
    batch of another shape run eagerly, and a replaced tensor refused. Same contexts and momentum as
    the uncaptured fused step (the same kernels in the same order: exact)."""
    import fdbpl_hf.step as step_module

    monkeypatch.setattr(step_module, "capture_cuda_graph", lambda fn: (lambda g: (g, g.outputs))(FakeGraph(fn)))
    monkeypatch.setattr(step_module, "on_side_stream", lambda fn: fn())
    monkeypatch.setattr(FakeGraph, "captures", 0)
    g = torch.Generator().manual_seed(0)

    def batch(size=6):
        return {"image_features": torch.randn(size, 16, generator=g),
                "topk_indices": torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(size)]),
                "topk_logits": torch.randn(size, 4, generator=g).sort(-1, descending=True).values,
                "teacher_entropy": torch.rand(size, generator=g)}

    batches = [batch() for _ in range(7)] + [batch(5), batch()]
    lrs = [0.05 * (1 - i / 10) for i in range(len(batches))]
    runs = {}
    for captured in (False, True):
        model = student(tokenizer)
        model.set_class_names(DIGIT_NAMES)
        step = tiny_fused_step(model)
        step.capture = captured  # FusedStep refuses capture off CUDA: set past that check, for the fake graph
        losses = []
        for b, lr in zip(batches, lrs):
            step.optimizer.param_groups[0]["lr"] = lr
            losses.append(float(step(b)))
            assert step.optimizer.update_applied
            step.optimizer.step()  # the Trainer's call: the update is done already
        buffers = [step.optimizer.state[p]["momentum_buffer"] for p in step.params]
        runs[captured] = (model.prompts.contexts().detach(), torch.stack(buffers), losses, step)
    (eager, eager_buf, eager_loss, _), (graphed, graphed_buf, graphed_loss, step) = runs[False], runs[True]
    assert FakeGraph.captures == 1 and step._graph.replays == len(batches) - 3 - 1  # 3 warm-up, 1 eager (batch of 5)
    torch.testing.assert_close(graphed, eager, atol=0, rtol=0)
    torch.testing.assert_close(graphed_buf, eager_buf, atol=0, rtol=0)
    assert graphed_loss == eager_loss
    state = step.optimizer.state[step.params[0]]
    kept = state["momentum_buffer"]
    state["momentum_buffer"] = torch.zeros_like(step.params[0])  # e.g. a reload
    with pytest.raises(RuntimeError, match="was replaced since the capture"):
        step(batches[0])
    state["momentum_buffer"] = kept
    step(batches[0])  # the same tensors again: replayed
    assert step._graph.replays == len(batches) - 3
    size = step.model.clip.config.vision_config.image_size
    step.model.get_image_features(torch.randn(2, 3, size, size))  # the image tower, which this graph does not run
    step(batches[0])
    assert step._graph.replays == len(batches) - 2
    with torch.no_grad():  # a frozen weight edited in place (as a load_state_dict does): the prepared layers are stale
        step.model.clip.text_model.encoder.layers[0].mlp.fc1.weight.mul_(1.0)
    with pytest.raises(RuntimeError, match="was replaced since the capture"):
        step(batches[0])


def tiny_fused_step(model):
    params = [model.prompts.ctx_pos, model.prompts.ctx_neg]
    return FusedStep(model, FusedStepSGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4), loss_kwargs={},
                     teacher_logits=lambda b, _: dense_teacher_logits(b["topk_indices"], b["topk_logits"], 10),
                     teacher_entropy=lambda b: b["teacher_entropy"], autocast=contextlib.nullcontext)


# ---- the frozen towers in bf16, cast once ---------------------------------------------------------

class _Dtypes(TrainerCallback):
    def __init__(self, model):
        self.model, self.seen = model, []

    def on_step_end(self, args, state, control, **kwargs):
        clip = self.model.clip
        self.seen.append((clip.text_model.encoder.layers[0].mlp.fc1.weight.dtype,
                          clip.vision_model.embeddings.patch_embedding.weight.dtype,
                          clip.logit_scale.dtype, self.model.prompts.ctx_pos.dtype))


@pytest.mark.parametrize("train_step", ["standard", "fused"])
def test_bf16_training_casts_the_frozen_towers_once_and_gives_them_back(digits_small, table, teacher_clip, tokenizer,
                                                                        tmp_path, train_step):
    """Under --bf16 the towers (student, and the live teacher's image tower) run in bf16 weights cast
    once, autocast off inside them (no per-call casts); contexts, logit scale and loss stay float32.
    After train() the CLIP holds its very float32 tensors again, bit for bit."""
    online = online_data(digits_small)
    teacher = CLIPTeacher(teacher_clip, tokenizer, DIGIT_NAMES)
    model = student(tokenizer)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.clip.named_parameters()}
    teacher_before = teacher_clip.vision_model.embeddings.patch_embedding.weight.data_ptr()
    dtypes = _Dtypes(model)
    inside = []
    probe = model.clip.text_model.encoder.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda module, args: inside.append((args[0].dtype, torch.is_autocast_enabled("cpu"))))
    trainer = FDBPLTrainer(model=model, args=train_args(tmp_path, bf16=True, max_steps=3, train_step=train_step),
                           train_dataset=online, teacher=teacher, callbacks=[dtypes])
    trainer.train()
    probe.remove()
    assert dtypes.seen == [(torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)] * 3
    assert inside and all(entry == (torch.bfloat16, False) for entry in inside)
    assert all(h["loss"] == h["loss"] for h in trainer.state.log_history if "loss" in h)  # finite, not NaN
    for name, p in model.clip.named_parameters():
        assert p.dtype == torch.float32 and p.data_ptr() == before[name][0], name
        assert torch.equal(p.detach(), before[name][1]), name
    assert teacher_clip.vision_model.embeddings.patch_embedding.weight.data_ptr() == teacher_before
    assert teacher_clip.vision_model.embeddings.patch_embedding.weight.dtype == torch.float32


def test_frozen_weights_in_restores_and_leaves_trainable_modules_alone(tokenizer, caplog):
    model = student(tokenizer)
    text = model.clip.text_model
    original = text.final_layer_norm.weight.data_ptr()
    with frozen_weights_in(model.frozen_towers(), torch.bfloat16) as cast:
        assert text.final_layer_norm.weight.dtype == torch.bfloat16 and len(cast) == 4
        with frozen_weights_in(model.frozen_towers(), torch.bfloat16) as again:  # nested: nothing to do
            assert again == []
        with torch.no_grad():
            features = model.get_text_features(NAMES)
        assert features.dtype == torch.bfloat16
    assert text.final_layer_norm.weight.data_ptr() == original and text.final_layer_norm.weight.dtype == torch.float32
    reference = model.get_text_features(NAMES).detach()
    # bf16 weights and activations: ~3 significant digits through 2 layers
    torch.testing.assert_close(features.float(), reference, atol=0.05, rtol=0.05)
    model.clip.text_projection.weight.requires_grad_(True)
    with frozen_weights_in(model.frozen_towers(), torch.bfloat16) as cast:
        assert cast == [] and text.final_layer_norm.weight.dtype == torch.float32
    assert "keeps its float32 weights" in caplog.text and "Linear has trainable" in caplog.text


def test_pinned_batches_are_copied_without_blocking(tmp_path):
    """Pinned memory (the Trainer's default off CPU) plus accelerate's non_blocking copies: the host
    queues the batch's copy and goes on; an explicit accelerator_config is left as given."""
    assert train_args(tmp_path, use_cpu=False).accelerator_config.non_blocking is True
    assert train_args(tmp_path, use_cpu=True).accelerator_config.non_blocking is False  # no pinned memory on CPU
    explicit = train_args(tmp_path, use_cpu=False, accelerator_config={"non_blocking": False})
    assert explicit.accelerator_config.non_blocking is False


def test_a_nan_teacher_still_shows_in_the_loss():
    """A dense rebuild leaves a class NaN when a row repeats a class: the loss must be NaN (and the logs
    show it), not a row silently dropped by the masks that make 0·log 0 = 0."""
    from fdbpl_hf.losses import fdbpl_loss

    g = torch.Generator().manual_seed(0)
    x = [torch.randn(4, 5, generator=g) for _ in range(3)] + [torch.randn(4, 8, generator=g),
                                                             torch.randn(5, 8, generator=g),
                                                             torch.randn(5, 8, generator=g)]
    x[2][1, 3] = float("nan")
    out = fdbpl_loss(*x)
    assert torch.isnan(out["pos"]) and torch.isnan(out["total"])
    x[2][1, 3] = float("-inf")  # a class the teacher rules out: no NaN (the reverse KL is +inf there, as before)
    out = fdbpl_loss(*x)
    assert not torch.isnan(out["total"]) and torch.isfinite(out["neg"])


def test_deepcopy_of_a_model_prepared_for_training(tokenizer):
    model = student(tokenizer)
    model.set_class_names(NAMES)
    model.get_text_features(NAMES)  # prepared tensors exist
    twin = copy.deepcopy(model)
    # a random change: a constant added to every entry is removed by the layer norms (up to rounding)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        twin.prompts.ctx_pos.copy_(torch.randn(twin.prompts.ctx_pos.shape, generator=g))
        assert not torch.allclose(twin.get_text_features(NAMES), model.get_text_features(NAMES), atol=1e-2)


# ---- review of 0.7's merged step: settings the fused update cannot honour -------------------------

def random_table_batch(g, size=6):
    return {"image_features": torch.randn(size, 16, generator=g),
            "topk_indices": torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(size)]),
            "topk_logits": torch.randn(size, 4, generator=g).sort(-1, descending=True).values,
            "teacher_entropy": torch.rand(size, generator=g)}


def test_a_captured_step_follows_sgd_settings_changed_after_the_capture(tokenizer, monkeypatch):
    """A CUDA graph keeps the SGD settings of its capture (momentum, weight decay, ... read as Python
    numbers) as kernel constants: a change afterwards (a momentum schedule, a callback) would be ignored
    by every replay. Such a step runs eagerly with the new settings. The stand-in graph here replays with
    the settings of its capture, as a real one does; the uncaptured fused step is the oracle (same
    kernels in the same order: exact)."""
    import fdbpl_hf.step as step_module

    monkeypatch.setattr(step_module, "on_side_stream", lambda fn: fn())
    g = torch.Generator().manual_seed(1)
    batches = [random_table_batch(g) for _ in range(7)]
    runs = {}
    for captured in (False, True):
        model = student(tokenizer)
        model.set_class_names(DIGIT_NAMES)
        step = tiny_fused_step(model)
        group = step.optimizer.param_groups[0]

        def capture(fn, group=group):
            baked = {key: group[key] for key in ("momentum", "weight_decay")}
            graph = FakeGraph(fn)
            replay = graph.replay

            def replay_with_the_captured_settings():
                current = {key: group[key] for key in baked}
                group.update(baked)
                try:
                    replay()
                finally:
                    group.update(current)

            graph.replay = replay_with_the_captured_settings
            return graph, graph.outputs

        monkeypatch.setattr(step_module, "capture_cuda_graph", capture)
        step.capture = captured  # past FusedStep's CUDA check, for the stand-in graph
        for i, b in enumerate(batches):
            if i == 5:  # after the capture (3 warm-up steps, the capture at step 4)
                group["momentum"], group["weight_decay"] = 0.5, 0.01
            step(b)
            step.optimizer.step()
        runs[captured] = model.prompts.contexts().detach()
    torch.testing.assert_close(runs[True], runs[False], atol=0, rtol=0)
    assert step._graph is not None and step._graph.replays == 2  # the capture's own replay and step 5; then eager


def test_the_fused_step_refuses_several_parameter_groups(tokenizer):
    """The fused update applies the first group's learning rate and settings to both contexts: a second
    group's (another learning rate for the negative context) was silently ignored."""
    model = student(tokenizer)
    model.set_class_names(DIGIT_NAMES)
    optimizer = FusedStepSGD([{"params": [model.prompts.ctx_pos], "lr": 0.1},
                              {"params": [model.prompts.ctx_neg], "lr": 0.0}])
    with pytest.raises(ValueError, match="the optimiser has 2 parameter groups: put both contexts in one group"):
        FusedStep(model, optimizer, loss_kwargs={}, teacher_logits=None, teacher_entropy=None,
                  autocast=contextlib.nullcontext)


def test_contexts_go_in_exactly_under_autocast(tokenizer):
    """Under an enclosing autocast with float32 towers (--bf16 with cast_frozen_backbone=False) the one-hot
    injection ran in bf16: the contexts reached the float32 embeddings rounded to 3 significant digits
    (0.6's hook injected them in float32). The encoder's input must be what it is without autocast: the
    same float32 ops on both sides, so exact."""
    model = student(tokenizer)
    seen = []
    hook = model.clip.text_model.encoder.layers[0].register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model.get_text_features(NAMES)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.get_text_features(NAMES)
    hook.remove()
    reference, under_autocast = seen
    assert reference.dtype == under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference, atol=0, rtol=0)


@pytest.fixture(scope="module")
def second_table(digits_small, tokenizer, tmp_path_factory):
    """A second teacher's table of the same regions (composable with `table`)."""
    return build_ril_table(digits_small, make_clip("tiny", seed=5), teacher_tokenizer=tokenizer, num_regions=5,
                           top_k=3, output_dir=str(tmp_path_factory.mktemp("tables") / "t2"))


@pytest.mark.parametrize("options", [dict(weight_entropy="topk", max_grad_norm=0.3), dict(loss_type="coop")],
                         ids=["topk-clipped", "coop"])
def test_the_fused_step_trains_the_same_contexts_from_composed_tables(digits_small, table, second_table, tokenizer,
                                                                      tmp_path, options):
    """Composed tables (soft labels mixed by the dataset, `teacher_log_probs`) and options the mode test
    leaves at their defaults: top-K entropy weights with gradient clipping (the steps clipped), and CoOp.
    `table`'s teacher predicts one class for every region, so PCD is 0 in the mode test; the mixture has
    regions of several teacher classes and PCD a value (asserted), so the fused step's PCD inputs are
    compared too. Logs (every term, gradient norm) as the Trainer's step logs them. Tolerances as in
    `test_the_fused_step_trains_the_same_contexts`."""
    data = RILDataset(digits_small, [table, second_table], image_mean=MEAN, image_std=STD,
                      teacher_weighting="max_prob")
    reference, standard = run(tmp_path / "standard", tokenizer, data, None, logging_steps=3, **options)
    contexts, fused = run(tmp_path / "fused", tokenizer, data, None, logging_steps=3, train_step="fused", **options)
    torch.testing.assert_close(contexts, reference, atol=2e-6, rtol=0)
    a = assert_same_logs(standard, fused)
    if options.get("loss_type") != "coop":
        assert all(h["loss_pcd"] > 0 for h in a)
        assert all(h["grad_norm"] > 0.3 for h in a)  # the logged steps' norms (before clipping): clipped


def test_prepared_prompts_follow_a_new_tokenizer(tokenizer):
    """The prepared prompts were kept per class list whatever the tokenizer: after `model.tokenizer =
    other` the class names kept the old tokenizer's ids (silently the old features). Assigning a
    tokenizer drops them and checks it like the constructor."""
    model = student(tokenizer)
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["cat"])  # "cat" now one added token of its own
    assert other("cat", add_special_tokens=False)["input_ids"] != tokenizer("cat", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        before = model.get_text_features(NAMES)
        model.tokenizer = other
        after = model.get_text_features(NAMES)
        fresh = get_fdbpl_model(make_clip("tiny", seed=2), FDBPLConfig(), other).get_text_features(NAMES)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, fresh, atol=0, rtol=0)  # the same model and tokens: the same ops
    with pytest.raises(ValueError, match="a tokenizer is required"):
        model.tokenizer = None


def test_training_scores_the_training_classes_whatever_the_model_was_set_to(digits_small, table, tokenizer,
                                                                           tmp_path):
    """The trainer set the model's class names once, at construction, and the step scored whatever they
    were at each step: a `set_class_names` in between (the same model scoring other classes between two
    runs) trained the contexts against the table's soft labels in another class order, without a word.
    Tolerances as in `test_the_fused_step_trains_the_same_contexts`."""
    data = RILDataset(digits_small, table, image_mean=MEAN, image_std=STD)
    reference, _ = run(tmp_path / "reference", tokenizer, data, None)
    for train_step in ("standard", "fused"):
        model = student(tokenizer)
        trainer = FDBPLTrainer(model=model, args=train_args(tmp_path / train_step, train_step=train_step),
                               train_dataset=data)
        model.set_class_names(DIGIT_NAMES[::-1])
        trainer.train()
        torch.testing.assert_close(model.prompts.contexts().detach(), reference, atol=2e-6, rtol=0, msg=train_step)
