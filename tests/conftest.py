"""Shared fixtures: the Tiny Shakespeare copy beside the project, tiny configs, a trained tiny checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

from mlx_gpt import cpu
from mlx_gpt.data import resolve_data_path

# The suite runs with the CPU plug-in on (the scripts' default) and, in CI, once more with MLX_GPT_CPU=0: the plain
# MLX path that Metal and CUDA users run. Enabled before anything imports mlx.core (it may load a BLAS).
cpu.enable(build_kernels=True)

ROOT = Path(__file__).resolve().parent.parent

# CI runs the fuzz tests with a fixed seed, so a submission's result does not depend on the draw; run them
# locally (without CI set) to explore new examples each time.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    """Tiny Shakespeare: the copy beside the project (CI), else as train.py finds it ($MLX_GPT_DATA, the cached
    copy, or a download, SHA-256 checked)."""
    beside = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    return beside if beside.is_file() and not os.environ.get("MLX_GPT_DATA") else resolve_data_path(None)


@pytest.fixture(scope="session")
def small_text(tmp_path_factory: pytest.TempPathFactory, shakespeare: Path) -> Path:
    """The first 50,000 characters of Tiny Shakespeare."""
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(shakespeare.read_text(encoding="utf-8")[:50_000], encoding="utf-8")
    return path


TINY_FLAGS = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "8",
              "--dropout", "0", "--eval_iters", "4", "--log_interval", "10", "--device", "cpu"]


def run_script(script: str, *args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run one of the root scripts in a subprocess; returns the completed process (text output)."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=kwargs.pop("cwd", ROOT), **kwargs)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, small_text: Path) -> Path:
    """latest.npz of a tiny model trained for 300 steps on small_text (shared by sampling tests)."""
    out = tmp_path_factory.mktemp("tiny_ckpt")
    proc = run_script("train.py", "--data", str(small_text), "--out_dir", str(out), *TINY_FLAGS,
                      "--max_iters", "300", "--eval_interval", "300", "--learning_rate", "3e-3")
    assert proc.returncode == 0, proc.stderr
    return out / "latest.npz"
