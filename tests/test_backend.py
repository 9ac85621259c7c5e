"""The compute backend: OpenBLAS loading on Linux keeps matmul results right; device choice."""

from __future__ import annotations

import os
import platform
import shutil
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


@pytest.mark.skipif(mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available()),
                    reason="MLX's default device is a GPU: its eval order is left alone")
def test_importing_mlx_gpt_widens_mlx_eval_order_on_the_cpu_unless_the_user_set_it() -> None:
    def width(**env: str) -> str:
        env = {key: value for key, value in {**os.environ, **env}.items() if key != "MLX_BFS_MAX_WIDTH" or value}
        probe = "import os, mlx_gpt; print(os.environ.get('MLX_BFS_MAX_WIDTH'))"
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                              env=env).stdout.strip()

    assert width(MLX_BFS_MAX_WIDTH="") == backend.EVAL_ORDER_WIDTH
    assert width(MLX_BFS_MAX_WIDTH="7") == "7"


# Compiled functions whose kernels use exp, erf and selects (GELU's value and gradient, causal attention's), and
# sqrt and rsqrt in a kernel with many inputs and outputs (an AdamW-like update, LayerNorm's gradient).
_JIT_PROBE = """
import hashlib, mlx_gpt
import mlx.core as mx, mlx.nn as nn
from mlx_gpt import backend, ops
x = mx.random.normal((2, 3, 150, 16), key=mx.random.key(0)) * 2
attend = lambda z: ops.scaled_dot_product_attention(nn.gelu(z), z, z, scale=0.25)
step = mx.compile(lambda a: mx.vjp(attend, [a], [mx.cos(a)]))
out, grads = step(x)
def update(p, g, m, v):
    m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * mx.square(g)
    return p * (1 - 1e-3) - 0.1 * m / (mx.sqrt(v) + 1e-8), m, v
norm = mx.compile(mx.grad(lambda z: (nn.LayerNorm(16)(z) * mx.cos(z)).sum()))
arrays = [*out, *grads, *mx.compile(update)(x, mx.sin(x), mx.cos(x), mx.abs(x)), norm(x)]
print(backend.jit_description)
print(hashlib.sha256(b"".join(memoryview(a).tobytes() for a in arrays)).hexdigest())
"""


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64")
                         and shutil.which("g++")), reason="the CPU kernel flags apply on Linux with g++")
def test_kernels_built_for_this_cpu_give_the_same_bits_as_mlx_default(tmp_path) -> None:
    def run(**env: str) -> list[str]:
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), **env}
        return subprocess.run([sys.executable, "-c", _JIT_PROBE], capture_output=True, text=True, check=True,
                              env=env).stdout.splitlines()

    tuned, tuned_again, default = run(), run(), run(MLX_GPT_CPU_JIT="0")
    assert tuned[0].startswith("compiled for this CPU") and default[0] == "MLX default (MLX_GPT_CPU_JIT=0)"
    # This (tuned) process's PATH starts with its compiler script: the children still find the real g++.
    assert tuned[0].endswith(backend.jit_description.split("/cpu-kernels/")[-1])
    assert tuned[1] == tuned_again[1] == default[1]  # bit for bit; the second run loads the cached kernels
    kernels = list(tmp_path.glob("mlx-gpt/cpu-kernels/*/mlx/*/cpu/*.so"))
    assert kernels and not list(tmp_path.glob("mlx-gpt/cpu-kernels/*/mlx/*/cpu/*.tmp"))


@pytest.mark.skipif(not shutil.which("g++") or not sys.platform.startswith("linux"), reason="needs g++ on Linux")
def test_the_compiler_script_passes_through_and_renames_into_place(tmp_path) -> None:
    compiler = tmp_path / "bin" / "g++"
    backend._install_jit_compiler(compiler, os.path.realpath(shutil.which("g++")))
    assert subprocess.run([str(compiler), "--version"], capture_output=True).returncode == 0  # MLX's probe
    source = tmp_path / "k.cpp"
    source.write_text('extern "C" void twice(float* x, long n) { for (long i = 0; i < n; ++i) x[i] *= 2; }\n')
    library = tmp_path / "out dir" / "libk.so"
    library.parent.mkdir()
    subprocess.run([str(compiler), "-std=c++17", "-O3", "-fPIC", "-shared", str(source), "-o", str(library)],
                   check=True)
    assert sorted(p.name for p in library.parent.iterdir()) == ["libk.so"]
    source.write_text("this is not C++")
    failed = subprocess.run([str(compiler), "-shared", str(source), "-o", str(library)], capture_output=True)
    assert failed.returncode != 0 and sorted(p.name for p in library.parent.iterdir()) == ["libk.so"]
