"""convert_torch_ckpt.py: PyTorch checkpoints of three layouts give the same logits and text in mlx-gpt."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import hostile_inputs
import numpy as np
import pytest
from conftest import ROOT, run_script

from mlx_gpt.convert import TORCH_HINT, convert_file, read_meta_pkl, vocab_from_text
from mlx_gpt.errors import MlxGptError

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
CHARS = sorted(set(TEXT))
SHAPE = dict(n_embd=32, n_head=4, n_layer=2, block_size=32)
PROMPT = "Speak"
NEW_TOKENS = 24  # prompt + continuation fit in block_size: no context cropping on either side

# Runs a script with `import torch` failing, as if PyTorch were not installed.
WITHOUT_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
                 "runpy.run_path(sys.argv[0], run_name='__main__')")


def run_without_torch(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(ROOT / script), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


@pytest.fixture(scope="module")
def refs():
    pytest.importorskip("torch")
    import torch_refs

    return torch_refs


def assert_same_logits(torch_model, out: Path, seed: int = 0) -> None:
    import mlx.core as mx
    import torch

    from mlx_gpt.checkpoint import load_model

    model, tokenizer, _ = load_model(out)
    assert tokenizer.chars == CHARS
    ids = np.random.default_rng(seed).integers(0, len(CHARS), size=(3, SHAPE["block_size"]))
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids)).numpy()
    np.testing.assert_allclose(np.array(model(mx.array(ids))), expected, atol=1e-4, rtol=0)


def assert_same_greedy_text(refs, torch_model, out: Path) -> None:
    """sample.py --temperature 0 (run without torch importable) continues PROMPT exactly like the PyTorch model."""
    ids = refs.greedy_decode(torch_model, [CHARS.index(c) for c in PROMPT], NEW_TOKENS)
    proc = run_without_torch("sample.py", "--ckpt", str(out), "--prompt", PROMPT, "--temperature", "0",
                             "--max_new_tokens", str(NEW_TOKENS), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "".join(CHARS[i] for i in ids) + "\n"


def lecture_checkpoint(refs, tmp_path: Path) -> tuple[object, Path, Path]:
    """A "Let's build GPT" model saved as a bare state_dict, and its training text."""
    model = refs.randomize_(refs.lecture_gpt(len(CHARS), **SHAPE), seed=3)
    src, text = tmp_path / "gpt.pt", tmp_path / "input.txt"
    refs.torch.save(model.state_dict(), src)
    text.write_text(TEXT, encoding="utf-8")
    return model, src, text


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_minigpt_checkpoint_matches_pytorch(refs, tmp_path, weights):
    raw = refs.randomize_(refs.minigpt(len(CHARS), **SHAPE), seed=1)
    ema = refs.perturbed_copy(raw, seed=2)
    src, out = tmp_path / "ckpt.pt", tmp_path / "out.npz"
    refs.save_minigpt(raw, ema, CHARS, src)

    result = convert_file(src, out, weights=weights)
    assert result.layout == "minigpt" and result.iter == 1234
    c = result.config
    assert (c.activation, c.bias, c.tie_weights, c.lm_head_bias, c.n_head, c.dropout) == ("gelu_tanh", True, True,
                                                                                         True, 4, 0.1)
    reference = ema if weights == "ema" else raw
    assert_same_logits(reference, out)
    if weights == "ema":
        assert_same_greedy_text(refs, reference, out)


@pytest.mark.parametrize("bias, tied, prefix, meta_beside", [(False, True, "_orig_mod.", False),
                                                              (True, False, "module.", True)])
def test_nanogpt_checkpoint_matches_pytorch(refs, tmp_path, monkeypatch, bias, tied, prefix, meta_beside):
    monkeypatch.chdir(tmp_path)
    model = refs.randomize_(refs.NanoGPT(len(CHARS), **SHAPE, bias=bias, tied=tied), seed=4)
    # nanoGPT's own folders: <repo>/out-x/ckpt.pt and <repo>/data/<dataset>/meta.pkl (or meta.pkl beside ckpt.pt)
    src = tmp_path / "nanoGPT" / "out-x" / "ckpt.pt"
    src.parent.mkdir(parents=True)
    refs.save_nanogpt(model, src, prefix=prefix, dataset="tiny_chars")
    meta = src.parent / "meta.pkl" if meta_beside else tmp_path / "nanoGPT" / "data" / "tiny_chars" / "meta.pkl"
    refs.save_meta_pkl(CHARS, meta)

    result = convert_file(src, tmp_path / "out.npz")
    assert result.layout == "nanogpt" and result.iter == 250
    c = result.config
    assert (c.activation, c.bias, c.tie_weights, c.lm_head_bias) == ("gelu", bias, tied, False)
    assert_same_logits(model, tmp_path / "out.npz")
    if tied:
        assert_same_greedy_text(refs, model, tmp_path / "out.npz")


def test_lecture_checkpoint_matches_pytorch(refs, tmp_path):
    model, src, text = lecture_checkpoint(refs, tmp_path)
    out = tmp_path / "out.npz"
    result = convert_file(src, out, vocab_from=text)
    c = result.config
    assert result.layout == "lecture"
    assert (c.activation, c.bias, c.tie_weights, c.lm_head_bias) == ("relu", True, False, True)
    assert_same_logits(model, out)
    assert_same_greedy_text(refs, model, out)


def test_cli_prints_summary_and_keeps_existing_output(refs, tmp_path):
    model, src, text = lecture_checkpoint(refs, tmp_path)
    out = tmp_path / "out.npz"
    proc = run_script("convert_torch_ckpt.py", str(src), str(out), "--vocab_from", str(text), timeout=120)
    assert proc.returncode == 0, proc.stderr
    # mlx-gpt holds PyTorch's parameters plus the zero q/k/v biases of its fused c_attn.
    n_params = sum(p.numel() for p in model.parameters()) + SHAPE["n_layer"] * 3 * SHAPE["n_embd"]
    assert "layout: lecture" in proc.stdout
    assert "activation=relu" in proc.stdout and "tie_weights=False" in proc.stdout
    assert f"parameters: {n_params:,}" in proc.stdout

    written = out.read_bytes()
    proc = run_script("convert_torch_ckpt.py", str(src), str(out), "--vocab_from", str(text), timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "--force" in proc.stderr
    assert out.read_bytes() == written


def test_force_overwrites(refs, tmp_path):
    _, src, text = lecture_checkpoint(refs, tmp_path)
    out = tmp_path / "out.npz"
    out.write_bytes(b"not a checkpoint")
    with pytest.raises(MlxGptError, match="--force"):
        convert_file(src, out, vocab_from=text)
    assert out.read_bytes() == b"not a checkpoint"
    convert_file(src, out, vocab_from=text, force=True)
    from mlx_gpt.checkpoint import Checkpoint

    assert Checkpoint.load(out).config.activation == "relu"


class MakesMarker:
    """Unpickling this runs os.mkdir(path): the stand-in for a checkpoint that runs code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("container", ["torch.save", "pickle"])
def test_checkpoint_that_runs_code_is_refused(refs, tmp_path, container):
    marker, src, out = tmp_path / "marker", tmp_path / "evil.pt", tmp_path / "out.npz"
    payload = {"model_state_dict": {"w": refs.torch.zeros(2)}, "meta": MakesMarker(marker)}
    if container == "torch.save":
        refs.torch.save(payload, src)
    else:
        src.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(MlxGptError) as info:
        convert_file(src, out)
    assert not marker.exists() and not out.exists()
    assert "\n" not in str(info.value) and "refused" in str(info.value)
    # The file really runs code when loaded without weights_only: the check above could fail.
    if container == "torch.save":
        refs.torch.load(src, weights_only=False)
    else:
        pickle.loads(src.read_bytes())
    assert marker.is_dir()


def test_meta_pkl_that_runs_code_is_refused(tmp_path):
    marker, meta = tmp_path / "marker", tmp_path / "meta.pkl"
    meta.write_bytes(pickle.dumps({"vocab_size": 2, "itos": {0: "a", 1: "b"}, "x": MakesMarker(marker)}))
    with pytest.raises(MlxGptError, match="only dicts, ints and strings"):
        read_meta_pkl(meta)
    assert not marker.exists()


def test_missing_or_wrong_vocabulary_says_how_to_give_one(refs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nano = tmp_path / "ckpt.pt"
    refs.save_nanogpt(refs.NanoGPT(len(CHARS), **SHAPE, bias=False), nano)
    _, lecture, _ = lecture_checkpoint(refs, tmp_path)
    for src in (nano, lecture):
        with pytest.raises(MlxGptError, match="--meta .*--vocab_from"):
            convert_file(src, tmp_path / "out.npz")
    short = tmp_path / "short.txt"
    short.write_text("abc", encoding="utf-8")
    with pytest.raises(MlxGptError, match=f"has 3 characters but the checkpoint's embedding has {len(CHARS)} rows"):
        convert_file(nano, tmp_path / "out.npz", vocab_from=short)
    assert not (tmp_path / "out.npz").exists()


def test_partial_or_unknown_layout_lists_keys(refs, tmp_path):
    model, _, text = lecture_checkpoint(refs, tmp_path)
    state = model.state_dict()
    del state["blocks.1.ffwd.net.2.bias"]
    state["blocks.0.sa.extra.weight"] = refs.torch.zeros(3)
    partial, unknown = tmp_path / "partial.pt", tmp_path / "unknown.pt"
    refs.torch.save(state, partial)
    with pytest.raises(MlxGptError, match=r"missing keys: blocks\.1\.ffwd\.net\.2\.bias; "
                                          r"unexpected keys: blocks\.0\.sa\.extra\.weight"):
        convert_file(partial, tmp_path / "out.npz", vocab_from=text)
    refs.torch.save({"weights": {"a": refs.torch.zeros(1)}, "step": 3}, unknown)
    with pytest.raises(MlxGptError, match="unknown checkpoint layout .*step, weights.*--format"):
        convert_file(unknown, tmp_path / "out.npz")


def test_without_torch_the_error_says_how_to_install_it(tmp_path):
    src = tmp_path / "ckpt.pt"
    src.write_bytes(b"x")
    proc = run_without_torch("convert_torch_ckpt.py", str(src), str(tmp_path / "out.npz"))
    assert proc.returncode == 1
    assert proc.stderr == f"error: {TORCH_HINT}\n"
    assert 'pip install -e ".[convert]"' in TORCH_HINT


# ----------------------------------------------------------------------------- hostile files: bounded before copying


@pytest.mark.parametrize("value, message", [
    (hostile_inputs.laughs(40, 2), "it nests more than 8 levels deep"),
    (hostile_inputs.laughs(3, 200), "it holds more than 1,048,576 values"),
    ({"itos": {0: "a", "x": "b"}}, "not a character-level nanoGPT meta.pkl"),
])
def test_meta_pkl_plain_data_check_counts_nodes_and_depth(tmp_path, value, message):
    meta = tmp_path / "meta.pkl"
    meta.write_bytes(pickle.dumps(value))
    assert len(meta.read_bytes()) < 10_000  # small files whose walk by paths would visit 2**40 or 8e6 dicts
    with pytest.raises(MlxGptError, match=message):
        read_meta_pkl(meta)


def test_self_referencing_meta_pkl_is_refused(tmp_path):
    value = {"vocab_size": 1, "itos": {0: "a"}}
    value["itos"]["loop"] = value
    meta = tmp_path / "meta.pkl"
    meta.write_bytes(pickle.dumps(value))
    with pytest.raises(MlxGptError, match="it nests more than 8 levels deep"):
        read_meta_pkl(meta)


@pytest.mark.parametrize("reader", [read_meta_pkl, vocab_from_text])
def test_vocabulary_files_that_never_end_are_refused(tmp_path, reader):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (Path("/dev/zero"), fifo):
        with pytest.raises(MlxGptError, match=r"is not a regular file \(a FIFO, device or socket\)"):
            reader(path)


def test_vocab_from_reads_in_chunks_across_multibyte_characters(tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("héllo — wörld 🙂\n" * 7, encoding="utf-8")
    assert vocab_from_text(text, chunk=3).chars == sorted(set(text.read_text(encoding="utf-8")))


def test_nanogpt_n_layer_beyond_its_state_dict_is_refused_before_any_loop(tmp_path):
    pytest.importorskip("torch")
    src = hostile_inputs.nanogpt_file(tmp_path / "ckpt.pt", hostile_inputs.nanogpt_state(), n_layer=10**9)
    (tmp_path / "input.txt").write_text(hostile_inputs.TEXT)
    with pytest.raises(MlxGptError, match="model_args.n_layer is 1000000000 but the state_dict holds 2 layers"):
        convert_file(src, tmp_path / "out.npz", vocab_from=tmp_path / "input.txt")


def test_head_numbered_far_beyond_the_others_is_refused(tmp_path):
    pytest.importorskip("torch")
    command = hostile_inputs.CASES["pt_minigpt_head_1e9"](tmp_path)
    with pytest.raises(MlxGptError, match="heads of blocks.0 are numbered up to 999999999 but there are 1"):
        convert_file(command.argv[1], tmp_path / "out.npz")


@pytest.mark.parametrize("name, message", [
    ("pt_expand_as_weights", r"repeats its data \(stride 0, e.g. an expand\)"),
    ("pt_layers_share_one_storage", r"would take [\d,]+ bytes from [\d,]+ bytes of stored data"),
    ("pt_int_weights", "transformer.wpe.weight has dtype torch.int64; weights are floating point"),
    ("pt_nan_weights", r"non-finite weights in transformer\.h\.1\.mlp\.c_fc\.weight"),
])
def test_tensors_are_checked_before_they_are_copied_out(tmp_path, name, message):
    pytest.importorskip("torch")
    command = hostile_inputs.CASES[name](tmp_path)
    with pytest.raises(MlxGptError, match=message):
        convert_file(command.argv[1], tmp_path / "out.npz", vocab_from=command.argv[-1])
    assert not (tmp_path / "out.npz").exists()


def test_tied_weights_sharing_one_storage_still_convert(tmp_path):
    pytest.importorskip("torch")
    src = hostile_inputs.nanogpt_file(tmp_path / "ckpt.pt", hostile_inputs.nanogpt_state())
    (tmp_path / "input.txt").write_text(hostile_inputs.TEXT)
    result = convert_file(src, tmp_path / "out.npz", vocab_from=tmp_path / "input.txt")
    assert result.config.tie_weights and "lm_head: tied to the token embedding" in result.notes
