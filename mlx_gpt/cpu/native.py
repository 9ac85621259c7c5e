"""Kernels written in C++ for MLX's CPU backend (``csrc/``), built on this machine the first time training asks.

The first process that needs a kernel compiles its source with g++ against the installed MLX (its headers and
``libmlx``) and nanobind's sources (MLX's own bindings use nanobind, and a module must share their ABI and domain
to pass ``mx.array`` back and forth). The result is cached per source, MLX, Python, nanobind, compiler and CPU
under ``~/.cache/mlx-gpt/native/<key>/`` and written atomically (the ranks of one job may build at once).
Whatever is missing or fails leaves MLX's own ops in use, and ``status`` says why (the training banner prints it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import platform
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import mlx.core as mx

from ..data import cache_dir
from ..files import atomic_target
from .toolchain import KERNEL_FLAGS, builds_for_this_cpu, cpu_identity, system_cxx

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"

# Per kernel: where it was loaded from, or why MLX's own ops stand in for it (for the banner); set by load().
status: dict[str, str] = {}
_loaded: dict[str, ModuleType | None] = {}
NOT_BUILT = "MLX's own ops (not built yet: training builds it)"


def _build_inputs() -> tuple[str, list[str], str] | str:
    """(the compiler, its arguments but the source and output, what else the build depends on) to build a module
    here, or why one cannot be built."""
    if not builds_for_this_cpu():
        return f"not built for {sys.platform}/{platform.machine()} (Linux only)"
    cxx = system_cxx()
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
    args = [*KERNEL_FLAGS, *(f"-I{path}" for path in includes), str(Path(nanobind.source_dir()) / "nb_combined.cpp"),
            f"-L{mlx_dir / 'lib'}", "-lmlx", f"-Wl,-rpath,{mlx_dir / 'lib'}"]
    depends = f"mlx {mx.__version__}, nanobind {nanobind.__version__}, python {sys.version}\n{cpu_identity()}"
    return cxx, args, depends


class BuildError(Exception):
    """A kernel did not build: the compiler's first error line."""


def _compile(cxx: str, args: list[str], source: Path, target: Path) -> None:
    """Build ``source`` into the module ``target`` (atomically)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_target(target) as tmp:
            result = subprocess.run([cxx, str(source), *args, "-o", str(tmp)], capture_output=True, text=True,
                                    timeout=600)
            if result.returncode != 0:
                errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
                raise BuildError(errors[0] if errors else f"g++ exited with {result.returncode}")
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(str(exc)) from None


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name: str, build: bool = False, log: Callable[[str], None] | None = None) -> ModuleType | None:
    """The module built from ``csrc/<name>.cpp`` (imported as ``_<name>``), building it first if ``build`` (saying
    so through ``log``); None if it cannot be used here or is not built yet (``status[name]`` says why)."""
    if name not in _loaded or (build and status[name] == NOT_BUILT):
        _loaded[name] = _load(name, build, log)
    return _loaded[name]


def _load(name: str, build: bool, log: Callable[[str], None] | None) -> ModuleType | None:
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
        if not build:
            status[name] = NOT_BUILT
            return None
        if log is not None:
            log(f"building the C++ kernel {name} for this CPU (once, ~10 s)")
        try:
            _compile(cxx, args, source, target)
        except BuildError as exc:
            status[name] = f"MLX's own ops (build failed: {exc})"
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
    """One line on these kernels (after ``load``) for the banner."""
    said = {name: status.get(name, "MLX's own ops (not loaded)") for name in names}
    if len(set(said.values())) == 1:
        return f"{', '.join(names)}: {next(iter(said.values()))}"
    return "; ".join(f"{name}: {text}" for name, text in said.items())
