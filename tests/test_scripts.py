"""train.py and sample.py end to end, in subprocesses, on a tiny config."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY_FLAGS, run_script

from mlx_gpt.checkpoint import Checkpoint


def test_train_then_sample_end_to_end(tiny_checkpoint: Path, tmp_path: Path) -> None:
    assert Checkpoint.load(tiny_checkpoint).iter == 300
    proc = run_script("sample.py", "--ckpt", str(tiny_checkpoint), "--prompt", "ROMEO:", "--max_new_tokens", "40",
                      "--seed", "1", "--device", "cpu", cwd=tmp_path)  # no data file anywhere near
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ROMEO:") and len(proc.stdout) >= len("ROMEO:") + 40
    again = run_script("sample.py", "--ckpt", str(tiny_checkpoint), "--prompt", "ROMEO:", "--max_new_tokens", "40",
                       "--seed", "1", "--device", "cpu")
    assert again.stdout == proc.stdout


def test_train_resume_continues_to_more_iterations(small_text: Path, tmp_path: Path) -> None:
    args = ["--data", str(small_text), "--out_dir", str(tmp_path), *TINY_FLAGS, "--eval_interval", "10"]
    first = run_script("train.py", *args, "--max_iters", "10")
    assert first.returncode == 0, first.stderr
    assert "number of parameters" in first.stdout and "BLAS" in first.stdout
    second = run_script("train.py", "--resume", "--out_dir", str(tmp_path), "--max_iters", "20", "--device", "cpu")
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stdout and "step 20:" in second.stdout
    assert Checkpoint.load(tmp_path / "latest.npz").iter == 20


def test_resume_refuses_a_different_model_shape(small_text: Path, tmp_path: Path) -> None:
    run_script("train.py", "--data", str(small_text), "--out_dir", str(tmp_path), *TINY_FLAGS, "--max_iters", "2")
    proc = run_script("train.py", "--resume", "--out_dir", str(tmp_path), "--n_layer", "3", "--device", "cpu")
    assert proc.returncode == 1 and proc.stderr.startswith("error: --resume takes the model's shape")


def test_sigint_saves_a_loadable_checkpoint_and_exits_0(small_text: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--data", str(small_text), "--out_dir", str(tmp_path), *TINY_FLAGS,
         "--max_iters", "100000", "--eval_interval", "100000", "--log_interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:  # wait until training steps are running
        if line.startswith("iter 3:") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "interrupted at iter" in out and "Traceback" not in err
    ckpt = Checkpoint.load(tmp_path / "latest.npz")
    assert 3 <= ckpt.iter < 100000


def test_bad_checkpoints_give_one_line_errors_without_traceback(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    for path in (truncated, tmp_path / "missing.npz"):
        proc = run_script("sample.py", "--ckpt", str(path), "--device", "cpu")
        assert proc.returncode == 1
        assert proc.stderr.startswith("error: checkpoint") and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr


def test_unknown_prompt_characters_are_listed(tiny_checkpoint: Path) -> None:
    proc = run_script("sample.py", "--ckpt", str(tiny_checkpoint), "--prompt", "Hello ✓", "--device", "cpu")
    assert proc.returncode == 1 and "'✓'" in proc.stderr and proc.stderr.count("\n") == 1


def test_bad_flags_are_argparse_errors() -> None:
    for args in (["--n_embd", "30", "--n_head", "4", "--max_iters", "1"], ["--unknown_flag", "1"],
                 ["--learning_rate", "nan"], ["--batch_size", "0"]):
        proc = run_script("train.py", *args, "--device", "cpu")
        assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(("error:", "usage:", "train.py: error:"))


def test_every_package_and_kernel_source_is_in_the_distribution() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {str(init.parent.relative_to(ROOT)).replace("/", ".") for init in (ROOT / "mlx_gpt").rglob("__init__.py")}
    assert set(setuptools["packages"]) == found
    assert setuptools["package-data"]["mlx_gpt.cpu"] == ["csrc/*.cpp", "csrc/*.h"]
    assert {p.suffix for p in (ROOT / "mlx_gpt" / "cpu" / "csrc").iterdir()} == {".cpp", ".h"}
