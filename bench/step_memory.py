"""Memory of the training step, step by step: MLX's peak of live arrays, its buffer cache, the process's RSS.

    python bench/step_memory.py                                 # the default config, 3 steps
    python bench/step_memory.py --batch_size 16 --cache_limit 0
    python bench/step_memory.py --plain linear activation       # without mlx_gpt/lean_backward.py
    python bench/step_memory.py --config baby --ab 30 --block 20  # step time, lean vs plain, alternating

Per step: MLX's peak (``mx.get_peak_memory()`` after ``mx.reset_peak_memory()``: the arrays alive at once), the
buffer cache after it (``mx.get_cache_memory()``: with a limit above what a step allocates, every buffer it
allocated), the RSS after it and the process's peak RSS, page faults and system time (page faults cost CPU time).
``--ab N`` runs a second trainer with the plain backward in the same process, on the same batches, alternating
blocks of steps N times, and prints the lean step's tokens/s over the plain one's per round.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_gpt import cpu  # noqa: E402

cpu.enable(build_kernels=True, log=None)  # as train.py does, before mlx.core is imported
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from train_speed import configs  # noqa: E402  (bench/: the settings train_speed.py measures)

from mlx_gpt import model as gpt_model  # noqa: E402
from mlx_gpt.device import select_device  # noqa: E402
from mlx_gpt.training import Trainer  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
MIB = 2**20


class PlainMLP(gpt_model.MLP):
    def __call__(self, x: mx.array) -> mx.array:
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))


def trainer(args: argparse.Namespace, plain: list[str]) -> Trainer:
    model_cfg, train_cfg, dataset, tokenizer = configs(args.config, args.data)
    if args.batch_size:
        train_cfg = dataclasses.replace(train_cfg, batch_size=args.batch_size)
    result = Trainer(model_cfg, train_cfg, dataset, tokenizer, log=lambda _: None)
    for _, module in result.model.named_modules():  # the classes the model had before lean_backward
        if "linear" in plain and type(module) is gpt_model.Linear:
            module.__class__ = nn.Linear
        if "activation" in plain and type(module) is gpt_model.MLP:
            module.__class__ = PlainMLP
    return result


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / MIB


def measure(args: argparse.Namespace) -> None:
    tr = trainer(args, args.plain)
    print(f"after setup: arrays {mx.get_active_memory() / MIB:,.0f} MiB, RSS {rss_mib():,.0f} MiB")
    for i in range(args.steps):
        mx.reset_peak_memory()
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        tr.train_step()
        seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        print(f"step {i}: {seconds:.2f} s; MLX peak {mx.get_peak_memory() / MIB:,.0f} MiB, cache "
              f"{mx.get_cache_memory() / MIB:,.0f} MiB, RSS {rss_mib():,.0f} MiB (peak {after.ru_maxrss / 1024:,.0f});"
              f" {after.ru_minflt - before.ru_minflt:,} page faults, system {after.ru_stime - before.ru_stime:.2f} s")


def alternate(args: argparse.Namespace) -> None:
    sides = {"lean": trainer(args, []), "plain": trainer(args, ["linear", "activation"])}
    for tr in sides.values():
        for _ in range(2):
            tr.train_step()
    ratios = []
    for round_ in range(args.ab):
        seconds = {}
        for name in sorted(sides, reverse=round_ % 2 == 1):  # who goes first alternates
            start = time.perf_counter()
            for _ in range(args.block):
                sides[name].train_step()
            seconds[name] = time.perf_counter() - start
        ratios.append(seconds["plain"] / seconds["lean"])
        print(f"round {round_ + 1}: lean {seconds['lean'] / args.block * 1e3:.1f} ms/step, plain "
              f"{seconds['plain'] / args.block * 1e3:.1f}; lean : plain tokens/s {ratios[-1]:.3f}", flush=True)
    low, median, high = statistics.quantiles(ratios, n=4)
    print(f"lean : plain tokens/s, {args.ab} rounds of {args.block} steps: median {median:.3f}, "
          f"quartiles {low:.3f}-{high:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="shakespeare", help="preset (shakespeare: the default config)")
    p.add_argument("--batch_size", type=int, help="instead of the preset's")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="text to train on (Tiny Shakespeare)")
    p.add_argument("--cache_limit", type=float, help="MLX's buffer cache limit in MiB (default: the plug-in's)")
    p.add_argument("--plain", nargs="+", choices=("linear", "activation"), default=[],
                   help="the model's plain backward for these (as before lean_backward)")
    p.add_argument("--ab", type=int, help="alternate with the plain backward this many rounds; print step times")
    p.add_argument("--block", type=int, default=1, help="steps per side per round with --ab")
    args = p.parse_args()
    select_device("cpu")
    if args.cache_limit is not None:
        mx.set_cache_limit(int(args.cache_limit * MIB))
    alternate(args) if args.ab else measure(args)


if __name__ == "__main__":
    main()
