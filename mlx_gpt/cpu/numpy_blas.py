"""MLX's matmuls through the OpenBLAS that numpy's wheel bundles: fast on Linux with pip alone.

MLX's ``mlx[cpu]`` wheel for Linux carries a reference BLAS (slow float32 matmul) and takes
``cblas_sgemm``, ``cblas_dgemm`` and ``cblas_cgemm`` from whatever library defines them first in the process's
global symbol scope when ``mlx.core`` is imported. numpy's wheel bundles a fast OpenBLAS
(``numpy.libs/libscipy_openblas64_-*.so``), but with renamed symbols (``scipy_cblas_sgemm64_``) taking 64-bit
integers, so MLX cannot find it. This module builds, with the system C compiler, a forwarding library whose
``cblas_sgemm`` etc. widen their integers and call numpy's, checks it with a trial matmul against numpy (through
ctypes, so without importing ``mlx.core``), and loads it with ``RTLD_GLOBAL`` so that MLX binds to it.

Only the three CBLAS routines are forwarded. MLX also imports LAPACK routines (for ``mx.linalg``, which mlx-gpt
does not use); forwarding them would take a hand-written wrapper per routine converting integer arrays (pivots,
``iwork``) to 64 bits, so they stay with MLX's bundled reference LAPACK, which is correct, only slow.

The C source is inline (``FORWARD_SOURCE``): it is a few dozen lines, its symbol names are set by ``-D`` flags,
and keeping it here leaves this module self-contained (no package data to ship) and its text part of the cache key.

This module must not import ``mlx`` (it runs before ``mlx.core`` is imported) and imports numpy, which it needs.

``blas.py`` decides between this, a system OpenBLAS and MLX's own BLAS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mlx_gpt.files import atomic_target

# The forwarding library. SYM(name) is numpy's name for an OpenBLAS symbol, BLASINT its integer type (both set by
# -D flags from what the library exports). MLX calls with 32-bit ints; CBLAS's enums are ints in both.
FORWARD_SOURCE = r"""
#include <stdint.h>
#define CAT_(a, b, c) a##b##c
#define CAT(a, b, c) CAT_(a, b, c)
#define SYM(name) CAT(SYM_PREFIX, name, SYM_SUFFIX)
#define EXPORT __attribute__((visibility("default")))

void SYM(cblas_sgemm)(int, int, int, BLASINT, BLASINT, BLASINT, float, const float *, BLASINT, const float *,
                      BLASINT, float, float *, BLASINT);
void SYM(cblas_dgemm)(int, int, int, BLASINT, BLASINT, BLASINT, double, const double *, BLASINT, const double *,
                      BLASINT, double, double *, BLASINT);
void SYM(cblas_cgemm)(int, int, int, BLASINT, BLASINT, BLASINT, const void *, const void *, BLASINT, const void *,
                      BLASINT, const void *, void *, BLASINT);
void SYM(openblas_set_num_threads)(int);
int SYM(openblas_get_num_threads)(void);
char *SYM(openblas_get_config)(void);
char *SYM(openblas_get_corename)(void);

EXPORT void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                        const float *b, int ldb, float beta, float *c, int ldc) {
    SYM(cblas_sgemm)(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
EXPORT void cblas_dgemm(int order, int ta, int tb, int m, int n, int k, double alpha, const double *a, int lda,
                        const double *b, int ldb, double beta, double *c, int ldc) {
    SYM(cblas_dgemm)(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
EXPORT void cblas_cgemm(int order, int ta, int tb, int m, int n, int k, const void *alpha, const void *a, int lda,
                        const void *b, int ldb, const void *beta, void *c, int ldc) {
    SYM(cblas_cgemm)(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
/* Not CBLAS names, so that they never stand in for another library's. */
EXPORT void mlx_gpt_blas_set_num_threads(int n) { SYM(openblas_set_num_threads)(n); }
EXPORT int mlx_gpt_blas_get_num_threads(void) { return SYM(openblas_get_num_threads)(); }
EXPORT const char *mlx_gpt_blas_config(void) { return SYM(openblas_get_config)(); }
EXPORT const char *mlx_gpt_blas_corename(void) { return SYM(openblas_get_corename)(); }
"""

CFLAGS = ("-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-Wl,--no-undefined")

# The symbol layouts of numpy's OpenBLAS builds: (prefix, suffix, integer type). numpy 2 (scipy-openblas64),
# numpy 1.22-1.26 (openblas64_), and scipy-openblas32 where a wheel uses 32-bit integers.
LAYOUTS = (("scipy_", "64_", "int64_t"), ("", "64_", "int64_t"), ("scipy_", "", "int"))
_NEEDED = ("cblas_sgemm", "cblas_dgemm", "cblas_cgemm", "openblas_set_num_threads", "openblas_get_num_threads",
           "openblas_get_config", "openblas_get_corename")


_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_TRANS = 101, 111, 112


@dataclass
class NumpyBlas:
    """The forwarding library, loaded into the global symbol scope: MLX's matmuls go to numpy's OpenBLAS."""

    path: Path  # the forwarding library
    openblas: Path  # numpy's OpenBLAS it forwards to
    description: str  # for the banner, e.g. "OpenBLAS 0.3.31 bundled with numpy 2.4.6 (Haswell kernels)"
    library: ctypes.CDLL

    def set_num_threads(self, n: int) -> None:
        """The number of threads numpy's OpenBLAS (and so MLX's matmuls, and numpy's) uses."""
        self.library.mlx_gpt_blas_set_num_threads(int(n))

    def get_num_threads(self) -> int:
        return int(self.library.mlx_gpt_blas_get_num_threads())


# ----------------------------------------------------------------------------- numpy's OpenBLAS


def numpy_libs_dir() -> Path | None:
    """The folder where numpy's wheel keeps its bundled libraries (``site-packages/numpy.libs``), if any."""
    spec = importlib.util.find_spec("numpy")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).resolve().parent.parent / "numpy.libs"
    return folder if folder.is_dir() else None


def find_numpy_openblas(libs: Path | None) -> tuple[Path, tuple[str, str, str]] | str:
    """numpy's OpenBLAS in ``libs`` and its symbol layout (prefix, suffix, integer type), or why there is none."""
    if libs is None:
        return "numpy has no bundled libraries (numpy.libs; a numpy not from a wheel?)"
    found = sorted(libs.glob("libscipy_openblas*.so*")) or sorted(libs.glob("libopenblas*.so*"))
    if len(found) != 1:
        return f"expected one OpenBLAS in {libs}, found {len(found)}"
    try:
        library = ctypes.CDLL(str(found[0]))  # RTLD_LOCAL: nothing enters the global scope yet
    except OSError as exc:
        return f"cannot load {found[0].name}: {exc}"
    for prefix, suffix, int_type in LAYOUTS:
        if all(hasattr(library, f"{prefix}{name}{suffix}") for name in _NEEDED):
            return found[0], (prefix, suffix, int_type)
    return f"{found[0].name} has none of the expected symbol names (e.g. scipy_cblas_sgemm64_)"


def c_compiler() -> str | None:
    """The system C compiler (``cc``, else ``gcc``), resolved, or None."""
    for name in ("cc", "gcc"):
        path = shutil.which(name)
        if path is not None:
            return os.path.realpath(path)
    return None


def _file_identity(path: str | Path) -> str:
    stat = os.stat(path)
    return f"{path} {stat.st_size} {stat.st_mtime_ns}"


def _mlx_version() -> str:
    try:
        return importlib.metadata.version("mlx")  # not `import mlx`: the BLAS must be chosen before that
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cache_key(openblas: Path, layout: tuple[str, str, str], cc: str) -> str:
    """What the forwarding library depends on: numpy's library file, its symbols, MLX (which symbols it imports),
    the compiler and the CPU architecture (the build is generic: no -march)."""
    parts = [FORWARD_SOURCE, *CFLAGS, *layout, _file_identity(openblas), f"mlx {_mlx_version()}", _file_identity(cc),
             platform.machine()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build_forwarder(target: Path, openblas: Path, layout: tuple[str, str, str], cc: str) -> str | None:
    """Compile the forwarding library to ``target`` (atomically); None, or why it failed."""
    prefix, suffix, int_type = layout
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_target(target) as tmp:
            # The source from stdin ("-x none": the library after it is not C), linked against numpy's library by
            # path, found again at run time through the rpath.
            defines = [f"-DSYM_PREFIX={prefix}", f"-DSYM_SUFFIX={suffix}", f"-DBLASINT={int_type}"]
            subprocess.run([cc, *CFLAGS, *defines, "-x", "c", "-", "-x", "none", "-o", str(tmp), str(openblas),
                            f"-Wl,-rpath,{openblas.parent}"],
                           input=FORWARD_SOURCE, text=True, check=True, capture_output=True, timeout=60)
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or "").strip().splitlines()
        return f"the build failed ({cc}: {detail[-1] if detail else f'exit {exc.returncode}'})"
    except subprocess.TimeoutExpired:
        return f"the build failed ({cc} ran past 60 s)"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the build failed ({exc})"
    return None


def trial(library: ctypes.CDLL) -> str | None:
    """Multiply through the forwarding library's cblas_sgemm/dgemm/cgemm, as MLX will, and compare with numpy;
    None, or what was wrong. Shapes past OpenBLAS's small-matrix paths; transposes and alpha/beta exercise every
    argument."""
    import numpy as np

    rng = np.random.default_rng(0)
    m, n, k = 67, 45, 130
    for dtype, name, scalar in ((np.float32, "cblas_sgemm", ctypes.c_float), (np.float64, "cblas_dgemm",
                                ctypes.c_double), (np.complex64, "cblas_cgemm", None)):
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((n, k)).astype(dtype)  # used transposed
        c = rng.standard_normal((m, n)).astype(dtype)
        if dtype == np.complex64:
            a, b, c = a + 1j * a[::-1].astype(dtype), b - 1j * b[::-1].astype(dtype), c + 0.5j
            alpha, beta = np.array([0.5 - 0.25j], np.complex64), np.array([2 + 1j], np.complex64)
            scalars = (alpha.ctypes.data_as(ctypes.c_void_p), beta.ctypes.data_as(ctypes.c_void_p))
            expected = alpha[0] * (a @ b.T).astype(np.complex128) + beta[0] * c.astype(np.complex128)
        else:
            scalars = (scalar(0.5), scalar(2.0))
            expected = 0.5 * (a.astype(np.float64) @ b.T.astype(np.float64)) + 2.0 * c.astype(np.float64)
        out = np.ascontiguousarray(c)
        pointer = ctypes.c_void_p
        getattr(library, name)(_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_TRANS, m, n, k, scalars[0],
                               pointer(a.ctypes.data), k, pointer(b.ctypes.data), k, scalars[1],
                               pointer(out.ctypes.data), n)
        if not np.allclose(out, expected, rtol=1e-4, atol=1e-4):
            return f"{name} through it disagrees with numpy (max error {np.max(np.abs(out - expected)):.3g})"
    plain = np.zeros((m, n), np.float32)
    a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    library.cblas_sgemm(_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_NO_TRANS, m, n, k, ctypes.c_float(1.0),
                        ctypes.c_void_p(a.ctypes.data), k, ctypes.c_void_p(b.ctypes.data), n, ctypes.c_float(0.0),
                        ctypes.c_void_p(plain.ctypes.data), n)
    if not np.allclose(plain, a @ b, rtol=1e-5, atol=1e-5):
        return "cblas_sgemm through it disagrees with numpy's matmul"
    return None


def _describe(library: ctypes.CDLL) -> str:
    import numpy as np

    library.mlx_gpt_blas_config.restype = ctypes.c_char_p
    library.mlx_gpt_blas_corename.restype = ctypes.c_char_p
    config = (library.mlx_gpt_blas_config() or b"OpenBLAS").decode(errors="replace").split()
    version = " ".join(config[:2]) if config[:1] == ["OpenBLAS"] else "OpenBLAS"
    core = (library.mlx_gpt_blas_corename() or b"").decode(errors="replace")
    return f"{version} bundled with numpy {np.__version__}" + (f" ({core} kernels)" if core else "")


def load_numpy_openblas(cache_root: Path, libs: Path | None = None) -> NumpyBlas | str:
    """Route MLX's matmuls to numpy's OpenBLAS (call before ``import mlx.core``): build the forwarding library
    under ``cache_root`` if needed, check it, load it globally. Returns it, or the one-line reason it is not used.
    ``libs``: where numpy's libraries are (default: beside numpy)."""
    if not sys.platform.startswith("linux"):
        return f"not on {sys.platform} (Linux only)"
    found = find_numpy_openblas(numpy_libs_dir() if libs is None else libs)
    if isinstance(found, str):
        return found
    openblas, layout = found
    cc = c_compiler()
    if cc is None:
        return "no C compiler (cc or gcc) on PATH to build the forwarding library"
    target = cache_root / cache_key(openblas, layout, cc) / "libmlx_gpt_blas.so"
    if not target.is_file():
        failed = build_forwarder(target, openblas, layout, cc)
        if failed is not None:
            return failed
    try:
        library = ctypes.CDLL(str(target))  # RTLD_LOCAL until the trial passes: MLX must not see a bad one
    except OSError as exc:
        return f"cannot load {target}: {exc}"
    library.mlx_gpt_blas_get_num_threads.restype = ctypes.c_int
    failed = trial(library)
    if failed is not None:
        return f"trial matmul failed: {failed}"
    try:
        library = ctypes.CDLL(str(target), mode=ctypes.RTLD_GLOBAL)  # the same object, now in the global scope
    except OSError as exc:
        return f"cannot load {target} globally: {exc}"
    library.mlx_gpt_blas_get_num_threads.restype = ctypes.c_int
    return NumpyBlas(path=target, openblas=openblas, description=_describe(library), library=library)
