"""Compute backend: a fast BLAS and fast compiled kernels for MLX on Linux, device choice, banner facts.

The ``mlx[cpu]`` wheel for Linux bundles a reference BLAS that runs float32 matmul at a few
GFLOP/s. MLX resolves its BLAS symbols when ``mlx.core`` is first imported, so a library defining
them opened with ``RTLD_GLOBAL`` *before* that import takes over (~30x faster here): numpy's bundled
OpenBLAS through a small forwarding library (``cpu/numpy_blas.py``), else a system OpenBLAS. This
module must therefore not import ``mlx`` at module level; ``mlx_gpt/__init__.py`` calls ``load_blas()`` first.

MLX's CPU backend compiles the elementwise parts of an ``mx.compile``d function to C++ at run time
(``g++ -O3``, no target flags), and so on x86 every ``exp``, ``erf`` and ``fma`` in those kernels is a scalar
call. ``tune_cpu_jit()`` (also called from ``__init__``) makes the same compiler command build for this
CPU, which vectorises those kernels (GELU's forward and backward 25x faster here) with bit-identical
results; see ``JIT_FLAGS``.

Environment:
    MLX_GPT_OPENBLAS=0        MLX's own (reference) BLAS
    MLX_GPT_OPENBLAS=numpy    numpy's OpenBLAS only; =system: a system OpenBLAS only (default: the first that works)
    MLX_GPT_OPENBLAS=/path    load this library instead of searching
    MLX_GPT_CPU_JIT=0         leave MLX's CPU kernel compiler as it is
    MLX_GPT_CPU_STREAMS=N     split a batch over N CPU streams (default: one per core; 1: off)
    MLX_BFS_MAX_WIDTH=N       MLX's own setting, kept if set (else EVAL_ORDER_WIDTH on the CPU)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# Freed CPU buffers MLX keeps for reuse (its default is 32 MB); see select_device().
CPU_BUFFER_CACHE_BYTES = 4 << 30

# How far breadth-first MLX orders a graph's operations for evaluation (MLX_BFS_MAX_WIDTH; MLX's default: 20).
# A training step on the CPU is one evaluation holding one slice of the batch per stream (see split_cores), and
# MLX keeps only a few tasks in flight: at width 20 the order ran long stretches of one stream's work while the
# other stream's thread waited. With the blocked attention of ops.py both threads were then ~60 % busy and a
# default-config step took 14.7 s; at 100 or 1000 both are over 90 % busy and it takes 8.1 s (peak memory
# 5.6 -> 5.9 GB).
EVAL_ORDER_WIDTH = "1000"

# Added to MLX's CPU JIT command (g++ -std=c++17 -O3 -fPIC -shared ...). None changes a result: no fast-math.
# -march=native: this CPU's vector units (AVX2/AVX-512, FMA: std::fma becomes one instruction, not a call);
# -fno-trapping-math: lets the vectoriser turn MLX's NaN/range checks into blends (only the order of
# floating-point exception flags, which nothing reads, may change); -fno-math-errno: sqrt without the errno
# check, so that loops with sqrt or rsqrt (AdamW's update, LayerNorm) vectorise (nothing reads errno either);
# vect-max-version-for-alias-checks: a fused kernel can have a dozen input and output pointers, and g++ gives
# up on vectorising once the runtime overlap checks they need pass its default of 10 (AdamW's update was one
# such scalar loop); -finline-limit: inlines MLX's simd::exp and simd::erf into the kernel's loop so that it
# can vectorise; -ffp-contract=off: no a*b+c fused where the source has two operations (g++'s default in ISO
# C++ mode, stated because bit-identical results depend on it).
JIT_FLAGS = ("-march=native", "-fno-trapping-math", "-fno-math-errno", "--param=vect-max-version-for-alias-checks=64",
             "-finline-limit=10000", "-ffp-contract=off")

# The compiler MLX finds first on PATH. It writes the library under a temporary name and renames it into place,
# so that processes sharing the kernel cache (the ranks of one job) never load a half-written one.
_JIT_COMPILER_SCRIPT = """#!/bin/sh
# Written by mlx-gpt (mlx_gpt/backend.py, tune_cpu_jit): MLX's CPU kernel compiler, building for this CPU.
out= prev=
for arg in "$@"; do
    [ "$prev" = -o ] && out=$arg
    prev=$arg
done
[ -z "$out" ] && exec {cxx} "$@"
{cxx} "$@" {flags} -o "$out.$$.tmp" && exec mv -f "$out.$$.tmp" "$out"
status=$?
rm -f "$out.$$.tmp"
exit $status
"""

# What load_blas() found: a short description for the banner, whether to print the hint, the library and its
# thread setter (None where MLX's own BLAS is in use).
blas_description = "not checked"
blas_hint: str | None = None
_openblas: ctypes.CDLL | None = None
_set_blas_threads: Callable[[int], None] | None = None
# What tune_cpu_jit() did, for the banner.
jit_description = "not checked"


def load_blas() -> str:
    """Choose the BLAS for MLX's matmuls on Linux before ``mlx.core`` is imported (cpu/numpy_blas.py: numpy's
    OpenBLAS, else a system one); returns (and records) what is in use."""
    global blas_description, blas_hint, _openblas, _set_blas_threads
    from .cpu.numpy_blas import choose_blas
    from .data import cache_dir

    choice = choose_blas(os.environ.get("MLX_GPT_OPENBLAS", ""), cache_dir() / "numpy-blas")
    blas_description, blas_hint = choice.description, choice.hint
    _openblas, _set_blas_threads = choice.library, choice.set_num_threads
    return blas_description


def builds_for_this_cpu() -> bool:
    """Whether mlx-gpt compiles code for this CPU at all (MLX's JIT flags, the C++ kernels): Linux on x86-64 or
    arm64, with g++ (see system_cxx)."""
    return sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64")


@functools.lru_cache
def cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _path_without_jit_compiler() -> str:
    """PATH without the directory of the compiler script that tune_cpu_jit puts first (child processes inherit it)."""
    return os.pathsep.join(entry for entry in os.environ.get("PATH", "").split(os.pathsep)
                           if Path(entry).parent.parent.name != "cpu-kernels")


def system_cxx() -> str | None:
    """The real g++ (not tune_cpu_jit's script in front of it), or None."""
    cxx = shutil.which("g++", path=_path_without_jit_compiler())
    return os.path.realpath(cxx) if cxx is not None else None


def tune_cpu_jit() -> str:
    """Have MLX's CPU JIT build its kernels for this CPU (Linux, x86-64 or arm64, with g++); returns (and records)
    what it did. Must run before anything is compiled: it sets PATH and TMPDIR for this process and its children.

    MLX runs ``g++`` from PATH and keeps the kernels under ``$TMPDIR/mlx/<version>/cpu``, keyed by their source
    alone, so the kernels get their own cache here (keyed by the CPU, compiler and flags): kernels built
    without the flags, by other programs in the shared /tmp, are never picked up.
    """
    global jit_description
    if jit_description.startswith("compiled"):
        return jit_description  # done already in this process
    if os.environ.get("MLX_GPT_CPU_JIT", "").strip() == "0":
        jit_description = "MLX default (MLX_GPT_CPU_JIT=0)"
        return jit_description
    from .data import cache_dir

    search_path = _path_without_jit_compiler()
    cxx = system_cxx()
    if not builds_for_this_cpu() or cxx is None:
        jit_description = "MLX default"
        return jit_description
    key = hashlib.sha256("\n".join([cxx, *JIT_FLAGS, cpu_identity()]).encode()).hexdigest()[:16]
    root = cache_dir() / "cpu-kernels" / key
    compiler = root / "bin" / "g++"
    if not compiler.exists():
        try:
            _install_jit_compiler(compiler, cxx)
        except (OSError, subprocess.SubprocessError) as exc:
            jit_description = f"MLX default (could not set up {compiler}: {exc})"
            return jit_description
    tempfile.gettempdir()  # Python's own temporary files stay where they were
    os.environ["PATH"] = f"{compiler.parent}{os.pathsep}{search_path}"
    os.environ["TMPDIR"] = str(root)
    jit_description = f"compiled for this CPU ({' '.join(JIT_FLAGS[:2])}; kernels in {root})"
    return jit_description


def _install_jit_compiler(compiler: Path, cxx: str) -> None:
    """Write the compiler script, after checking that this g++ accepts the flags (an old one may not)."""
    compiler.parent.mkdir(parents=True, exist_ok=True)
    probe = compiler.parent / f"probe.{os.getpid()}.cpp"
    probe.write_text("extern \"C\" float scale(float x) { return 2.0f * x; }\n")
    try:
        subprocess.run([cxx, "-std=c++17", "-O3", "-fPIC", "-shared", *JIT_FLAGS, str(probe), "-o",
                        str(probe.with_suffix(".so"))], check=True, capture_output=True, timeout=120)
    finally:
        for leftover in (probe, probe.with_suffix(".so")):
            leftover.unlink(missing_ok=True)
    script = _JIT_COMPILER_SCRIPT.format(cxx=shlex.quote(cxx), flags=" ".join(JIT_FLAGS))
    tmp = compiler.with_name(f"g++.{os.getpid()}.tmp")
    tmp.write_text(script)
    tmp.chmod(0o755)
    os.replace(tmp, compiler)  # several processes may install at once: each writes the same script


def widen_eval_order() -> None:
    """Let MLX's evaluation order interleave the CPU streams' work (see EVAL_ORDER_WIDTH). MLX reads the setting
    at its first evaluation, so this runs on import, before any; a value the user set is kept. Only when the
    default device is the CPU: a GPU runs one stream, and keeps MLX's own order."""
    import mlx.core as mx

    if "MLX_BFS_MAX_WIDTH" not in os.environ and mx.default_device().type == mx.DeviceType.cpu:
        os.environ["MLX_BFS_MAX_WIDTH"] = EVAL_ORDER_WIDTH


def split_cores(processes_here: int, batch_size: int) -> tuple[int, str | None]:
    """Share this process's cores between CPU streams and BLAS threads; returns (streams, a banner line or None).

    MLX runs each CPU stream's kernels on one thread; only BLAS (matmuls) uses several. So on the CPU a batch
    split over one stream per core, each stream with a one-thread BLAS, keeps every core busy through the
    elementwise parts of a step too (10 % faster than one stream and a two-thread BLAS, measured here on 2 cores).
    The cores are the machine's divided among the ``processes_here`` ranks of a data-parallel job on it (each
    OpenBLAS process otherwise starts one thread per core: 2 ranks on 2 cores ran at half the speed). The
    streams divide the batch evenly; ``MLX_GPT_CPU_STREAMS=N`` asks for N (1: off).
    """
    import mlx.core as mx

    if (_set_blas_threads is None or os.environ.get("OPENBLAS_NUM_THREADS")
            or mx.default_device().type != mx.DeviceType.cpu):
        return 1, None  # no OpenBLAS of ours, the user chose its threads, or the work is on a GPU
    cores = max(1, (os.cpu_count() or 1) // processes_here)
    wanted = os.environ.get("MLX_GPT_CPU_STREAMS", "").strip()
    most = max(1, int(wanted)) if wanted.isdigit() else cores
    streams = max(n for n in range(1, min(most, batch_size) + 1) if batch_size % n == 0)
    threads = max(1, cores // streams)
    _set_blas_threads(threads)
    if streams == 1 and processes_here == 1:
        return 1, None
    return streams, (f"CPU: {streams} stream{'s' * (streams > 1)} x {threads} BLAS thread{'s' * (threads > 1)}"
                     + (f" in each of {processes_here} processes on this machine" if processes_here > 1 else ""))


def processes_on_this_machine(rank: int) -> int:
    """How many ranks of an ``mlx.launch`` job run on this machine (from the ring backend's hostfile, where
    each rank is listed with its IP addresses, or MPI's local size); 1 when it cannot tell."""
    if os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "").isdigit():
        return int(os.environ["OMPI_COMM_WORLD_LOCAL_SIZE"])
    try:
        ranks = json.loads(Path(os.environ["MLX_HOSTFILE"]).read_text())
        addresses = [tuple(sorted(entry.rsplit(":", 1)[0] for entry in rank_entries)) for rank_entries in ranks]
        return addresses.count(addresses[rank])
    except (KeyError, OSError, ValueError, TypeError, AttributeError, IndexError):
        return 1


def select_device(name: str = "auto") -> str:
    """Make ``gpu`` (Metal or CUDA) or ``cpu`` MLX's default device; ``auto`` prefers the GPU."""
    import mlx.core as mx

    from .errors import MlxGptError

    if name not in ("auto", "gpu", "cpu"):
        raise MlxGptError(f"--device must be auto, gpu or cpu, got {name!r}")
    has_gpu = mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())
    if name == "gpu" and not has_gpu:
        raise MlxGptError("--device gpu: this MLX build has no GPU (Metal or CUDA); use --device cpu")
    use_gpu = has_gpu and name != "cpu"
    mx.set_default_device(mx.gpu if use_gpu else mx.cpu)
    if not use_gpu:
        # MLX keeps only 32 MB of freed CPU buffers for reuse: every larger activation is then fresh memory that
        # the OS must fault in page by page, ~10x the cost of the arithmetic on it. Keep a step's worth instead.
        mx.set_cache_limit(CPU_BUFFER_CACHE_BYTES)
    return "gpu" if use_gpu else "cpu"


def describe_device(device: str) -> str:
    """One line for the banner: the device, the GPU kind, and the BLAS on the CPU."""
    import mlx.core as mx

    if device == "gpu":
        kind = "Metal" if mx.metal.is_available() else "CUDA"
        return f"device: gpu ({kind}), mlx {mx.__version__}"
    return (f"device: cpu ({platform.machine()}, {os.cpu_count()} cores), mlx {mx.__version__}, "
            f"BLAS: {blas_description}, kernels: {jit_description}")
