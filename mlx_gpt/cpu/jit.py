"""MLX's CPU kernel compiler, building for this CPU, and MLX's evaluation order, widened for several CPU streams.

``mx.compile`` turns the elementwise parts of a step into C++ that MLX builds with ``g++ -O3`` and no target flags,
so on x86 every ``exp``, ``erf`` and ``fma`` in them is a scalar call. MLX runs ``g++`` from PATH and caches the
kernels under ``$TMPDIR/mlx/<version>/cpu`` keyed by their source alone, so ``tune_jit`` puts a compiler script
first on PATH and points TMPDIR at a cache of our own (kernels built without the flags are never picked up). The
script adds the flags only to builds whose output lies in that cache: other programs' g++ calls pass through as
they are. Both settings are undone by ``EnvChanges.restore``.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..data import cache_dir
from ..files import atomic_target
from .toolchain import JIT_FLAGS, builds_for_this_cpu, cpu_identity, system_cxx

# How far breadth-first MLX orders a graph for evaluation (its default: 20). With one step's work split over
# several CPU streams, 20 ran long stretches of one stream while the other's thread waited (docs/performance.md).
EVAL_ORDER_WIDTH = "1000"

# The compiler MLX finds first on PATH. It writes under a temporary name and renames into place, so that processes
# sharing the kernel cache (the ranks of one job) never load a half-written library.
_COMPILER_SCRIPT = """#!/bin/sh
# Written by mlx-gpt (mlx_gpt/cpu/jit.py): MLX's CPU kernel compiler, building for this CPU.
out= prev=
for arg in "$@"; do
    [ "$prev" = -o ] && out=$arg
    prev=$arg
done
case "$out" in
    {root}/*) ;;
    *) exec {cxx} "$@" ;;
esac
{cxx} "$@" {flags} -o "$out.$$.tmp" && exec mv -f "$out.$$.tmp" "$out"
status=$?
rm -f "$out.$$.tmp"
exit $status
"""


@dataclass
class EnvChanges:
    """Environment variables this process set, with their values before (None: unset), to undo them."""

    before: dict[str, str | None] = field(default_factory=dict)

    def set(self, name: str, value: str) -> None:
        self.before.setdefault(name, os.environ.get(name))
        os.environ[name] = value

    def restore(self) -> None:
        for name, value in self.before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self.before.clear()


def tune_jit(env: EnvChanges) -> str:
    """Have MLX's CPU JIT build for this CPU (records the PATH and TMPDIR it sets in ``env``); returns what it did."""
    if os.environ.get("MLX_GPT_CPU_JIT", "").strip() == "0":
        return "MLX default (MLX_GPT_CPU_JIT=0)"
    cxx = system_cxx()
    if not builds_for_this_cpu() or cxx is None:
        return "MLX default (no g++)" if cxx is None else "MLX default"
    key = hashlib.sha256("\n".join([cxx, *JIT_FLAGS, cpu_identity(), _COMPILER_SCRIPT]).encode()).hexdigest()[:16]
    root = cache_dir() / "cpu-kernels" / key
    compiler = root / "bin" / "g++"
    if not compiler.exists():
        try:
            _install_compiler(compiler, cxx, root)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"MLX default (could not set up {compiler}: {exc})"
    tempfile.gettempdir()  # Python's own temporary files stay where they were
    env.set("PATH", f"{compiler.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.set("TMPDIR", str(root))
    return f"compiled for this CPU ({' '.join(JIT_FLAGS[:2])}; kernels in {root})"


def _install_compiler(compiler: Path, cxx: str, root: Path) -> None:
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
    script = _COMPILER_SCRIPT.format(root=shlex.quote(str(root)), cxx=shlex.quote(cxx), flags=" ".join(JIT_FLAGS))
    with atomic_target(compiler) as tmp:  # several processes may install at once: each writes the same script
        tmp.write_text(script)
        tmp.chmod(0o755)


def widen_eval_order(env: EnvChanges) -> None:
    """Let MLX's evaluation order interleave the CPU streams' work. MLX reads the setting at its first evaluation;
    a value the user set is kept."""
    if "MLX_BFS_MAX_WIDTH" not in os.environ:
        env.set("MLX_BFS_MAX_WIDTH", EVAL_ORDER_WIDTH)
