"""MLX's matmuls through numpy's bundled OpenBLAS (mlx_gpt/cpu/numpy_blas.py): the forwarding library is built,
cached, used by MLX and matches numpy; every fall-back gives its banner line and never crashes."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_gpt.cpu import blas, numpy_blas

ROOT = Path(__file__).resolve().parent.parent

_found = numpy_blas.find_numpy_openblas(numpy_blas.numpy_libs_dir()) if sys.platform.startswith("linux") else "-"
needs_numpy_openblas = pytest.mark.skipif(
    isinstance(_found, str) or numpy_blas.c_compiler() is None,
    reason=f"needs Linux, a C compiler and numpy's bundled OpenBLAS ({_found if isinstance(_found, str) else ''})")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS choice is Linux-only")

# A child process that loads the BLAS modules alone and has not imported mlx.core, as a process starting up has not.
_PRELUDE = f"""
import sys, types
from pathlib import Path
for name in ("mlx_gpt", "mlx_gpt.cpu"):
    package = types.ModuleType(name)
    package.__path__ = [str(Path({str(ROOT)!r}, *name.split(".")))]
    sys.modules[name] = package
from mlx_gpt.cpu import blas, numpy_blas
"""


def run_child(code: str, *args: str, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", _PRELUDE + code, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def sgemm(library: ctypes.CDLL, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b through the library's cblas_sgemm, called as MLX calls it (row-major, 32-bit ints)."""
    (m, k), n = a.shape, b.shape[1]
    out = np.empty((m, n), np.float32)
    library.cblas_sgemm(101, 111, 111, m, n, k, ctypes.c_float(1.0), ctypes.c_void_p(a.ctypes.data), k,
                        ctypes.c_void_p(b.ctypes.data), n, ctypes.c_float(0.0), ctypes.c_void_p(out.ctypes.data), n)
    return out


@needs_numpy_openblas
def test_the_forwarding_library_is_built_once_and_gives_numpys_bits(tmp_path: Path) -> None:
    blas = numpy_blas.load_numpy_openblas(tmp_path)
    assert isinstance(blas, numpy_blas.NumpyBlas), blas
    assert blas.path.is_file() and blas.path.is_relative_to(tmp_path) and blas.openblas == _found[0]
    assert blas.description.startswith("OpenBLAS ") and f"numpy {np.__version__}" in blas.description
    assert not list(tmp_path.rglob("*.tmp"))
    built = blas.path.stat().st_mtime_ns
    again = numpy_blas.load_numpy_openblas(tmp_path)
    assert isinstance(again, numpy_blas.NumpyBlas) and again.path == blas.path
    assert blas.path.stat().st_mtime_ns == built  # loaded from the cache, not rebuilt
    rng = np.random.default_rng(1)
    for m, k, n in ((257, 130, 67), (3, 5, 2), (384, 128, 512)):
        a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
        assert np.array_equal(sgemm(blas.library, a, b), a @ b)  # numpy's matmul calls the same sgemm
    threads = blas.get_num_threads()
    try:
        blas.set_num_threads(1)
        assert blas.get_num_threads() == 1
    finally:
        blas.set_num_threads(threads)


_MLX_USES_IT = """
import ctypes
blas = numpy_blas.load_numpy_openblas(Path(sys.argv[-1]))
assert isinstance(blas, numpy_blas.NumpyBlas), blas
import mlx.core as mx
import numpy as np
mx.set_default_device(mx.cpu)
address = lambda function: ctypes.cast(function, ctypes.c_void_p).value
# The process's first cblas_sgemm (the one MLX binds to): the forwarding library's.
assert address(ctypes.CDLL(None).cblas_sgemm) == address(blas.library.cblas_sgemm)
rng = np.random.default_rng(0)
a, b = rng.standard_normal((257, 130), dtype=np.float32), rng.standard_normal((130, 67), dtype=np.float32)
x = rng.standard_normal((3, 4, 33, 16), dtype=np.float32)
c = (rng.standard_normal((40, 30)) + 1j * rng.standard_normal((40, 30))).astype(np.complex64)
d, e = rng.standard_normal((50, 40)), rng.standard_normal((40, 30))
same = [
    np.array_equal(np.array(mx.array(a) @ mx.array(b)), a @ b),
    np.array_equal(np.array(mx.array(a.T.copy()).T @ mx.array(b)), a.T.copy().T @ b),
    np.array_equal(np.array(mx.array(x) @ mx.array(x).transpose(0, 1, 3, 2)), x @ x.transpose(0, 1, 3, 2)),
    np.array_equal(np.array(mx.array(c) @ mx.array(c.T.copy())), c @ c.T.copy()),
    np.array_equal(np.array(mx.array(d, dtype=mx.float64) @ mx.array(e, dtype=mx.float64)), d @ e),
]
print(same)
"""


@needs_numpy_openblas
def test_mlx_binds_to_the_forwarding_library_and_gives_numpys_bits(tmp_path: Path) -> None:
    log = tmp_path / "ld"
    same = run_child(_MLX_USES_IT, str(tmp_path / "cache"), LD_DEBUG="bindings", LD_DEBUG_OUTPUT=str(log))
    assert same.strip() == "[True, True, True, True, True]"  # float32, transposed, batched, complex64, float64
    # glibc's own account: libmlx's BLAS symbols bound to the forwarding library.
    bindings = "".join(path.read_text(errors="replace") for path in tmp_path.glob("ld.*"))
    for name in ("cblas_sgemm", "cblas_dgemm", "cblas_cgemm"):
        assert re.search(rf"/libmlx\.so \[0\] to {re.escape(str(tmp_path / 'cache'))}/\w+/libmlx_gpt_blas\.so \[0\]: "
                         rf"normal symbol `{name}'", bindings), name


@needs_numpy_openblas
def test_a_failed_trial_leaves_the_library_out_of_mlxs_reach(tmp_path: Path) -> None:
    code = """
import ctypes
numpy_blas.trial = lambda library: "forced to fail"
choice = blas.choose_blas("", Path(sys.argv[-1]))
print(choice.description)
import mlx.core as mx
forwarders = [line.split()[-1] for line in open("/proc/self/maps") if "libmlx_gpt_blas" in line]
address = lambda function: ctypes.cast(function, ctypes.c_void_p).value
print(address(ctypes.CDLL(None).cblas_sgemm) != address(ctypes.CDLL(forwarders[0]).cblas_sgemm))
"""
    description, elsewhere = run_child(code, str(tmp_path)).splitlines()
    assert "numpy's OpenBLAS not used: trial matmul failed: forced to fail" in description
    assert elsewhere == "True"  # loaded for the trial, but never where MLX looks


@pytest.fixture
def before_mlx(monkeypatch: pytest.MonkeyPatch) -> None:
    """choose_blas as at start-up, before mlx.core is imported (this test process imported it long ago); no
    system OpenBLAS loaded into it."""
    monkeypatch.delitem(sys.modules, "mlx.core", raising=False)
    monkeypatch.setattr(blas, "find_system_openblas", lambda: "/usr/lib/fake/libopenblas.so.0")
    monkeypatch.setattr(blas, "load_system_openblas", lambda path: blas.BlasChoice(f"OpenBLAS ({path})"))


def banners(cache: Path) -> dict[str, blas.BlasChoice]:
    return {setting: blas.choose_blas(setting, cache) for setting in ("", "numpy")}


@linux_only
def test_no_compiler_falls_back_with_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before_mlx) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    auto, numpy_only = banners(tmp_path).values()
    reason = "numpy's OpenBLAS not used: no C compiler (cc or gcc) on PATH to build the forwarding library"
    assert auto.description == f"OpenBLAS (/usr/lib/fake/libopenblas.so.0); {reason}" and auto.hint is None
    assert numpy_only.description == f"MLX bundled reference BLAS ({reason})"
    assert numpy_only.hint == blas.HINT
    monkeypatch.setattr(blas, "find_system_openblas", lambda: None)
    nothing = blas.choose_blas("", tmp_path)
    assert nothing.description == f"MLX bundled reference BLAS ({reason}; no system OpenBLAS found)"
    assert nothing.hint == blas.HINT and nothing.set_num_threads is None


@linux_only
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs cc to make a library without OpenBLAS's symbols")
def test_an_unexpected_numpy_layout_falls_back_with_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               before_mlx) -> None:
    libs = tmp_path / "numpy.libs"
    libs.mkdir()
    monkeypatch.setattr(numpy_blas, "numpy_libs_dir", lambda: libs)
    assert banners(tmp_path)[""].description.endswith(
        f"numpy's OpenBLAS not used: expected one OpenBLAS in {libs}, found 0")
    (libs / "libscipy_openblas64_-fake.so").write_text("not a library")
    assert f"cannot load libscipy_openblas64_-fake.so: {libs}" in banners(tmp_path)["numpy"].description
    subprocess.run(["cc", "-shared", "-fPIC", "-x", "c", "-", "-o", str(libs / "libscipy_openblas64_-fake.so")],
                   input="int not_openblas;\n", text=True, check=True)
    assert banners(tmp_path)["numpy"].description == (
        "MLX bundled reference BLAS (numpy's OpenBLAS not used: libscipy_openblas64_-fake.so has none of the "
        "expected symbol names (e.g. scipy_cblas_sgemm64_))")
    (libs / "libscipy_openblas64_-other.so").write_text("")
    assert "expected one OpenBLAS in" in banners(tmp_path)["numpy"].description
    monkeypatch.setattr(numpy_blas, "numpy_libs_dir", lambda: None)
    assert banners(tmp_path)[""].description.endswith("numpy has no bundled libraries (numpy.libs; a numpy not from "
                                                      "a wheel?)")


@needs_numpy_openblas
def test_a_failed_build_or_trial_falls_back_with_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            before_mlx) -> None:
    monkeypatch.setattr(numpy_blas, "c_compiler", lambda: "/bin/false")
    auto = blas.choose_blas("", tmp_path)
    assert auto.description == ("OpenBLAS (/usr/lib/fake/libopenblas.so.0); numpy's OpenBLAS not used: the build "
                                "failed (/bin/false: exit 1)")
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.tmp"))
    monkeypatch.undo()
    monkeypatch.delitem(sys.modules, "mlx.core", raising=False)
    monkeypatch.setattr(numpy_blas, "trial", lambda library: "cblas_sgemm through it disagrees with numpy's matmul")
    numpy_only = blas.choose_blas("numpy", tmp_path)
    assert numpy_only.description == ("MLX bundled reference BLAS (numpy's OpenBLAS not used: trial matmul failed: "
                                      "cblas_sgemm through it disagrees with numpy's matmul)")
    assert numpy_only.hint == blas.HINT and numpy_only.library is None


@linux_only
def test_explicit_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before_mlx) -> None:
    off = blas.choose_blas("0", tmp_path)
    assert off.description == "MLX bundled reference BLAS (MLX_GPT_OPENBLAS=0)" and off.hint is None
    assert blas.choose_blas("system", tmp_path).description == "OpenBLAS (/usr/lib/fake/libopenblas.so.0)"
    monkeypatch.undo()  # a real load, of a library that is not there
    monkeypatch.delitem(sys.modules, "mlx.core", raising=False)
    missing = blas.choose_blas(str(tmp_path / "libopenblas.so.0"), tmp_path)
    assert missing.description.startswith(f"MLX bundled reference BLAS (could not load {tmp_path}/libopenblas.so.0")
    assert missing.hint == blas.HINT
    monkeypatch.undo()
    assert "too late to choose a BLAS" in blas.choose_blas("", tmp_path).description


@linux_only
def test_the_banner_of_a_process_without_a_compiler(tmp_path: Path) -> None:
    code = "from mlx_gpt import cpu; print(cpu.enable(log=None)[0])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PATH": str(tmp_path), "MLX_GPT_OPENBLAS": "numpy"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("CPU plug-in: BLAS: MLX bundled reference BLAS (numpy's OpenBLAS not used: no C "
                                  "compiler (cc or gcc) on PATH to build the forwarding library); MLX's kernels: ")
