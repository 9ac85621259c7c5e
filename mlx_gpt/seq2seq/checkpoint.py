"""A trained translator in one small ``.npz``: weights under ``model/<param path>`` and a JSON ``meta`` entry
(config, both tokenizers, free-form info, a checksum). The container is ``mlx_gpt/checkpoint.py``'s: written
atomically, read with every bound and check the GPT checkpoint gets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..checkpoint import (
    ContainerKind,
    Member,
    check_arrays,
    check_param_count,
    container_bytes,
    group,
    layer_mismatch,
    param_bounds,
    read_container,
    shape_mismatch,
)
from ..errors import MlxGptError
from ..files import write_atomic
from .model import Seq2Seq, Seq2SeqConfig
from .tokenizer import SpecialCharTokenizer

FORMAT = "mlx-gpt-seq2seq"
VERSION = 1
KIND = ContainerKind(FORMAT, VERSION, "translator", missing="train one with python -m mlx_gpt.seq2seq",
                     fix="train it again (python -m mlx_gpt.seq2seq)", groups=("model",))


def save_translator(path: str | Path, model: Seq2Seq, src_tokenizer: SpecialCharTokenizer,
                    tgt_tokenizer: SpecialCharTokenizer, info: dict[str, Any] | None = None) -> Path:
    """Write the model's weights, config and tokenizers to ``path`` (atomically); ``info`` is free-form JSON."""
    path = Path(path)
    arrays = {f"model/{k}": np.array(v) for k, v in tree_flatten(model.parameters())}
    meta = {"config": model.config.to_dict(), "src_tokenizer": src_tokenizer.to_dict(),
            "tgt_tokenizer": tgt_tokenizer.to_dict(), "info": info or {}}
    payload = container_bytes(FORMAT, VERSION, meta, arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, payload)
    return path


def _param_bounds(config: Seq2SeqConfig) -> tuple[int, int]:
    """(fewest, most) parameters: the two GPT stacks, plus the decoder's cross-attention (4 C x C and norms)."""
    (enc_low, enc_high), (dec_low, dec_high) = (param_bounds(config.encoder_config()),
                                                param_bounds(config.decoder_config()))
    C = config.n_embd
    cross = config.n_decoder_layer * 4 * C * C
    return enc_low + dec_low + cross, enc_high + dec_high + cross + config.n_decoder_layer * 8 * C


def _check_header(meta: dict[str, Any], members: dict[str, Member]
                  ) -> tuple[Seq2SeqConfig, SpecialCharTokenizer, SpecialCharTokenizer]:
    try:
        config = Seq2SeqConfig.from_dict(meta.get("config"))
        src_tokenizer = SpecialCharTokenizer.from_dict(meta.get("src_tokenizer"))
        tgt_tokenizer = SpecialCharTokenizer.from_dict(meta.get("tgt_tokenizer"))
    except MlxGptError as exc:
        raise MlxGptError(f"bad header: {exc}") from None
    if (src_tokenizer.vocab_size, tgt_tokenizer.vocab_size) != (config.src_vocab_size, config.tgt_vocab_size):
        raise MlxGptError("the tokenizers' vocabularies do not match the config's vocab sizes")
    # The header is not covered by the checksum: it must describe these weights before a model is built from it.
    shapes = {k: m.shape for k, m in group(members, "model").items()}
    C = config.n_embd
    expected = {"encoder.wte.weight": (config.src_vocab_size, C), "encoder.wpe.weight": (config.src_block_size, C),
                "decoder.wte.weight": (config.tgt_vocab_size, C), "decoder.wpe.weight": (config.tgt_block_size, C)}
    mismatch = (shape_mismatch(shapes, expected) or layer_mismatch(shapes, "encoder.h.", config.n_encoder_layer)
                or layer_mismatch(shapes, "decoder.h.", config.n_decoder_layer))
    if mismatch:
        raise MlxGptError(f"its config does not match its weights ({mismatch}); the header is corrupt")
    check_param_count(group(members, "model"), "weights", _param_bounds(config))
    return config, src_tokenizer, tgt_tokenizer


def load_translator(path: str | Path) -> tuple[Seq2Seq, SpecialCharTokenizer, SpecialCharTokenizer]:
    """(model in eval mode, source tokenizer, target tokenizer) from a file ``save_translator`` wrote."""
    path = Path(path)
    (config, src_tokenizer, tgt_tokenizer), arrays = read_container(path, KIND, _check_header)
    model = Seq2Seq(config)
    weights = {k[len("model/"):]: v for k, v in arrays.items()}
    check_arrays(path, "weights", {k: v.shape for k, v in tree_flatten(model.parameters())}, weights)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    model.eval()
    mx.eval(model.parameters())
    return model, src_tokenizer, tgt_tokenizer
