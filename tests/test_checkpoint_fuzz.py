"""Fuzz the checkpoint loader: whatever the bytes on disk, loading ends in our one-line MlxGptError or a
correct checkpoint -- never another exception, never a traceback, never code execution.

Every case writes a damaged file and calls ``Checkpoint.load`` (the reader every script uses) and, where the
damage leaves a readable file, ``load_model`` (what sample.py does with it) or ``Trainer`` (what --resume does).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx_gpt  # noqa: F401  (before mlx.core)
from mlx_gpt.checkpoint import Checkpoint, arrays_checksum, load_model
from mlx_gpt.config import GPTConfig, TrainConfig
from mlx_gpt.data import BatchSampler, Dataset
from mlx_gpt.errors import MlxGptError
from mlx_gpt.tokenizer import CharTokenizer
from mlx_gpt.training import Trainer

# No example database: nothing written into the project, the same cost on every run.
FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

TEXT = "abcde " * 40
MODEL_CFG = GPTConfig(vocab_size=6, block_size=8, n_layer=1, n_head=1, n_embd=8, dropout=0.0)


def _train_cfg(out_dir: Path) -> TrainConfig:
    return TrainConfig(out_dir=str(out_dir), batch_size=2, eval_iters=1, compile=False)


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, np.ndarray]]:
    """A tiny but real checkpoint (model + optimizer + sampler state): its bytes and its arrays by npz name."""
    folder = tmp_path_factory.mktemp("fuzz_source")
    tokenizer = CharTokenizer.from_text(TEXT)
    dataset = Dataset(TEXT, tokenizer, MODEL_CFG.block_size)
    trainer = Trainer(MODEL_CFG, _train_cfg(folder), dataset, tokenizer, log=lambda _: None)
    trainer.train_step()
    payload = trainer.checkpoint().to_bytes()
    with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return payload, arrays


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where each example writes its damaged file (hypothesis reruns a test many times: one path, rewritten)."""
    return tmp_path_factory.mktemp("fuzz") / "damaged.npz"


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _meta(arrays: dict[str, np.ndarray]) -> dict:
    return json.loads(arrays["meta"].tobytes().decode("utf-8"))


def _with_meta(arrays: dict[str, np.ndarray], meta: object, recompute_checksum: bool = False) -> dict[str, np.ndarray]:
    out = dict(arrays)
    del out["meta"]
    if recompute_checksum and isinstance(meta, dict):
        meta = {**meta, "checksum": arrays_checksum(out)}
    out["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    return out


def _one_line_error(path: Path, exc: MlxGptError) -> None:
    message = str(exc)
    assert message and "\n" not in message, f"not one line: {message!r}"
    assert str(path) in message or path.name in message, f"the message does not name the file: {message!r}"


def _load_expecting_error(path: Path) -> None:
    with pytest.raises(MlxGptError) as info:
        Checkpoint.load(path)
    _one_line_error(path, info.value)


def _sample_or_error(path: Path) -> bool:
    """load_model (sample.py's path) ends in a model or in our one-line error; True when it loaded.

    A model that loads must also run: one forward pass.
    """
    import mlx.core as mx  # here, not at the top: mlx_gpt must be imported first
    try:
        model, _, _ = load_model(path)
    except MlxGptError as exc:
        assert "\n" not in str(exc), f"not one line: {exc!s}"
        return False
    mx.eval(model(mx.array([[0, 1]])))
    return True


# ----------------------------------------------------------------------------- raw damage


@FUZZ
@given(data=st.data())
def test_truncated_file_is_one_line_error(valid, target, data) -> None:
    payload, _ = valid
    length = data.draw(st.integers(0, len(payload) - 1), label="length")
    target.write_bytes(payload[:length])
    _load_expecting_error(target)


@FUZZ
@given(data=st.data())
def test_flipped_bytes_are_detected_or_harmless(valid, target, data) -> None:
    """Flipped bytes anywhere: an error, or (in zip bookkeeping that holds no data) the very same checkpoint."""
    payload, arrays = valid
    damaged = bytearray(payload)
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(payload) - 1), st.integers(1, 255)),
                               min_size=1, max_size=8), label="flips")
    for position, mask in flips:
        damaged[position] ^= mask
    target.write_bytes(bytes(damaged))
    try:
        loaded = Checkpoint.load(target)
    except MlxGptError as exc:
        _one_line_error(target, exc)
        return
    original = _meta(arrays)
    assert loaded.iter == original["iter"] and loaded.tokenizer.chars == original["vocab"]
    assert loaded.config.to_dict() == original["config"] and loaded.data_rng == original["data_rng"]
    for name, value in loaded.model.items():
        np.testing.assert_array_equal(value, arrays[f"model/{name}"])


@FUZZ
@given(garbage=st.binary(max_size=2048))
def test_arbitrary_bytes_are_one_line_error(target, garbage) -> None:
    target.write_bytes(garbage)
    _load_expecting_error(target)


def test_not_a_file(tmp_path: Path) -> None:
    _load_expecting_error(tmp_path / "missing.npz")
    (tmp_path / "folder.npz").mkdir()
    _load_expecting_error(tmp_path / "folder.npz")
    (tmp_path / "text.npz").write_text("just some text\n")
    _load_expecting_error(tmp_path / "text.npz")


# ----------------------------------------------------------------------------- well-formed npz, wrong content

NON_FLOAT = [np.dtype(t) for t in ("U3", "S3", "c8", "M8[s]", "V4", "i1", "i8", "u2", "?")]
OTHER_FLOATS = [np.dtype("f2"), np.dtype("f8")]


@FUZZ
@given(data=st.data())
def test_wrong_dtype_or_shape_of_an_array(valid, target, data) -> None:
    """An array with another dtype or shape but a matching checksum (as a buggy writer would produce)."""
    _, arrays = valid
    name = data.draw(st.sampled_from(sorted(k for k in arrays if k.startswith("model/"))), label="name")
    original = arrays[name]
    change = data.draw(st.sampled_from(["float dtype", "non-float", "shape"]), label="change")
    if change == "shape":
        shape = data.draw(st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)
                          .filter(lambda s: s != original.shape), label="shape")
        replacement = np.zeros(shape, dtype=original.dtype)
    else:
        dtype = data.draw(st.sampled_from(OTHER_FLOATS if change == "float dtype" else NON_FLOAT), label="dtype")
        replacement = np.zeros(original.shape, dtype=dtype)
    damaged = {**arrays, name: replacement}
    target.write_bytes(_npz(_with_meta(damaged, _meta(arrays), recompute_checksum=True)))
    loaded = _sample_or_error(target)
    if change != "float dtype":  # integer and bool weights too: they would fail later, inside MLX
        assert not loaded, f"{change} change of {name} was accepted"


@FUZZ
@given(data=st.data())
def test_missing_entries(valid, target, data) -> None:
    _, arrays = valid
    names = sorted(arrays)
    dropped = data.draw(st.sets(st.sampled_from(names), min_size=1, max_size=len(names)), label="dropped")
    kept = {k: v for k, v in arrays.items() if k not in dropped}
    recompute = data.draw(st.booleans(), label="recompute_checksum")
    if recompute and "meta" in kept:
        kept = _with_meta(kept, _meta(arrays), recompute_checksum=True)
    target.write_bytes(_npz(kept))
    loaded = _sample_or_error(target)
    if "meta" in dropped or not recompute or any(k.startswith("model/") for k in dropped):
        assert not loaded, f"a checkpoint without {sorted(dropped)} was accepted"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
HEADER_KEYS = ["format", "version", "config", "train", "vocab", "iter", "best_val_loss", "data_rng", "checksum"]
CONFIG_KEYS = list(MODEL_CFG.to_dict())


@FUZZ
@given(data=st.data())
def test_header_with_wrong_types(valid, target, data) -> None:
    """Any JSON value in place of a header field (or of a config field, or of the whole header)."""
    _, arrays = valid
    meta = _meta(arrays)
    where = data.draw(st.sampled_from(["header", "config", "whole"]), label="where")
    value = data.draw(JSON_VALUES, label="value")
    if where == "whole":
        meta = value
    elif where == "header":
        meta[data.draw(st.sampled_from(HEADER_KEYS), label="key")] = value
    else:
        key = data.draw(st.sampled_from(CONFIG_KEYS), label="key")
        meta["config"] = {**meta["config"], key: value}
    target.write_bytes(_npz(_with_meta(arrays, meta)))
    _sample_or_error(target)


@pytest.mark.parametrize("field, value", [("n_layer", 10**9), ("n_embd", 2**40), ("block_size", 2**62),
                                          ("n_head", 3), ("vocab_size", 7)])
def test_header_config_that_disagrees_with_the_weights(valid, tmp_path: Path, field: str, value: int) -> None:
    """A header asking for a huge model must fail fast on the mismatch, not try to build it."""
    _, arrays = valid
    meta = _meta(arrays)
    meta["config"][field] = value
    path = tmp_path / "big.npz"
    path.write_bytes(_npz(_with_meta(arrays, meta)))
    assert not _sample_or_error(path)


@FUZZ
@given(state=JSON_VALUES)
def test_saved_sampler_state_of_any_shape(state) -> None:
    """The data-sampler state from the header (used by --resume): restored, or our error."""
    sampler = BatchSampler(np.arange(20), 4, 2, seed=0)
    try:
        sampler.set_state(state)
    except MlxGptError as exc:
        assert "\n" not in str(exc)


def test_huge_declared_array_shape(valid, tmp_path: Path) -> None:
    """A .npy header that declares far more data than the file holds (no giant allocation, no MemoryError)."""
    _, arrays = valid
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": (2**45,)})
    member.write(b"\0" * 64)
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as zf:
        for name, value in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, value)
            zf.writestr(f"{name}.npy", buffer.getvalue())
        zf.writestr("model/extra.npy", member.getvalue())
    _load_expecting_error(path)


# ----------------------------------------------------------------------------- pickles: never executed


class _Payload:
    """Unpickling this object would create ``marker``: proof that the loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("entry", ["meta", "model/wte.weight", "optimizer/step", "extra"])
def test_pickled_object_array_is_refused_not_run(valid, tmp_path: Path, entry: str) -> None:
    _, arrays = valid
    marker = tmp_path / "pickle-ran"
    evil = np.empty(1, dtype=object)
    evil[0] = _Payload(marker)
    path = tmp_path / "evil.npz"
    np.savez(path, **{**arrays, entry: evil})  # np.savez pickles object arrays (the attack we must refuse)
    _load_expecting_error(path)
    assert not _sample_or_error(path)
    assert not marker.exists(), "loading the checkpoint executed code from it"


# ----------------------------------------------------------------------------- resume path


@pytest.mark.parametrize("damage", ["drop_optimizer_entry", "optimizer_shape", "sampler_state", "vocab_mismatch"])
def test_resume_from_damaged_checkpoint_is_one_line_error(valid, tmp_path: Path, damage: str) -> None:
    """What --resume does with a checkpoint that passes Checkpoint.load but cannot restore a run."""
    _, arrays = valid
    damaged, meta = dict(arrays), _meta(arrays)
    optimizer_name = next(k for k in sorted(arrays) if k.startswith("optimizer/") and arrays[k].ndim == 2)
    if damage == "drop_optimizer_entry":
        del damaged[optimizer_name]
    elif damage == "optimizer_shape":
        damaged[optimizer_name] = np.zeros((3, 3), dtype=np.float32)
    elif damage == "sampler_state":
        meta["data_rng"] = {"bit_generator": "PCG64", "state": {"state": "x", "inc": []}}
    else:
        meta["vocab"] = list("vwxyz!")
    path = tmp_path / "resume.npz"
    path.write_bytes(_npz(_with_meta(damaged, meta, recompute_checksum=True)))
    ckpt = Checkpoint.load(path)
    with pytest.raises(MlxGptError) as info:
        dataset, tokenizer = Dataset(TEXT, ckpt.tokenizer, ckpt.config.block_size), ckpt.tokenizer
        Trainer(ckpt.config, _train_cfg(tmp_path), dataset, tokenizer, resume=ckpt, log=lambda _: None)
    assert "\n" not in str(info.value)
