"""`FDBPLCLIPModel`: a frozen `transformers.CLIPModel` driven by learnable positive/negative prompts."""

import copy
import itertools
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from .clip_ops import check_tokenizer, refuse_identical_prompts  # noqa: F401  (evaluation imports them from here)
from .config import FDBPLConfig
from .frozen_layers import clip_image_features, forget
from .precision import module_dtype, reduced_precision_block
from .prompt_encoding import ClassPrompts, encode_prompts
from .prompts import (FDBPLPromptLearner, adapter_tokenizer, hypothesis_template, locate_adapter_config,
                      merged_card, merged_file_owner, save_adapter, superseded_merged_weights)
from .saving import CARD_NAME, save_files, stamp_card
from .validation import check_class_names

_SIGNATURE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings")


@dataclass
class FDBPLOutput(ModelOutput):
    """What the losses need from one forward pass.

    `pos_logits`/`neg_logits`: `[B, C]` = logit_scale x cosine(image, class prompt).
    `image_features`: `[B, P]`; `pos_text_features`/`neg_text_features`: `[C, P]`. Features are
    projected but not normalised, like `CLIPModel.get_*_features(...).pooler_output`.
    """

    pos_logits: Optional[torch.Tensor] = None
    neg_logits: Optional[torch.Tensor] = None
    image_features: Optional[torch.Tensor] = None
    pos_text_features: Optional[torch.Tensor] = None
    neg_text_features: Optional[torch.Tensor] = None
    logit_scale: Optional[torch.Tensor] = None


def base_model_signature(clip: CLIPModel) -> dict:
    """Shape facts of a CLIP text tower; two models with different facts can't share an adapter."""
    text = clip.config.text_config
    sig = {key: getattr(text, key) for key in _SIGNATURE_KEYS}
    sig["projection_dim"] = clip.config.projection_dim
    return sig


def model_name(clip: CLIPModel) -> str:
    """The name or path a CLIP was loaded from ("" for one built in memory)."""
    return getattr(clip.config, "_name_or_path", None) or getattr(clip, "name_or_path", "") or ""


def _short_name(name: Optional[str]) -> str:
    """The model's name without owner or folders: "org/clip-x", "./clip-x" and a Hub-cache
    snapshot ".../models--org--clip-x/snapshots/<sha>" all give "clip-x"."""
    if not name:
        return ""
    parts = os.path.normpath(name).split(os.sep)
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].split("--")[-1]
    return parts[-1]


def _modules_of(root: nn.Module):
    """Every module below `root` (itself included), without `named_modules`' prefix strings and
    memo: the per-step checks below run it at each training step."""
    stack = [root]
    while stack:
        module = stack.pop()
        yield module
        stack.extend(m for m in module._modules.values() if m is not None)


def prompt_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                  copies: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits `[B, copies, C]`, unit image features `[B, P]`, unit text features `[copies * C, P]`)
    of image features `[B, P]` against the text features of C classes under `copies` contexts
    (`[copies * C, P]`, context-major as `encode_class_prompts` returns them): logit_scale x cosine,
    one matmul for all contexts, in float32 with autocast off (bf16 logits near 25 are quantised in
    steps of 0.125, too coarse for soft labels)."""
    with torch.autocast(image_features.device.type, enabled=False):
        image_unit = F.normalize(image_features.float(), dim=-1)
        text_unit = F.normalize(text_features.float(), dim=-1)
        logits = (logit_scale.float() * image_unit) @ text_unit.t()
    return logits.view(image_features.shape[0], copies, -1), image_unit, text_unit


class FDBPLCLIPModel(nn.Module):
    """A frozen CLIP plus an `FDBPLPromptLearner` (the only trainable and saved part).

    Build one with `get_fdbpl_model(clip, config, tokenizer)` or load a trained adapter with
    `FDBPLCLIPModel.from_pretrained(clip, adapter_id, tokenizer=tokenizer)`.

    The learnable contexts go into prepared embeddings of the class prompts (token + position
    embeddings computed once per class list), at fixed positions, by a one-hot matmul; CLIP's own
    encoder layers, final layer norm and projection then run on them, pooling where CLIP pools
    (`fdbpl_hf.prompt_encoding`). The CLIP model is not modified: called directly (e.g. as a
    teacher) it is unaffected.
    """

    # Trainer reads this on checkpoint reload; the wrapper is not a PreTrainedModel.
    _keys_to_ignore_on_save = None

    def __init__(self, clip_model: CLIPModel, prompts: FDBPLPromptLearner, tokenizer: PreTrainedTokenizerBase,
                 check_base_model: bool = True):
        super().__init__()
        if not isinstance(clip_model, CLIPModel):
            hint = (": merge its adapters into the CLIP first (clip = peft_model.merge_and_unload())"
                    if hasattr(clip_model, "merge_and_unload") else "")
            raise TypeError(f"expected a transformers.CLIPModel, got {type(clip_model).__name__}{hint}")
        _check_compatible(clip_model, prompts.config, check_base_model)
        self.clip = clip_model
        self.clip.requires_grad_(False)
        self.clip.eval()
        forget(clip_model)  # prepared layers from before (e.g. a peft merge's .data edits since): made anew
        self.prompts = prompts.to(clip_model.device)
        self.tokenizer = tokenizer  # checked, and the prepared prompts keyed to it (the setter below)
        self.class_names: Optional[list[str]] = None

    # ---- properties ------------------------------------------------------------------------
    @property
    def fdbpl_config(self) -> FDBPLConfig:
        return self.prompts.config

    @property
    def device(self) -> torch.device:
        return self.prompts.ctx_pos.device

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer of the class prompts. Assigning another one checks it and drops the prompts
        prepared with the old one (they hold its token ids); a tokenizer changed in place (`add_tokens`)
        is not noticed: assign it again."""
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if tokenizer is None:
            raise ValueError("a tokenizer is required (the one of the base CLIP model)")
        check_tokenizer(self.clip, tokenizer)
        self._placeholder_id = _single_token_id(tokenizer, self.prompts.config.placeholder_token)
        self._tokenizer = tokenizer
        self._prompt_cache: dict[tuple[str, ...], ClassPrompts] = {}

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def train(self, mode: bool = True) -> "FDBPLCLIPModel":
        # The Trainer calls train() at every step. nn.Module.train() through the backbone's
        # hundreds of modules, twice, cost about 1 ms of host time per step (a launch-bound GPU
        # step is host time), so only the prompts follow `mode`, and the backbone (frozen, its
        # dropout never runs) goes back to eval mode only where something switched it on.
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        self.prompts.train(mode)
        if any(m.training for m in _modules_of(self.clip)):
            self.clip.eval()
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients like `nn.Module.zero_grad` (the Trainer calls it every step), with a
        cheaper walk of the module tree: the contexts, and backbone parameters that hold one."""
        params = (p for m in itertools.chain([self.prompts], _modules_of(self.clip)) for p in m._parameters.values())
        for p in params:
            if p is None or p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    # ---- prompts -----------------------------------------------------------------------------
    def set_class_names(self, class_names: Sequence[str]) -> None:
        """Classes `forward` scores when it is not given any (the trainer sets the training classes)."""
        self._tokenize(class_names)  # validates now rather than at the first batch
        self.class_names = list(class_names)

    def _tokenize(self, class_names: Sequence[str]) -> ClassPrompts:
        if isinstance(class_names, (str, bytes)):  # the hot path: the full check runs once per class list
            check_class_names("class_names", class_names)
        key = tuple(class_names)
        cached = self._prompt_cache.get(key)
        if cached is None or cached.input_ids.device != self.device:
            # Kept on the model's device: the training step reuses the same class list every time.
            cached = (cached or self._build_prompts(key)).to(self.device)
            if len(self._prompt_cache) > 64:
                self._prompt_cache.clear()
            self._prompt_cache[key] = cached
        return cached

    def _build_prompts(self, class_names: tuple[str, ...]) -> ClassPrompts:
        # identical names are refused below with the other identical prompts
        check_class_names("class_names", class_names, unique=False)
        cfg, tok = self.fdbpl_config, self.tokenizer
        n_ctx, slot = cfg.n_ctx, self._placeholder_id
        max_len = self.clip.config.text_config.max_position_embeddings
        period = tok(".", add_special_tokens=False)["input_ids"]
        rows, masks = [], []
        for name in class_names:
            if cfg.class_token_position == "end":
                body = [slot] * n_ctx + tok(f"{name}.", add_special_tokens=False)["input_ids"]
                mask = [1] * n_ctx + [0] * (len(body) - n_ctx)
            else:
                name_ids = tok(name, add_special_tokens=False)["input_ids"]
                before = 0 if cfg.class_token_position == "front" else n_ctx // 2
                body = [slot] * before + name_ids + [slot] * (n_ctx - before) + period
                mask = [1] * before + [0] * len(name_ids) + [1] * (n_ctx - before) + [0] * len(period)
            ids = [tok.bos_token_id] + body + [tok.eos_token_id]
            if len(ids) > max_len:
                raise ValueError(
                    f"the prompt for class {name!r} is {len(ids)} tokens long ({n_ctx} context tokens "
                    f"+ the class name), more than the text encoder's {max_len}: shorten the class name"
                )
            rows.append(ids)
            masks.append([0] + mask + [0])
        refuse_identical_prompts(class_names, rows)
        length = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        ctx_mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, (ids, mask) in enumerate(zip(rows, masks)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            ctx_mask[i, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
        # context row j fills the j-th slot of every prompt (CoOp's order, for every class position)
        slot_index = (ctx_mask.long().cumsum(dim=1) - 1).clamp_min(0) * ctx_mask
        return ClassPrompts(input_ids, attention, ctx_mask, slot_index)

    def __deepcopy__(self, memo) -> "FDBPLCLIPModel":
        # A copy of backbone and prompts wrapped again (the prepared prompts are rebuilt on use).
        if getattr(self, "_unloaded", False):
            raise RuntimeError("this FDBPLCLIPModel was unloaded: deep-copy the CLIP model unload() returned")
        clip = copy.deepcopy(self.clip, memo)
        new = type(self)(clip, copy.deepcopy(self.prompts, memo), self.tokenizer, check_base_model=False)
        memo[id(self)] = new
        new.class_names = copy.copy(self.class_names)
        new.train(self.training)
        return new

    def unload(self) -> CLIPModel:
        """Detach the prompts and return the plain CLIP model (like `peft`'s `unload()`); the
        wrapper is unusable afterwards. The backbone stays frozen (`requires_grad=False`)."""
        self._unloaded = True
        self._prompt_cache.clear()
        return self.clip

    def _encode(self, prompts: ClassPrompts, contexts: torch.Tensor) -> torch.Tensor:
        """Text features `[len(contexts) * C, P]`: every class under each context in `contexts`."""
        if getattr(self, "_unloaded", False):
            raise RuntimeError("this FDBPLCLIPModel was unloaded: wrap the CLIP model again "
                               "(get_fdbpl_model or FDBPLCLIPModel.from_pretrained)")
        return encode_prompts(self.clip, prompts, contexts)

    def get_text_features(self, class_names: Sequence[str], negative: bool = False) -> torch.Tensor:
        """Projected (not normalised) text features `[C, projection_dim]` of the prompted classes."""
        ctx = self.prompts.ctx_neg if negative else self.prompts.ctx_pos
        return self._encode(self._tokenize(class_names), ctx.unsqueeze(0))

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image features `[B, projection_dim]`; no gradient (the image tower is frozen).
        The tower computes in its weights' dtype (`fdbpl_hf.precision`)."""
        vision = self.clip.vision_model
        dtype = module_dtype(vision)
        with torch.no_grad(), reduced_precision_block(vision, dtype):
            return clip_image_features(self.clip, pixel_values.to(dtype))

    def forward(self, pixel_values: Optional[torch.Tensor] = None, class_names: Optional[Sequence[str]] = None,
                image_features: Optional[torch.Tensor] = None) -> FDBPLOutput:
        """Positive and negative logits of a batch of images against `class_names`.

        Give either `pixel_values` or precomputed `image_features` (e.g. from a feature cache).
        """
        names = class_names if class_names is not None else self.class_names
        if names is None:
            raise ValueError("no class names: pass class_names= or call set_class_names() first")
        if image_features is None:
            if pixel_values is None:
                raise ValueError("give pixel_values or image_features")
            image_features = self.get_image_features(pixel_values)
        text = self._encode(self._tokenize(names), self.prompts.contexts())
        scale = self.logit_scale
        logits, _, _ = prompt_logits(image_features, text, scale)
        pos_text, neg_text = text.chunk(2, dim=0)
        return FDBPLOutput(pos_logits=logits[:, 0], neg_logits=logits[:, 1], image_features=image_features,
                           pos_text_features=pos_text, neg_text_features=neg_text, logit_scale=scale)

    def class_prompts(self, class_names: Optional[Sequence[str]] = None) -> ClassPrompts:
        """The prepared prompts of `class_names` (default: those of `set_class_names`), on the
        model's device; made once per class list and kept."""
        names = class_names if class_names is not None else self.class_names
        if names is None:
            raise ValueError("no class names: pass class_names= or call set_class_names() first")
        return self._tokenize(names)

    def encode_class_prompts(self, prompts: ClassPrompts, contexts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Text features `[S * C, P]` of prepared prompts under contexts `[S, n_ctx, D]` (default:
        the positive then the negative context), in the text tower's dtype."""
        return self._encode(prompts, self.prompts.contexts() if contexts is None else contexts)

    def frozen_towers(self) -> list[nn.Module]:
        """The parts of the backbone that compute: both towers and their projections. The trainer
        casts them once under `--bf16`/`--fp16` (`fdbpl_hf.precision`); `logit_scale` stays float32."""
        clip = self.clip
        return [clip.text_model, clip.vision_model, clip.text_projection, clip.visual_projection]

    # ---- persistence (only the adapter, in peft's format) ------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *, is_main_process: bool = True,
                        safe_serialization: bool = True, model_card_kwargs: Optional[dict] = None) -> Optional[str]:
        """Write the adapter as a peft `TrainableTokens` adapter: `adapter_config.json`,
        `adapter_model.safetensors`, the tokenizer with the context tokens, `fdbpl_config.json`
        and a `README.md` card (`model_card_kwargs={"repo_id": ...}` names the repo in its
        snippets). Nothing is written when `is_main_process` is False (as in transformers).
        `safe_serialization` is accepted as in peft; adapters are always safetensors."""
        if not safe_serialization:
            raise ValueError("safe_serialization=False: FDBPL adapters are only written as safetensors (loading "
                             "never unpickles); drop the argument")
        if not is_main_process:
            return None
        # the adapter names a plain base model: prompts learned over LoRA layers would be loaded
        # without them, and score differently
        self._refuse_peft_layers("the adapter holds only the prompts, learned on top of them", "save")
        repo_id = (model_card_kwargs or {}).get("repo_id")
        return save_adapter(save_directory, self.prompts, self._adapter_tokenizer()[0], repo_id=repo_id)

    def _refuse_peft_layers(self, why: str, then: str) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        tuned = [name for name, module in self.clip.named_modules() if isinstance(module, BaseTunerLayer)]
        if tuned:
            raise ValueError(f"the CLIP model holds {len(tuned)} peft adapter layers (e.g. {tuned[0]!r}) and {why}: "
                             "merge them first (clip = peft_model.merge_and_unload()), wrap that CLIP with these "
                             f"prompts, then {then}")

    def _adapter_tokenizer(self):
        """(the tokenizer plus the context tokens, the first context id), made once per model:
        copying a 49k-token tokenizer costs about a second, and the Trainer saves at every checkpoint."""
        n_ctx = self.fdbpl_config.n_ctx
        cached = getattr(self, "_with_context_tokens", None)
        if cached is None or cached[0] is not self.tokenizer or cached[1] != n_ctx:
            cached = (self.tokenizer, n_ctx, *adapter_tokenizer(self.tokenizer, n_ctx))
            self._with_context_tokens = cached
        return cached[2], cached[3]

    def save_merged(self, output_dir: str | os.PathLike, image_processor=None) -> str:
        """Write a stock transformers CLIP folder holding the learned prompts as tokens, and
        return the `hypothesis_template` that runs the positive prompt, e.g.
        `"<fdbpl_pos_0><fdbpl_pos_1><fdbpl_pos_2><fdbpl_pos_3> {}."`.

        The folder holds the model (text embeddings grown by the `2 * n_ctx` context rows, EOS id
        set to the tokenizer's so that legacy configs pool right), the tokenizer with the context
        tokens, `image_processor` when given (the zero-shot pipeline needs one) and a card stating
        the template. `pipeline("zero-shot-image-classification", model=output_dir)` with that
        template predicts what `forward(...).pos_logits` predicts, without fdbpl_hf installed.
        `output_dir` must be new, empty or an earlier `save_merged` folder: files of a model that
        fdbpl_hf did not save are refused, untouched, and a README.md the user wrote is kept.
        """
        if getattr(self, "_unloaded", False):
            raise RuntimeError("this FDBPLCLIPModel was unloaded: wrap the CLIP model again first")
        # A CLIP holding peft layers (LoRA ...) would be saved with their `base_layer`/`lora_*` keys,
        # which a stock CLIPModel does not know: it would load with those weights freshly
        # initialised, and the pipeline would classify with a different model.
        self._refuse_peft_layers("a stock CLIP checkpoint cannot hold them", "save_merged")
        cfg = self.fdbpl_config
        tok, first = self._adapter_tokenizer()
        merged = copy.deepcopy(self).unload()  # a copy without our hook; self stays as it is
        text = merged.text_model
        text.resize_token_embeddings(len(tok), mean_resizing=False)
        rows = torch.cat([self.prompts.ctx_pos, self.prompts.ctx_neg]).detach()
        weight = text.embeddings.token_embedding.weight
        with torch.no_grad():
            weight[first:first + rows.shape[0]] = rows.to(weight.dtype)
        merged.config.text_config.vocab_size = len(tok)
        merged.config.text_config.eos_token_id = tok.eos_token_id
        text.config.eos_token_id = tok.eos_token_id
        text.eos_token_id = tok.eos_token_id
        merged.requires_grad_(True)  # a plain model, as from_pretrained gives it

        def write(staging: str) -> None:
            merged.save_pretrained(staging)
            tok.save_pretrained(staging)
            if image_processor is not None:
                image_processor.save_pretrained(staging)
            with open(os.path.join(staging, CARD_NAME), "w", encoding="utf-8") as f:
                f.write(stamp_card(str(merged_card(cfg))))

        # only into a new or empty folder, or over an earlier save_merged: a model or tokenizer that
        # fdbpl_hf did not write is refused, untouched (fdbpl_hf.saving)
        save_files(output_dir, write, merged_file_owner, what="the merged CLIP", stale=superseded_merged_weights,
                   last=("config.json",))
        return hypothesis_template(cfg)

    def get_base_model(self) -> CLIPModel:
        """The frozen CLIP model under the prompts (still hooked; see `unload()`)."""
        return self.clip

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), like peft."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        """Print how many parameters train, like peft's `print_trainable_parameters()`."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload FDBPL adapter", private: Optional[bool] = None,
                    token=None, revision: Optional[str] = None, create_pr: bool = False,
                    model_card_kwargs: Optional[dict] = None) -> str:
        """Publish the adapter (KB of weights, plus the tokenizer) to the Hub in one commit;
        returns the commit URL. The card's snippets name the repo, owner included."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, model_card_kwargs={"repo_id": repo_id, **(model_card_kwargs or {})})
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message,
                                     revision=revision, create_pr=create_pr)
        return str(info)

    @classmethod
    def from_pretrained(cls, clip_model: CLIPModel, path_or_repo_id: str | os.PathLike,
                        tokenizer: Optional[PreTrainedTokenizerBase] = None, *,
                        revision: Optional[str] = None, token=None, cache_dir=None, local_files_only: bool = False,
                        force_download: bool = False, check_base_model: bool = True,
                        is_trainable: bool = False) -> "FDBPLCLIPModel":
        """Load an adapter from a folder or Hub repo onto `clip_model`.

        As in peft, the model comes back for inference (eval mode, contexts frozen) unless
        `is_trainable=True`. The adapter must have been trained on the same base model: a
        different text width or shape raises, and so does a different model name, compared
        without owner or folders (a local copy `./clip-vit-base-patch32` matches
        `openai/clip-vit-base-patch32`; `check_base_model=False` skips the name check).
        """
        where = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
                     force_download=force_download)
        # config first: an adapter for another model (or a corrupt one) is refused before its
        # contexts are allocated
        _check_compatible(clip_model, FDBPLConfig.from_pretrained(str(path_or_repo_id), **where), check_base_model)
        prompts = FDBPLPromptLearner.from_pretrained(str(path_or_repo_id), **where)
        if tokenizer is None:
            tokenizer = _adapter_or_model_tokenizer(clip_model, str(path_or_repo_id), where)
        model = cls(clip_model, prompts, tokenizer, check_base_model=check_base_model)
        if not is_trainable:
            model.prompts.requires_grad_(False)
            model.eval()
        return model


def _adapter_or_model_tokenizer(clip_model: CLIPModel, path_or_repo_id: str, where: dict):
    """The tokenizer saved with an adapter (the peft format), else the base model's."""
    _, legacy = locate_adapter_config(path_or_repo_id, **where)
    if legacy:
        return _tokenizer_for(clip_model)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path_or_repo_id, revision=where["revision"], token=where["token"],
                                         cache_dir=where["cache_dir"], local_files_only=where["local_files_only"])


def _tokenizer_for(clip_model: CLIPModel):
    name = model_name(clip_model)
    if not name:
        raise ValueError("pass tokenizer=: the CLIP model has no name or path to load its tokenizer from")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def _single_token_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"placeholder_token {word!r} must be one token for this tokenizer, got {len(ids)}")
    return ids[0]


def _check_compatible(clip: CLIPModel, config: FDBPLConfig, check_name: bool) -> None:
    width = clip.config.text_config.hidden_size
    if config.context_dim != width:
        raise ValueError(
            f"adapter context width {config.context_dim} does not match the base model's text width {width}: "
            f"this adapter was trained on a different CLIP (base model {config.base_model_name_or_path!r})"
        )
    positions = clip.config.text_config.max_position_embeddings
    if config.n_ctx + 3 > positions:
        raise ValueError(f"adapter n_ctx {config.n_ctx} does not fit the base model's {positions} text positions "
                         "([SOS] + context + class name + [EOS])")
    if config.base_model_signature:
        found = base_model_signature(clip)
        diff = {k: (v, found.get(k)) for k, v in config.base_model_signature.items() if found.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: adapter {a} vs model {b}" for k, (a, b) in diff.items())
            raise ValueError(f"adapter was trained on a different base model ({detail})")
    stored, actual = _short_name(config.base_model_name_or_path), _short_name(model_name(clip))
    if check_name and stored and actual and stored != actual:
        raise ValueError(
            f"adapter was trained on {config.base_model_name_or_path!r} but the model is {model_name(clip)!r}; "
            "pass check_base_model=False if they are the same weights under another name"
        )


def get_fdbpl_model(clip_model: CLIPModel, config: Optional[FDBPLConfig] = None,
                    tokenizer: Optional[PreTrainedTokenizerBase] = None) -> FDBPLCLIPModel:
    """Wrap a CLIP model with fresh FDBPL prompts, initialised from `config.positive_init`/`negative_init`.

    Mirrors `peft.get_peft_model`: the CLIP model is frozen, only the two contexts train.
    """
    if config is not None and not isinstance(config, FDBPLConfig):
        raise TypeError(f"config must be an FDBPLConfig, got {type(config).__name__}"
                        + (": build it with FDBPLConfig.from_dict(settings)" if isinstance(config, dict) else ""))
    if tokenizer is None:
        tokenizer = _tokenizer_for(clip_model)
    config = copy.deepcopy(config) if config is not None else FDBPLConfig()
    config.context_dim = clip_model.config.text_config.hidden_size
    config.base_model_signature = base_model_signature(clip_model)
    if not config.base_model_name_or_path:
        config.base_model_name_or_path = model_name(clip_model) or None
    if config.revision is None:
        # the commit transformers loaded the checkpoint from (set for Hub downloads)
        config.revision = getattr(clip_model.config, "_commit_hash", None) or None
    prompts = FDBPLPromptLearner(config)
    embedding = clip_model.text_model.embeddings.token_embedding.weight
    with torch.no_grad():
        for param, init in ((prompts.ctx_pos, config.positive_init), (prompts.ctx_neg, config.negative_init)):
            if init is None:
                continue
            ids = tokenizer(init, add_special_tokens=False)["input_ids"]
            if len(ids) != config.n_ctx:
                raise ValueError(f"init text {init!r} is {len(ids)} tokens but n_ctx is {config.n_ctx}: "
                                 "make them agree or pass init=None for a random init")
            param.copy_(embedding[torch.tensor(ids, device=embedding.device)].float())
    return FDBPLCLIPModel(clip_model, prompts, tokenizer)
