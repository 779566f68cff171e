"""`FDBPLPromptLearner`: the only trainable (and the only saved) part of an FDBPL model."""

# No `from __future__ import annotations` here: huggingface_hub's mixin rebuilds the config
# dataclass from the *evaluated* annotation of `__init__(config: FDBPLConfig)`.
import json
import os
from pathlib import Path
from typing import Optional

import torch
from huggingface_hub import ModelCard, ModelHubMixin, hf_hub_download
from safetensors.torch import load_file, save_file
from torch import nn

from .config import FDBPLConfig

ADAPTER_CONFIG_NAME = "config.json"
ADAPTER_WEIGHTS_NAME = "model.safetensors"
PAPER_URL = "https://arxiv.org/abs/2505.18053"

_CARD_TEMPLATE = """---
{{ card_data }}
---

# FDBPL adapter{% if base_model %} for `{{ base_model }}`{% endif %}

This is a prompt adapter trained with **FDBPL** ([Faster Distillation-Based Prompt Learning]({{ paper_url }}))
using [`fdbpl_hf`](https://pypi.org/project/fdbpl-hf/). It holds only two learnable text
contexts ({{ n_ctx }} tokens x {{ context_dim }} dims each, {{ num_params }} parameters): a **positive**
prompt used for classification and a **negative** prompt that scores uninformative or
out-of-distribution inputs. The CLIP model itself is not stored here.

## How to load

```python
from transformers import CLIPModel, CLIPTokenizer
from fdbpl_hf import FDBPLCLIPModel

clip = CLIPModel.from_pretrained("{{ base_model or 'BASE_MODEL_ID' }}")
tokenizer = CLIPTokenizer.from_pretrained("{{ base_model or 'BASE_MODEL_ID' }}")
model = FDBPLCLIPModel.from_pretrained(clip, "{{ repo_id or 'path/to/this/adapter' }}", tokenizer=tokenizer)
logits = model(pixel_values, class_names=["cat", "dog"]).pos_logits
```

## Adapter

| setting | value |
|---|---|
| base model | `{{ base_model or 'unknown' }}`{% if revision %} (revision `{{ revision }}`){% endif %} |
| context tokens | {{ n_ctx }} |
| positive init | {{ positive_init }} |
| negative init | {{ negative_init }} |
| class name position | {{ class_token_position }} |
| fdbpl_hf version | {{ fdbpl_version }} |
{% if class_names %}
Trained on {{ class_names|length }} classes: {{ class_names|join(", ") }}.
{% endif %}{% if training %}
## Training

| | |
|---|---|
{% for key, value in training.items() %}| {{ key }} | {{ value }} |
{% endfor %}{% endif %}
## Citation

```bibtex
@article{fdbpl2025,
  title   = {FDBPL: Faster Distillation-Based Prompt Learning for Region-Aware Vision-Language Models Adaptation},
  journal = {arXiv preprint arXiv:2505.18053},
  year    = {2025}
}
```
"""


def adapter_file(model_id: str, name: str, *, revision: Optional[str] = None, cache_dir=None,
                 force_download: bool = False, local_files_only: bool = False, token=None) -> str:
    """Local path of file `name` of an adapter folder or Hub repo (downloaded if needed)."""
    model_id = str(model_id)
    if os.path.isdir(model_id):
        path = os.path.join(model_id, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_id} is not an FDBPL adapter: no {name}")
        return path
    try:
        return hf_hub_download(model_id, name, revision=revision, cache_dir=cache_dir,
                               force_download=force_download, local_files_only=local_files_only, token=token)
    except Exception as err:
        # "runs/eurosat" is a folder name and a Hub id alike: say both were tried
        raise FileNotFoundError(
            f"no FDBPL adapter at {model_id!r}: no folder {os.path.abspath(model_id)}, and no {name} "
            f"could be read from a Hub repo {model_id} ({type(err).__name__}: {err})") from err


class FDBPLPromptLearner(
    nn.Module,
    ModelHubMixin,
    library_name="fdbpl_hf",
    paper_url=PAPER_URL,
    tags=["fdbpl", "prompt-learning", "clip", "knowledge-distillation"],
    model_card_template=_CARD_TEMPLATE,
):
    """The positive and negative contexts, `[n_ctx, context_dim]` each.

    Persists as `config.json` + `model.safetensors` + `README.md` (a few KB). Loading never
    executes code and never unpickles: only JSON and safetensors are read.
    """

    def __init__(self, config: FDBPLConfig):
        super().__init__()
        if config.context_dim is None:
            raise ValueError("FDBPLConfig.context_dim must be set (get_fdbpl_model fills it)")
        self.config = config
        shape = (config.n_ctx, config.context_dim)
        self.ctx_pos = nn.Parameter(torch.empty(shape).normal_(std=0.02))
        self.ctx_neg = nn.Parameter(torch.empty(shape).normal_(std=0.02))

    def contexts(self) -> torch.Tensor:
        """`[2, n_ctx, D]`: positive then negative."""
        return torch.stack([self.ctx_pos, self.ctx_neg])

    # ---- persistence -------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        tensors = {"ctx_pos": self.ctx_pos.detach().float().cpu().contiguous(),
                   "ctx_neg": self.ctx_neg.detach().float().cpu().contiguous()}
        save_file(tensors, str(save_directory / ADAPTER_WEIGHTS_NAME),
                  metadata={"format": "pt", "library": "fdbpl_hf"})
        with open(save_directory / ADAPTER_CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(self.config.to_dict(), f, indent=2, sort_keys=True)

    def save_pretrained(self, save_directory, *, is_main_process: bool = True, model_card_kwargs=None, **kwargs):
        """Write `config.json`, `model.safetensors` and a fresh `README.md` card (`model_card_kwargs`
        fill it, e.g. `repo_id`); nothing when `is_main_process` is False (as in transformers)."""
        if not is_main_process:
            return None
        # The mixin keeps an existing card: remove it so the card always describes this adapter now.
        (Path(save_directory) / "README.md").unlink(missing_ok=True)
        return super().save_pretrained(save_directory, model_card_kwargs=model_card_kwargs, **kwargs)

    def push_to_hub(self, repo_id: str, *, model_card_kwargs=None, **kwargs) -> str:
        """Publish the adapter; its card's loading snippet names the repo (owner included)."""
        from huggingface_hub import HfApi

        # resolved first, so that "name" becomes "user/name" on the card as on the Hub
        repo_id = HfApi(token=kwargs.get("token")).create_repo(
            repo_id, private=kwargs.get("private"), exist_ok=True).repo_id
        return super().push_to_hub(repo_id, model_card_kwargs={"repo_id": repo_id, **(model_card_kwargs or {})},
                                   **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: Optional[str], cache_dir, force_download: bool,
                         local_files_only: bool, token, **model_kwargs) -> "FDBPLPromptLearner":
        where = dict(revision=revision, cache_dir=cache_dir, force_download=force_download,
                     local_files_only=local_files_only, token=token)
        config = FDBPLConfig.from_pretrained(model_id, **where)
        state = load_file(adapter_file(model_id, ADAPTER_WEIGHTS_NAME, **where))
        learner = cls(config)
        expected = {k: tuple(v.shape) for k, v in learner.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if expected != found:
            raise ValueError(f"adapter weights in {model_id} do not match its config: "
                             f"expected {expected}, found {found}")
        learner.load_state_dict(state, strict=True)
        return learner

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        cfg = self.config
        info = self._hub_mixin_info
        card_data = info.model_card_data.__class__(**info.model_card_data.to_dict())
        if cfg.base_model_name_or_path and not os.path.isabs(cfg.base_model_name_or_path):
            card_data.base_model = cfg.base_model_name_or_path
        return ModelCard.from_template(
            card_data=card_data,
            template_str=info.model_card_template,
            paper_url=PAPER_URL,
            base_model=cfg.base_model_name_or_path,
            revision=cfg.revision,
            n_ctx=cfg.n_ctx,
            context_dim=cfg.context_dim,
            num_params=sum(p.numel() for p in self.parameters()),
            positive_init=repr(cfg.positive_init),
            negative_init=repr(cfg.negative_init),
            class_token_position=cfg.class_token_position,
            fdbpl_version=cfg.fdbpl_version,
            class_names=cfg.class_names,
            training=cfg.training,
            repo_id=kwargs.get("repo_id"),
        )
