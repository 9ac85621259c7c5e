"""Model and training hyperparameters, presets, and their validation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import MlxGptError

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "relu2")
POSITION_ENCODINGS = ("learned", "rope")
OPTIMIZERS = ("adamw", "muon")
LR_SCHEDULES = ("cosine", "wsd")
# The compute precision of training (weights and optimizer state stay float32); auto picks one for the device.
DTYPES = ("float32", "bfloat16", "float16")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise MlxGptError(message)


def _check_types(obj: Any) -> None:
    """Reject values of the wrong type (e.g. from a hand-edited JSON file or checkpoint)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        expected = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(f.type)
        if expected is None:
            continue
        ok = isinstance(value, expected) and not (f.type in ("int", "float") and isinstance(value, bool))
        _require(ok, f"{type(obj).__name__}.{f.name} must be {f.type}, got {value!r}")


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the decoder-only transformer (nanoGPT's names)."""

    vocab_size: int = 65
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    bias: bool = False  # biases in Linear and LayerNorm layers
    activation: str = "gelu"  # gelu (exact erf), gelu_tanh, relu, relu2 (relu squared)
    lm_head_bias: bool = False
    tie_weights: bool = True  # LM head shares the token embedding
    # The recipe's architecture settings (docs/recipe.md); off, they leave nanoGPT's model.
    position_encoding: str = "learned"  # learned (nanoGPT's wpe) or rope (rotary, on queries and keys)
    rope_base: float = 10000.0
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    zero_init_proj: bool = False  # the projections into the residual stream (c_proj) start at zero
    logit_softcap: float = 0.0  # 0: off; else logits = cap * tanh(logits / cap)
    value_residual: bool = False  # each layer's values mixed with the first layer's (learned weight per layer)
    embed_shortcut: bool = False  # each block's input mixed with the embeddings (two learned weights per block)

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        _require(
            self.n_embd % self.n_head == 0,
            f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
            "pick e.g. n_head that divides it",
        )
        _require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _require(
            self.activation in ACTIVATIONS,
            f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}",
        )
        _require(
            self.position_encoding in POSITION_ENCODINGS,
            f"position_encoding must be one of {', '.join(POSITION_ENCODINGS)}, got {self.position_encoding!r}",
        )
        if self.position_encoding == "rope":
            head_dim = self.n_embd // self.n_head
            _require(head_dim % 2 == 0, f"rotary positions need an even head size, got n_embd/n_head = {head_dim}; "
                                        "pick n_head so that n_embd / n_head is even")
        _require(math.isfinite(self.rope_base) and self.rope_base > 1,
                 f"rope_base must be a finite number > 1, got {self.rope_base}")
        _require(math.isfinite(self.logit_softcap) and self.logit_softcap >= 0,
                 f"logit_softcap must be a finite number >= 0 (0: off), got {self.logit_softcap}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPTConfig:
        return dataclass_from_dict(cls, values)


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (nanoGPT's names and shakespeare_char defaults)."""

    data: str | None = None  # None: Tiny Shakespeare (downloaded once, cached)
    out_dir: str = "assets/checkpoints"
    batch_size: int = 64
    gradient_accumulation_steps: int = 1
    max_iters: int = 5000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 5000
    decay_lr: bool = True
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    eval_iters: int = 200
    eval_whole_val: bool = False  # val loss on the whole val split (every target once), not eval_iters batches
    log_interval: int = 10
    save_interval: int = 0  # 0: same as eval_interval
    seed: int = 1337
    compile: bool = True
    keep_last: int = 5  # timestamped checkpoints kept; 0 keeps all
    on_save_error: str = "stop"  # stop | warn
    skip_nonfinite: int = 0  # non-finite steps that may be skipped before stopping
    ema_decay: float = 0.0  # 0: off; else keep an exponential moving average of the weights
    label_smoothing: float = 0.0  # in the training loss only; eval reports plain cross-entropy
    plot: bool = False  # redraw out_dir/loss.png after each evaluation (needs the [plot] extra)
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' 2-D weights, AdamW for the rest)
    muon_learning_rate: float = 0.02  # Muon's peak rate; it follows the same schedule shape as learning_rate
    muon_momentum: float = 0.95
    momentum_warmup_iters: int = 0  # Muon's momentum rises linearly from 0.85 to muon_momentum over these
    lr_schedule: str = "cosine"  # cosine (nanoGPT) | wsd (warm-up, stable, linear decay)
    wsd_decay_fraction: float = 0.2  # wsd: the decay takes this last fraction of lr_decay_iters
    dtype: str = "float32"  # forward and backward in this type (DTYPES or auto); float32 master weights

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("batch_size", "gradient_accumulation_steps", "max_iters", "eval_interval",
                     "eval_iters", "log_interval"):
            _require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_iters", "lr_decay_iters", "save_interval", "keep_last", "skip_nonfinite",
                     "momentum_warmup_iters"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value >= 0, f"{name} must be a finite number >= 0, got {value}")
        _require(self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}")
        _require(math.isfinite(self.muon_learning_rate) and self.muon_learning_rate > 0,
                 f"muon_learning_rate must be a finite number > 0, got {self.muon_learning_rate}")
        for name in ("beta1", "beta2", "muon_momentum"):
            _require(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("ema_decay", "label_smoothing"):
            _require(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}")
        _require(0 <= self.seed < 2**64, f"seed must be in [0, 2**64) (what MLX and numpy accept), got {self.seed}")
        _require(self.on_save_error in ("stop", "warn"),
                 f"on_save_error must be 'stop' or 'warn', got {self.on_save_error!r}")
        _require(self.optimizer in OPTIMIZERS,
                 f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        _require(self.lr_schedule in LR_SCHEDULES,
                 f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        _require(0.0 < self.wsd_decay_fraction <= 1.0,
                 f"wsd_decay_fraction must be in (0, 1], got {self.wsd_decay_fraction}")
        _require(self.dtype in (*DTYPES, "auto"),
                 f"dtype must be one of {', '.join(DTYPES)} or auto, got {self.dtype!r}")

    @property
    def checkpoint_interval(self) -> int:
        return self.save_interval or self.eval_interval

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, values)


def dataclass_from_dict(cls: type, values: Any) -> Any:
    """Build a config dataclass from a JSON-like dict, with one-line errors for anything that does not fit."""
    _require(isinstance(values, dict), f"{cls.__name__} must be a JSON object, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    _require(not unknown, f"unknown {cls.__name__} field(s): {', '.join(map(repr, unknown))}")
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise MlxGptError(f"{cls.__name__}: {exc}") from None


# Presets: flat dicts of GPTConfig and TrainConfig fields. "shakespeare" is the default.
PRESETS: dict[str, dict[str, Any]] = {
    # The seed's model size with nanoGPT's shakespeare_char recipe (a GPU run; slow on a CPU).
    "shakespeare": {},
    # nanoGPT's "baby" CPU run of shakespeare_char.
    "baby": {
        "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "dropout": 0.0,
        "batch_size": 12, "max_iters": 2000, "lr_decay_iters": 2000, "eval_iters": 20,
    },
}
# baby's model size, data and budget with the recipe's architecture settings (docs/recipe.md has each one's measured
# effect): rotary positions, QK-norm, relu², zero-initialised projections, an untied head, a logit soft-cap and both
# shortcuts; evaluated on the whole val split. Muon is left out: on a CPU at this batch its Newton-Schulz steps cost
# more time than its better steps save.
PRESETS["baby-fast"] = {
    **PRESETS["baby"], "position_encoding": "rope", "qk_norm": True, "activation": "relu2", "zero_init_proj": True,
    "tie_weights": False, "logit_softcap": 30.0, "value_residual": True, "embed_shortcut": True,
    "eval_whole_val": True,
}


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A preset by name, or a JSON file of GPTConfig/TrainConfig fields."""
    if name_or_path in PRESETS:
        return dict(PRESETS[name_or_path])
    from .checkpoint import MAX_META_BYTES, parse_json_limited, read_limited  # here: checkpoint imports this module

    path = Path(name_or_path)
    if not path.exists():
        raise MlxGptError(
            f"--config {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor an existing JSON file"
        )
    payload = read_limited(path, MAX_META_BYTES, "--config", "pass a JSON file of config fields")
    try:
        values = parse_json_limited(payload, "its JSON")
    except MlxGptError as exc:
        raise MlxGptError(f"--config {path}: not a readable JSON file ({exc})") from None
    _require(isinstance(values, dict), f"--config {path}: expected a JSON object of config fields")
    known = {f.name for f in fields(GPTConfig)} | {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    _require(not unknown, f"--config {path}: unknown field(s) {', '.join(map(repr, unknown))}")
    return values


def split_fields(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a flat dict into (GPTConfig fields, TrainConfig fields)."""
    model_names = {f.name for f in fields(GPTConfig)}
    train_names = {f.name for f in fields(TrainConfig)}
    return (
        {k: v for k, v in values.items() if k in model_names},
        {k: v for k, v in values.items() if k in train_names},
    )
