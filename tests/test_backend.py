"""The compute backend: OpenBLAS loading on Linux keeps matmul results right; device choice."""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_gpt import backend
from mlx_gpt.errors import MlxGptError


def test_matmul_is_right_with_the_loaded_blas() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(257, 130)).astype(np.float32), rng.normal(size=(130, 67)).astype(np.float32)
    np.testing.assert_allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, rtol=1e-4, atol=1e-4)
    batched = rng.normal(size=(3, 4, 33, 16)).astype(np.float32)
    np.testing.assert_allclose(np.array(mx.array(batched) @ mx.array(batched).transpose(0, 1, 3, 2)),
                               batched @ batched.transpose(0, 1, 3, 2), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS loading is Linux-only")
def test_blas_banner_and_opt_out() -> None:
    code = "import mlx_gpt; from mlx_gpt import backend; print(backend.blas_description)"
    default = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"MLX_GPT_OPENBLAS": "0", "PATH": ""}).stdout
    assert "MLX_GPT_OPENBLAS=0" in off
    assert default.startswith("OpenBLAS") or "reference BLAS" in default


def test_device_selection() -> None:
    assert backend.select_device("cpu") == "cpu"
    assert "device: cpu" in backend.describe_device("cpu")
    with pytest.raises(MlxGptError, match="--device"):
        backend.select_device("tpu")
