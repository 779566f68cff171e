"""The FDBPL adapter on disk: two learnable text contexts in peft's `TrainableTokens` format.

An adapter folder (or Hub repo) holds:

- `adapter_config.json` + `adapter_model.safetensors`: a stock peft `TrainableTokensConfig` on
  CLIP's `token_embedding` whose `2 * n_ctx` trainable rows are the positive context
  (`<fdbpl_pos_0>` ...) then the negative one (`<fdbpl_neg_0>` ...);
- the tokenizer (`tokenizer.json`, `tokenizer_config.json`): the base tokenizer plus those
  `2 * n_ctx` added tokens, at the ids the peft config names;
- `fdbpl_config.json`: the `FDBPLConfig` (inits, class-name position, base model signature,
  training record);
- `README.md`: the card (`library_name: peft`).

So `peft.PeftModel.from_pretrained(clip, folder)` loads it after three stock steps (tokenizer
from the folder, `clip.text_model.resize_token_embeddings(len(tokenizer))`, EOS id set to the
tokenizer's), and `FDBPLCLIPModel.from_pretrained` reads it, and 0.3 adapters
(`config.json` + `model.safetensors` with `ctx_pos` / `ctx_neg`) too. Loading never executes
code and never unpickles: JSON and safetensors only. docs/adapter-format.md says why.
"""

import copy
import functools
import json
import os
import re
from typing import Optional

import torch
from huggingface_hub import ModelCard, ModelCardData
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .adapter_files import FDBPL_CONFIG_NAME, LEGACY_CONFIG_NAME, adapter_file, hub_model_id, locate_adapter_config
from .config import FDBPLConfig
from .files import write_json
from .saving import CARD_NAME, card_owner, save_files, stamp_card

ADAPTER_CONFIG_NAME = "adapter_config.json"  # peft's names
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "model.safetensors"
# what a tokenizer's save_pretrained may write, depending on its class and the transformers version
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
# what a checkpoint holds besides peft's two files (the Trainer copies only those before a push)
ADAPTER_COMPANION_FILES = (FDBPL_CONFIG_NAME, *TOKENIZER_FILES, CARD_NAME)
# the first line of the cards fdbpl_hf writes (before 0.7 they were recognised by it; 0.3's too)
ADAPTER_CARD_HEADINGS = ("# FDBPL adapter",)
MERGED_CARD_HEADINGS = ("# CLIP with an FDBPL prompt",)
TARGET_MODULE = "token_embedding"
PEFT_WEIGHTS_KEY = "base_model.model.text_model.embeddings.token_embedding.trainable_tokens_delta"
PAPER_URL = "https://arxiv.org/abs/2505.18053"
CARD_TAGS = ["fdbpl", "prompt-learning", "clip", "knowledge-distillation", "trainable-tokens", "arxiv:2505.18053"]


def context_tokens(n_ctx: int, negative: Optional[bool] = None) -> list[str]:
    """Names of the added tokens: positive `<fdbpl_pos_k>` then negative `<fdbpl_neg_k>`
    (only one of them with `negative=False` / `True`)."""
    pos = [f"<fdbpl_pos_{k}>" for k in range(n_ctx)]
    neg = [f"<fdbpl_neg_{k}>" for k in range(n_ctx)]
    return pos + neg if negative is None else (neg if negative else pos)


def hypothesis_template(config: FDBPLConfig, negative: bool = False) -> str:
    """The learned prompt as text for a tokenizer holding the context tokens, with `{}` for the
    class name: `"<fdbpl_pos_0><fdbpl_pos_1><fdbpl_pos_2><fdbpl_pos_3> {}."` for the default.
    It tokenises to exactly the ids `FDBPLCLIPModel` builds (tested)."""
    ctx = context_tokens(config.n_ctx, negative)
    if config.class_token_position == "end":
        return "".join(ctx) + " {}."
    if config.class_token_position == "front":
        return "{} " + "".join(ctx) + "."
    half = config.n_ctx // 2
    return ("".join(ctx[:half]) + " {} " + "".join(ctx[half:]) + ".").lstrip()


def _read_tensors(path: str, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors file, their shapes checked from the header before any
    is read, and refused unless finite."""
    try:
        with safe_open(path, framework="pt") as f:
            keys = sorted(f.keys())
            if keys != sorted(expected):
                raise ValueError(f"{path} holds tensors {keys}, expected {sorted(expected)}")
            for key, shape in expected.items():
                found = tuple(f.get_slice(key).get_shape())
                if found != shape:
                    raise ValueError(f"{path}: tensor {key!r} has shape {found}, its config says {shape}")
            tensors = {key: f.get_tensor(key) for key in expected}
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from err
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, expected floating point")
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{path}: tensor {key!r} holds {bad} NaN or infinite values: the adapter is corrupt "
                             "(or its training diverged); load an earlier checkpoint")
    return tensors


def _check_peft_config(path: str, config: FDBPLConfig) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(data, dict) or data.get("peft_type") != "TRAINABLE_TOKENS":
        raise ValueError(f"{path}: field 'peft_type' must be 'TRAINABLE_TOKENS' for an FDBPL adapter")
    indices = data.get("token_indices")
    if (not isinstance(indices, list) or len(indices) != 2 * config.n_ctx
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)):
        raise ValueError(f"{path}: field 'token_indices' must list {2 * config.n_ctx} token ids (2 x n_ctx)")


class FDBPLPromptLearner(nn.Module):
    """The positive and negative contexts, `[n_ctx, context_dim]` each: the only trainable part
    of an `FDBPLCLIPModel`. `FDBPLCLIPModel.save_pretrained` writes them in peft's format."""

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

    @classmethod
    def from_pretrained(cls, model_id: str | os.PathLike, *, revision: Optional[str] = None, cache_dir=None,
                        force_download: bool = False, local_files_only: bool = False,
                        token=None) -> "FDBPLPromptLearner":
        """Read an adapter folder or Hub repo, in the peft format or the 0.3 one. The config is
        validated and the weights' shapes checked against it before anything is allocated."""
        where = dict(revision=revision, cache_dir=cache_dir, force_download=force_download,
                     local_files_only=local_files_only, token=token)
        config_path, legacy = locate_adapter_config(model_id, **where)
        config = FDBPLConfig.from_json_file(config_path)
        if config.context_dim is None:
            raise ValueError(f"{config_path}: field 'context_dim' must be set")
        n, dim = config.n_ctx, config.context_dim
        if legacy:
            path = adapter_file(model_id, LEGACY_WEIGHTS_NAME, **where)
            state = _read_tensors(path, {"ctx_pos": (n, dim), "ctx_neg": (n, dim)})
        else:
            _check_peft_config(adapter_file(model_id, ADAPTER_CONFIG_NAME, **where), config)
            path = adapter_file(model_id, ADAPTER_WEIGHTS_NAME, **where)
            rows = _read_tensors(path, {PEFT_WEIGHTS_KEY: (2 * n, dim)})[PEFT_WEIGHTS_KEY]
            state = {"ctx_pos": rows[:n], "ctx_neg": rows[n:]}
        learner = cls(config)
        learner.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return learner


def adapter_tokenizer(tokenizer, n_ctx: int):
    """(a tokenizer holding the `2 * n_ctx` context tokens at consecutive ids, the first id).
    `tokenizer` is copied, not changed; one that already holds them (loaded from an adapter)
    is used as is."""
    from tokenizers import AddedToken

    names = context_tokens(n_ctx)
    vocab = tokenizer.get_vocab()
    present = [t for t in names if t in vocab]
    if not present:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    elif len(present) != len(names):
        raise ValueError(f"the tokenizer holds {len(present)} of the {len(names)} FDBPL context tokens "
                         f"({present[:3]}...): use the base model's tokenizer")
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(ids[0], ids[0] + len(names))):
        raise ValueError(f"the tokenizer's FDBPL context tokens have ids {ids}, not consecutive: "
                         "use the base model's tokenizer")
    return tokenizer, ids[0]


def framework_versions() -> dict[str, str]:
    import peft
    import transformers

    from .version import __version__

    return {"fdbpl_hf": __version__, "peft": peft.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__}


# every file an adapter save may write: what `adapter_file_owner` must allow before training
ADAPTER_FILES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, *ADAPTER_COMPANION_FILES)


def save_adapter(save_directory: str | os.PathLike, prompts: FDBPLPromptLearner, tokenizer, *,
                 repo_id: Optional[str] = None) -> str:
    """Write the adapter folder (see the module docstring); returns its path. Only fdbpl_hf's own
    files in it are replaced (`fdbpl_hf.saving`): a folder holding another model's files is
    refused, unchanged, and a README.md the user wrote is kept."""
    from peft import TrainableTokensConfig

    cfg = prompts.config
    n = cfg.n_ctx
    tok, first = adapter_tokenizer(tokenizer, n)
    base = hub_model_id(cfg.base_model_name_or_path)
    peft_config = TrainableTokensConfig(target_modules=[TARGET_MODULE], token_indices=list(range(first, first + 2 * n)),
                                        base_model_name_or_path=base, revision=cfg.revision if base else None,
                                        inference_mode=True)
    rows = torch.cat([prompts.ctx_pos, prompts.ctx_neg]).detach().float().cpu().contiguous()
    card = adapter_card(cfg, repo_id=repo_id, num_params=2 * n * cfg.context_dim)

    def write(staging: str) -> None:
        peft_config.save_pretrained(staging, auto_mapping_dict={
            "base_model_class": "CLIPModel", "parent_library": "transformers.models.clip.modeling_clip"})
        save_file({PEFT_WEIGHTS_KEY: rows}, os.path.join(staging, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(os.path.join(staging, FDBPL_CONFIG_NAME), cfg.to_dict())
        tok.save_pretrained(staging)
        with open(os.path.join(staging, CARD_NAME), "w", encoding="utf-8") as f:
            f.write(stamp_card(str(card)))

    # a folder saved over a 0.3 adapter keeps no 0.3 files that would contradict it (fdbpl_hf wrote them)
    return save_files(save_directory, write, adapter_file_owner, what="the FDBPL adapter",
                      stale=superseded_0_3_files, last=(ADAPTER_CONFIG_NAME, FDBPL_CONFIG_NAME))


def _json_object(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _safetensors_keys(path: str) -> Optional[list[str]]:
    try:
        with safe_open(path, framework="pt") as f:
            return sorted(f.keys())
    except Exception:  # not a safetensors file: safetensors raises several types
        return None


def _tokenizer_sizes(folder: str) -> Optional[tuple[frozenset, int]]:
    """(the added tokens, the size they give the vocabulary: their largest id + 1) of a folder's
    `tokenizer.json`, or None. FDBPL's tokens are added after the base vocabulary, so for its
    tokenizers that is the vocabulary's size."""
    path = os.path.join(folder, "tokenizer.json")
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _parsed_tokenizer_sizes(path, st.st_mtime_ns, st.st_size, st.st_ino)


@functools.lru_cache(maxsize=8)
def _parsed_tokenizer_sizes(path: str, *version) -> Optional[tuple[frozenset, int]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return None
    # "added_tokens" comes before the 49k-entry vocabulary in a tokenizers file: decode that list
    # alone (parsing all 3.6 MB takes about a second on a busy CPU, and a save asks for each file)
    tokens = None
    start = text.find('"added_tokens"')
    if start >= 0:
        bracket = text.find("[", start)
        try:
            tokens = json.JSONDecoder().raw_decode(text, bracket)[0] if bracket >= 0 else None
        except ValueError:
            tokens = None
    if not isinstance(tokens, list):
        try:
            data = json.loads(text)
        except ValueError:
            return None
        tokens = data.get("added_tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list):
            return None
    added = {t["content"]: t["id"] for t in tokens if isinstance(t, dict) and isinstance(t.get("content"), str)}
    ids = [i for i in added.values() if isinstance(i, int)]
    return frozenset(added), (max(ids) + 1 if ids else 0)


def holds_context_tokens(folder: str) -> bool:
    """Whether the tokenizer saved in `folder` holds FDBPL's context tokens (fdbpl_hf saved it)."""
    found = _tokenizer_sizes(folder)
    added = found[0] if found else set(_json_object(os.path.join(folder, "added_tokens.json")) or {})
    return "<fdbpl_pos_0>" in added and "<fdbpl_neg_0>" in added


def _is_fdbpl_config(data: Optional[dict]) -> bool:
    return data is not None and isinstance(data.get("fdbpl_version"), str) and "n_ctx" in data \
        and "context_dim" in data and "model_type" not in data


def adapter_file_owner(name: str, path: str) -> Optional[str]:
    """None when the existing file `path` (named `name`, in an adapter folder) was written by an
    fdbpl_hf adapter save, recognised by its content; else why it is not (`fdbpl_hf.saving`)."""
    folder = os.path.dirname(path)
    if name == FDBPL_CONFIG_NAME:
        return None if _is_fdbpl_config(_json_object(path)) else "not an FDBPL adapter config"
    if name == ADAPTER_CONFIG_NAME:
        data = _json_object(path)
        if data is None or data.get("peft_type") != "TRAINABLE_TOKENS":
            return "another peft adapter's config"
        return None if _is_fdbpl_config(_json_object(os.path.join(folder, FDBPL_CONFIG_NAME))) else \
            "a TrainableTokens adapter without an FDBPL config beside it"
    if name == ADAPTER_WEIGHTS_NAME:
        return None if _safetensors_keys(path) == [PEFT_WEIGHTS_KEY] else "another adapter's weights"
    if name in TOKENIZER_FILES:
        return None if holds_context_tokens(folder) else "the tokenizer of a model, without FDBPL's context tokens"
    if name == CARD_NAME:
        return card_owner(path, ADAPTER_CARD_HEADINGS)
    return "not a file of an FDBPL adapter"


def superseded_0_3_files(folder: str) -> list[str]:
    """The 0.3 adapter files in `folder` (an FDBPL `config.json` and a `model.safetensors` holding
    exactly `ctx_pos` and `ctx_neg`, both recognised by content), or none."""
    config, weights = os.path.join(folder, LEGACY_CONFIG_NAME), os.path.join(folder, LEGACY_WEIGHTS_NAME)
    if _is_fdbpl_config(_json_object(config)) and _safetensors_keys(weights) == ["ctx_neg", "ctx_pos"]:
        return [LEGACY_CONFIG_NAME, LEGACY_WEIGHTS_NAME]
    return []


_WEIGHTS_FILE = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")


def merged_config_is_ours(folder: str) -> bool:
    """Whether `folder/config.json` is a CLIP saved by `save_merged`: its text vocabulary is the
    size of the tokenizer beside it, which holds FDBPL's context tokens."""
    config = _json_object(os.path.join(folder, "config.json"))
    sizes = _tokenizer_sizes(folder)
    if config is None or config.get("model_type") != "clip" or sizes is None or not holds_context_tokens(folder):
        return False
    return (config.get("text_config") or {}).get("vocab_size") == sizes[1]


def merged_file_owner(name: str, path: str) -> Optional[str]:
    """As `adapter_file_owner`, for a folder written by `FDBPLCLIPModel.save_merged`: the tokenizer
    holds the context tokens, and the model files go with a config that matches it."""
    folder = os.path.dirname(path)
    if name in TOKENIZER_FILES:
        return None if holds_context_tokens(folder) else "the tokenizer of a model, without FDBPL's context tokens"
    if name == CARD_NAME:
        return card_owner(path, MERGED_CARD_HEADINGS)
    if merged_config_is_ours(folder):
        return None
    return "a model fdbpl_hf did not save" if name == "config.json" or _WEIGHTS_FILE.fullmatch(name) else \
        "a file of a model fdbpl_hf did not save"


def superseded_merged_weights(folder: str) -> list[str]:
    """The weight files of an earlier `save_merged` into `folder` (a save that writes other shards
    removes the ones it does not rewrite)."""
    if not merged_config_is_ours(folder):
        return []
    return sorted(n for n in os.listdir(folder) if _WEIGHTS_FILE.fullmatch(n))


def _card_data(cfg: FDBPLConfig, library_name: str, extra_tags=()) -> ModelCardData:
    base = hub_model_id(cfg.base_model_name_or_path)
    tags = list(CARD_TAGS) + list(extra_tags)
    source = (cfg.training or {}).get("source dataset")
    datasets = [source] if hub_model_id(source) else None
    return ModelCardData(library_name=library_name, base_model=base, pipeline_tag="zero-shot-image-classification",
                         tags=tags, datasets=datasets)


_ADAPTER_CARD = """---
{{ card_data }}
---

# FDBPL adapter{% if base_model %} for `{{ base_model }}`{% endif %}

A prompt adapter trained with **FDBPL** ([Faster Distillation-Based Prompt Learning]({{ paper_url }}))
using [`fdbpl_hf`](https://pypi.org/project/fdbpl-hf/). It holds two learnable text contexts
({{ n_ctx }} tokens x {{ context_dim }} dims each, {{ num_params }} parameters) as a stock peft
`TrainableTokens` adapter on CLIP's `token_embedding`: a **positive** prompt used for
classification and a **negative** prompt that scores uninformative or out-of-distribution inputs.
The CLIP model itself is not stored here.

The positive prompt, as text for the tokenizer in this repo: `{{ template }}`
(negative: `{{ negative_template }}`), `{}` being the class name.

## With peft and transformers only

```python
from peft import PeftModel
from transformers import AutoTokenizer, CLIPModel

tokenizer = AutoTokenizer.from_pretrained("{{ repo_id or 'path/to/this/adapter' }}")  # base tokenizer + context tokens
clip = CLIPModel.from_pretrained("{{ base_model or 'BASE_MODEL_ID' }}")
clip.text_model.resize_token_embeddings(len(tokenizer))
# OpenAI checkpoints keep the legacy eos_token_id 2, which pools at the largest token id:
clip.text_model.eos_token_id = clip.config.text_config.eos_token_id = tokenizer.eos_token_id
model = PeftModel.from_pretrained(clip, "{{ repo_id or 'path/to/this/adapter' }}")
prompts = ["{{ template }}".format(c) for c in ["cat", "dog"]]
text = model.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt")).pooler_output
```

## With fdbpl_hf

```python
from transformers import CLIPModel
from fdbpl_hf import FDBPLCLIPModel

clip = CLIPModel.from_pretrained("{{ base_model or 'BASE_MODEL_ID' }}")
model = FDBPLCLIPModel.from_pretrained(clip, "{{ repo_id or 'path/to/this/adapter' }}")
logits = model(pixel_values, class_names=["cat", "dog"]).pos_logits
```

`model.save_merged(folder, image_processor)` writes a plain CLIP for
`pipeline("zero-shot-image-classification", model=folder)` with the template above.

## Adapter

| setting | value |
|---|---|
| base model | `{{ base_model or 'not a Hub model' }}`{% if revision %} (revision `{{ revision }}`){% endif %} |
| context tokens | {{ n_ctx }} |
| positive init | {{ positive_init }} |
| negative init | {{ negative_init }} |
| class name position | {{ class_token_position }} |
{% if class_names %}
Trained on {{ class_names|length }} classes: {{ class_names|join(", ") }}.
{% endif %}{% if training %}
## Training

| | |
|---|---|
{% for key, value in training.items() %}| {{ key }} | {% if value is sequence and value is not string -%}
{# a list (the tables learned from): one entry per line, a mapping as "key value, ..." #}
{%- for v in value -%}
{%- if v is mapping %}{% for k2, v2 in v.items() if v2 is not none %}{{ k2 }} {{ v2 }}
{%- if not loop.last %}, {% endif %}{% endfor %}{% else %}{{ v }}{% endif %}{% if not loop.last %}<br>{% endif -%}
{%- endfor %}{% else %}{{ value }}{% endif %} |
{% endfor %}{% endif %}
## Framework versions

{% for key, value in versions.items() %}- {{ key }} {{ value }}
{% endfor %}
## Citation

```bibtex
@article{fdbpl2025,
  title   = {FDBPL: Faster Distillation-Based Prompt Learning for Region-Aware Vision-Language Models Adaptation},
  journal = {arXiv preprint arXiv:2505.18053},
  year    = {2025}
}
```
"""


def adapter_card(cfg: FDBPLConfig, *, repo_id: Optional[str] = None, num_params: Optional[int] = None) -> ModelCard:
    """The adapter's card: `library_name: peft`, base model (Hub ids only), pipeline tag, the
    training dataset when it is a Hub id, framework versions, how to load it with and without us."""
    base = hub_model_id(cfg.base_model_name_or_path)
    extra = [f"base_model:adapter:{base}"] if base else []
    return ModelCard.from_template(
        card_data=_card_data(cfg, "peft", extra), template_str=_ADAPTER_CARD, paper_url=PAPER_URL,
        base_model=base, revision=cfg.revision if base else None, n_ctx=cfg.n_ctx, context_dim=cfg.context_dim,
        num_params=num_params if num_params is not None else 2 * cfg.n_ctx * (cfg.context_dim or 0),
        positive_init=repr(cfg.positive_init), negative_init=repr(cfg.negative_init),
        class_token_position=cfg.class_token_position, class_names=cfg.class_names, training=cfg.training,
        template=hypothesis_template(cfg), negative_template=hypothesis_template(cfg, negative=True),
        versions=framework_versions(), repo_id=repo_id,
    )


_MERGED_CARD = """---
{{ card_data }}
---

# CLIP with an FDBPL prompt{% if base_model %}: `{{ base_model }}`{% endif %}

A plain `transformers` CLIP whose tokenizer holds a prompt learned with **FDBPL**
([Faster Distillation-Based Prompt Learning]({{ paper_url }})) as {{ n_ctx }} added tokens. Use it with
this **hypothesis template**:

    {{ template }}

```python
from transformers import pipeline

classifier = pipeline("zero-shot-image-classification", model="{{ repo_id or 'path/to/this/folder' }}")
classifier(image, candidate_labels=["cat", "dog"], hypothesis_template="{{ template }}")
```

Any other template works too, but then it is plain CLIP. The negative prompt (out-of-distribution
scores) is `{{ negative_template }}`.

## Framework versions

{% for key, value in versions.items() %}- {{ key }} {{ value }}
{% endfor %}
"""


def merged_card(cfg: FDBPLConfig, *, repo_id: Optional[str] = None) -> ModelCard:
    """The card of a `save_merged` folder: a transformers model card stating the template."""
    data = _card_data(cfg, "transformers")
    return ModelCard.from_template(
        card_data=data, template_str=_MERGED_CARD, paper_url=PAPER_URL, base_model=data.base_model,
        n_ctx=cfg.n_ctx, template=hypothesis_template(cfg), negative_template=hypothesis_template(cfg, True),
        versions=framework_versions(), repo_id=repo_id,
    )


def record_eval_results(card: ModelCard, results: list[dict], *, model_name: str) -> ModelCard:
    """Put evaluation results into a card's `model-index` (what the Hub shows as results).

    `results`: dicts with `dataset_id` (Hub id or name), `dataset_name`, `split`, `metric` (the
    metric's name, e.g. "base accuracy"), `metric_type` (e.g. "accuracy") and `value` (%).
    An existing result for the same dataset, split and metric name is replaced; others are kept.
    """
    from huggingface_hub import EvalResult

    fresh = [EvalResult(task_type="zero-shot-image-classification", task_name="Zero-shot image classification",
                        dataset_type=r["dataset_id"], dataset_name=r["dataset_name"], dataset_split=r.get("split"),
                        metric_type=r["metric_type"], metric_name=r["metric"], metric_value=round(float(r["value"]), 2))
             for r in results]
    keys = {(r.dataset_type, r.dataset_split, r.metric_name) for r in fresh}
    kept = [r for r in (card.data.eval_results or []) if (r.dataset_type, r.dataset_split, r.metric_name) not in keys]
    card.data.eval_results = kept + fresh
    card.data.model_name = card.data.model_name or model_name
    return card
