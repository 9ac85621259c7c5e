"""The core changes nothing on import; the CPU plug-in changes what it says, keeps results right, and undoes it."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_gpt import cpu, ops
from mlx_gpt.cpu import jit
from mlx_gpt.cpu.streams import processes_on_this_machine
from mlx_gpt.device import describe_device, select_device
from mlx_gpt.errors import MlxGptError

LINUX_WITH_GXX = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64") and \
    shutil.which("g++") is not None

_IMPORT_EVERYTHING = """
import os, sys
before = dict(os.environ)
import mlx_gpt, mlx_gpt.model, mlx_gpt.training, mlx_gpt.sampling, mlx_gpt.checkpoint, mlx_gpt.convert
import mlx_gpt.seq2seq.model, mlx_gpt.cpu
import mlx.core as mx
mx.eval(mx.ones(3) @ mx.ones(3))
assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
print("libopenblas.so" in maps, mx.set_cache_limit(0) == 4 << 30, os.environ.get("MLX_BFS_MAX_WIDTH"))
"""


def test_importing_the_library_changes_nothing(tmp_path: Path) -> None:
    spy = tmp_path / "bin"
    spy.mkdir()
    for tool in ("g++", "c++", "cc", "gcc"):  # any compiler run on import would leave its name here
        (spy / tool).write_text(f"#!/bin/sh\necho {tool} >> {tmp_path / 'ran'}\n")
        (spy / tool).chmod(0o755)
    cache, scratch = tmp_path / "cache", tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLX_BFS_MAX_WIDTH"}
    env.update(PATH=f"{spy}{os.pathsep}{env.get('PATH', '')}", XDG_CACHE_HOME=str(cache), HOME=str(tmp_path),
               TMPDIR=str(scratch))
    out = subprocess.run([sys.executable, "-c", _IMPORT_EVERYTHING], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "None"]  # no BLAS loaded, no buffer cache setting, no MLX setting
    assert not (tmp_path / "ran").exists(), "a compiler ran on import"
    assert not cache.exists() and not list(scratch.iterdir()), "a file was written on import"


@pytest.mark.skipif(not Path(os.environ.get("MLX_GPT_OPENBLAS", "0")).is_file(),
                    reason="set MLX_GPT_OPENBLAS to a BLAS library's path to check that it is the one in use")
def test_a_blas_chosen_by_path_is_the_one_in_use() -> None:
    path = os.environ["MLX_GPT_OPENBLAS"]
    assert cpu.describe()[0].startswith(f"CPU plug-in: BLAS: OpenBLAS ({path}); ")
    maps = Path("/proc/self/maps").read_text()
    assert str(Path(path).resolve()) in maps or path in maps


def test_matmul_is_right_with_the_loaded_blas() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(257, 130)).astype(np.float32), rng.normal(size=(130, 67)).astype(np.float32)
    np.testing.assert_allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, rtol=1e-4, atol=1e-4)
    batched = rng.normal(size=(3, 4, 33, 16)).astype(np.float32)
    np.testing.assert_allclose(np.array(mx.array(batched) @ mx.array(batched).transpose(0, 1, 3, 2)),
                               batched @ batched.transpose(0, 1, 3, 2), rtol=1e-4, atol=1e-4)


_ENABLE = "import os; from mlx_gpt import cpu; print(*cpu.enable(log=None), os.environ.get('MLX_BFS_MAX_WIDTH'), " \
          "sep='\\n')"


def _enable_in_child(**env: str) -> list[str]:
    env = {key: value for key, value in {**os.environ, **env}.items() if value}
    return subprocess.run([sys.executable, "-c", _ENABLE], capture_output=True, text=True, check=True,
                          env=env).stdout.splitlines()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU plug-in is Linux-only")
def test_enable_says_what_it_did_and_the_switches_off() -> None:
    lines = _enable_in_child(MLX_BFS_MAX_WIDTH="")
    assert lines[0].startswith("CPU plug-in: BLAS: ") and lines[1].startswith("CPU kernels: ")
    assert lines[-1] == jit.EVAL_ORDER_WIDTH
    assert _enable_in_child(MLX_BFS_MAX_WIDTH="7")[-1] == "7"  # the user's setting is kept
    assert "MLX_GPT_OPENBLAS=0" in _enable_in_child(MLX_GPT_OPENBLAS="0")[0]
    assert "MLX default (MLX_GPT_CPU_JIT=0)" in _enable_in_child(MLX_GPT_CPU_JIT="0")[0]
    assert _enable_in_child(MLX_GPT_CPU="0", MLX_BFS_MAX_WIDTH="") == ["CPU plug-in: off (MLX_GPT_CPU=0)", "None"]


_DISABLE = """
import os
before = dict(os.environ)
from mlx_gpt import cpu, ops
cpu.enable(log=None)
import mlx.core as mx
assert ops._active != ops.PLAIN and os.environ != before
cpu.disable()
assert ops._active == ops.PLAIN and dict(os.environ) == before and ops.describe() == []
print(mx.set_cache_limit(0))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU plug-in is Linux-only")
def test_disable_restores_the_plain_ops_and_the_environment() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLX_BFS_MAX_WIDTH"}
    out = subprocess.run([sys.executable, "-c", _DISABLE], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) != cpu.CPU_BUFFER_CACHE_BYTES


def test_device_selection() -> None:
    assert select_device("cpu") == "cpu"
    assert "device: cpu" in describe_device("cpu")
    with pytest.raises(MlxGptError, match="--device"):
        select_device("tpu")


def test_the_seam_refuses_unknown_ops() -> None:
    with pytest.raises(ValueError, match="no such op"):
        ops.override(softmax=lambda x: x)


def test_processes_on_this_machine_from_the_ring_hostfile(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text('[["127.0.0.1:5000"], ["127.0.0.1:5001"], ["10.0.0.2:5002", "10.0.1.2:5003"]]')
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_SIZE", raising=False)
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    assert [processes_on_this_machine(rank) for rank in range(3)] == [2, 2, 1]
    hostfile.write_text("not json")
    assert processes_on_this_machine(0) == 1
    monkeypatch.delenv("MLX_HOSTFILE")
    assert processes_on_this_machine(0) == 1


# Compiled functions whose kernels use exp, erf and selects (GELU's value and gradient, causal attention's), and
# sqrt and rsqrt in a kernel with many inputs and outputs (an AdamW-like update, LayerNorm's gradient).
_JIT_PROBE = """
import hashlib
from mlx_gpt import cpu
said = cpu.enable(log=None)[0]
import mlx.core as mx, mlx.nn as nn
from mlx_gpt import ops
x = mx.random.normal((2, 3, 150, 16), key=mx.random.key(0)) * 2
attend = lambda z: ops.attention(nn.gelu(z), z, z, scale=0.25, mask="causal")
step = mx.compile(lambda a: mx.vjp(attend, [a], [mx.cos(a)]))
out, grads = step(x)
def update(p, g, m, v):
    m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * mx.square(g)
    return p * (1 - 1e-3) - 0.1 * m / (mx.sqrt(v) + 1e-8), m, v
norm = mx.compile(mx.grad(lambda z: (nn.LayerNorm(16)(z) * mx.cos(z)).sum()))
arrays = [*out, *grads, *mx.compile(update)(x, mx.sin(x), mx.cos(x), mx.abs(x)), norm(x)]
print(said.split("MLX's kernels: ")[1])
print(hashlib.sha256(b"".join(memoryview(a).tobytes() for a in arrays)).hexdigest())
"""


@pytest.mark.skipif(not LINUX_WITH_GXX, reason="the CPU kernel flags apply on Linux with g++")
def test_kernels_built_for_this_cpu_give_the_same_bits_as_mlx_default(tmp_path) -> None:
    def run(**env: str) -> list[str]:
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), **env}
        return subprocess.run([sys.executable, "-c", _JIT_PROBE], capture_output=True, text=True, check=True,
                              env=env).stdout.splitlines()

    tuned, tuned_again, default = run(), run(), run(MLX_GPT_CPU_JIT="0")
    assert tuned[0].startswith("compiled for this CPU") and default[0] == "MLX default (MLX_GPT_CPU_JIT=0)"
    assert tuned[1] == tuned_again[1] == default[1]  # bit for bit; the second run loads the cached kernels
    kernels = list(tmp_path.glob("mlx-gpt/cpu-kernels/*/mlx/*/cpu/*.so"))
    assert kernels and not list(tmp_path.glob("mlx-gpt/cpu-kernels/*/mlx/*/cpu/*.tmp"))


@pytest.mark.skipif(not LINUX_WITH_GXX, reason="needs g++ on Linux")
def test_the_compiler_script_adds_flags_only_to_mlx_s_kernels(tmp_path) -> None:
    root = tmp_path / "root"
    compiler = root / "bin" / "g++"
    jit._install_compiler(compiler, os.path.realpath(shutil.which("g++")), root)
    assert subprocess.run([str(compiler), "--version"], capture_output=True).returncode == 0  # MLX's probe
    source = tmp_path / "k.cpp"
    source.write_text('#ifdef __AVX2__\n#error built for this CPU\n#endif\n'
                      'extern "C" void twice(float* x, long n) { for (long i = 0; i < n; ++i) x[i] *= 2; }\n')
    ours, theirs = root / "mlx" / "libk.so", tmp_path / "elsewhere" / "libk.so"
    for library in (ours, theirs):
        library.parent.mkdir(parents=True)
    build = [str(compiler), "-std=c++17", "-O3", "-fPIC", "-shared", str(source), "-o"]
    assert subprocess.run([*build, str(theirs)], capture_output=True).returncode == 0  # passed through untouched
    built_here = subprocess.run([*build, str(ours)], capture_output=True)
    if " avx2 " in Path("/proc/cpuinfo").read_text():  # -march=native was added, and a failed build leaves nothing
        assert b"built for this CPU" in built_here.stderr and not list(ours.parent.iterdir())
    source.write_text('extern "C" int one() { return 1; }\n')
    subprocess.run([*build, str(ours)], check=True)
    assert sorted(p.name for p in ours.parent.iterdir()) == ["libk.so"]  # renamed into place, no temporary left
