"""Kernels written in C++ for MLX's CPU backend (``csrc/``), built on this machine the first time they are needed.

Why: some parts of a step are, in MLX ops on the CPU, many small scheduled operations: LayerNorm is
``mx.fast.layer_norm``'s fallback graph (seven reductions and a few elementwise kernels, forward and backward), and
attention at short sequences is ~30 operations a layer around small matmuls. ``csrc/layer_norm.cpp`` and
``csrc/attention.cpp`` do each as one custom MLX primitive per direction, which MLX runs like its own, in graphs,
under ``mx.compile`` and on any CPU stream; ``ops.py`` chooses them and says when (README, Performance: a baby
step ~8 % faster from each).

How: the first process that needs a kernel compiles its source with g++ against the installed MLX (its headers
and ``libmlx``) and nanobind's sources (the ``nanobind`` package: MLX's own bindings use it, and a module must share
their ABI and domain to pass ``mx.array`` back and forth). The result is cached per source, MLX, Python, nanobind,
compiler and CPU under ``~/.cache/mlx-gpt/native/<key>/``, written under a temporary name and renamed into place
(ranks of one job may build at once). Takes ~10 s a kernel, once.

Whatever is missing (Linux, g++, Python's headers, nanobind) or fails (the build, or a trial call when this MLX's
nanobind ABI differs) leaves MLX's own ops in use, and ``describe`` says why (the training banner prints it).
``MLX_GPT_FAST_CPU_OPS=0`` turns these kernels off along with the other CPU versions (``ops.py``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import mlx.core as mx

from . import backend
from .data import cache_dir

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"

# MLX builds its Python module with NB_DOMAIN=mlx; a module in another domain would not know mx.array.
NANOBIND_DOMAIN = "mlx"

# No fast-math: the kernels' sums are in explicit lanes, not reassociated by the compiler. The vectorising flags are
# those of backend.JIT_FLAGS (there, why each is needed), but multiply-adds are fused where the CPU has FMA
# (-ffp-contract=fast): twice the arithmetic per instruction in attention's inner loops, and more exact.
CXX_FLAGS = ("-std=c++20", "-O3", "-DNDEBUG", "-fPIC", "-shared", "-fvisibility=hidden", "-march=native",
             "-fno-math-errno", "-fno-trapping-math", "--param=vect-max-version-for-alias-checks=64",
             "-finline-limit=10000", "-ffp-contract=fast", f"-DNB_DOMAIN={NANOBIND_DOMAIN}")

# Per kernel: where it was loaded from, or why MLX's own ops stand in for it (for the banner); set by load().
status: dict[str, str] = {}


def _build_inputs() -> tuple[str, list[str], str] | str:
    """(the compiler, its arguments but the source and output, what else the build depends on) to build a module
    here, or why one cannot be built."""
    if not backend.builds_for_this_cpu():
        return f"not built for {sys.platform}/{platform.machine()} (Linux only)"
    cxx = backend.system_cxx()
    if cxx is None:
        return "no g++ on PATH"
    python_include = Path(sysconfig.get_paths()["include"])
    if not (python_include / "Python.h").is_file():
        return f"Python's headers are missing ({python_include}/Python.h; Debian/Ubuntu: apt-get install python3-dev)"
    try:
        import nanobind
    except ImportError:
        return "nanobind is not installed (pip install nanobind)"
    mlx_dir = Path(mx.__file__).parent
    nanobind_dir = Path(nanobind.__file__).parent
    includes = [SOURCE_DIR, nanobind.include_dir(), nanobind_dir / "ext" / "robin_map" / "include", python_include,
                mlx_dir / "include"]
    args = [*CXX_FLAGS, *(f"-I{path}" for path in includes), str(Path(nanobind.source_dir()) / "nb_combined.cpp"),
            f"-L{mlx_dir / 'lib'}", "-lmlx", f"-Wl,-rpath,{mlx_dir / 'lib'}"]
    depends = f"mlx {mx.__version__}, nanobind {nanobind.__version__}, python {sys.version}\n{backend.cpu_identity()}"
    return cxx, args, depends


def _compile(cxx: str, args: list[str], source: Path, target: Path) -> str | None:
    """Build ``source`` into the module ``target``; None, or the compiler's complaint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    command = [cxx, str(source), *args, "-o", str(tmp)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
            return f"build failed: {errors[0] if errors else f'g++ exited with {result.returncode}'}"
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"build failed: {exc}"
    finally:
        tmp.unlink(missing_ok=True)
    return None


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache
def load(name: str) -> ModuleType | None:
    """The module built from ``csrc/<name>.cpp`` (imported as ``_<name>``), building it if needed; None if it
    cannot be used here (``status[name]`` says why)."""
    inputs = _build_inputs()
    if isinstance(inputs, str):
        status[name] = f"MLX's own ops ({inputs})"
        return None
    cxx, args, depends = inputs
    source = SOURCE_DIR / f"{name}.cpp"
    headers = [header.read_text() for header in sorted(SOURCE_DIR.glob("*.h"))]
    key = hashlib.sha256("\n".join([source.read_text(), *headers, cxx, *args, depends]).encode()).hexdigest()
    target = cache_dir() / "native" / key[:16] / f"_{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not target.exists():
        problem = _compile(cxx, args, source, target)
        if problem is not None:
            status[name] = f"MLX's own ops ({problem})"
            return None
    try:
        module = _import(f"_{name}", target)
        module.trial(mx.array(0.0))  # passes an mx.array through: a TypeError if this MLX's nanobind ABI differs
    except (ImportError, OSError, TypeError, AttributeError) as exc:
        status[name] = f"MLX's own ops ({target} does not load with this MLX: {exc})"
        return None
    status[name] = f"built for this CPU ({target.parent.parent})"
    return module


def describe(names: tuple[str, ...]) -> str:
    """One line on these kernels for the banner (loading them first, so building them if they are to be)."""
    for name in names:
        load(name)
    said = {name: status[name] for name in names}
    if len(set(said.values())) == 1:
        return f"{', '.join(names)}: {next(iter(said.values()))}"
    return "; ".join(f"{name}: {text}" for name, text in said.items())
