"""The fused training step (`--train_step fused` / `cuda_graph`): the whole FDBPL training step as one
function of tensors, which a CUDA graph can capture once and replay.

One step = the student's image features (image tower, or the feature cache's rows), the class
prompts' text features under both contexts (`fdbpl_hf.prompt_encoding`), the teacher's logits (the
table's top-K rebuilt, or the live teacher on the same pixels), the loss
(`fdbpl_hf.losses.fdbpl_objective`), the gradients of the two contexts (`torch.autograd.grad`), the
gradient norm (and clipping when `max_grad_norm` > 0), the SGD update of the contexts and of the
momentum buffers the Trainer's `torch.optim.SGD` holds (so checkpoints and resumption are the
Trainer's own), and the sums of the logged loss terms. Nothing in it reads a tensor on the host,
and no shape depends on data: it can be captured.

- "fused": the step runs eagerly on any device (with `--torch_compile`, its forward and loss are
  compiled as one graph, `fullgraph=True`, so a graph break is an error, not a slowdown);
- "cuda_graph": after `WARMUP_STEPS` eager steps on a side stream, the step is captured as one
  CUDA graph and each later step is a copy of the batch into the graph's input buffers, the
  learning rate written into a device tensor, and one replay. CUDA only (refused elsewhere).

The Trainer stays the entry point: `FDBPLTrainer.training_step` calls the step, its
`optimizer.step()` call then finds the update done (`FusedStepSGD`), its gradient norm is the
step's, and its logs read the step's sums.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

from .frozen_layers import prepared_encoder, recording_encoders
from .losses import coop_loss, fdbpl_objective
from .modeling import FDBPLCLIPModel, prompt_logits
from .prompt_encoding import PreparedText, encode_prepared, prepare_text
from .ril.replay import TEACHER_LOG_PROBS
from .ril.table import ENTROPY_COLUMN

logger = logging.getLogger(__name__)

STEP_MODES = ("standard", "fused", "cuda_graph")
# what the step logs, in this order, then the count of batches with a non-finite live teacher and the batch count
LOGGED_TERMS = ("pos", "neg", "sim", "pcd", "weight")
# eager steps before the capture: the first one creates the momentum buffers, the others let
# cuBLAS, SDPA and the caching allocator settle (PyTorch's whole-network capture recipe uses 3)
WARMUP_STEPS = 3
# the batch keys the step reads (any other key, e.g. image ids, stays out of the graph)
# (teacher_log_probs: composed tables' soft labels, mixed by the dataset)
STEP_INPUTS = ("pixel_values", "image_features", "topk_indices", "topk_logits", TEACHER_LOG_PROBS, "labels",
               ENTROPY_COLUMN)


class FusedStepSGD(torch.optim.SGD):
    """`torch.optim.SGD` whose update the fused training step applies itself, on the same
    parameters and momentum buffers: `step()` then does nothing once (the Trainer calls it after
    every training step); called without a fused update before it, it is plain SGD. Its state
    dict is plain SGD's."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.update_applied = False

    def step(self, closure=None):
        if self.update_applied:
            self.update_applied = False
            return None
        return super().step(closure)


def check_fused_sgd(optimizer: torch.optim.Optimizer) -> None:
    """Refuse SGD settings the fused update does not reproduce."""
    if not isinstance(optimizer, FusedStepSGD):
        raise ValueError(f"the fused training step applies the SGD update itself; got {type(optimizer).__name__}: "
                         "use the default optim='sgd' with train_step='fused' or 'cuda_graph'")
    if len(optimizer.param_groups) != 1:
        # the update reads one group's settings for both contexts: a second group's would be ignored
        raise ValueError(f"the fused training step applies one SGD update, with one parameter group's settings, to "
                         f"both contexts; the optimiser has {len(optimizer.param_groups)} parameter groups: put both "
                         "contexts in one group, or use train_step='standard'")
    for group in optimizer.param_groups:
        for key in ("maximize", "differentiable"):
            if group.get(key):
                raise ValueError(f"the fused training step does not implement SGD's {key}=True")


class FusedStep:
    """One training step of an `FDBPLCLIPModel` as one function of tensors (see the module doc).

    Args:
        model: the student (unwrapped).
        optimizer: the `FusedStepSGD` over the two contexts (its lr, momentum, dampening, weight
            decay and nesterov are read; its momentum buffers are updated in place).
        loss_kwargs: `fdbpl_objective`'s settings (lambdas, margin, weight mode ...).
        teacher_logits: `(batch, pixels) -> [B, C]` float32 teacher logits (table rebuild or live teacher).
        teacher_entropy: `batch -> [B] or None`, the entropy behind the region weights.
        autocast: the student's autocast context factory (`fdbpl_hf.acceleration.autocast_factory`).
        render: `batch -> pixels or None` for device-replay batches (rendered before the step:
            the batch's crop sizes set the shapes).
        loss_type: "fdbpl" or "coop".
        max_grad_norm: clip the contexts' gradient norm to this when > 0 (as the Trainer would).
        capture: capture the step as a CUDA graph (the contexts must be on a CUDA device).
        compile_options: `torch.compile` keyword arguments for the forward + loss, or None.
        live_teacher: whether the teacher logits come from a live teacher (its finiteness is counted).
        class_names: the classes scored (the teacher logits' columns); default: the model's `set_class_names`.
    """

    def __init__(self, model: FDBPLCLIPModel, optimizer: FusedStepSGD, *, loss_kwargs: dict,
                 teacher_logits: Callable, teacher_entropy: Callable, autocast: Callable,
                 render: Optional[Callable] = None, loss_type: str = "fdbpl", max_grad_norm: float = 0.0,
                 capture: bool = False, compile_options: Optional[dict] = None, live_teacher: bool = False,
                 class_names: Optional[Sequence[str]] = None):
        check_fused_sgd(optimizer)
        self.model, self.optimizer = model, optimizer
        self.params = [model.prompts.ctx_pos, model.prompts.ctx_neg]
        trained = [p for group in optimizer.param_groups for p in group["params"]]
        if len(trained) != 2 or any(not any(p is q for q in self.params) for p in trained):
            raise ValueError("the fused training step trains exactly the two contexts: the optimiser holds other "
                             "parameters")
        self.loss_kwargs, self.loss_type = dict(loss_kwargs), loss_type
        self.teacher_logits, self.teacher_entropy = teacher_logits, teacher_entropy
        self.autocast, self.render = autocast, render
        self.max_grad_norm, self.live_teacher = float(max_grad_norm), live_teacher
        device = self.params[0].device
        if capture and device.type != "cuda":
            raise ValueError(f"train_step='cuda_graph' captures CUDA graphs, and the contexts are on {device.type}: "
                             "use train_step='fused' (the same step, not captured) off CUDA")
        self.capture = capture
        self.class_prompts = model.class_prompts(class_names)
        self.terms = () if loss_type == "coop" else LOGGED_TERMS
        self.sums = torch.zeros(len(LOGGED_TERMS) + 2, device=device)  # accumulated in place, read by the logs
        self.lr = torch.zeros((), device=device)  # the schedule's rate, written before each step
        self.grad_norm: Optional[torch.Tensor] = None
        self._forward = self._forward_loss if compile_options is None else torch.compile(
            self._forward_loss, fullgraph=True, **compile_options)
        self._eager_steps = 0
        self._graph = None
        self._static: dict = {}
        self._outputs: tuple = ()
        self._captured_state: tuple = ()
        self._graph_encoders: dict = {}  # (an ordered set) encoders run from prepared weights in the step
        self._captured_settings: tuple = ()
        self._told_eager: set = set()

    # ---- the step as tensor work -----------------------------------------------------------
    def _forward_loss(self, batch: dict, prepared: PreparedText, contexts: torch.Tensor):
        """(total loss, logged row `[len(LOGGED_TERMS) + 2]`) of one batch; differentiable in `contexts`."""
        model = self.model
        pixels = batch.get("pixel_values")
        with self.autocast():
            features = batch.get("image_features")
            if features is None:
                features = model.get_image_features(pixels)
            text = encode_prepared(model.clip, prepared, contexts)
        logits, image_unit, text_unit = prompt_logits(features, text, model.logit_scale, copies=contexts.shape[0])
        one = logits.new_ones(())
        zero = logits.new_zeros(())
        if self.loss_type == "coop":
            return coop_loss(logits[:, 0], batch["labels"]), torch.stack([zero] * (len(LOGGED_TERMS) + 1) + [one])
        teacher = self.teacher_logits(batch, pixels)
        losses = fdbpl_objective(logits, teacher, image_unit, text_unit, teacher_entropy=self.teacher_entropy(batch),
                                 **self.loss_kwargs)
        nonfinite = (~torch.isfinite(teacher).all()).float() if self.live_teacher else zero
        row = torch.stack([losses[key].detach().float() for key in LOGGED_TERMS] + [nonfinite, one])
        return losses["total"], row

    def _step(self, batch: dict, prepared: PreparedText) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, loss, gradients, clipping, SGD update and logged sums; returns (loss, grad norm)."""
        contexts = torch.stack(self.params)
        total, row = self._forward(batch, prepared, contexts)
        (grad,) = torch.autograd.grad(total, [contexts])
        norm = torch.linalg.vector_norm(grad)
        if self.max_grad_norm > 0:  # torch.nn.utils.clip_grad_norm_'s rule
            grad = grad * torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
        self._sgd(list(grad.unbind(0)))
        self.sums.add_(row)
        return total.detach(), norm

    def _sgd(self, grads: list) -> None:
        """`torch.optim.SGD`'s foreach update of the contexts, with the learning rate read from the
        device tensor `self.lr` (a captured step replays with each step's rate)."""
        group = self.optimizer.param_groups[0]
        momentum, dampening = group["momentum"], group["dampening"]
        with torch.no_grad():
            self._update(grads, group, momentum, dampening)

    def _update(self, grads: list, group: dict, momentum: float, dampening: float) -> None:
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, self.params, alpha=group["weight_decay"])
        if momentum != 0:
            state = [self.optimizer.state[p] for p in self.params]
            buffers = [s.get("momentum_buffer") for s in state]
            if any(b is None for b in buffers):  # the first step (eager, never captured)
                buffers = [torch.clone(g).detach() for g in grads]
                for s, b in zip(state, buffers):
                    s["momentum_buffer"] = b
            else:
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, grads, alpha=1 - dampening)
            grads = torch._foreach_add(grads, buffers, alpha=momentum) if group["nesterov"] else buffers
        torch._foreach_sub_(self.params, torch._foreach_mul(grads, self.lr))

    # ---- running it ------------------------------------------------------------------------
    def __call__(self, inputs: dict) -> torch.Tensor:
        """Run one training step on a collated batch (already on the device); returns the loss."""
        batch = {key: inputs[key] for key in STEP_INPUTS if key in inputs}
        if self.render is not None and "region_crop" in inputs:
            batch["pixel_values"] = self.render(inputs)
        prepared = prepare_text(self.model.clip, self.class_prompts, 2, self.params[0].shape[0],
                                self.params[0].dtype)
        self.lr.fill_(self.optimizer.param_groups[0]["lr"])
        if not self.capture:
            loss, self.grad_norm = self._step(batch, prepared)
        else:
            loss, self.grad_norm = self._captured(batch, prepared)
        self.optimizer.update_applied = True
        return loss

    def _captured(self, batch: dict, prepared: PreparedText) -> tuple[torch.Tensor, torch.Tensor]:
        if self._graph is not None:
            if not _same_objects(self._state(prepared), self._captured_state):
                raise RuntimeError("a tensor the captured training step reads was replaced since the capture (the "
                                   "contexts, the optimiser's momentum buffers or the backbone's weights): "
                                   "the CUDA graph would read stale memory")
            if _shapes(batch) != _shapes(self._static):
                return self._eager_once(batch, prepared, "a batch of another shape than the captured one")
            if self._settings() != self._captured_settings:
                # the graph holds the SGD settings of the capture as constants: an eager step reads the current ones
                return self._eager_once(batch, prepared, "the optimiser's momentum, dampening, weight decay or "
                                        "nesterov changed since the capture (each such step runs eagerly)", warn=True)
            for key, value in batch.items():
                self._static[key].copy_(value, non_blocking=True)
            self._graph.replay()
            return self._outputs
        if self._eager_steps < WARMUP_STEPS:
            self._eager_steps += 1
            with recording_encoders() as used:  # the capture runs the same Python: the same encoders
                out = on_side_stream(lambda: self._step(batch, prepared))
            self._graph_encoders.update(dict.fromkeys(used))
            return out
        self._static = {key: value.clone() for key, value in batch.items()}
        static = self._static
        with recording_encoders() as used:
            self._graph, self._outputs = capture_cuda_graph(lambda: self._step(static, prepared))
        self._graph_encoders.update(dict.fromkeys(used))  # those whose prepared weights the graph reads
        self._captured_state = self._state(prepared)
        self._captured_settings = self._settings()
        logger.info("fused training step captured as one CUDA graph after %d eager steps", self._eager_steps)
        self._graph.replay()  # the capture recorded this step's work without running it
        return self._outputs

    def _eager_once(self, batch: dict, prepared: PreparedText, why: str, warn: bool = False):
        if why not in self._told_eager:
            (logger.warning if warn else logger.info)("training step run eagerly, not replayed: %s (the same "
                                                      "computation)", why)
            self._told_eager.add(why)
        return self._step(batch, prepared)

    def _settings(self) -> tuple:
        """The SGD settings `_update` reads as Python numbers (a captured graph keeps those of the capture)."""
        group = self.optimizer.param_groups[0]
        return tuple(group[key] for key in ("momentum", "dampening", "weight_decay", "nesterov"))

    def _state(self, prepared: PreparedText) -> tuple:
        """The tensors a captured graph reads by address (kept alive here, compared by identity)."""
        buffers = tuple(self.optimizer.state[p].get("momentum_buffer") for p in self.params)
        # the prepared weights of the encoders the graph runs (student towers, a live CLIP teacher's image tower):
        # held here, so their memory stays the graph's, and compared by identity (a rebuild means changed weights)
        layers = tuple(prepared_encoder(encoder) for encoder in self._graph_encoders)
        return (*self.params, *buffers, self.sums, self.lr, *prepared, *layers)

    def take_sums(self) -> torch.Tensor:
        """The logged sums since the last call (a copy), and zero them (device work, no sync)."""
        sums = self.sums.clone()
        self.sums.zero_()
        return sums


def capture_cuda_graph(fn: Callable[[], tuple]) -> tuple:
    """(a CUDA graph of `fn()`'s work, the tensors it returned: its outputs at every replay). The
    capture records the kernels without running them."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: DataLoader threads (pinning the next batch) may call CUDA while this thread captures
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        outputs = fn()
    return graph, outputs


def on_side_stream(fn: Callable):
    """`fn()` on a side stream, the current stream then waiting for it: PyTorch's warm-up before a
    capture (cuBLAS workspaces, autograd's streams)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


def _same_objects(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _shapes(batch: dict) -> tuple:
    return tuple(sorted((key, tuple(value.shape), value.dtype) for key, value in batch.items()))
