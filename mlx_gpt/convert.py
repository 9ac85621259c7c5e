"""PyTorch char-GPT checkpoints -> mlx-gpt checkpoints.

Three layouts are understood (``detect_layout`` tells them apart):

``minigpt``  the seed's miniGPT: ``{model_state_dict, optimizer_state_dict, iter, meta, ema_state_dict?}``,
             per-head ``key``/``query``/``value`` Linears, GELU (tanh approximation), LM head tied to the
             token embedding and with a bias; ``meta["chars"]`` is the vocabulary.
``nanogpt``  nanoGPT's ``ckpt.pt``: ``{model, model_args, iter_num, config, ...}``, fused ``c_attn``, exact
             GELU, biases per ``model_args["bias"]``; the vocabulary is nanoGPT's ``meta.pkl``.
``lecture``  Karpathy's "Let's build GPT" ``gpt.py``: a bare ``state_dict`` with the miniGPT names, ReLU, an
             untied LM head with a bias; the vocabulary comes from the training text.

PyTorch is imported lazily (``import mlx_gpt`` never needs it) and files are read with
``torch.load(weights_only=True)`` only, so a checkpoint can never run code. Torch Linear weights are
[out, in] like MLX's: nothing is transposed.
"""

from __future__ import annotations

import codecs
import io
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import Checkpoint, array_mismatches, check_arrays, name_list, open_regular_file, read_limited
from .config import GPTConfig
from .errors import MlxGptError
from .model import GPT
from .tokenizer import CharTokenizer

LAYOUTS = ("minigpt", "nanogpt", "lecture")
LAYOUT_NAMES = {
    "minigpt": "the seed's miniGPT checkpoint",
    "nanogpt": "nanoGPT ckpt.pt",
    "lecture": "\"Let's build GPT\" gpt.py state_dict",
}
TORCH_HINT = 'PyTorch is needed to read PyTorch checkpoints; install it with: pip install -e ".[convert]"'
VOCAB_HINT = ("pass --meta path/to/meta.pkl (nanoGPT's data/<dataset>/meta.pkl) or --vocab_from TEXTFILE "
              "(the training text; its sorted distinct characters are the vocabulary)")
# Wrappers that prefix every key: torch.compile (_orig_mod.) and DistributedDataParallel (module.).
KEY_PREFIXES = ("_orig_mod.", "module.")
# nanoGPT's meta.pkl of a MAX_VOCAB_SIZE vocabulary is ~1 MB; the plain-data walk visits at most this many values
# (counting a value each time it is reached, so a "billion laughs" of shared dicts is cut short) this deep.
MAX_META_PKL_BYTES = 16 * 2**20
MAX_PLAIN_NODES = 2**20
MAX_PLAIN_DEPTH = 8
# The tensors may hold at most this many times the bytes of their distinct storages (tied weights share one; a
# stride-0 expand or a thousand references to one tensor would multiply a small file in memory).
MAX_STORAGE_REUSE = 2
STORAGE_SLACK = 2**20

StateDict = dict[str, np.ndarray]
Tensors = dict[str, Any]  # names -> torch tensors, not yet copied out of the file


@dataclass
class Vocabulary:
    chars: list[str]
    source: str  # where it came from, for the summary


@dataclass
class Converted:
    """A converted model: what an mlx-gpt checkpoint needs, plus notes for the user."""

    layout: str
    config: GPTConfig
    tokenizer: CharTokenizer
    weights: StateDict  # flat mlx-gpt parameter names -> float32 arrays
    iter: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return sum(int(a.size) for a in self.weights.values())

    def summary(self) -> list[str]:
        config = " ".join(f"{k}={v}" for k, v in self.config.to_dict().items())
        return [f"layout: {self.layout} ({LAYOUT_NAMES[self.layout]})", *self.notes, f"config: {config}",
                f"parameters: {self.num_params:,}"]


# ---------------------------------------------------------------------------------------------------------------
# Reading files


def import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MlxGptError(TORCH_HINT) from None
    return torch


def _one_line(text: str) -> str:
    return " ".join(text.split())


def load_torch_file(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers: a pickle that would run code is refused.

    Zip-format files are memory-mapped, so no tensor is read before its shape and storage are checked (and a
    compressed record, which would have to be inflated first, is refused by torch).
    """
    torch = import_torch()
    open_regular_file(path, "checkpoint", "pass the PyTorch checkpoint (.pt) to convert").close()
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the error below says what matters
            warnings.simplefilter("ignore")
            # Legacy (pre-1.6) files cannot be mapped; their storages are read as the file holds them.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        # torch's message is a paragraph; keep the line that names what the pickle asked for.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines[1:] if not line.startswith(("Check the documentation", "Please file"))),
                      lines[0] if lines else type(exc).__name__)
        raise MlxGptError(
            f"{path}: refused: its pickle asks for more than tensors and plain containers ({_one_line(detail)}); "
            "weights-only loading never runs code from a file, so re-save just the tensors (a state_dict) "
            "with PyTorch from a source you trust"
        ) from None
    except Exception as exc:  # torch raises many kinds (RuntimeError, KeyError, EOFError ...) for non-checkpoints
        raise MlxGptError(f"{path}: not a PyTorch checkpoint torch.load can read "
                          f"({type(exc).__name__}: {_one_line(str(exc))[:200]})") from None


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only: any class or function reference (the way pickles run code) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it refers to {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it uses persistent ids")


def _plain_problem(value: Any) -> str | None:
    """Why ``value`` is not plain data (dicts of ints and strings), walking iteratively with a node and depth budget.

    A value is counted each time it is reached: shared or self-referencing dicts exhaust the budget, not memory.
    """
    stack, nodes = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > MAX_PLAIN_NODES:
            return f"it holds more than {MAX_PLAIN_NODES:,} values (counting shared ones each time)"
        if depth > MAX_PLAIN_DEPTH:
            return f"it nests more than {MAX_PLAIN_DEPTH} levels deep"
        if isinstance(item, dict):
            stack.extend((x, depth + 1) for pair in item.items() for x in pair)
        elif not (isinstance(item, str) or (isinstance(item, int) and not isinstance(item, bool))):
            return f"it holds a {type(item).__name__}"
    return None


def read_meta_pkl(path: Path) -> Vocabulary:
    """The vocabulary from nanoGPT's ``meta.pkl`` (``{vocab_size, itos, stoi}``); only dicts, ints, strings."""
    payload = read_limited(path, MAX_META_PKL_BYTES, "--meta", "pass nanoGPT's data/<dataset>/meta.pkl")
    try:
        meta = _PlainDataUnpickler(io.BytesIO(payload)).load()
    except Exception as exc:  # any failure of an untrusted pickle is the same user error
        raise MlxGptError(f"{path}: refused as a nanoGPT meta.pkl ({_one_line(str(exc)) or type(exc).__name__}); "
                          "it may hold only dicts, ints and strings") from None
    problem = _plain_problem(meta)
    if problem:
        raise MlxGptError(f"{path}: refused as a nanoGPT meta.pkl ({problem}); it may hold only dicts, ints and "
                          f"strings; {VOCAB_HINT}")
    itos = meta.get("itos") if isinstance(meta, dict) else None
    if not isinstance(itos, dict) or set(itos) != set(range(len(itos))):
        raise MlxGptError(f"{path}: not a character-level nanoGPT meta.pkl (expected {{'itos': {{0: 'a', ...}}}} "
                          f"of dicts, ints and strings); {VOCAB_HINT}")
    chars = [itos[i] for i in range(len(itos))]
    if meta.get("vocab_size", len(chars)) != len(chars):
        raise MlxGptError(f"{path}: vocab_size {meta['vocab_size']} does not match its {len(chars)} itos entries")
    return _checked_vocab(chars, str(path))


def vocab_from_text(path: Path, chunk: int = 2**22) -> Vocabulary:
    """sorted(set(text)): how all three code bases build their character vocabulary (read in chunks)."""
    decoder, chars, size = codecs.getincrementaldecoder("utf-8")(), set(), 0
    with open_regular_file(path, "--vocab_from", "pass the UTF-8 text the model was trained on") as f:
        try:
            while block := f.read(chunk):
                size += len(block)
                chars.update(decoder.decode(block))
            chars.update(decoder.decode(b"", final=True))
        except (OSError, UnicodeDecodeError) as exc:
            raise MlxGptError(f"cannot read --vocab_from {path}: {exc}") from None
    if not size:
        raise MlxGptError(f"--vocab_from {path} is empty; pass the text the model was trained on")
    return _checked_vocab(sorted(chars), f"{path} (its sorted distinct characters)")


def _checked_vocab(chars: Any, source: str) -> Vocabulary:
    try:
        CharTokenizer(chars)
    except MlxGptError as exc:
        raise MlxGptError(f"vocabulary from {source}: {exc}") from None
    return Vocabulary(list(chars), source)


# ---------------------------------------------------------------------------------------------------------------
# State dicts


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "detach") and hasattr(value, "numpy")


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(_is_tensor(v) for v in value.values())


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in KEY_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def tensor_state(state: Any, what: str) -> Tensors:
    """The tensors of a state_dict by name (wrapper prefixes removed); nothing is copied out of the file yet."""
    if not _is_state_dict(state):
        raise MlxGptError(f"{what} is not a state_dict (a dict of tensors)")
    out: Tensors = {}
    for key, tensor in state.items():
        name = _strip_prefixes(str(key))
        if name in out:
            raise MlxGptError(f"{what} holds {name} twice (with and without a wrapper prefix)")
        out[name] = tensor
    return out


def _storage_problem(name: str, tensor: Any) -> str | None:
    """Why a tensor cannot be copied out as it stands: no data of its own, or more elements than its storage."""
    import torch

    if tensor.layout != torch.strided or tensor.device.type != "cpu":
        return f"{name} is a {tensor.layout} tensor on {tensor.device}, not a plain CPU tensor"
    if not tensor.is_floating_point():
        return f"{name} has dtype {tensor.dtype}; weights are floating point"
    shape, stride, stored = tuple(tensor.shape), tensor.stride(), tensor.untyped_storage().nbytes()
    if any(n > 1 and st < 1 for n, st in zip(shape, stride, strict=True)):
        return f"{name} of shape {shape} repeats its data (stride 0, e.g. an expand)"
    end = tensor.storage_offset() + 1 + sum((n - 1) * st for n, st in zip(shape, stride, strict=True))
    if tensor.numel() and max(end, tensor.numel()) * tensor.element_size() > stored:
        return f"{name} of shape {shape} is larger than the {stored:,} bytes of data behind it (overlapping views?)"
    return None


def to_numpy_state(tensors: Tensors) -> StateDict:
    """Float32 numpy copies of checked tensors, refused when they would multiply the file's data in memory."""
    problem = next((p for name, t in tensors.items() if (p := _storage_problem(name, t))), None)
    if problem:
        raise MlxGptError(f"refused: {problem}; re-save the state_dict with real tensors")
    storages = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors.values()}
    stored = sum(nbytes for _, nbytes in storages)
    wanted = sum(t.numel() * t.element_size() for t in tensors.values())
    if wanted > MAX_STORAGE_REUSE * stored + STORAGE_SLACK:
        raise MlxGptError(f"refused: its tensors would take {wanted:,} bytes from {stored:,} bytes of stored data "
                          "(many tensors share one storage); re-save the state_dict with real tensors")
    out: StateDict = {}
    for name, tensor in tensors.items():
        out[name] = np.array(tensor.detach().float().numpy(), dtype=np.float32, copy=True)
        if not np.isfinite(out[name]).all():
            raise MlxGptError(f"non-finite weights in {name}: the PyTorch checkpoint is damaged; convert another")
    return out


def _layer_count(state: Tensors, pattern: str, what: str) -> int:
    """How many numbered layers (0..n-1) the names matching ``pattern`` hold; a gap in the numbers is an error."""
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    if found and len(found) != max(found) + 1:
        missing = sorted(set(range(len(found) + 1)) - found)[:3]
        raise MlxGptError(f"the state_dict's {what} are numbered up to {max(found)} but there are {len(found)} "
                          f"(missing {', '.join(map(str, missing))}, ...): not a complete checkpoint")
    return len(found)


def check_keys(state: Tensors, expected: dict[str, tuple[int, ...]], layout: str) -> None:
    """Raise one error listing missing keys, unexpected keys and wrong shapes, if any."""
    problems = array_mismatches(expected, state)
    if problems:
        raise MlxGptError(f"not a complete {layout} layout ({LAYOUT_NAMES[layout]}): {'; '.join(problems)}; "
                          "pass --format if the layout was detected wrongly")


def _require_core(state: Tensors, keys: list[str], layout: str) -> None:
    """The (2-D) embeddings the shapes are read from; without them every key of the file is unexpected."""
    missing = [k for k in keys if k not in state]
    flat = [k for k in keys if k in state and state[k].ndim != 2]
    if flat:
        raise MlxGptError(f"not a {layout} layout: {flat[0]} has shape {state[flat[0]].shape}, expected a 2-D table")
    if missing:
        unexpected = sorted(set(state) - set(keys))
        raise MlxGptError(f"not a {layout} layout ({LAYOUT_NAMES[layout]}): missing keys: {name_list(missing)}; "
                          f"unexpected keys: {name_list(unexpected)}; pass --format if the layout was detected wrongly")


def _head(state: StateDict, wte: np.ndarray, notes: list[str]) -> tuple[bool, StateDict]:
    """Tie the LM head to the token embedding only when the weights really are equal."""
    head = state["lm_head.weight"]
    if np.array_equal(head, wte):
        notes.append("lm_head: tied to the token embedding")
        return True, {}
    notes.append("lm_head: untied (its weight differs from the token embedding)")
    return False, {"lm_head.weight": head}


# ---------------------------------------------------------------------------------------------------------------
# Layouts


def detect_layout(obj: Any) -> str:
    """Which of LAYOUTS a loaded checkpoint object is."""
    if isinstance(obj, Mapping):
        if "model_state_dict" in obj:
            return "minigpt"
        if "model" in obj and "model_args" in obj:
            return "nanogpt"
        if _is_state_dict(obj):
            keys = {_strip_prefixes(str(k)) for k in obj}
            if "transformer.wte.weight" in keys:
                return "nanogpt"  # a bare nanoGPT state_dict: convert_nanogpt explains what is missing
            if "token_embedding_table.weight" in keys:
                return "lecture"
        top = name_list(sorted(str(k) for k in obj), 10)
    else:
        top = f"a {type(obj).__name__}, not a dict"
    raise MlxGptError(
        f"unknown checkpoint layout (top level: {top}); expected the seed's miniGPT dict "
        "{model_state_dict, meta, ...}, nanoGPT's ckpt.pt {model, model_args, ...} or a bare \"Let's build GPT\" "
        "state_dict; pass --format minigpt|nanogpt|lecture to say which"
    )


def _heads_state(obj: Any, layout: str, weights: str, notes: list[str]) -> Tensors:
    """The state_dict of a miniGPT/lecture checkpoint: the EMA or raw dict of a seed file, or a bare one."""
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        ema = obj.get("ema_state_dict")
        if ema is not None and weights == "ema":
            notes.append("weights: EMA (ema_state_dict; --weights model picks the raw ones)")
            return tensor_state(ema, "ema_state_dict")
        notes.append("weights: raw (model_state_dict)" + ("" if ema is not None else "; the file has no EMA weights"))
        return tensor_state(obj["model_state_dict"], "model_state_dict")
    if _is_state_dict(obj):
        notes.append("weights: the bare state_dict")
        return tensor_state(obj, "the checkpoint")
    raise MlxGptError(f"not a {layout} checkpoint: expected a dict with model_state_dict or a bare state_dict; "
                      "pass the right --format")


def convert_heads_layout(obj: Any, layout: str, vocab: Vocabulary | None, weights: str = "ema") -> Converted:
    """miniGPT and lecture: per-head q/k/v Linears (concatenated in head order into c_attn)."""
    notes: list[str] = []
    state = _heads_state(obj, layout, weights, notes)
    # Causal-mask buffers are not weights: mlx-gpt builds its mask on the fly.
    state = {k: v for k, v in state.items() if not re.fullmatch(r"blocks\.\d+\.sa\.heads\.\d+\.tril", k)}
    _require_core(state, ["token_embedding_table.weight", "position_embedding_table.weight"], layout)
    V, C = state["token_embedding_table.weight"].shape
    T = state["position_embedding_table.weight"].shape[0]
    n_layer = _layer_count(state, r"blocks\.(\d+)\.", "blocks")
    n_head = _layer_count(state, r"blocks\.0\.sa\.heads\.(\d+)\.", "heads of blocks.0")
    if n_layer == 0 or n_head == 0 or C % n_head:
        raise MlxGptError(f"not a {layout} layout: found {n_layer} blocks.N and {n_head} blocks.0.sa.heads.N "
                          f"with n_embd {C}; pass the right --format")
    hd = C // n_head
    qkv_bias = any(re.fullmatch(r"blocks\.\d+\.sa\.heads\.\d+\.(key|query|value)\.bias", k) for k in state)
    lm_head_bias = "lm_head.bias" in state

    expected = {"token_embedding_table.weight": (V, C), "position_embedding_table.weight": (T, C),
                "ln_f.weight": (C,), "ln_f.bias": (C,), "lm_head.weight": (V, C)}
    if lm_head_bias:
        expected["lm_head.bias"] = (V,)
    for i in range(n_layer):
        b = f"blocks.{i}."
        for h in range(n_head):
            for part in ("key", "query", "value"):
                expected[f"{b}sa.heads.{h}.{part}.weight"] = (hd, C)
                if qkv_bias:
                    expected[f"{b}sa.heads.{h}.{part}.bias"] = (hd,)
        expected |= {f"{b}sa.proj.weight": (C, C), f"{b}sa.proj.bias": (C,),
                     f"{b}ffwd.net.0.weight": (4 * C, C), f"{b}ffwd.net.0.bias": (4 * C,),
                     f"{b}ffwd.net.2.weight": (C, 4 * C), f"{b}ffwd.net.2.bias": (C,)}
        for ln in ("ln1", "ln2"):
            expected |= {f"{b}{ln}.weight": (C,), f"{b}{ln}.bias": (C,)}
    check_keys(state, expected, layout)
    state = to_numpy_state(state)  # only now, with every name and shape known to fit

    wte = state["token_embedding_table.weight"]
    tied, head = _head(state, wte, notes)
    out: StateDict = {"wte.weight": wte, "wpe.weight": state["position_embedding_table.weight"],
                      "ln_f.weight": state["ln_f.weight"], "ln_f.bias": state["ln_f.bias"], **head}
    if lm_head_bias:
        out["lm_head_bias"] = state["lm_head.bias"]
    for i in range(n_layer):
        b, o = f"blocks.{i}.", f"h.{i}."

        def heads(part: str, kind: str, b: str = b) -> list[np.ndarray]:
            return [state[f"{b}sa.heads.{h}.{part}.{kind}"] for h in range(n_head)]

        # c_attn rows: all query heads, then all keys, then all values; head h is rows h*hd:(h+1)*hd of each.
        out[f"{o}attn.c_attn.weight"] = np.concatenate(heads("query", "weight") + heads("key", "weight")
                                                       + heads("value", "weight"))
        # These q/k/v Linears have no bias while the rest of the model does: a zero bias is exact.
        out[f"{o}attn.c_attn.bias"] = (np.concatenate(heads("query", "bias") + heads("key", "bias")
                                                      + heads("value", "bias"))
                                       if qkv_bias else np.zeros(3 * C, dtype=np.float32))
        for ours, theirs in (("attn.c_proj", "sa.proj"), ("mlp.c_fc", "ffwd.net.0"), ("mlp.c_proj", "ffwd.net.2"),
                             ("ln_1", "ln1"), ("ln_2", "ln2")):
            out[f"{o}{ours}.weight"] = state[f"{b}{theirs}.weight"]
            out[f"{o}{ours}.bias"] = state[f"{b}{theirs}.bias"]

    dropout = 0.0
    if layout == "minigpt":
        meta = obj.get("meta") if isinstance(obj, Mapping) else None
        if vocab is None:
            chars = meta.get("chars") if isinstance(meta, Mapping) else None
            if chars is None:
                raise MlxGptError(f"this miniGPT checkpoint has no meta['chars'] vocabulary; {VOCAB_HINT}")
            vocab = _checked_vocab(chars, "the checkpoint's meta['chars']")
        if isinstance(meta, Mapping) and "dropout" in meta:
            dropout = _dropout(meta["dropout"], "miniGPT meta['dropout']")
    elif vocab is None:
        raise MlxGptError(f"a \"Let's build GPT\" state_dict holds no vocabulary; {VOCAB_HINT}")
    config = GPTConfig(vocab_size=V, block_size=T, n_layer=n_layer, n_head=n_head, n_embd=C, dropout=dropout,
                       bias=True, activation="gelu_tanh" if layout == "minigpt" else "relu",
                       lm_head_bias=lm_head_bias, tie_weights=tied)
    iteration = obj.get("iter", 0) if isinstance(obj, Mapping) else 0
    return _finish(layout, config, vocab, out, iteration, notes)


def _dropout(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise MlxGptError(f"{what} must be a number in [0, 1), got {_one_line(repr(value))[:40]}")
    return float(value)


def _meta_pkl_candidates(obj: Mapping, ckpt_path: Path | None) -> list[Path]:
    """Beside the checkpoint, nanoGPT's own rule (data/<config.dataset>/meta.pkl from the working folder), and
    the data folder of the nanoGPT repository that holds the checkpoint's out_dir."""
    candidates = []
    if ckpt_path is not None:
        candidates.append(ckpt_path.parent / "meta.pkl")
    config = obj.get("config")
    dataset = config.get("dataset") if isinstance(config, Mapping) else None
    if isinstance(dataset, str) and dataset and Path(dataset).name == dataset and dataset not in (".", ".."):
        candidates.append(Path("data") / dataset / "meta.pkl")
        if ckpt_path is not None:
            candidates.append(ckpt_path.parent.parent / "data" / dataset / "meta.pkl")
    return candidates


def convert_nanogpt(obj: Any, vocab: Vocabulary | None, ckpt_path: Path | None = None) -> Converted:
    """nanoGPT: names map one to one once ``transformer.`` is dropped."""
    layout = "nanogpt"
    if not isinstance(obj, Mapping) or "model" not in obj or not isinstance(obj.get("model_args"), Mapping):
        raise MlxGptError("not a nanoGPT ckpt.pt: expected a dict with 'model' and 'model_args' (a bare state_dict "
                          "does not say n_head); convert the ckpt.pt that nanoGPT's train.py writes")
    args = obj["model_args"]
    try:
        n_layer, n_head, n_embd = int(args["n_layer"]), int(args["n_head"]), int(args["n_embd"])
    except (KeyError, TypeError, ValueError, OverflowError):
        raise MlxGptError(f"nanoGPT model_args lacks integer n_layer/n_head/n_embd (it has "
                          f"{name_list(sorted(map(str, args)))})") from None
    dropout = _dropout(args.get("dropout", 0.0), "nanoGPT model_args.dropout")
    notes: list[str] = []
    state = tensor_state(obj["model"], "the nanoGPT 'model' state_dict")
    state = {k: v for k, v in state.items() if not re.fullmatch(r"transformer\.h\.\d+\.attn\.bias", k)}  # masks
    _require_core(state, ["transformer.wte.weight", "transformer.wpe.weight"], layout)
    # Compared before anything ranges over n_layer: a header claiming 10**9 layers must not build 10**9 names.
    layers = _layer_count(state, r"transformer\.h\.(\d+)\.", "layers transformer.h.N")
    if layers != n_layer:
        raise MlxGptError(f"nanoGPT model_args.n_layer is {n_layer} but the state_dict holds {layers} layers "
                          "(transformer.h.N): the checkpoint is inconsistent")
    V = state["transformer.wte.weight"].shape[0]
    T = state["transformer.wpe.weight"].shape[0]
    # Old nanoGPT files predate model_args["bias"]; they always had biases.
    bias = bool(args.get("bias", "transformer.ln_f.bias" in state))
    C = n_embd
    expected = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C), "lm_head.weight": (V, C)}

    def linear_or_norm(name: str, shape: tuple[int, ...]) -> None:
        expected[f"{name}.weight"] = shape
        if bias:
            expected[f"{name}.bias"] = shape[:1]

    linear_or_norm("transformer.ln_f", (C,))
    for i in range(n_layer):
        b = f"transformer.h.{i}."
        linear_or_norm(f"{b}ln_1", (C,))
        linear_or_norm(f"{b}attn.c_attn", (3 * C, C))
        linear_or_norm(f"{b}attn.c_proj", (C, C))
        linear_or_norm(f"{b}ln_2", (C,))
        linear_or_norm(f"{b}mlp.c_fc", (4 * C, C))
        linear_or_norm(f"{b}mlp.c_proj", (C, 4 * C))
    check_keys(state, expected, layout)
    state = to_numpy_state(state)  # only now, with every name and shape known to fit

    wte = state["transformer.wte.weight"]
    tied, head = _head(state, wte, notes)
    out = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"} | head
    if vocab is None:
        candidates = _meta_pkl_candidates(obj, ckpt_path)
        meta_path = next((c for c in candidates if c.is_file()), None)
        if meta_path is None:
            looked = ", ".join(str(c) for c in candidates) or "nowhere (no checkpoint path or config.dataset)"
            raise MlxGptError(f"no vocabulary for this nanoGPT checkpoint: no meta.pkl at {looked}; {VOCAB_HINT}")
        vocab = read_meta_pkl(meta_path)
    config = GPTConfig(vocab_size=V, block_size=T, n_layer=n_layer, n_head=n_head, n_embd=C,
                       dropout=dropout, bias=bias, activation="gelu",
                       lm_head_bias=False, tie_weights=tied)
    return _finish(layout, config, vocab, out, obj.get("iter_num", 0), notes)


def _finish(layout: str, config: GPTConfig, vocab: Vocabulary, weights: StateDict, iteration: Any,
            notes: list[str]) -> Converted:
    if len(vocab.chars) != config.vocab_size:
        raise MlxGptError(f"the vocabulary from {vocab.source} has {len(vocab.chars)} characters but the "
                          f"checkpoint's embedding has {config.vocab_size} rows; give the vocabulary the model "
                          "was trained with (--meta or --vocab_from)")
    if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
        iteration = 0
    notes.append(f"vocabulary: {len(vocab.chars)} characters from {vocab.source}")
    return Converted(layout, config, CharTokenizer(vocab.chars), weights, iteration, notes)


def convert(obj: Any, layout: str = "auto", *, vocab: Vocabulary | None = None, weights: str = "ema",
            ckpt_path: Path | None = None) -> Converted:
    """Convert a checkpoint object (as torch.load returns it) to mlx-gpt weights, config and tokenizer."""
    if layout == "auto":
        layout = detect_layout(obj)
    if layout not in LAYOUTS:
        raise MlxGptError(f"--format must be auto or one of {', '.join(LAYOUTS)}, got {layout!r}")
    if weights not in ("ema", "model"):
        raise MlxGptError(f"--weights must be ema or model, got {weights!r}")
    if layout == "nanogpt":
        return convert_nanogpt(obj, vocab, ckpt_path)
    return convert_heads_layout(obj, layout, vocab, weights)


def check_output(out_path: Path, force: bool) -> None:
    """Refuse an output checkpoint path that is a folder, exists (unless ``force``) or lies in no folder."""
    if out_path.is_dir():
        raise MlxGptError(f"the output {out_path} is a folder; give a file name such as {out_path / 'model.npz'}")
    if out_path.exists() and not force:
        raise MlxGptError(f"{out_path} already exists; pass --force to overwrite it")
    if not out_path.parent.is_dir():
        raise MlxGptError(f"the output folder {out_path.parent} does not exist; create it first")


def convert_file(in_path: str | Path, out_path: str | Path, *, layout: str = "auto", meta: str | Path | None = None,
                 vocab_from: str | Path | None = None, weights: str = "ema", force: bool = False) -> Converted:
    """Convert the PyTorch checkpoint ``in_path`` and write it (atomically) as the mlx-gpt checkpoint ``out_path``."""
    from mlx.utils import tree_flatten

    in_path, out_path = Path(in_path), Path(out_path)
    if meta is not None and vocab_from is not None:
        raise MlxGptError("pass either --meta or --vocab_from, not both")
    if out_path.exists() and out_path.resolve() == in_path.resolve():
        raise MlxGptError(f"the output {out_path} is the input checkpoint; write to another file")
    check_output(out_path, force)
    vocab = read_meta_pkl(Path(meta)) if meta is not None else None
    if vocab_from is not None:
        vocab = vocab_from_text(Path(vocab_from))

    obj = load_torch_file(in_path)
    result = convert(obj, layout, vocab=vocab, weights=weights, ckpt_path=in_path)
    # The mlx-gpt model must take these arrays exactly as they are.
    expected = {k: tuple(v.shape) for k, v in tree_flatten(GPT(result.config).parameters())}
    check_arrays(out_path, "converted weights", expected, result.weights)
    Checkpoint(config=result.config, tokenizer=result.tokenizer, model=result.weights, iter=result.iter).save(out_path)
    return result
