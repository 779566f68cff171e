"""`FDBPLConfig`: what an FDBPL adapter is, in PEFT's spirit (a plain, JSON-able dataclass)."""

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from .version import __version__

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")


@dataclass
class FDBPLConfig:
    """Configuration of an FDBPL adapter (the two learnable text contexts).

    Args:
        base_model_name_or_path: Hub id or path of the student CLIP the adapter belongs to.
            Filled from the model by `get_fdbpl_model` when left empty.
        revision: revision of the base model, recorded for reproducibility (filled by
            `get_fdbpl_model` with the commit a Hub checkpoint was loaded from).
        n_ctx: number of learnable context tokens per prompt (CoOp's M; paper: 4).
        positive_init: words whose token embeddings initialise the positive context. Must
            tokenise to exactly `n_ctx` tokens; `None` draws a random N(0, 0.02) init.
        negative_init: same for the negative context (paper: "a photo of no").
        class_token_position: where the class name goes relative to the context:
            "end" (CoOp default: `[SOS] ctx . . . ctx <class>. [EOS]`), "middle" or "front".
        placeholder_token: the word that fills the context slots of the token ids. The
            context is injected by position, so class names may contain this word too.
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
        if not isinstance(self.n_ctx, int) or self.n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive integer, got {self.n_ctx!r}")
        if self.class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(
                f"class_token_position must be one of {CLASS_TOKEN_POSITIONS}, "
                f"got {self.class_token_position!r}"
            )
        if not self.placeholder_token or not self.placeholder_token.strip():
            raise ValueError("placeholder_token must be a non-empty word")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, **kwargs) -> "FDBPLConfig":
        """Read an adapter's config (folder or Hub repo) without its weights, like
        `peft.PeftConfig.from_pretrained`; takes `revision`, `token`, `cache_dir`, ..."""
        import json

        from .prompts import ADAPTER_CONFIG_NAME, adapter_file

        with open(adapter_file(path_or_repo_id, ADAPTER_CONFIG_NAME, **kwargs), encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FDBPLConfig":
        """Build a config, ignoring keys this version does not know (forward compatible)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
