"""`FDBPLConfig`: what an FDBPL adapter is, in PEFT's spirit (a plain, JSON-able dataclass)."""

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from .adapter_files import locate_adapter_config
from .validation import check_template
from .version import __version__

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
# No CLIP text tower has more than a few hundred positions; a larger n_ctx in a config file is
# corruption or an attack, refused before any tensor of that size is allocated.
MAX_N_CTX = 512
MAX_CONTEXT_DIM = 65536


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class FDBPLConfig:
    """Configuration of an FDBPL adapter (the two learnable text contexts).

    Args:
        base_model_name_or_path: Hub id or path of the student CLIP the adapter belongs to.
            Filled from the model by `get_fdbpl_model` when left empty. Cards and peft's
            `adapter_config.json` only ever show it when it is a Hub id.
        revision: revision of the base model, recorded for reproducibility (filled by
            `get_fdbpl_model` with the commit a Hub checkpoint was loaded from).
        n_ctx: number of learnable context tokens per prompt (CoOp's M; paper: 4).
        positive_init: words whose token embeddings initialise the positive context. Must
            tokenise to exactly `n_ctx` tokens; `None` draws a random N(0, 0.02) init.
        negative_init: same for the negative context (paper: "a photo of no").
        class_token_position: where the class name goes relative to the context:
            "end" (CoOp default: `[SOS] ctx . . . ctx <class>. [EOS]`), "middle" or "front".
        placeholder_token: the word that fills the context slots of the token ids during
            training. The context is injected by position, so class names may contain it too.
        context_dim: width of the text token embeddings (filled from the base model).
        base_model_signature: shape facts of the base text encoder (filled from the base model)
            so that an adapter cannot be loaded silently onto a different model.
        class_names: classes the adapter was trained on (informative; any names work at
            inference, which is how novel classes are scored).
        template: hand-crafted template of the dataset, kept for zero-shot comparisons.
        training: the training record `FDBPLTrainer` writes (method, table, hyper-parameters,
            final loss), shown on the model card.
        fdbpl_version: library version that wrote the adapter.
    """

    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    n_ctx: int = 4
    positive_init: Optional[str] = "a photo of a"
    negative_init: Optional[str] = "a photo of no"
    class_token_position: str = "end"
    placeholder_token: str = "X"
    context_dim: Optional[int] = None
    base_model_signature: Optional[dict] = None
    class_names: Optional[list] = None
    template: Optional[str] = None
    training: dict = field(default_factory=dict)
    fdbpl_version: str = __version__

    def __post_init__(self) -> None:
        # Every field is checked here, because configs come from files: a wrong type must fail
        # now, naming the field, not later as a TypeError deep in torch.
        def fail(name: str, what: str) -> None:
            raise ValueError(f"FDBPLConfig field {name!r} must be {what}, got {_short(getattr(self, name))}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("base_model_name_or_path", "revision", "positive_init", "negative_init", "template"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                fail(name, "a string or null")
        if not is_int(self.n_ctx) or not 1 <= self.n_ctx <= MAX_N_CTX:
            fail("n_ctx", f"an integer from 1 to {MAX_N_CTX}")
        if self.class_token_position not in CLASS_TOKEN_POSITIONS:
            fail("class_token_position", f"one of {CLASS_TOKEN_POSITIONS}")
        if not isinstance(self.placeholder_token, str) or not self.placeholder_token.strip():
            fail("placeholder_token", "a non-empty word")
        if self.context_dim is not None and (not is_int(self.context_dim)
                                             or not 1 <= self.context_dim <= MAX_CONTEXT_DIM):
            fail("context_dim", f"an integer from 1 to {MAX_CONTEXT_DIM} or null")
        sig = self.base_model_signature
        if sig is not None and (not isinstance(sig, dict) or not all(is_int(v) and v > 0 for v in sig.values())):
            fail("base_model_signature", "an object of positive integers or null")
        positions = (sig or {}).get("max_position_embeddings")
        if positions is not None and self.n_ctx + 3 > positions:
            # [SOS] + context + at least one class token + [EOS] must fit the text encoder
            fail("n_ctx", f"at most {positions - 3} (the base model has {positions} text positions)")
        if self.class_names is not None and (not isinstance(self.class_names, list)
                                             or not all(isinstance(c, str) for c in self.class_names)):
            fail("class_names", "a list of strings or null")
        if self.template is not None:
            check_template("FDBPLConfig field 'template'", self.template)
        if not isinstance(self.training, dict):
            fail("training", "an object")
        if not isinstance(self.fdbpl_version, str):
            fail("fdbpl_version", "a string")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **kwargs) -> "FDBPLConfig":
        """Read an adapter's config (folder or Hub repo) without its weights, like
        `peft.PeftConfig.from_pretrained`; takes `revision`, `token`, `cache_dir`, ...
        Reads `fdbpl_config.json` (the peft format) or, for adapters saved by 0.3, `config.json`."""
        path, _ = locate_adapter_config(path_or_repo_id, **kwargs)
        return cls.from_json_file(path)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "FDBPLConfig":
        """Parse a config file; every error names the file and, where one is at fault, the field."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}): re-save the adapter") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        for key in ("n_ctx", "context_dim"):
            if key not in data:
                raise ValueError(f"{path} is not an FDBPL adapter config: no {key!r} field")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FDBPLConfig":
        """Build a config, ignoring keys this version does not know (forward compatible)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
