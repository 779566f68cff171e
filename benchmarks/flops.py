"""Analytic FLOP counts of CLIP towers, for the speed benchmark (`benchmarks/speed.py`).

Convention: one multiply-add = 2 FLOPs. Counted: every matrix product (patch embedding, Q/K/V and
output projections, the two MLP layers, the attention score and attention x value products, the
final projection of the pooled token). Not counted: LayerNorm, softmax, GELU, residual adds,
embedding look-ups and the logit/loss math, which are all O(tokens x width) and below 1% here.

Backward through a *frozen* tower (the student's text encoder: only the context tokens at its
input need gradients): PyTorch's autograd only computes the gradients whose inputs require them,
so a linear layer with `requires_grad=False` weights runs one GEMM backward (input gradient),
not two: 1x its forward. The two attention products multiply two activations, both needing
gradients: 2x their forward. The image towers run under `no_grad` (no backward at all).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tower:
    """A pre-LN transformer tower as CLIP builds it."""

    name: str
    width: int
    layers: int
    mlp: int
    tokens: int               # sequence length (image: patches + class token; text: padded prompt)
    proj: int                 # projection_dim of the pooled token
    patch: int = 0            # image towers: patch size (0 for text)
    image_size: int = 0

    def forward_parts(self) -> dict[str, float]:
        """FLOPs of one forward pass of one sequence, split into linear (weight) and attention parts."""
        n, d = self.tokens, self.width
        linear = 2 * self.layers * n * (4 * d * d + 2 * d * self.mlp)  # QKV + out proj + 2 MLP GEMMs
        attention = 2 * self.layers * 2 * n * n * d                    # QK^T and attn @ V
        head = 2 * d * self.proj                                       # projection of the pooled token
        embed = 0.0
        if self.patch:
            patches = (self.image_size // self.patch) ** 2
            embed = 2 * patches * (3 * self.patch * self.patch) * d   # the patch-embedding conv
        return {"linear": linear + head + embed, "attention": attention}

    def forward(self) -> float:
        parts = self.forward_parts()
        return parts["linear"] + parts["attention"]

    def backward_frozen(self) -> float:
        """Activation gradients only (frozen weights): 1x the weight GEMMs, 2x the attention products.

        (The patch embedding of an image tower would have no input gradient; only text uses this.)
        """
        parts = self.forward_parts()
        return parts["linear"] + 2 * parts["attention"]

    def forward_backward_frozen(self) -> float:
        return self.forward() + self.backward_frozen()


def vit(name: str, image_size: int, patch: int, width: int, layers: int, proj: int, mlp: int | None = None) -> Tower:
    tokens = (image_size // patch) ** 2 + 1
    return Tower(name, width, layers, mlp or 4 * width, tokens, proj, patch, image_size)


def text_tower(name: str, tokens: int, width: int = 512, layers: int = 12, proj: int = 512,
               mlp: int | None = None) -> Tower:
    return Tower(name, width, layers, mlp or 4 * width, tokens, proj)


def real_models(prompt_tokens: int) -> dict[str, Tower]:
    """The paper's models: teacher ViT-L/14 image tower, student ViT-B/32 image and text towers."""
    return {
        "teacher_image": vit("ViT-L/14 image @224", 224, 14, 1024, 24, 768, mlp=4096),
        "student_image": vit("ViT-B/32 image @224", 224, 32, 768, 12, 512, mlp=3072),
        "student_text": text_tower(f"ViT-B/32 text, {prompt_tokens} tokens", prompt_tokens, 512, 12, 512),
    }


@dataclass(frozen=True)
class StepFlops:
    teacher: float            # B teacher image forwards
    student_image: float      # B student image forwards (no grad)
    student_text: float       # 2C prompts (positive + negative), forward + activation backward

    @property
    def offline(self) -> float:
        return self.student_image + self.student_text

    @property
    def online(self) -> float:
        return self.teacher + self.offline

    @property
    def limit(self) -> float:
        return self.online / self.offline


def step_flops(teacher_image: float, student_image: float, text_per_class: float, batch: int,
               num_classes: int) -> StepFlops:
    """One training step: B regions, C classes scored by a positive and a negative prompt each."""
    return StepFlops(batch * teacher_image, batch * student_image, 2 * num_classes * text_per_class)


if __name__ == "__main__":  # a quick look: python benchmarks/flops.py
    for n in (10, 77):
        m = real_models(n)
        t, s = m["teacher_image"].forward(), m["student_image"].forward()
        x = m["student_text"].forward_backward_frozen()
        print(f"prompt tokens {n}: teacher {t / 1e9:.1f} GFLOPs/img, student image {s / 1e9:.2f} GFLOPs/img, "
              f"text fwd+bwd {x / 1e9:.2f} GFLOPs/class-prompt")
        for c in (50, 500):
            f = step_flops(t, s, x, 32, c)
            print(f"  C={c}: online {f.online / 1e12:.2f} TFLOPs/step, offline {f.offline / 1e12:.3f}, "
                  f"limit {f.limit:.2f}x")
