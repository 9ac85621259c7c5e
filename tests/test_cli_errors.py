"""Bad input to the scripts: argparse-style errors for bad flag values, one-line errors for bad files and prompts.

Most cases run the scripts' own ``parse_args``/``main`` in-process (through ``cli.run``, exactly as the scripts
do); a few spot checks run them as subprocesses to see the real exit codes and stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from conftest import ROOT, TINY_FLAGS, run_script

import mlx_gpt  # noqa: F401  (before mlx.core)
from mlx_gpt import cli
from mlx_gpt.checkpoint import Checkpoint
from mlx_gpt.config import GPTConfig, TrainConfig
from mlx_gpt.data import Dataset
from mlx_gpt.errors import MlxGptError
from mlx_gpt.model import GPT
from mlx_gpt.tokenizer import CharTokenizer


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_script() -> ModuleType:
    return _script("train")


@pytest.fixture(scope="module")
def sample_script() -> ModuleType:
    return _script("sample")


# ----------------------------------------------------------------------------- numeric flags

# Values each validating type must refuse, and one it accepts (so the test is not vacuous).
BAD_VALUES = {
    cli.positive_int: ["-1", "0", "abc", "nan", "inf", "1.5", ""],
    cli.nonnegative_int: ["-1", "abc", "nan", "inf", "2.5"],
    cli.positive_float: ["-1", "0", "-0.0", "abc", "nan", "inf", "-inf"],
    cli.nonnegative_float: ["-0.5", "abc", "nan", "inf"],
    cli.unit_interval: ["-0.1", "1", "1.5", "abc", "nan"],
    cli.any_int: ["abc", "nan", "1.5", "inf"],
    cli.open_unit_interval: ["0", "-0.1", "1.5", "abc", "nan"],
    cli.closed_unit_interval: ["-0.1", "1.5", "abc", "nan", "inf"],
    cli.seed: ["-1", str(2**64), str(10**30), "abc", "nan", "1.5"],
}
GOOD_VALUE = {cli.positive_int: "3", cli.nonnegative_int: "0", cli.positive_float: "1e-3",
              cli.nonnegative_float: "0", cli.unit_interval: "0.5", cli.any_int: "-7",
              cli.open_unit_interval: "1", cli.closed_unit_interval: "0", cli.seed: str(2**64 - 1)}


def bad_values(kind: object) -> list[str]:
    if isinstance(kind, cli.IntRange):  # a capped integer: just outside both ends, and not integers
        return [str(kind.low - 1), str(kind.high + 1), str(2**64), "abc", "nan", "1.5"]
    return BAD_VALUES[kind]


def good_value(kind: object) -> str:
    return str(kind.high) if isinstance(kind, cli.IntRange) else GOOD_VALUE[kind]


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _parser_of(script: ModuleType, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The script's ArgumentParser, caught when its parse_args() runs (the scripts do not expose it)."""

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Captured(self)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        patch.setattr(sys, "argv", ["script"])
        try:
            script.parse_args()
        except _Captured as caught:
            return caught.parser
    raise AssertionError("parse_args did not build a parser")


def _numeric_flags(parser: argparse.ArgumentParser) -> list[tuple[str, object]]:
    flags = []
    for action in parser._actions:
        if action.type is None or action.choices is not None:
            continue
        assert action.type in BAD_VALUES or isinstance(action.type, cli.IntRange), (
            f"{action.option_strings[0]} uses type={action.type!r}: use one of the validating types in mlx_gpt.cli "
            "(e.g. cli.positive_int)")
        flags.append((action.option_strings[0], action.type))
    return flags


@pytest.mark.parametrize("script_name", ["train", "sample"])
def test_every_numeric_flag_refuses_bad_values(script_name: str, monkeypatch, capsys) -> None:
    script = _script(script_name)
    parser = _parser_of(script, monkeypatch)
    flags = _numeric_flags(parser)
    if script_name == "train":  # every numeric config field set by a flag goes through a validating type
        numeric_fields = {f.name for cls in (GPTConfig, TrainConfig) for f in dataclasses.fields(cls)
                          if f.type in ("int", "float")}
        flag_fields = {a.dest for a in parser._actions} & numeric_fields
        assert {flag[2:] for flag, _ in flags} == flag_fields
        assert len(flags) >= 20
    else:
        assert {flag for flag, _ in flags} >= {"--max_new_tokens", "--temperature", "--top_k", "--num_samples"}
    tried = 0
    for flag, kind in flags:
        parser.parse_args([flag, good_value(kind)])
        for value in bad_values(kind):
            with pytest.raises(SystemExit) as exit_info:
                parser.parse_args([f"{flag}={value}"])  # "=": also a value like "-1" stays a value
            stderr = capsys.readouterr().err
            assert exit_info.value.code == 2, (flag, value)
            assert "usage:" in stderr and f"error: argument {flag}: " in stderr, (flag, value, stderr)
            assert "Traceback" not in stderr
            tried += 1
    print(f"\n{script_name}.py: {len(flags)} numeric flags, {tried} bad values refused")


@pytest.mark.parametrize("argv, flag", [
    (["train.py", "--max_iters", "-1"], "--max_iters"),
    (["train.py", "--learning_rate", "nan"], "--learning_rate"),
    (["train.py", "--dropout", "1"], "--dropout"),
    (["sample.py", "--temperature", "-1"], "--temperature"),
    (["sample.py", "--top_k", "0"], "--top_k"),
    (["sample.py", "--seed", "-1"], "--seed"),
    (["train.py", "--seed", str(2**64)], "--seed"),
])
def test_bad_flag_value_in_a_real_process(argv: list[str], flag: str) -> None:
    proc = run_script(*argv)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage:") and f"error: argument {flag}: " in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- running the scripts' main in-process


def _run_main(script: ModuleType, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """``cli.run(script.main)`` with ``argv``, as ``python script.py argv`` would: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(script.main)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _one_line_error(code: int, err: str) -> str:
    assert code == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "unexpected" not in lines[0], lines[0]  # "unexpected" is how cli.run reports a bug
    return lines[0]


# ----------------------------------------------------------------------------- config files


@pytest.mark.parametrize("values, field", [
    ({"n_embd": 30, "n_head": 4}, "n_embd"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"max_iters": "lots"}, "max_iters"),
    ({"dropout": 1.5}, "dropout"),
    ({"bias": 1}, "bias"),
    ({"n_layers": 4}, "n_layers"),
    ({"seed": -1}, "seed must be in [0, 2**64)"),
    ({"seed": 2**64}, "seed must be in [0, 2**64)"),
])
def test_config_file_with_bad_values(tmp_path: Path, small_text: Path, train_script, monkeypatch, capsys,
                                     values: dict, field: str) -> None:
    """--config JSON bypasses argparse: the config classes refuse the same things, in one line."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(values))
    code, _, err = _run_main(train_script, ["--config", str(config), "--data", str(small_text),
                                            "--out_dir", str(tmp_path / "out"), "--device", "cpu"],
                             monkeypatch, capsys)
    assert field in _one_line_error(code, err)


# ----------------------------------------------------------------------------- data files


@pytest.mark.parametrize("content, expected", [
    (b"\xff\xfeh\x00i\x00", "is not UTF-8 text (bad byte at offset 0)"),
    (b"caf\xe9 au lait\n" * 10, "is not UTF-8 text (bad byte at offset 3)"),
    (b"", "is empty"),
    (b"short text", "the train split has 9 characters, fewer than block_size + 1 = 33"),
    (b"x" * 200, "the val split has 20 characters, fewer than block_size + 1 = 33"),
])
def test_bad_data_file(tmp_path: Path, train_script, monkeypatch, capsys, content: bytes, expected: str) -> None:
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    code, _, err = _run_main(train_script, ["--data", str(data), "--out_dir", str(tmp_path / "out"), *TINY_FLAGS],
                             monkeypatch, capsys)
    error = _one_line_error(code, err)
    assert str(data) in error and expected in error
    assert not (tmp_path / "out").exists(), "a failed start left an out_dir behind"


def test_data_path_that_is_missing_or_a_folder(tmp_path: Path) -> None:
    with pytest.raises(MlxGptError, match="does not exist"):
        Dataset.load(str(tmp_path / "nope.txt"), 32)
    with pytest.raises(MlxGptError, match="cannot read data file"):
        Dataset.load(str(tmp_path), 32)


def test_resume_with_data_that_has_new_characters(tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("abc" * 100 + "Z", encoding="utf-8")
    with pytest.raises(MlxGptError, match="characters the checkpoint's vocabulary lacks"):
        Dataset.load(str(data), 8, tokenizer=CharTokenizer("abc"))


def test_bad_data_file_in_a_real_process(tmp_path: Path) -> None:
    data = tmp_path / "latin1.txt"
    data.write_bytes("Fran\u00e7ois\n".encode("latin-1") * 50)
    proc = run_script("train.py", "--data", str(data), "--out_dir", str(tmp_path / "out"), *TINY_FLAGS)
    assert proc.returncode == 1
    assert "not UTF-8" in _one_line_error(proc.returncode, proc.stderr)


def test_ckpt_without_resume_and_bad_out_dir(tmp_path: Path, small_text: Path, train_script, monkeypatch,
                                             capsys) -> None:
    code, _, err = _run_main(train_script, ["--ckpt", "x.npz"], monkeypatch, capsys)
    assert "--ckpt is for --resume" in _one_line_error(code, err)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = _run_main(train_script, ["--data", str(small_text), "--out_dir", str(blocker / "out"),
                                            *TINY_FLAGS, "--max_iters", "1"], monkeypatch, capsys)
    assert "cannot create out_dir" in _one_line_error(code, err)


# ----------------------------------------------------------------------------- sample.py: prompts and checkpoints

BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory: pytest.TempPathFactory, small_text: Path) -> Path:
    """A freshly initialised tiny model on small_text's vocabulary (enough for every error path)."""
    tokenizer = CharTokenizer.from_text(small_text.read_text(encoding="utf-8"))
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=BLOCK_SIZE, n_layer=1, n_head=2, n_embd=16,
                       dropout=0.0)
    from mlx.utils import tree_flatten

    weights = {k: np.array(v) for k, v in tree_flatten(GPT(config).parameters())}
    return Checkpoint(config=config, tokenizer=tokenizer, model=weights).save(
        tmp_path_factory.mktemp("sample_ckpt") / "tiny.npz")


def test_prompt_longer_than_block_size(untrained_checkpoint: Path, sample_script, monkeypatch, capsys) -> None:
    prompt = "ROMEO: " * 15  # 105 characters, block_size 16: the context is cropped, never an error
    code, out, err = _run_main(sample_script, ["--ckpt", str(untrained_checkpoint), "--prompt", prompt,
                                               "--max_new_tokens", "5", "--seed", "1", "--device", "cpu"],
                               monkeypatch, capsys)
    assert code == 0, err
    assert out.startswith(prompt) and len(out.rstrip("\n")) >= len(prompt) + 1


@pytest.mark.parametrize("prompt_args, expected", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "ROMEO \u2603"], "not in the vocabulary"),
    (["--prompt", "FILE:/nonexistent/prompt.txt"], "prompt.txt"),
    (["--prompt", "FILE:{latin1}"], "prompt"),
])
def test_bad_prompt(tmp_path: Path, untrained_checkpoint: Path, sample_script, monkeypatch, capsys,
                    prompt_args: list[str], expected: str) -> None:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Fran\u00e7ois".encode("latin-1"))
    args = [a.format(latin1=latin1) for a in prompt_args]
    code, _, err = _run_main(sample_script, ["--ckpt", str(untrained_checkpoint), *args, "--max_new_tokens", "3",
                                             "--device", "cpu"], monkeypatch, capsys)
    assert expected in _one_line_error(code, err)


@pytest.mark.parametrize("make, expected", [
    (lambda p: p.write_bytes(b"a" * (2**20 + 1)), "is larger than the limit of 1,048,576 bytes"),
    (lambda p: p.mkdir(), "is a folder, not a file"),
])
def test_prompt_file_that_is_not_a_small_text_file(tmp_path: Path, untrained_checkpoint: Path, sample_script,
                                                   monkeypatch, capsys, make, expected: str) -> None:
    prompt = tmp_path / "prompt.txt"
    make(prompt)
    code, out, err = _run_main(sample_script, ["--ckpt", str(untrained_checkpoint), "--prompt", f"FILE:{prompt}",
                                               "--device", "cpu"], monkeypatch, capsys)
    assert f"cannot read prompt file {prompt}: it {expected}" in _one_line_error(code, err) and not out


@pytest.mark.parametrize("source", ["fifo", "/dev/zero"])
def test_prompt_file_that_never_ends_is_refused_at_once(tmp_path: Path, untrained_checkpoint: Path,
                                                         source: str) -> None:
    """A FIFO would block the read and /dev/zero never ends: both refused as not regular files."""
    path = Path(source)
    if source == "fifo":
        path = tmp_path / "prompt.fifo"
        os.mkfifo(path)
    proc = run_script("sample.py", "--ckpt", str(untrained_checkpoint), "--prompt", f"FILE:{path}", "--device", "cpu",
                      timeout=120)
    assert "is not a regular file (a FIFO, device or socket)" in _one_line_error(proc.returncode, proc.stderr)


@pytest.mark.parametrize("flag, value, limit", [
    ("--num_samples", "1000000", "1,024"),
    ("--max_new_tokens", str(2**31), "1,000,000"),
    ("--repetition_context_size", str(10**12), "1,000,000"),
])
def test_sample_caps_name_their_limit(sample_script, monkeypatch, capsys, flag: str, value: str, limit: str) -> None:
    parser = _parser_of(sample_script, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([flag, value])
    assert exit_info.value.code == 2
    assert f"error: argument {flag}: must be at most {limit} (the limit), got {value}" in capsys.readouterr().err


def test_num_samples_times_length_is_capped(untrained_checkpoint: Path, sample_script, monkeypatch, capsys) -> None:
    code, out, err = _run_main(sample_script, ["--ckpt", str(untrained_checkpoint), "--num_samples", "1024",
                                               "--max_new_tokens", "1000000", "--device", "cpu"], monkeypatch, capsys)
    error = _one_line_error(code, err)
    assert "is 1,024,001,024 characters, more than the limit of 33,554,432" in error and not out


@pytest.mark.parametrize("make, expected", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "is a folder, not a file"),
    (lambda p: p.write_bytes(b"PK\x03\x04 not really a zip"), "not an .npz file"),
    (lambda p: np.savez(p, x=np.zeros(3)), "not an mlx-gpt checkpoint"),
])
def test_bad_checkpoint_for_sampling(tmp_path: Path, sample_script, monkeypatch, capsys, make, expected) -> None:
    path = tmp_path / "ckpt.npz"
    make(path)
    code, _, err = _run_main(sample_script, ["--ckpt", str(path), "--device", "cpu"], monkeypatch, capsys)
    error = _one_line_error(code, err)
    assert expected in error and str(path) in error


def test_sample_error_in_a_real_process_and_debug_shows_traceback(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.npz")
    proc = run_script("sample.py", "--ckpt", missing, "--device", "cpu")
    assert f"checkpoint {missing} does not exist" in _one_line_error(proc.returncode, proc.stderr)
    proc = run_script("sample.py", "--ckpt", missing, "--device", "cpu", "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "MlxGptError" in proc.stderr


# ----------------------------------------------------------------------------- convert_torch_ckpt.py


@pytest.mark.parametrize("make", [
    lambda p: None,  # missing
    lambda p: p.mkdir(),
    lambda p: p.write_bytes(b""),
    lambda p: p.write_bytes(b"PK\x03\x04 truncated zip"),
    lambda p: p.write_text("not a checkpoint at all\n"),
])
def test_convert_bad_input_is_one_line_error(tmp_path: Path, monkeypatch, capsys, make) -> None:
    """Whatever the input (or without PyTorch installed), one line and exit 1; --debug shows the traceback."""
    source, target = tmp_path / "in.pt", tmp_path / "out.npz"
    make(source)
    script = _script("convert_torch_ckpt")
    code, _, err = _run_main(script, [str(source), str(target)], monkeypatch, capsys)
    _one_line_error(code, err)
    assert not target.exists()
    monkeypatch.setattr(sys, "argv", ["convert_torch_ckpt.py", str(source), str(target), "--debug"])
    with pytest.raises(MlxGptError):
        cli.run(script.main)
