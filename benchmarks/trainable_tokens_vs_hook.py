#!/usr/bin/env python
"""Text-embedding forward + backward per step: peft's `TrainableTokensLayer` against fdbpl_hf's hook.

    python benchmarks/trainable_tokens_vs_hook.py   # a few seconds, one CPU thread

Why: adapters are saved in peft's TrainableTokens format, but training keeps fdbpl_hf's forward
hook (docs/adapter-format.md). peft's layer rebuilds the whole embedding matrix with `index_copy`
at every forward and gets a dense gradient of it; the hook writes only the context rows. Both
train the same 8 rows here: ViT-B/32's text vocabulary (49,408 + 8 rows x 512), 100 prompts of 10
tokens, 4 context positions per prompt.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import git_commit, mean_ms, torch_threads  # noqa: E402
import torch  # noqa: E402
from peft import TrainableTokensConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402

VOCAB, WIDTH, PROMPTS, LENGTH = 49408, 512, 100, 10


class TextEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB + 8, WIDTH)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids)


def main() -> None:
    with torch_threads(1):
        run()


def run() -> None:
    import fdbpl_hf

    print(f"fdbpl_hf {fdbpl_hf.__version__} at {git_commit()}, torch {torch.__version__}, 1 thread")
    ids = torch.randint(0, VOCAB, (PROMPTS, LENGTH))
    ids[:, 1:5] = torch.arange(VOCAB, VOCAB + 4)  # the positive context tokens
    peft_model = get_peft_model(TextEmbedding(), TrainableTokensConfig(
        target_modules=["token_embedding"], token_indices=list(range(VOCAB, VOCAB + 8))))

    hooked = TextEmbedding().requires_grad_(False)
    ctx = nn.Parameter(torch.randn(4, WIDTH))
    mask = torch.zeros(PROMPTS, LENGTH, dtype=torch.bool)
    mask[:, 1:5] = True
    hooked.token_embedding.register_forward_hook(
        lambda module, args, out: out.masked_scatter(mask[..., None], ctx.expand(PROMPTS, -1, -1).reshape(-1, WIDTH)))

    for r in range(2):
        peft_ms = mean_ms(lambda: peft_model(ids).sum().backward())
        hook_ms = mean_ms(lambda: hooked(ids).sum().backward())
        print(f"round {r}: peft TrainableTokensLayer {peft_ms:.2f} ms, fdbpl_hf hook {hook_ms:.2f} ms")


if __name__ == "__main__":
    main()
