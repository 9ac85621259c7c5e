"""The Hugging Face GPT-2 format: export an mlx-gpt checkpoint as a folder that transformers and mlx-lm load, and
read such a folder back as an mlx-gpt checkpoint.

A folder holds config.json (a ``GPT2LMHeadModel`` config), model.safetensors (keys without a ``transformer.``
prefix, Linear weights in GPT-2's Conv1D layout, i.e. transposed), tokenizer.json (a ``WordLevel`` model whose
vocabulary is our characters, split one character per token), tokenizer_config.json, generation_config.json and
a model card (README.md). MLX writes and reads the safetensors itself: nothing beyond mlx-gpt's own dependencies
is needed to export or to import a safetensors folder (a pytorch_model.bin needs PyTorch).

Our architecture is GPT-2's, with three settings GPT-2 cannot express (an untied LM head, an LM head bias, and a
ReLU MLP for mlx-lm, which always uses the tanh GELU); those are refused. ``bias=False`` is written as zero biases
(mlx-lm gives every Linear and LayerNorm a bias) and read back as ``bias=False`` when every bias is zero.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import Checkpoint, array_mismatches, name_list
from .config import GPTConfig
from .errors import MlxGptError
from .files import fsync_dir, write_atomic
from .tokenizer import CharTokenizer

WEIGHTS_FILE = "model.safetensors"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"
SHARD_INDEX_FILE = "model.safetensors.index.json"
EXPORT_FILES = ("config.json", WEIGHTS_FILE, "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                "README.md")
# One token per character: the regex "." would merge "\n\n" and the tokenizers library rejects "(?s)".
CHAR_SPLIT = {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": False}
# WordLevel needs an unknown token; it is left out of the vocabulary so that an unknown character is an error (as
# in CharTokenizer), never silently mapped to a real one.
UNK_TOKEN = "<unk>"
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}  # ours -> GPT-2's activation_function
FROM_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                       "gelu_fast": "gelu_tanh", "relu": "relu"}
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # weights stored [in, out] by GPT-2
LAYER_NORMS = ("ln_1", "ln_2")
# Buffers older transformers versions saved with the weights (the causal mask), not parameters.
BUFFER_KEY = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")


# ---------------------------------------------------------------------------------------------------------------
# Shared: the mapping between our parameter names and GPT-2's


def layer_names(config: GPTConfig) -> list[str]:
    """Every GPT-2 parameter name (weights and biases) of a model of this shape, no prefix."""
    names = ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"]
    for i in range(config.n_layer):
        for part in (*LAYER_NORMS, *CONV1D):
            names += [f"h.{i}.{part}.weight", f"h.{i}.{part}.bias"]
    return names


def _is_conv1d(name: str) -> bool:
    return name.endswith(".weight") and any(f".{part}." in name for part in CONV1D)


def gpt2_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """GPT-2's shape of each parameter (Conv1D weights are [in, out])."""
    C = config.n_embd
    shapes = {"wte.weight": (config.vocab_size, C), "wpe.weight": (config.block_size, C)}
    linear = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)}
    for name in layer_names(config)[2:]:
        part = name.rsplit(".", 1)[0].split(".", 2)[-1]
        if name.startswith("ln_f") or part in LAYER_NORMS:
            shapes[name] = (C,)
        else:
            shapes[name] = linear[part] if name.endswith(".weight") else (linear[part][1],)
    return shapes


# ---------------------------------------------------------------------------------------------------------------
# Export


@dataclass
class Exported:
    """What an export wrote, and what the user should know about it."""

    out_dir: Path
    weights: str  # "ema" or "raw"
    warnings: list[str] = field(default_factory=list)


# The recipe's settings that change what the model computes (docs/recipe.md; zero_init_proj only changes the init)
RECIPE_SETTINGS = ("position_encoding", "qk_norm", "logit_softcap", "value_residual", "embed_shortcut")


def unsupported_settings(config: GPTConfig) -> list[str]:
    """The settings of ``config`` that a GPT-2 folder cannot carry, each with the reason."""
    problems = []
    if not config.tie_weights:
        problems.append("tie_weights=False (GPT-2 ties its LM head to the token embedding; mlx-lm cannot load an "
                        "untied head)")
    if config.lm_head_bias:
        problems.append("lm_head_bias=True (GPT-2's LM head has no bias)")
    if config.activation not in HF_ACTIVATIONS:
        problems.append(f"activation={config.activation} (mlx-lm's GPT-2 always uses the tanh GELU)")
    defaults = GPTConfig()
    for name in RECIPE_SETTINGS:
        value = getattr(config, name)
        if value != getattr(defaults, name):
            problems.append(f"{name}={value} (GPT-2 has learned positions, plain attention and no logit cap or "
                            "shortcuts; it loads into mlx-gpt, not back out)")
    return problems


def hf_config(config: GPTConfig, layer_norm_eps: float, extra: dict[str, Any]) -> dict[str, Any]:
    """config.json: a GPT2LMHeadModel of this shape (mlx-lm needs n_ctx as well as n_positions)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": HF_ACTIVATIONS[config.activation],
        "layer_norm_epsilon": layer_norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": 0.0,  # our attention has no dropout on its weights (model.py)
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        # A character vocabulary has no special tokens; GPT-2's default ids (50256) would be out of range.
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "torch_dtype": "float32",
        "mlx_gpt": extra,
    }


def hf_weights(config: GPTConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat parameters in GPT-2's names and layout: Conv1D weights transposed, absent biases as zeros."""
    out = {}
    for name, shape in gpt2_shapes(config).items():
        if name in params:
            value = params[name]
            out[name] = np.ascontiguousarray(value.T) if _is_conv1d(name) else value
        else:  # bias=False: mlx-lm loads strictly and gives every Linear and LayerNorm a bias
            out[name] = np.zeros(shape, dtype=params["wte.weight"].dtype)
    return out


def tokenizer_json(tokenizer: CharTokenizer) -> dict[str, Any]:
    """tokenizer.json: one WordLevel token per character, decoded by plain concatenation (Fuse)."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": CHAR_SPLIT,
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(tokenizer.chars)}, "unk_token": UNK_TOKEN},
    }


def tokenizer_config(config: GPTConfig) -> dict[str, Any]:
    # With clean_up_tokenization_spaces true, transformers would decode "Nay , sir !" as "Nay, sir!".
    return {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "model_max_length": config.block_size}


def generation_config(config: GPTConfig) -> dict[str, Any]:
    """sample.py's defaults; max_length stops generation where the position table ends."""
    return {"do_sample": True, "temperature": 0.8, "top_k": 200, "max_length": config.block_size,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def gelu_difference(model: Any, params: dict[str, np.ndarray]) -> float:
    """Largest |logit| difference between ``model`` and the same weights with the tanh GELU, on one window."""
    import mlx.core as mx

    from .model import GPT

    config = model.config
    tanh_model = GPT(replace(config, activation="gelu_tanh"))
    tanh_model.load_weights([(k, mx.array(v)) for k, v in params.items()])
    tanh_model.eval()
    ids = mx.array(np.arange(config.block_size, dtype=np.int32) % config.vocab_size)[None]
    return float(mx.abs(model(ids) - tanh_model(ids)).max())


def _describe_data(train: dict[str, Any] | None) -> str:
    if not train:
        return "not recorded (a converted checkpoint)"
    data = train.get("data")
    return Path(data).name if data else "Tiny Shakespeare"


def model_card(ckpt: Checkpoint, weights: str, out_name: str, gelu_diff: float | None) -> str:
    """README.md: what the model is, how it was trained, and how to load it."""
    c, train = ckpt.config, ckpt.train or {}
    loss = f"{ckpt.best_val_loss:.4f}" if ckpt.best_val_loss is not None else "not recorded"
    recipe = ", ".join(f"{k}={train[k]}" for k in ("batch_size", "learning_rate", "max_iters", "weight_decay",
                                                      "dropout", "ema_decay", "seed") if k in train)
    mlx_lm_note = ("" if gelu_diff is None else
                   f"\nmlx-lm always computes the tanh GELU while this model was trained with the exact one: its "
                   f"logits there differ from mlx-gpt's and transformers' by up to {gelu_diff:.1e} (measured at "
                   "export); train with `--activation gelu_tanh` for an exact match.\n")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [gpt2, character-level, mlx, mlx-gpt]
---

# {out_name}

A character-level GPT-2 trained with mlx-gpt (nanoGPT's architecture in Apple's MLX).
Each token is one character; the vocabulary is the {c.vocab_size} distinct characters of the training text.

| setting | value |
| --- | --- |
| layers, heads, embedding | {c.n_layer}, {c.n_head}, {c.n_embd} |
| context (block_size) | {c.block_size} characters |
| activation | {c.activation} (`{HF_ACTIVATIONS[c.activation]}`) |
| biases | {"yes" if c.bias else "no (written as zeros)"} |
| training data | {_describe_data(ckpt.train)} |
| iterations | {ckpt.iter} |
| best validation loss | {loss} |
| weights | {"EMA" if weights == "ema" else "raw (trained)"} |

Training recipe: {recipe or "not recorded"}.
{mlx_lm_note}
## Use

With transformers (PyTorch):

```python
from transformers import AutoTokenizer, GPT2LMHeadModel
tok = AutoTokenizer.from_pretrained("{out_name}")
model = GPT2LMHeadModel.from_pretrained("{out_name}")
ids = tok("ROMEO:", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, do_sample=False)[0]))  # up to max_length={c.block_size} characters
```

With mlx-lm:

```python
from mlx_lm import generate, load
model, tok = load("{out_name}")
print("ROMEO:" + generate(model, tok, "ROMEO:", max_tokens={c.block_size - 6}))
```

The model has {c.block_size} positions: keep prompt + new characters within that (transformers stops there
by default; mlx-gpt's sample.py slides its window to go further). A character outside the vocabulary is an
error (`Missing [UNK] token`), never replaced.
Back to mlx-gpt: `python convert_torch_ckpt.py {out_name} model.npz`.
"""


def _prepare_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse to overwrite without --force, and never delete a folder that holds anything but an export."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise MlxGptError(f"the output {out_dir} is a file; give a folder name for the exported model")
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORT_FILES)
    if others:
        raise MlxGptError(f"the output folder {out_dir} holds other files ({name_list(others, 4)}); "
                          "give a new or empty folder, or one an earlier export wrote")
    if any(out_dir.iterdir()) and not force:
        raise MlxGptError(f"{out_dir} already holds an exported model; pass --force to overwrite it")


def _write_json(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by the complete folder ``tmp``: the old export is removed only once the new one is in."""
    old = tmp.with_name(tmp.name.replace(".tmp", ".old"))
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def export(ckpt_path: str | Path, out_dir: str | Path, weights: str = "auto", force: bool = False,
           warn: Callable[[str], None] | None = None) -> Exported:
    """Write the checkpoint ``ckpt_path`` as a Hugging Face GPT-2 folder ``out_dir``.

    ``weights`` as in ``load_model``. The folder is written beside ``out_dir`` and renamed into place when
    complete, so an error leaves ``out_dir`` as it was.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .checkpoint import load_model

    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, force)
    model, tokenizer, ckpt = load_model(ckpt_path, weights=weights)
    problems = unsupported_settings(ckpt.config)
    if problems:
        raise MlxGptError(f"checkpoint {ckpt_path} cannot be written as GPT-2: {'; '.join(problems)}")
    params = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    chosen = "ema" if ckpt.ema and weights != "raw" else "raw"
    result = Exported(out_dir, chosen)
    gelu_diff = gelu_difference(model, params) if ckpt.config.activation == "gelu" else None
    if gelu_diff is not None:
        result.warnings.append(
            f"activation=gelu (exact): transformers matches, but mlx-lm always uses the tanh GELU and its logits "
            f"differ by up to {gelu_diff:.1e} here; train with --activation gelu_tanh for an exact mlx-lm match")
    extra = {"iter": ckpt.iter, "best_val_loss": ckpt.best_val_loss, "weights": chosen}
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        arrays = {k: mx.array(v) for k, v in hf_weights(ckpt.config, params).items()}
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), arrays, metadata={"format": "pt"})  # transformers wants "pt"
        _write_json(tmp / "config.json", hf_config(ckpt.config, model.ln_f.eps, extra))
        _write_json(tmp / "tokenizer.json", tokenizer_json(tokenizer))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config(ckpt.config))
        _write_json(tmp / "generation_config.json", generation_config(ckpt.config))
        write_atomic(tmp / "README.md", model_card(ckpt, chosen, out_dir.name, gelu_diff).encode("utf-8"))
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for message in result.warnings:
        (warn or _stderr)(f"warning: {message}")
    return result


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Import


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise MlxGptError(f"{path.parent} has no {path.name}; a Hugging Face GPT-2 folder needs {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MlxGptError(f"{path}: not a readable JSON file ({' '.join(str(exc).split())})") from None


def _config_int(hf: dict[str, Any], key: str, path: Path) -> int:
    value = hf.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise MlxGptError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def config_from_hf(hf: Any, path: Path, layer_norm_eps: float = 1e-5) -> GPTConfig:
    """Our GPTConfig from a GPT-2 config.json; anything our model would compute differently is an error."""
    if not isinstance(hf, dict) or hf.get("model_type") != "gpt2":
        kind = hf.get("model_type") if isinstance(hf, dict) else None
        raise MlxGptError(f"{path}: model_type is {kind!r}, not 'gpt2'; only GPT-2 folders can be converted")
    C = _config_int(hf, "n_embd", path)
    n_positions = _config_int(hf, "n_positions", path)
    activation = FROM_HF_ACTIVATIONS.get(str(hf.get("activation_function", "gelu_new")))
    eps = hf.get("layer_norm_epsilon", 1e-5)
    checks = [
        (activation is not None, f"activation_function {hf.get('activation_function')!r} (mlx-gpt has "
                                 f"{', '.join(FROM_HF_ACTIVATIONS)})"),
        (hf.get("n_inner") in (None, 4 * C), f"n_inner={hf.get('n_inner')} (mlx-gpt's MLP is 4 * n_embd wide)"),
        (isinstance(eps, (int, float)) and abs(eps - layer_norm_eps) <= 1e-12,
         f"layer_norm_epsilon={hf.get('layer_norm_epsilon')} (mlx-gpt's LayerNorm uses {layer_norm_eps})"),
        (hf.get("scale_attn_weights", True) is True, "scale_attn_weights=false"),
        (not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true"),
        (not hf.get("add_cross_attention", False), "add_cross_attention=true"),
    ]
    unsupported = [what for ok, what in checks if not ok]
    if unsupported:
        raise MlxGptError(f"{path}: settings mlx-gpt's model does not have: {'; '.join(unsupported)}")
    dropout = hf.get("resid_pdrop", 0.0)
    sizes = {k: _config_int(hf, k, path) for k in ("vocab_size", "n_layer", "n_head")}
    try:
        return GPTConfig(**sizes, block_size=n_positions, n_embd=C,
                         dropout=float(dropout) if isinstance(dropout, (int, float)) and 0 <= dropout < 1 else 0.0,
                         bias=True, activation=activation, tie_weights=True)
    except MlxGptError as exc:
        raise MlxGptError(f"{path}: {exc}") from None


def vocab_from_hf(folder: Path) -> list[str]:
    """The characters of a character-level tokenizer.json, in id order; any other tokenizer is an error."""
    path = folder / "tokenizer.json"
    if not path.is_file() and (folder / "merges.txt").is_file():
        raise MlxGptError(f"{folder} has a BPE tokenizer (vocab.json + merges.txt), not a character one; mlx-gpt "
                          "models are character-level, so this model cannot be converted")
    model = _read_json(path, "a character-level tokenizer.json").get("model") or {}
    kind = model.get("type")
    if kind != "WordLevel":
        raise MlxGptError(f"{path}: a {kind} tokenizer, not a character-level one (a WordLevel vocabulary of single "
                          "characters); mlx-gpt models are character-level, so this model cannot be converted")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise MlxGptError(f"{path}: the WordLevel model has no vocabulary")
    long = sorted(token for token in vocab if len(token) != 1)
    if long:
        raise MlxGptError(f"{path}: tokens longer than one character ({name_list([repr(t) for t in long], 4)}); "
                          "mlx-gpt's vocabulary is single characters only")
    ids = sorted(vocab.values())
    if ids != list(range(len(vocab))):
        raise MlxGptError(f"{path}: token ids must be 0..{len(vocab) - 1} without gaps")
    return sorted(vocab, key=vocab.__getitem__)


def _load_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    import mlx.core as mx

    out = {}
    for path in files:
        if not path.is_file():
            raise MlxGptError(f"{path} is missing (listed in {SHARD_INDEX_FILE}); download every shard")
        try:
            arrays = mx.load(str(path))
        except Exception as exc:  # MLX raises ValueError/RuntimeError for damaged files
            raise MlxGptError(f"{path}: not a readable safetensors file ({' '.join(str(exc).split())})") from None
        for name, value in arrays.items():  # float16/bfloat16 models become float32, like our checkpoints
            out[name] = np.array(value.astype(mx.float32) if value.dtype != mx.float32 else value)
    return out


def read_hf_weights(folder: Path) -> tuple[dict[str, np.ndarray], str]:
    """The folder's tensors by name (float32 numpy) and the file(s) they came from."""
    if (folder / WEIGHTS_FILE).is_file():
        return _load_safetensors([folder / WEIGHTS_FILE]), WEIGHTS_FILE
    if (folder / SHARD_INDEX_FILE).is_file():
        weight_map = _read_json(folder / SHARD_INDEX_FILE, "a weight map").get("weight_map") or {}
        return _load_safetensors([folder / f for f in sorted(set(weight_map.values()))]), SHARD_INDEX_FILE
    if (folder / TORCH_WEIGHTS_FILE).is_file():
        from .convert import load_torch_file, tensor_state, to_numpy_state  # needs PyTorch; weights-only loading

        tensors = tensor_state(load_torch_file(folder / TORCH_WEIGHTS_FILE), TORCH_WEIGHTS_FILE)
        return to_numpy_state(tensors), TORCH_WEIGHTS_FILE
    raise MlxGptError(f"{folder} has no {WEIGHTS_FILE} (or {TORCH_WEIGHTS_FILE}); a Hugging Face GPT-2 folder "
                      "needs its weights")


def weights_from_hf(config: GPTConfig, tensors: dict[str, np.ndarray], source: str,
                    tie: bool) -> tuple[GPTConfig, dict[str, np.ndarray]]:
    """Our config and parameters from GPT-2 tensors: prefix and buffers dropped, Conv1D weights transposed."""
    state = {k.removeprefix("transformer."): v for k, v in tensors.items() if not BUFFER_KEY.search(k)}
    head = state.pop("lm_head.weight", None)
    problems = array_mismatches(gpt2_shapes(config), state)
    if problems:
        raise MlxGptError(f"{source} does not match config.json: {'; '.join(problems)}")
    if head is not None and head.shape != state["wte.weight"].shape:
        raise MlxGptError(f"{source}: lm_head.weight has shape {head.shape}, expected {state['wte.weight'].shape}")
    params = {k: np.ascontiguousarray(v.T) if _is_conv1d(k) else v for k, v in state.items()}
    if not any(v.any() for k, v in params.items() if k.endswith(".bias")):  # how we export bias=False
        params = {k: v for k, v in params.items() if not k.endswith(".bias")}
        config = replace(config, bias=False)
    if head is not None and not tie and not np.array_equal(head, params["wte.weight"]):  # tied: transformers ignores it
        params["lm_head.weight"] = head
        config = replace(config, tie_weights=False)
    return config, params


def read_hf_dir(folder: str | Path) -> Checkpoint:
    """An mlx-gpt checkpoint (in memory) from a Hugging Face GPT-2 folder with a character-level tokenizer."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MlxGptError(f"{folder} is not a folder; pass a Hugging Face model folder (config.json, weights, "
                          "tokenizer.json)")
    hf = _read_json(folder / "config.json", "config.json")
    config = config_from_hf(hf, folder / "config.json")
    chars = vocab_from_hf(folder)
    if len(chars) != config.vocab_size:
        raise MlxGptError(f"{folder}: tokenizer.json has {len(chars)} characters but config.json's vocab_size is "
                          f"{config.vocab_size}; the two files are from different models")
    tensors, source = read_hf_weights(folder)
    config, params = weights_from_hf(config, tensors, f"{folder / source}", hf.get("tie_word_embeddings", True))
    extra = hf.get("mlx_gpt") if isinstance(hf.get("mlx_gpt"), dict) else {}
    iteration, best = extra.get("iter", 0), extra.get("best_val_loss")
    return Checkpoint(config=config, tokenizer=CharTokenizer(chars), model=params,
                      iter=iteration if isinstance(iteration, int) and iteration >= 0 else 0,
                      best_val_loss=float(best) if isinstance(best, (int, float)) else None)


def import_dir(folder: str | Path, out_path: str | Path, force: bool = False) -> Checkpoint:
    """Convert the Hugging Face GPT-2 folder ``folder`` and write it (atomically) as the checkpoint ``out_path``."""
    from .convert import check_output

    out_path = Path(out_path)
    check_output(out_path, force)
    ckpt = read_hf_dir(folder)
    ckpt.save(out_path)
    return ckpt


def summary(ckpt: Checkpoint) -> list[str]:
    config = " ".join(f"{k}={v}" for k, v in ckpt.config.to_dict().items())
    n = sum(int(a.size) for a in ckpt.model.values())
    return ["layout: Hugging Face GPT-2 folder", f"vocabulary: {ckpt.tokenizer.vocab_size} characters from "
            "tokenizer.json", f"config: {config}", f"parameters: {n:,}"]
