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


def test_processes_on_this_machine_from_the_ring_hostfile(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text('[["127.0.0.1:5000"], ["127.0.0.1:5001"], ["10.0.0.2:5002", "10.0.1.2:5003"]]')
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_SIZE", raising=False)
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    assert [backend.processes_on_this_machine(rank) for rank in range(3)] == [2, 2, 1]
    hostfile.write_text("not json")
    assert backend.processes_on_this_machine(0) == 1
    monkeypatch.delenv("MLX_HOSTFILE")
    assert backend.processes_on_this_machine(0) == 1
