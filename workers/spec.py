"""Per-user prefix settings (PrefixSpec) and training settings (TrainConfig): plain data."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from prefixfleet.workers.errors import WorkerError

METHODS: tuple[str, ...] = ("prefix", "ptuning-v2", "prompt")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
PRECISIONS: tuple[str, ...] = ("float32", "bfloat16")


@dataclass(frozen=True)
class PrefixSpec:
    """What a user's prefix is.

    method: `prefix` (Li & Liang: key/value prefix at every layer, trained through an MLP
    reparametrization that is dropped after training), `ptuning-v2` (deep prompts at every layer,
    no reparametrization) or `prompt` (Lester: soft prompt on the input embeddings only).
    init_text: when set, the prefix starts from the activations of these real tokens.
    dtype: the storage dtype of the artifact; the prefix trains in float32 (TrainConfig.precision
    sets the precision of the forward and backward).
    """

    method: str = "prefix"
    num_virtual_tokens: int = 8
    reparam_hidden: int = 512
    init_text: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise WorkerError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if not 1 <= self.num_virtual_tokens <= 4096:
            raise WorkerError(f"num_virtual_tokens must be in 1..4096, got {self.num_virtual_tokens}")
        if self.reparam_hidden < 1:
            raise WorkerError(f"reparam_hidden must be positive, got {self.reparam_hidden}")
        if self.dtype not in DTYPES:
            raise WorkerError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if self.init_text is not None and not self.init_text.strip():
            raise WorkerError("init_text is empty; leave it unset for random init")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """Canonical JSON: the same spec always gives the same string (used in fingerprints)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrefixSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise WorkerError(f"unknown PrefixSpec field(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> PrefixSpec:
        return cls.from_dict(json.loads(text))

    def with_(self, **changes: Any) -> PrefixSpec:
        return replace(self, **changes)


# Adam step sizes that train the small local backbones in tens of steps; directly trained deep
# prompts need far larger steps than the MLP-reparametrized prefix. Real models: pass --lr.
DEFAULT_LR = {"prefix": 1e-2, "ptuning-v2": 3e-1, "prompt": 1e-1}


@dataclass(frozen=True)
class TrainConfig:
    """How one user's prefix is trained. The same config trains alone or packed with others."""

    steps: int = 60
    batch_size: int = 8
    lr: float | None = None  # None: DEFAULT_LR of the method
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    max_length: int = 256
    eval_fraction: float = 0.2
    seed: int = 0
    precision: str = "float32"  # bfloat16: bf16 autocast around forward/backward, prefixes kept in float32

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise WorkerError("steps and batch_size must be positive")
        if self.lr is not None and self.lr <= 0:
            raise WorkerError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise WorkerError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_length < 2:
            raise WorkerError(f"max_length must be at least 2, got {self.max_length}")
        if self.precision not in PRECISIONS:
            raise WorkerError(f"unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")

    def learning_rate(self, method: str) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[method]

    def settings_json(self, method: str) -> str:
        """Canonical JSON of every setting that changes a trained prefix, the learning rate
        resolved for `method`. It joins the exactly-once identity: a changed setting trains again.
        Settings added since the first release appear only when set away from their default, so
        adding one does not retrain every user."""
        settings = {**asdict(self), "lr": self.learning_rate(method)}
        for name, default in ADDED_SETTINGS.items():
            if settings[name] == default:
                del settings[name]
        return json.dumps(settings, sort_keys=True, separators=(",", ":"))


ADDED_SETTINGS: dict[str, object] = {"precision": "float32"}
