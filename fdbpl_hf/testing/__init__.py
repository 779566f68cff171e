"""Demo and test worlds, outside the library proper (no library module imports this package).

- `fdbpl_hf.testing.worlds`: the real CLIP tokenizer, CLIP configs from tiny to ViT-L sizes and
  real MNIST digits (and two-digit numbers), all built without the network from PyPI wheels;
- `fdbpl_hf.testing.zoo`: a teacher and a student CLIP pretrained on those digits (the demo's models).

`fdbpl_hf.offline` and `fdbpl_hf.zoo` are the same modules under their pre-0.5 names.
"""
