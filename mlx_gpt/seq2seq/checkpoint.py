"""A trained translator in one small ``.npz``: weights under ``model/<param path>`` and a JSON ``meta`` entry
(config, both tokenizers, a checksum). The same conventions as ``mlx_gpt/checkpoint.py``: written
atomically, loaded with ``allow_pickle=False``."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..checkpoint import arrays_checksum, check_arrays, write_atomic
from ..errors import MlxGptError
from .model import Seq2Seq, Seq2SeqConfig
from .tokenizer import SpecialCharTokenizer

FORMAT = "mlx-gpt-seq2seq"
VERSION = 1


def save_translator(path: str | Path, model: Seq2Seq, src_tokenizer: SpecialCharTokenizer,
                    tgt_tokenizer: SpecialCharTokenizer, info: dict[str, Any] | None = None) -> Path:
    """Write the model's weights, config and tokenizers to ``path`` (atomically); ``info`` is free-form JSON."""
    path = Path(path)
    arrays = {f"model/{k}": np.array(v) for k, v in tree_flatten(model.parameters())}
    meta = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(),
            "src_tokenizer": src_tokenizer.to_dict(), "tgt_tokenizer": tgt_tokenizer.to_dict(),
            "info": info or {}, "checksum": arrays_checksum(arrays)}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return path


def load_translator(path: str | Path) -> tuple[Seq2Seq, SpecialCharTokenizer, SpecialCharTokenizer]:
    """(model in eval mode, source tokenizer, target tokenizer) from a file ``save_translator`` wrote."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise MlxGptError(f"{path} does not exist; train one with python -m mlx_gpt.seq2seq.train") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise MlxGptError(f"{path} is not a readable .npz ({exc}); train it again") from None
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError):
        raise MlxGptError(f"{path} has no valid 'meta' entry: not a saved translator") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise MlxGptError(f"{path} is not a version-{VERSION} {FORMAT} file")
    if meta.get("checksum") != arrays_checksum(arrays):
        raise MlxGptError(f"{path}: checksum mismatch, the file is corrupt; train it again")
    config = Seq2SeqConfig.from_dict(meta.get("config"))
    src_tokenizer = SpecialCharTokenizer.from_dict(meta.get("src_tokenizer"))
    tgt_tokenizer = SpecialCharTokenizer.from_dict(meta.get("tgt_tokenizer"))
    if (src_tokenizer.vocab_size, tgt_tokenizer.vocab_size) != (config.src_vocab_size, config.tgt_vocab_size):
        raise MlxGptError(f"{path}: the tokenizers' vocabularies do not match the config's vocab sizes; train it again")
    model = Seq2Seq(config)
    weights = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    check_arrays(path, "weights", {k: v.shape for k, v in tree_flatten(model.parameters())}, weights)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    model.eval()
    mx.eval(model.parameters())
    return model, src_tokenizer, tgt_tokenizer
