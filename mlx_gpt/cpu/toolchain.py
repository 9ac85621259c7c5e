"""What the plug-in compiles with: whether to build here at all, the compiler, the CPU, the flags, the cache."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import sys
from pathlib import Path

# Flags that let g++ vectorise MLX-style loops without changing a result (no fast-math):
# -march=native: this CPU's vector units and FMA; -fno-trapping-math: NaN/range checks become blends (only the
# order of floating-point exception flags may change, and nothing reads them); -fno-math-errno: sqrt without the
# errno check, so loops with sqrt/rsqrt vectorise; vect-max-version-for-alias-checks: fused kernels have a dozen
# pointers, past g++'s default of 10 overlap checks; -finline-limit: inlines simd::exp/erf into the loop.
VECTORISE_FLAGS = ("-march=native", "-fno-trapping-math", "-fno-math-errno",
                   "--param=vect-max-version-for-alias-checks=64", "-finline-limit=10000")

# Added to MLX's own kernel compiler command. -ffp-contract=off: no a*b+c fused where MLX's source has two
# operations (g++'s ISO C++ default, stated because bit-identical results depend on it).
JIT_FLAGS = (*VECTORISE_FLAGS, "-ffp-contract=off")

# The C++ kernels of csrc/ sum in explicit lanes, so they may fuse multiply-adds (twice the arithmetic per
# instruction in attention's loops, and more exact). NB_DOMAIN: see native.py.
KERNEL_FLAGS = ("-std=c++20", "-O3", "-DNDEBUG", "-fPIC", "-shared", "-fvisibility=hidden", *VECTORISE_FLAGS,
                "-ffp-contract=fast", "-DNB_DOMAIN=mlx")


def builds_for_this_cpu() -> bool:
    """Whether the plug-in compiles anything here (MLX's JIT flags, the C++ kernels): Linux on x86-64 or arm64."""
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


def system_cxx() -> str | None:
    """The real g++ (not the compiler script that ``jit.tune_jit`` puts first on PATH), or None."""
    search = os.pathsep.join(entry for entry in os.environ.get("PATH", "").split(os.pathsep)
                             if Path(entry).parent.parent.name != "cpu-kernels")
    cxx = shutil.which("g++", path=search)
    return os.path.realpath(cxx) if cxx is not None else None
