"""The checkpoint file: round trip, self-contained sampling, and clear errors for bad files."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gpt import checkpoint
from mlx_gpt.checkpoint import Checkpoint, arrays_checksum, json_depth, load_model
from mlx_gpt.config import GPTConfig
from mlx_gpt.errors import MlxGptError
from mlx_gpt.model import GPT
from mlx_gpt.tokenizer import MAX_VOCAB_SIZE, CharTokenizer


def tiny_checkpoint_file(path: Path) -> tuple[GPT, Path]:
    tok = CharTokenizer.from_text("abcdefgh \n")
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.0)
    mx.random.seed(0)
    model = GPT(cfg)
    weights = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    Checkpoint(config=cfg, tokenizer=tok, model=weights, iter=7, best_val_loss=1.5).save(path)
    return model, path


def test_round_trip_gives_the_same_logits_without_any_data_file(tmp_path: Path) -> None:
    model, path = tiny_checkpoint_file(tmp_path / "c.npz")
    loaded, tok, ckpt = load_model(path)
    idx = mx.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    np.testing.assert_array_equal(np.array(loaded(idx)), np.array(model(idx)))
    assert tok.chars == sorted("abcdefgh \n") and ckpt.iter == 7 and ckpt.best_val_loss == 1.5


def test_loads_with_plain_numpy_and_no_pickle(tmp_path: Path) -> None:
    _, path = tiny_checkpoint_file(tmp_path / "c.npz")
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(npz["meta"].tobytes())
        assert meta["format"] == "mlx-gpt" and meta["version"] == 1 and "h.0.attn.c_attn.weight" in {
            name.split("/", 1)[1] for name in npz.files if name.startswith("model/")}


def rewrite(path: Path, change_meta=None, drop: str | None = None, fix_checksum: bool = False) -> None:
    """Re-save a checkpoint with its header edited or an array dropped (checksum kept stale unless fixed)."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files if k != drop}
    meta = json.loads(arrays.pop("meta").tobytes())
    if change_meta:
        change_meta(meta)
    if fix_checksum:
        meta["checksum"] = arrays_checksum(arrays)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "not an .npz file"),
        (lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)), "not an .npz file"),
        (lambda p: np.savez(p, weights=np.zeros(3)), "not an mlx-gpt checkpoint"),
        (lambda p: rewrite(p, lambda m: m.update(version=99)), "newer mlx-gpt"),
        (lambda p: rewrite(p, lambda m: m.update(format="other")), "foreign"),
        (lambda p: rewrite(p, drop="model/ln_f.weight"), "checksum mismatch"),
        (lambda p: rewrite(p, lambda m: m["config"].update(n_head=3)), "divisible by n_head"),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path: Path, damage, message: str) -> None:
    _, path = tiny_checkpoint_file(tmp_path / "c.npz")
    damage(path)
    with pytest.raises(MlxGptError, match=message) as info:
        load_model(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_weights_not_matching_the_config_are_named(tmp_path: Path) -> None:
    _, path = tiny_checkpoint_file(tmp_path / "c.npz")
    rewrite(path, lambda meta: meta["config"].update(n_layer=2), fix_checksum=True)
    with pytest.raises(MlxGptError, match=r"missing h\.1\."):
        load_model(path)


def test_zip_with_pickled_object_array_is_refused(tmp_path: Path) -> None:
    _, path = tiny_checkpoint_file(tmp_path / "c.npz")
    with zipfile.ZipFile(path, "a") as zf:
        with zf.open("model/evil.npy", "w") as f:
            np.save(f, np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(MlxGptError, match="model/evil holds pickled Python objects, which are never loaded"):
        Checkpoint.load(path)


def test_save_is_atomic_when_the_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, path = tiny_checkpoint_file(tmp_path / "c.npz")
    before = path.read_bytes()
    ckpt = Checkpoint.load(path)
    ckpt.iter = 8

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", full_disk)
    with pytest.raises(OSError):
        ckpt.save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.npz"]


# ----------------------------------------------------------------------------- bounded, checked reading


def raw_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def write_members(path: Path, arrays: dict[str, np.ndarray], meta: object | bytes, compress: bool = False) -> None:
    """An npz of ``arrays`` and a ``meta`` entry (JSON of ``meta``, or these raw bytes), checksum as given."""
    payload = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    save = np.savez_compressed if compress else np.savez
    save(path, **arrays, meta=np.frombuffer(payload, dtype=np.uint8))


def edit(path: Path, change_meta=None, arrays: dict[str, np.ndarray] | None = None) -> None:
    """Replace arrays and edit the header, with a checksum that matches."""
    current = raw_arrays(path)
    meta = json.loads(current.pop("meta").tobytes())
    current.update(arrays or {})
    if change_meta:
        change_meta(meta)
    meta["checksum"] = arrays_checksum(current)
    write_members(path, current, meta)


def refused(path: Path, match: str) -> str:
    with pytest.raises(MlxGptError, match=match) as info:
        Checkpoint.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize("dtype", ["int64", "int8", "uint8", "bool"])
def test_integer_or_bool_weights_are_refused(tmp_path: Path, dtype: str) -> None:
    _, path = tiny_checkpoint_file(tmp_path / "c.npz")
    edit(path, arrays={"model/h.0.attn.c_proj.weight": np.ones((8, 8), dtype=dtype)})
    refused(path, rf"model/h\.0\.attn\.c_proj\.weight has dtype {dtype} but must hold floats")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused(tmp_path: Path, value: float) -> None:
    _, path = tiny_checkpoint_file(tmp_path / "c.npz")
    weight = raw_arrays(path)["model/h.0.mlp.c_fc.weight"].copy()
    weight[3, 1] = value
    edit(path, arrays={"model/h.0.mlp.c_fc.weight": weight})
    refused(path, r"non-finite weights in model/h\.0\.mlp\.c_fc\.weight: the checkpoint is damaged; use another")


def test_train_keys_that_are_not_train_config_fields_are_named(tmp_path: Path) -> None:
    _, path = tiny_checkpoint_file(tmp_path / "c.npz")
    edit(path, lambda meta: meta.update(train={"batch_size": 8, "batchsize": 8, "lr": 0.1}))
    refused(path, "'train' has keys that are not TrainConfig fields: batchsize, lr")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "1.5"])
def test_best_val_loss_must_be_a_finite_number(tmp_path: Path, value: object) -> None:
    _, path = tiny_checkpoint_file(tmp_path / "c.npz")
    edit(path, lambda meta: meta.update(best_val_loss=value))
    refused(path, "'best_val_loss' must be a finite number or null")


def test_data_fingerprint_round_trips_and_older_files_load(tmp_path: Path) -> None:
    _, path = tiny_checkpoint_file(tmp_path / "c.npz")
    ckpt = Checkpoint.load(path)
    assert ckpt.data is None
    ckpt.data = {"sha256": "ab" * 32, "chars": 1000, "source": "input.txt"}
    ckpt.save(path)
    assert Checkpoint.load(path).data == ckpt.data
    edit(path, lambda meta: meta.pop("data"))  # as written before the field existed
    assert Checkpoint.load(path).data is None
    edit(path, lambda meta: meta.update(data=["input.txt"]))
    refused(path, "'data' must be an object or null, got list")


def test_header_nested_too_deep_is_refused_without_recursion_error(tmp_path: Path) -> None:
    _, path = tiny_checkpoint_file(tmp_path / "c.npz")
    arrays = raw_arrays(path)
    del arrays["meta"]
    write_members(path, arrays, b"[" * 100_000 + b"]" * 100_000)
    refused(path, "its header nests 100000 levels deep, more than the limit of 32")


@pytest.mark.parametrize("text, depth", [(b'{"a": "[[{{", "b": [1, {"c": "\\"[["}]}', 3), (b'"\\\\"[[]]', 2),
                                         (b"[]", 1), (b"7", 0)])
def test_json_depth_ignores_brackets_in_strings(text: bytes, depth: int) -> None:
    assert json_depth(text) == depth


def test_header_larger_than_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, path = tiny_checkpoint_file(tmp_path / "c.npz")
    monkeypatch.setattr(checkpoint, "MAX_META_BYTES", 100)
    refused(path, r"its header is [\d,]+ bytes, more than the limit of 100;")


def test_vocabulary_over_the_cap_is_refused(tmp_path: Path) -> None:
    _, path = tiny_checkpoint_file(tmp_path / "c.npz")
    vocab = [chr(0x10000 + i) for i in range(MAX_VOCAB_SIZE + 1)]
    edit(path, lambda meta: meta.update(vocab=vocab))
    refused(path, f"the vocabulary has {MAX_VOCAB_SIZE + 1} characters, more than the limit of {MAX_VOCAB_SIZE}")


def test_vocabulary_with_a_lone_surrogate_is_refused(tmp_path: Path) -> None:
    _, path = tiny_checkpoint_file(tmp_path / "c.npz")
    edit(path, lambda meta: meta["vocab"].__setitem__(-1, "\ud800"))
    refused(path, "lone surrogate")


def test_zip_bomb_is_refused_before_decompressing(tmp_path: Path) -> None:
    """Zero weights of a 1.6M-parameter model compress ~1000x: the arrays declare far more than the file holds."""
    tok = CharTokenizer.from_text("abcdefgh \n")
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=2, n_head=2, n_embd=256, dropout=0.0)
    weights = {k: np.zeros(v.shape, np.float32) for k, v in tree_flatten(GPT(cfg).parameters())}
    path = tmp_path / "bomb.npz"
    Checkpoint(config=cfg, tokenizer=tok, model=weights).save(path)
    arrays = raw_arrays(path)
    meta = arrays.pop("meta").tobytes()
    write_members(path, arrays, meta, compress=True)
    assert path.stat().st_size < 100_000
    refused(path, "its arrays declare [\\d,]+ bytes, more than 8 times the file's")


def test_member_declaring_more_than_its_zip_entry_holds(tmp_path: Path) -> None:
    _, path = tiny_checkpoint_file(tmp_path / "c.npz")
    with zipfile.ZipFile(path, "a") as zf:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**40,)})
        zf.writestr("ema/wte.weight.npy", header.getvalue() + b"\0" * 64)
    refused(path, r"ema/wte\.weight declares [\d,]+ bytes but its shape \(1099511627776,\) of float32 needs")


@pytest.mark.parametrize("make, match", [
    (lambda p: p.mkdir(), "is a folder, not a file"),
    (lambda p: os.mkfifo(p), r"is not a regular file \(a FIFO, device or socket\)"),
    (lambda p: (p.symlink_to(p.with_name("loop2")), p.with_name("loop2").symlink_to(p)), "is a symlink loop"),
    (lambda p: p.write_text("just some text\n" * 20), r"not an \.npz file"),
])
def test_paths_that_are_not_checkpoint_files(tmp_path: Path, make, match: str) -> None:
    path = tmp_path / "c.npz"
    make(path)
    message = refused(path, match)
    assert "does not exist" not in message and "unsafely" not in message and "pickled" not in message


def test_zip_with_other_files_or_too_many_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, path = tiny_checkpoint_file(tmp_path / "c.npz")
    monkeypatch.setattr(checkpoint, "MAX_MEMBERS", 5)
    refused(path, r"it holds 10 entries, more than the limit of 5;")
    monkeypatch.undo()
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("notes.txt", "hello")
    refused(path, r"not an \.npz of arrays \(it holds files other than \.npy\)")


def test_saving_a_non_finite_header_value_is_refused(tmp_path: Path) -> None:
    _, path = tiny_checkpoint_file(tmp_path / "c.npz")
    ckpt = Checkpoint.load(path)
    ckpt.best_val_loss = float("nan")
    with pytest.raises(MlxGptError, match="NaN or infinity"):
        ckpt.save(tmp_path / "nan.npz")
    assert not (tmp_path / "nan.npz").exists()
