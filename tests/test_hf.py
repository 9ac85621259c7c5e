"""Hugging Face GPT-2 export and import: transformers and mlx-lm load an export and compute what mlx-gpt computes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY_FLAGS, run_script

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, GPT2LMHeadModel  # noqa: E402

from mlx_gpt import hf  # noqa: E402
from mlx_gpt.checkpoint import Checkpoint, load_model  # noqa: E402
from mlx_gpt.config import GPTConfig  # noqa: E402
from mlx_gpt.errors import MlxGptError  # noqa: E402
from mlx_gpt.tokenizer import CharTokenizer  # noqa: E402

PROMPT = "ROMEO:"


def export_cli(*args: str) -> subprocess.CompletedProcess:
    """python -m mlx_gpt.export, run from the project root (so this checkout's mlx_gpt is the one imported)."""
    return subprocess.run([sys.executable, "-m", "mlx_gpt.export", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def tanh_checkpoint(tmp_path_factory: pytest.TempPathFactory, small_text: Path) -> Path:
    """A tiny model mlx-lm computes exactly: tanh GELU, with biases and EMA weights."""
    out = tmp_path_factory.mktemp("tanh_ckpt")
    proc = run_script("train.py", "--data", str(small_text), "--out_dir", str(out), *TINY_FLAGS,
                      "--max_iters", "300", "--eval_interval", "300", "--learning_rate", "3e-3",
                      "--activation", "gelu_tanh", "--bias", "--ema_decay", "0.9")
    assert proc.returncode == 0, proc.stderr
    return out / "latest.npz"


@pytest.fixture(scope="module", params=["gelu", "gelu_tanh"])
def exported(request, tmp_path_factory, tiny_checkpoint, tanh_checkpoint) -> tuple[Path, Path, str]:
    """(checkpoint, its export, activation): the exact-GELU model (conftest's) and the tanh one."""
    ckpt = tiny_checkpoint if request.param == "gelu" else tanh_checkpoint
    out = tmp_path_factory.mktemp("export") / "model"
    hf.export(ckpt, out, warn=lambda _: None)
    return ckpt, out, request.param


def our_logits(ckpt: Path, ids: np.ndarray) -> np.ndarray:
    model, _, _ = load_model(ckpt)
    return np.array(model(mx.array(ids)[None]))[0]


def window(ckpt: Path, text: str) -> tuple[str, np.ndarray]:
    """One block_size window of ``text`` and its ids."""
    _, tokenizer, c = load_model(ckpt)
    chunk = text[1000:1000 + c.config.block_size]
    return chunk, tokenizer.encode(chunk)


def test_export_writes_a_gpt2_folder(exported):
    ckpt, out, activation = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(hf.EXPORT_FILES)
    assert not list(out.parent.glob(".*"))  # no temporary folder left beside it
    config = json.loads((out / "config.json").read_text())
    c = Checkpoint.load(ckpt).config
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["n_ctx"] == config["n_positions"] == c.block_size
    assert config["activation_function"] == {"gelu": "gelu", "gelu_tanh": "gelu_new"}[activation]
    assert config["layer_norm_epsilon"] == 1e-5 and config["vocab_size"] == c.vocab_size
    assert json.loads((out / "tokenizer_config.json").read_text())["clean_up_tokenization_spaces"] is False
    assert "mlx_lm" in (out / "README.md").read_text()


def test_transformers_logits_match(exported, small_text):
    ckpt, out, _ = exported
    text, ids = window(ckpt, small_text.read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer(text)["input_ids"] == ids.tolist()
    model = GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids.tolist()])).logits[0].numpy()
    assert np.abs(theirs - our_logits(ckpt, ids)).max() < 1e-5


def test_mlx_lm_logits_match(exported, small_text):
    import mlx_lm

    ckpt, out, activation = exported
    text, ids = window(ckpt, small_text.read_text(encoding="utf-8"))
    model, tokenizer = mlx_lm.load(str(out))
    assert tokenizer.encode(text) == ids.tolist()
    diff = np.abs(np.array(model(mx.array(ids)[None]))[0] - our_logits(ckpt, ids)).max()
    # mlx-lm hard-codes the tanh GELU: exact for a gelu_tanh model, close for the exact-GELU one.
    assert diff < (1e-5 if activation == "gelu_tanh" else 1e-2)


def test_greedy_generation_matches_sample_py(exported):
    import mlx_lm

    ckpt, out, activation = exported
    n = Checkpoint.load(ckpt).config.block_size - len(PROMPT)
    proc = run_script("sample.py", "--ckpt", str(ckpt), "--temperature", "0", "--prompt", PROMPT,
                      "--max_new_tokens", str(n), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    ours = proc.stdout.removesuffix("\n")
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = model.generate(torch.tensor([tokenizer(PROMPT)["input_ids"]]), do_sample=False)
    assert tokenizer.decode(ids[0]) == ours
    if activation == "gelu_tanh":
        lm_model, lm_tokenizer = mlx_lm.load(str(out))
        assert PROMPT + mlx_lm.generate(lm_model, lm_tokenizer, PROMPT, max_tokens=n) == ours


def test_tokenizer_round_trips_tiny_shakespeare(tmp_path, shakespeare):
    from mlx_lm.tokenizer_utils import load as load_mlx_lm_tokenizer

    text = shakespeare.read_text(encoding="utf-8")
    chars = CharTokenizer.from_text(text)
    (tmp_path / "tokenizer.json").write_text(json.dumps(hf.tokenizer_json(chars)), encoding="utf-8")
    config = GPTConfig(vocab_size=chars.vocab_size)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(hf.tokenizer_config(config)), encoding="utf-8")
    expected = chars.encode(text).tolist()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == chars.vocab_size
    ids = tokenizer(text)["input_ids"]
    assert ids == expected
    assert tokenizer.decode(ids) == text
    assert load_mlx_lm_tokenizer(tmp_path).encode(text) == expected
    with pytest.raises(Exception, match="UNK"):  # an unknown character is an error, not a silent substitute
        tokenizer("Nay \u00e9")


@pytest.mark.parametrize("weights", ["auto", "raw"])
def test_export_import_round_trip_is_exact(tmp_path, tanh_checkpoint, weights):
    out = tmp_path / "model"
    hf.export(tanh_checkpoint, out, weights=weights, warn=lambda _: None)
    proc = run_script("convert_torch_ckpt.py", str(out), str(tmp_path / "back.npz"))
    assert proc.returncode == 0, proc.stderr
    original, back = Checkpoint.load(tanh_checkpoint), Checkpoint.load(tmp_path / "back.npz")
    chosen = original.model if weights == "raw" else original.ema
    assert back.config == original.config and back.tokenizer.chars == original.tokenizer.chars
    assert sorted(back.model) == sorted(chosen)
    for name, value in chosen.items():
        assert back.model[name].dtype == value.dtype and np.array_equal(back.model[name], value), name
    assert (back.iter, back.best_val_loss) == (original.iter, original.best_val_loss)


def test_import_of_transformers_saves(tmp_path, exported):
    """What transformers itself writes (prefixed keys; pytorch_model.bin) comes back to the same weights."""
    ckpt, out, _ = exported
    expected = hf.read_hf_dir(out)
    model = GPT2LMHeadModel.from_pretrained(out)
    model.save_pretrained(tmp_path / "resaved")
    bin_dir = tmp_path / "bin"
    shutil.copytree(out, bin_dir)
    (bin_dir / hf.WEIGHTS_FILE).unlink()
    torch.save(model.state_dict(), bin_dir / hf.TORCH_WEIGHTS_FILE)  # "transformer."-prefixed, with lm_head
    for folder in (tmp_path / "resaved", bin_dir):
        if folder.name == "resaved":
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(out / name, folder / name)
        got = hf.read_hf_dir(folder)
        assert got.config == expected.config
        assert sorted(got.model) == sorted(expected.model)
        assert all(np.array_equal(got.model[k], v) for k, v in expected.model.items())


def test_export_cli(tmp_path, tiny_checkpoint):
    out = tmp_path / "model"
    proc = export_cli(str(tiny_checkpoint), str(out))
    assert proc.returncode == 0, proc.stderr
    assert "mlx-lm always uses the tanh GELU" in proc.stderr and "differ by up to" in proc.stderr
    again = export_cli(str(tiny_checkpoint), str(out))
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "--force" in again.stderr
    forced = export_cli(str(tiny_checkpoint), str(out), "--force", "--weights", "raw")
    assert forced.returncode == 0, forced.stderr
    ema = export_cli(str(tiny_checkpoint), str(tmp_path / "x"), "--weights", "ema")
    assert ema.returncode == 1 and "no EMA weights" in ema.stderr and ema.stderr.count("\n") == 1


def test_force_never_deletes_other_files(tmp_path, tiny_checkpoint):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(MlxGptError, match="holds other files"):
        hf.export(tiny_checkpoint, out, force=True)
    assert (out / "notes.txt").read_text() == "keep me"


def test_failed_export_leaves_the_old_one(tmp_path, tiny_checkpoint, monkeypatch):
    out = tmp_path / "model"
    hf.export(tiny_checkpoint, out, warn=lambda _: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "model_card", broken)
    with pytest.raises(OSError):
        hf.export(tiny_checkpoint, out, force=True, warn=lambda _: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.parametrize("setting, named", [({"tie_weights": False}, "tie_weights=False"),
                                             ({"lm_head_bias": True}, "lm_head_bias=True"),
                                             ({"activation": "relu"}, "activation=relu"),
                                             ({"position_encoding": "rope"}, "position_encoding=rope"),
                                             ({"qk_norm": True}, "qk_norm=True"),
                                             ({"logit_softcap": 30.0}, "logit_softcap=30.0"),
                                             ({"value_residual": True}, "value_residual=True"),
                                             ({"embed_shortcut": True}, "embed_shortcut=True")])
def test_export_refuses_what_gpt2_cannot_express(tmp_path, setting, named):
    from mlx.utils import tree_flatten

    from mlx_gpt.model import GPT

    config = GPTConfig(vocab_size=3, block_size=8, n_layer=1, n_head=2, n_embd=8, **setting)
    params = {k: np.array(v) for k, v in tree_flatten(GPT(config).parameters())}
    Checkpoint(config=config, tokenizer=CharTokenizer("abc"), model=params).save(tmp_path / "c.npz")
    with pytest.raises(MlxGptError, match=named):
        hf.export(tmp_path / "c.npz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _broken_copy(src: Path, dest: Path, edit) -> Path:
    shutil.copytree(src, dest)
    edit(dest)
    return dest


def _edit_json(name: str, change):
    def edit(folder: Path) -> None:
        value = json.loads((folder / name).read_text())
        change(value)
        (folder / name).write_text(json.dumps(value))
    return edit


BAD_FOLDERS = {
    "missing config": (lambda d: (d / "config.json").unlink(), "has no config.json"),
    "missing weights": (lambda d: (d / hf.WEIGHTS_FILE).unlink(), "has no model.safetensors"),
    "missing tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "has no tokenizer.json"),
    "BPE tokenizer": (_edit_json("tokenizer.json", lambda t: t["model"].update(type="BPE")), "a BPE tokenizer"),
    "GPT-2's BPE files": (lambda d: ((d / "tokenizer.json").unlink(), (d / "merges.txt").write_text("#v\n")),
                          "BPE tokenizer"),
    "word tokens": (_edit_json("tokenizer.json", lambda t: t["model"]["vocab"].update({"the": 0})),
                    "longer than one character"),
    "not GPT-2": (_edit_json("config.json", lambda c: c.update(model_type="llama")), "not 'gpt2'"),
    "wrong shapes": (_edit_json("config.json", lambda c: c.update(n_embd=64)), "wrong shapes"),
    "vocab mismatch": (_edit_json("config.json", lambda c: c.update(vocab_size=7)), "different models"),
    "other activation": (_edit_json("config.json", lambda c: c.update(activation_function="silu")), "silu"),
    "corrupt weights": (lambda d: (d / hf.WEIGHTS_FILE).write_bytes(b"\0" * 16), "not a readable safetensors"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_import_errors_are_one_line(tmp_path, tanh_checkpoint, case):
    edit, message = BAD_FOLDERS[case]
    good = tmp_path / "good"
    hf.export(tanh_checkpoint, good, warn=lambda _: None)
    bad = _broken_copy(good, tmp_path / "bad", edit)
    with pytest.raises(MlxGptError, match=message) as info:
        hf.read_hf_dir(bad)
    assert "\n" not in str(info.value)


def test_import_cli_error(tmp_path, tanh_checkpoint):
    out = tmp_path / "model"
    hf.export(tanh_checkpoint, out, warn=lambda _: None)
    (out / "config.json").write_text(json.dumps({"model_type": "bert"}))
    proc = run_script("convert_torch_ckpt.py", str(out), str(tmp_path / "x.npz"))
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "not 'gpt2'" in proc.stderr and not (tmp_path / "x.npz").exists()
    flags = run_script("convert_torch_ckpt.py", str(out), str(tmp_path / "x.npz"), "--vocab_from", "t.txt")
    assert flags.returncode == 1 and "leave out --format" in flags.stderr


def test_import_of_sharded_and_untied_folders(tmp_path, tanh_checkpoint):
    out = tmp_path / "model"
    hf.export(tanh_checkpoint, out, warn=lambda _: None)
    expected = hf.read_hf_dir(out)
    shard = "model-00001-of-00001.safetensors"
    arrays = mx.load(str(out / hf.WEIGHTS_FILE))
    (out / hf.WEIGHTS_FILE).rename(out / shard)
    (out / hf.SHARD_INDEX_FILE).write_text(json.dumps({"weight_map": {k: shard for k in arrays}}))
    assert all(np.array_equal(hf.read_hf_dir(out).model[k], v) for k, v in expected.model.items())
    head = np.random.default_rng(0).normal(size=expected.model["wte.weight"].shape).astype(np.float32)
    mx.save_safetensors(str(out / shard), {**arrays, "lm_head.weight": mx.array(head)}, metadata={"format": "pt"})
    _edit_json("config.json", lambda c: c.update(tie_word_embeddings=False))(out)
    untied = hf.read_hf_dir(out)
    assert untied.config.tie_weights is False and np.array_equal(untied.model["lm_head.weight"], head)
    untied.save(tmp_path / "untied.npz")
    load_model(tmp_path / "untied.npz")  # the mlx-gpt model takes exactly these arrays
