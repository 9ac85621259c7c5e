"""The checkpoint file: round trip, self-contained sampling, and clear errors for bad files."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gpt.checkpoint import Checkpoint, arrays_checksum, load_model
from mlx_gpt.config import GPTConfig
from mlx_gpt.errors import MlxGptError
from mlx_gpt.model import GPT
from mlx_gpt.tokenizer import CharTokenizer


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
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "not a readable .npz"),
        (lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)), "not a readable .npz"),
        (lambda p: np.savez(p, weights=np.zeros(3)), "not an mlx-gpt checkpoint"),
        (lambda p: rewrite(p, lambda m: m.update(version=99)), "newer mlx-gpt"),
        (lambda p: rewrite(p, lambda m: m.update(format="other")), "foreign"),
        (lambda p: rewrite(p, drop="model/wte.weight"), "checksum mismatch"),
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
        with zf.open("evil.npy", "w") as f:
            np.save(f, np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(MlxGptError, match="not a readable .npz"):
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
