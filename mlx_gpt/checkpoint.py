"""The checkpoint format: one ``.npz`` that is enough to sample from and to resume exactly.

Arrays are stored under ``model/<param path>``, ``optimizer/<state path>``, ``ema/<param path>``
(when present); one ``meta`` array holds UTF-8 JSON (uint8)::

    {"format": "mlx-gpt", "version": 1, "config": {...GPTConfig}, "train": {...TrainConfig} | null,
     "vocab": [...chars...], "iter": N, "best_val_loss": x | null, "data_rng": {...} | null,
     "checksum": "sha256 of every other array"}

``data_rng`` is the training batches' numpy generator; the MLX random key (dropout) is derived from
the seed and the iteration at every step, so there is no MLX RNG state to store.

Everything loads with ``numpy.load(path, allow_pickle=False)``: no pickled objects, ever. Writes are
atomic (temp file in the same folder, fsync, rename, fsync of the folder), so the file on disk is
either the old one or the complete new one.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlx.utils import tree_flatten

from .config import GPTConfig
from .errors import MlxGptError
from .files import write_atomic
from .model import GPT
from .tokenizer import CharTokenizer

FORMAT = "mlx-gpt"
VERSION = 1


def arrays_checksum(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def _prefixed(prefix: str, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}/{k}": v for k, v in flat.items()}


def _strip(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in arrays.items() if k.startswith(prefix + "/")}


@dataclass
class Checkpoint:
    """What a checkpoint holds. Flat dicts map dotted parameter/state paths to numpy arrays."""

    config: GPTConfig
    tokenizer: CharTokenizer
    model: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)
    ema: dict[str, np.ndarray] = field(default_factory=dict)
    train: dict[str, Any] | None = None
    iter: int = 0
    best_val_loss: float | None = None
    data_rng: dict[str, Any] | None = None
    lineage: list[list[Any]] = field(default_factory=list)  # [[run id, last step taken from it or None], ...]
    path: Path | None = None

    def to_bytes(self) -> bytes:
        arrays = {**_prefixed("model", self.model), **_prefixed("optimizer", self.optimizer),
                  **_prefixed("ema", self.ema)}
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "config": self.config.to_dict(),
            "train": self.train,
            "vocab": self.tokenizer.chars,
            "iter": self.iter,
            "best_val_loss": self.best_val_loss,
            "data_rng": self.data_rng,
            "lineage": self.lineage,
            "checksum": arrays_checksum(arrays),
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    def save(self, path: str | Path) -> Path:
        """Write atomically to ``path``."""
        path = Path(path)
        write_atomic(path, self.to_bytes())
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        """Read and validate a checkpoint; any problem is one MlxGptError naming the file."""
        path = Path(path)
        if not path.is_file():
            raise MlxGptError(
                f"checkpoint {path} does not exist; train one first (python train.py) or pass --ckpt PATH"
            )
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile,
                NotImplementedError, RuntimeError, MemoryError) as exc:  # MemoryError: a header declaring a huge array
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MlxGptError(
                f"checkpoint {path} is not a readable .npz (truncated or corrupt?: {reason}); "
                "use another checkpoint (e.g. a timestamped one) with --ckpt"
            ) from None
        return cls._from_arrays(path, arrays)

    @classmethod
    def _from_arrays(cls, path: Path, arrays: dict[str, np.ndarray]) -> Checkpoint:
        def fail(problem: str) -> MlxGptError:
            return MlxGptError(f"checkpoint {path}: {problem}")

        meta_array = arrays.pop("meta", None)
        if meta_array is None or meta_array.dtype != np.uint8 or meta_array.ndim != 1:
            raise fail("no mlx-gpt header ('meta' entry): not an mlx-gpt checkpoint; "
                       "convert PyTorch checkpoints with convert_torch_ckpt.py")
        try:
            meta = json.loads(meta_array.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise fail("the header is not valid JSON: the file is corrupt") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise fail("not an mlx-gpt checkpoint (foreign 'format' in its header)")
        version = meta.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise fail(f"invalid format version {version!r}")
        if version > VERSION:
            raise fail(f"written by a newer mlx-gpt (format version {version}, this one reads <= {VERSION}); "
                       "upgrade mlx-gpt")
        if meta.get("checksum") != arrays_checksum(arrays):
            raise fail("checksum mismatch: the file is corrupt; use another checkpoint with --ckpt")
        try:
            config = GPTConfig.from_dict(meta.get("config"))
            tokenizer = CharTokenizer(meta.get("vocab") or [])
            train = meta.get("train")
            if train is not None and not isinstance(train, dict):
                raise MlxGptError("'train' must be an object")
            iteration = meta.get("iter", 0)
            if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
                raise MlxGptError(f"'iter' must be a non-negative integer, got {iteration!r}")
            best = meta.get("best_val_loss")
            if best is not None and (not isinstance(best, (int, float)) or isinstance(best, bool)):
                raise MlxGptError(f"'best_val_loss' must be a number or null, got {best!r}")
            data_rng = meta.get("data_rng")
            if data_rng is not None and not isinstance(data_rng, dict):
                raise MlxGptError("'data_rng' must be an object")
            lineage = meta.get("lineage", [])
            if not isinstance(lineage, list) or not all(
                    isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                    and (entry[1] is None or (isinstance(entry[1], int) and not isinstance(entry[1], bool)))
                    for entry in lineage):
                raise MlxGptError("'lineage' must be a list of [run id, step or null]")
        except MlxGptError as exc:
            raise fail(f"bad header: {exc}") from None
        if tokenizer.vocab_size != config.vocab_size:
            raise fail(f"vocabulary has {tokenizer.vocab_size} characters but config.vocab_size is {config.vocab_size}")
        model = _strip("model", arrays)
        if not model:
            raise fail("holds no model weights")
        # The header is not covered by the checksum: check that it describes these weights before anything
        # builds a model from it (a header asking for 10**9 layers would otherwise exhaust memory).
        mismatch = _config_mismatch(config, model)
        if mismatch:
            raise fail(f"its config does not match its weights ({mismatch}); the header is corrupt")
        return cls(config=config, tokenizer=tokenizer, model=model, optimizer=_strip("optimizer", arrays),
                   ema=_strip("ema", arrays), train=train, iter=iteration, best_val_loss=best,
                   data_rng=data_rng, lineage=lineage, path=path)


def _config_mismatch(config: GPTConfig, model: dict[str, np.ndarray]) -> str | None:
    """What in ``config`` disagrees with the sizes the weights imply (embeddings, layer count), if anything."""
    expected = {"wte.weight": (config.vocab_size, config.n_embd), "wpe.weight": (config.block_size, config.n_embd)}
    for name, shape in expected.items():
        if name not in model:
            return f"no {name}"
        if tuple(model[name].shape) != shape:
            return f"{name} has shape {tuple(model[name].shape)}, the config implies {shape}"
    layers = {name.split(".")[1] for name in model if name.startswith("h.") and name.count(".") >= 2}
    if len(layers) != config.n_layer or not all(i.isdigit() and int(i) < config.n_layer for i in layers):
        # Name a few missing layers (never range over a huge n_layer from a corrupt header).
        missing = [f"h.{i}." for i in range(min(config.n_layer, len(layers) + 3)) if str(i) not in layers]
        return (f"config.n_layer is {config.n_layer} but the weights hold {len(layers)} layers"
                + (f": missing {', '.join(missing)}" if missing else ""))
    return None


def name_list(names: list[str], limit: int = 8) -> str:
    """The first ``limit`` names, comma-separated, with how many more there are."""
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def array_mismatches(expected: dict[str, tuple[int, ...]], arrays: dict[str, np.ndarray]) -> list[str]:
    """What keeps ``arrays`` from having exactly the expected names and shapes: missing, unexpected, wrong shape."""
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    wrong = sorted(k for k in set(expected) & set(arrays) if tuple(arrays[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing keys: {name_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {name_list(unexpected)}")
    if wrong:
        shapes = [f"{k} {arrays[k].shape} (expected {expected[k]})" for k in wrong]
        problems.append(f"wrong shapes: {name_list(shapes, 3)}")
    return problems


def check_arrays(
    path: Path | None, what: str, expected: dict[str, tuple[int, ...]], weights: dict[str, np.ndarray]
) -> None:
    """Raise an MlxGptError unless ``weights`` has exactly the expected names and shapes (and numeric dtypes)."""
    problems = array_mismatches(expected, weights)
    not_numeric = sorted(k for k in weights if weights[k].dtype.kind not in "fiub")
    if not_numeric:
        problems.append(f"non-numeric dtype in {name_list(not_numeric, 3)}")
    if problems:
        raise MlxGptError(f"checkpoint {path}: {what} do not match its config: {'; '.join(problems)}")


def load_model(path: str | Path, weights: str = "auto") -> tuple[GPT, CharTokenizer, Checkpoint]:
    """A ready-to-sample model (eval mode) and its tokenizer from a checkpoint.

    ``weights``: "auto" uses the EMA weights when the checkpoint has them, "raw" the trained
    weights, "ema" insists on EMA weights.
    """
    import mlx.core as mx

    ckpt = Checkpoint.load(path)
    if weights not in ("auto", "raw", "ema"):
        raise MlxGptError(f"weights must be auto, raw or ema, got {weights!r}")
    if weights == "ema" and not ckpt.ema:
        raise MlxGptError(f"checkpoint {ckpt.path} has no EMA weights; use --weights raw")
    chosen = ckpt.ema if ckpt.ema and weights != "raw" else ckpt.model
    model = GPT(ckpt.config)
    check_arrays(ckpt.path, "weights", {k: v.shape for k, v in tree_flatten(model.parameters())}, chosen)
    model.load_weights([(k, mx.array(v)) for k, v in chosen.items()])
    model.eval()
    mx.eval(model.parameters())
    return model, ckpt.tokenizer, ckpt
