"""A fine-tune job's configuration: defaults for unset fields and range checks, no I/O.

The protobuf `FineTuneConfig` uses 0 for "not set" on most fields; `FineTuneSpec.from_request`
turns that into explicit defaults here, once, so the trainer never guesses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from headswap.config import DEFAULT_MODEL_SOURCE
from headswap.errors import InvalidInput

DEFAULT_EPOCHS = 10
DEFAULT_LEARNING_RATE = 5e-3
DEFAULT_BATCH_SIZE = 32
DEFAULT_VALIDATION_SPLIT = 0.2
DEFAULT_FINETUNE_EPOCHS = 2
DEFAULT_FINETUNE_LEARNING_RATE = 1e-4
MAX_EPOCHS = 1000


@dataclass(frozen=True)
class FineTuneSpec:
    """Everything a job needs to know about how to train; stored as the job's `config_json`."""

    name: str
    base_model: str = DEFAULT_MODEL_SOURCE
    epochs: int = DEFAULT_EPOCHS
    learning_rate: float = DEFAULT_LEARNING_RATE
    batch_size: int = DEFAULT_BATCH_SIZE
    dropout: float = 0.0
    validation_split: float = DEFAULT_VALIDATION_SPLIT
    balance_classes: bool = False
    class_weights: dict[str, float] = field(default_factory=dict)
    early_stopping_patience: int = 0
    seed: int = 0
    unfreeze_top_layers: int = 0
    finetune_epochs: int = DEFAULT_FINETUNE_EPOCHS
    finetune_learning_rate: float = DEFAULT_FINETUNE_LEARNING_RATE
    activate: bool = False
    min_val_accuracy: float = 0.0
    skip_invalid_images: bool = False
    label_smoothing: float = 0.0

    @classmethod
    def from_request(cls, values: dict[str, Any]) -> "FineTuneSpec":
        """Build from the request's fields (0/empty = default) and check every range."""
        v = dict(values)
        spec = cls(
            name=str(v.get("name") or "").strip(),
            base_model=str(v.get("base_model") or "").strip() or DEFAULT_MODEL_SOURCE,
            epochs=int(v.get("epochs") or DEFAULT_EPOCHS),
            learning_rate=float(v.get("learning_rate") or DEFAULT_LEARNING_RATE),
            batch_size=int(v.get("batch_size") or DEFAULT_BATCH_SIZE),
            dropout=float(v.get("dropout") or 0.0),
            validation_split=float(v.get("validation_split") or DEFAULT_VALIDATION_SPLIT),
            balance_classes=bool(v.get("balance_classes")),
            class_weights={str(k): float(w) for k, w in dict(v.get("class_weights") or {}).items()},
            early_stopping_patience=int(v.get("early_stopping_patience") or 0),
            seed=int(v.get("seed") or 0),
            unfreeze_top_layers=int(v.get("unfreeze_top_layers") or 0),
            finetune_epochs=int(v.get("finetune_epochs") or DEFAULT_FINETUNE_EPOCHS),
            finetune_learning_rate=float(v.get("finetune_learning_rate") or DEFAULT_FINETUNE_LEARNING_RATE),
            activate=bool(v.get("activate")),
            min_val_accuracy=float(v.get("min_val_accuracy") or 0.0),
            skip_invalid_images=bool(v.get("skip_invalid_images")),
            label_smoothing=float(v.get("label_smoothing") or 0.0),
        )
        spec.check()
        return spec

    def check(self) -> None:
        """Refuse out-of-range values with one message naming each bad field."""
        problems = []
        if not self.name:
            problems.append("name is required (the registry name of the new model)")
        if not 1 <= self.epochs <= MAX_EPOCHS:
            problems.append(f"epochs must be between 1 and {MAX_EPOCHS}, got {self.epochs}")
        for key in ("learning_rate", "finetune_learning_rate"):
            value = getattr(self, key)
            if not 0 < value <= 1:
                problems.append(f"{key} must be in (0, 1], got {value}")
        if not 1 <= self.batch_size <= 4096:
            problems.append(f"batch_size must be between 1 and 4096, got {self.batch_size}")
        for key in ("dropout", "validation_split", "label_smoothing"):
            value = getattr(self, key)
            if not 0 <= value < 1:
                problems.append(f"{key} must be in [0, 1), got {value}")
        if not 0 <= self.min_val_accuracy <= 1:
            problems.append(f"min_val_accuracy must be in [0, 1], got {self.min_val_accuracy}")
        for key in ("early_stopping_patience", "unfreeze_top_layers"):
            if getattr(self, key) < 0:
                problems.append(f"{key} must not be negative")
        if not 1 <= self.finetune_epochs <= MAX_EPOCHS:
            problems.append(f"finetune_epochs must be between 1 and {MAX_EPOCHS}, got {self.finetune_epochs}")
        bad_weights = {k: w for k, w in self.class_weights.items() if not w > 0}
        if bad_weights:
            problems.append(f"class_weights must be positive: {bad_weights}")
        if problems:
            raise InvalidInput("invalid fine-tune config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FineTuneSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
