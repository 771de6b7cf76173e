"""A fine-tune job's configuration: defaults for unset fields and range checks, no I/O.

The protobuf `FineTuneConfig` uses 0 for "not set" on most fields; `FineTuneSpec.from_request`
turns that into explicit defaults here, once, so the trainer never guesses.
"""

from __future__ import annotations

import dataclasses
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from headswap.config import DEFAULT_MODEL_SOURCE
from headswap.errors import InvalidInput, shown_name
from headswap.registry.registry import check_model_name

DEFAULT_EPOCHS = 10
DEFAULT_LEARNING_RATE = 5e-3
DEFAULT_BATCH_SIZE = 32
DEFAULT_VALIDATION_SPLIT = 0.2
DEFAULT_FINETUNE_EPOCHS = 2
DEFAULT_FINETUNE_LEARNING_RATE = 1e-4
MAX_EPOCHS = 1000
MAX_HIDDEN_UNITS = 4096
PRECISIONS = ("fp32", "bf16", "int8")
MAX_BATCH_SIZE = 4096
MAX_SEED = 2**31 - 1  # every RNG involved (numpy, Python, TensorFlow) accepts it
# No Keras backbone we can fine-tune has more layers than this (EfficientNetB7: ~800); the
# trainer checks the real count of the base when it cuts the model.
MAX_UNFREEZE_LAYERS = 1000
MAX_CLASS_WEIGHT = 1e6
MAX_CLASS_WEIGHTS = 10_000
MAX_BASE_MODEL_LENGTH = 1024
# --- labels --------------------------------------------------------------------------------
#
# A label is a class name that people read: two labels that look the same must be one class or
# be refused, never two classes (issue 25 item 7). So, where labels enter (uploads, class_weights):
#
# 1. NFKC: compatibility forms become their plain letters (fullwidth "ｃａｔ" and "𝐜𝐚𝐭" are "cat",
#    NBSP is a space), after composing accents (NFC's "é" either way).
# 2. Variation selectors are stripped: they only choose how the character before them is drawn
#    (emoji or text style, a glyph variant), so "cat\uFE0F" is "cat" and "❤️" is "❤". Stripping
#    (rather than refusing) keeps emoji pasted with and without them one class.
# 3. Control and format characters (categories Cc, Cf, and unassigned / private use) are refused:
#    zero-width joiners, spaces and marks draw nothing ("ca\u200dt" reads "cat"). The one
#    exception is IDNA's context rule (RFC 5892 appendix A) where the joiner is visible: ZWNJ/ZWJ
#    right after a virama (Indic conjuncts) and ZWNJ between two Arabic-script letters (Persian),
#    never at either end.
# 4. Mixed scripts are refused (UTS #39's single-script test, kept small): each letter and mark
#    has a script, read from its Unicode name ("CYRILLIC SMALL LETTER ES" -> Cyrillic); digits,
#    punctuation, symbols, spaces and combining marks ("COMBINING ...") are Common/Inherited and go
#    with any script. A label passes with at most one script, or with Han plus the kana
#    (Japanese), Hangul (Korean) or Bopomofo (Chinese) that UTS #39 lets go with it. "сat" with a
#    Cyrillic "с" is refused. (The `regex` module's \p{Script} would be exact, but it is no
#    dependency of the serving path; the names are exact for every script a look-alike attack
#    uses: Latin, Greek, Cyrillic, Armenian, Cherokee.)

ZWNJ, ZWJ = "\u200c", "\u200d"
_VARIATION_SELECTORS = re.compile("[\ufe00-\ufe0f\U000e0100-\U000e01ef]")
_VIRAMA = 9  # canonical combining class of a virama
COMMON, INHERITED = "Common", "Inherited"
# First words of character names that are not the name of their script.
_NAME_SCRIPT = {"CJK": "Han", "IDEOGRAPHIC": "Han", "KATAKANA-HIRAGANA": COMMON, "MODIFIER": COMMON,
                "COMBINING": INHERITED}
# Scripts that UTS #39 lets one label combine (its augmented script sets).
_SCRIPT_SETS = (frozenset({"Han", "Hiragana", "Katakana"}), frozenset({"Han", "Hangul"}),
                frozenset({"Han", "Bopomofo"}))


def char_script(c: str) -> str:
    """The script of a letter or mark, from its Unicode name; Common for everything else."""
    if unicodedata.category(c)[0] not in "LM":
        return COMMON
    first = unicodedata.name(c, "").split(" ", 1)[0]
    return _NAME_SCRIPT.get(first, first.title()) if first else COMMON


def _joiner_allowed(text: str, i: int) -> bool:
    """RFC 5892's CONTEXTJ, the part that needs no joining-type table: where ZWNJ/ZWJ change what is drawn."""
    if not 0 < i < len(text) - 1:
        return False
    if unicodedata.combining(text[i - 1]) == _VIRAMA:
        return True
    return text[i] == ZWNJ and char_script(text[i - 1]) == char_script(text[i + 1]) == "Arabic"


def normalize_label(label: str) -> str:
    """One spelling per class (NFKC, variation selectors and surrounding blanks stripped); labels
    with invisible characters or mixed scripts refused (InvalidInput naming the label), because
    either would make two classes that read alike."""
    text = _VARIATION_SELECTORS.sub("", unicodedata.normalize("NFKC", str(label))).strip()
    bad = sorted({c for i, c in enumerate(text) if unicodedata.category(c).startswith("C")
                  and not (c in (ZWNJ, ZWJ) and _joiner_allowed(text, i))})
    if bad:
        raise InvalidInput(f"label {shown_name(text)} contains control or invisible characters "
                           f"{', '.join(f'U+{ord(c):04X}' for c in bad[:5])}; labels must be printable text")
    scripts: dict[str, str] = {}
    for c in text:
        script = char_script(c)
        if script not in (COMMON, INHERITED):
            scripts.setdefault(script, c)
    if len(scripts) > 1 and not any(set(scripts) <= allowed for allowed in _SCRIPT_SETS):
        shown = ", ".join(f"{script} {c!r} (U+{ord(c):04X})" for script, c in sorted(scripts.items()))
        raise InvalidInput(f"label {shown_name(text)} mixes scripts: {shown}; a label's letters must come "
                           "from one script (look-alike letters of another script would make a second class "
                           "that reads the same)")
    return text


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
    hidden_units: int = 0  # 0 = linear head; N = Dense(N, relu) before the output (the seeds' recipe: 256)
    precision: str = "fp32"
    # With activate: start the new version as a rollout ("canary" or "shadow", at rollout_percent)
    # instead of activating it outright (headswap.inference.rollout).
    rollout_mode: str = ""
    rollout_percent: int = 0

    @classmethod
    def from_request(cls, values: dict[str, Any]) -> "FineTuneSpec":
        """Build from the request's fields (0/empty = default) and check every range."""
        v = dict(values)
        problems: list[str] = []
        weights: dict[str, float] = {}
        for key, weight in dict(v.get("class_weights") or {}).items():
            try:
                weights[normalize_label(key)] = float(weight)
            except InvalidInput as err:
                problems.append(f"class_weights: {err}")
        if problems:
            raise InvalidInput("invalid fine-tune config: " + "; ".join(problems))
        spec = cls(
            name=str(v.get("name") or "").strip(),
            base_model=str(v.get("base_model") or "").strip() or DEFAULT_MODEL_SOURCE,
            epochs=int(v.get("epochs") or DEFAULT_EPOCHS),
            learning_rate=float(v.get("learning_rate") or DEFAULT_LEARNING_RATE),
            batch_size=int(v.get("batch_size") or DEFAULT_BATCH_SIZE),
            dropout=float(v.get("dropout") or 0.0),
            validation_split=float(v.get("validation_split") or DEFAULT_VALIDATION_SPLIT),
            balance_classes=bool(v.get("balance_classes")),
            class_weights=weights,
            early_stopping_patience=int(v.get("early_stopping_patience") or 0),
            seed=int(v.get("seed") or 0),
            unfreeze_top_layers=int(v.get("unfreeze_top_layers") or 0),
            finetune_epochs=int(v.get("finetune_epochs") or DEFAULT_FINETUNE_EPOCHS),
            finetune_learning_rate=float(v.get("finetune_learning_rate") or DEFAULT_FINETUNE_LEARNING_RATE),
            activate=bool(v.get("activate")),
            min_val_accuracy=float(v.get("min_val_accuracy") or 0.0),
            skip_invalid_images=bool(v.get("skip_invalid_images")),
            label_smoothing=float(v.get("label_smoothing") or 0.0),
            hidden_units=int(v.get("hidden_units") or 0),
            precision=str(v.get("precision") or "fp32").strip().lower(),
            rollout_mode=str(v.get("rollout_mode") or "").strip().lower(),
            rollout_percent=int(v.get("rollout_percent") or 0),
        )
        spec.check()
        return spec

    def check(self) -> None:
        """Refuse out-of-range values with one message naming each bad field."""
        problems = []
        if not self.name:
            problems.append("name is required (the registry name of the new model)")
        else:
            try:
                check_model_name(self.name)
            except InvalidInput as err:
                problems.append(f"name: {err}")
        if len(self.base_model) > MAX_BASE_MODEL_LENGTH or \
                any(unicodedata.category(c).startswith("C") for c in self.base_model):
            problems.append(f"base_model must be a registry name or a source (builtin:, keras:, hub:) of at most "
                            f"{MAX_BASE_MODEL_LENGTH} printable characters, got {shown_name(self.base_model)}")
        if not 0 <= self.seed <= MAX_SEED:
            problems.append(f"seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if not 0 <= self.unfreeze_top_layers <= MAX_UNFREEZE_LAYERS:
            problems.append(f"unfreeze_top_layers must be between 0 and {MAX_UNFREEZE_LAYERS}, "
                            f"got {self.unfreeze_top_layers}")
        if not 0 <= self.early_stopping_patience <= MAX_EPOCHS:
            problems.append(f"early_stopping_patience must be between 0 and {MAX_EPOCHS}, "
                            f"got {self.early_stopping_patience}")
        if not 1 <= self.epochs <= MAX_EPOCHS:
            problems.append(f"epochs must be between 1 and {MAX_EPOCHS}, got {self.epochs}")
        for key in ("learning_rate", "finetune_learning_rate"):
            value = getattr(self, key)
            if not 0 < value <= 1:
                problems.append(f"{key} must be in (0, 1], got {value}")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            problems.append(f"batch_size must be between 1 and {MAX_BATCH_SIZE}, got {self.batch_size}")
        for key in ("dropout", "validation_split", "label_smoothing"):
            value = getattr(self, key)
            if not 0 <= value < 1:
                problems.append(f"{key} must be in [0, 1), got {value}")
        if not 0 <= self.min_val_accuracy <= 1:
            problems.append(f"min_val_accuracy must be in [0, 1], got {self.min_val_accuracy}")
        if not 1 <= self.finetune_epochs <= MAX_EPOCHS:
            problems.append(f"finetune_epochs must be between 1 and {MAX_EPOCHS}, got {self.finetune_epochs}")
        if not 0 <= self.hidden_units <= MAX_HIDDEN_UNITS:
            problems.append(f"hidden_units must be between 0 and {MAX_HIDDEN_UNITS} (0 = no hidden layer), "
                            f"got {self.hidden_units}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {shown_name(self.precision)}")
        bad_weights = {k: w for k, w in self.class_weights.items()
                       if not (math.isfinite(w) and 0 < w <= MAX_CLASS_WEIGHT)}
        if bad_weights:
            shown = dict(list(bad_weights.items())[:5])
            problems.append(f"class_weights values must be in (0, {MAX_CLASS_WEIGHT:g}], got {shown}")
        if len(self.class_weights) > MAX_CLASS_WEIGHTS:
            problems.append(f"class_weights may name at most {MAX_CLASS_WEIGHTS} labels, got {len(self.class_weights)}")
        if any(not k for k in self.class_weights):
            problems.append("class_weights keys must be non-empty labels")
        if self.rollout_mode not in ("", "canary", "shadow"):
            problems.append(f"rollout_mode must be canary, shadow or empty (activate outright), got "
                            f"{shown_name(self.rollout_mode)}")
        elif self.rollout_mode and not 1 <= self.rollout_percent <= 99:
            problems.append(f"rollout_percent must be from 1 to 99 with a rollout_mode, got {self.rollout_percent}")
        elif not self.rollout_mode and self.rollout_percent:
            problems.append("rollout_percent needs a rollout_mode (canary or shadow)")
        if problems:
            raise InvalidInput("invalid fine-tune config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FineTuneSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
