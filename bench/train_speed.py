"""Training speed on this machine: mlx-gpt's real training step vs the same model in PyTorch, side by side.

    python bench/train_speed.py                       # baby and default configs, 3 pairs each
    python bench/train_speed.py --configs baby --pairs 5
    python bench/train_speed.py --sides mlx           # MLX only (also what happens without PyTorch)
    python bench/train_speed.py --sides mlx --baseline ../old-checkout   # this revision against another one
    python bench/train_speed.py --sides mlx --configs baby --blas numpy system   # MLX with each BLAS, interleaved
    python bench/train_speed.py --sides mlx --dtype float32 bfloat16 float16     # MLX in each dtype, interleaved

Each measurement runs in its own process, the two sides interleaved (MLX, PyTorch, MLX, PyTorch ...), so a
machine whose speed drifts (other work, thermal limits) moves both alike; every pair gives a ratio. The MLX
side is mlx_gpt.training.Trainer.train_step (the compiled step train.py runs: batch, forward, backward,
clipping, AdamW); the PyTorch side is bench/torch_gpt.py, eager, started from the same initial weights
and fed the same batches. A third kind of process measures float32 matmul throughput (numpy, 2048^3)
between the pairs: '% of sgemm' is the model's FLOPs per second (nanoGPT's estimate: 6 N + 12 L T C per
token) over that peak. Peak memory is each process's maximum resident set size (what the OS gives the process:
arrays, MLX's buffer cache, libraries), the largest over a side's processes; for the MLX side also MLX's own peak
(``mx.get_peak_memory()``: the arrays alive at once, without the buffer cache).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
CONFIGS = {"baby": "baby", "default": "shakespeare"}  # name in the table -> preset
# (warm-up steps, timed steps) per config: the default config takes seconds per step on a CPU. Baby's window is ~5 s:
# with 30 steps (1.5 s) the ratio per pair swung from 0.8 to 1.3 with this VM's bursts.
STEPS = {"baby": (10, 100), "default": (1, 3)}
DTYPES = ("float32", "bfloat16", "float16")
sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------- child processes


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / 1024 / (1024 if sys.platform == "darwin" else 1)


def configs(preset: str, data: str, dtype: str = "float32") -> tuple:
    from mlx_gpt.config import GPTConfig, TrainConfig, load_preset, split_fields
    from mlx_gpt.data import Dataset

    model_values, train_values = split_fields(load_preset(preset))
    model_cfg = GPTConfig.from_dict(model_values)
    train_cfg = TrainConfig.from_dict({**train_values, "out_dir": tempfile.gettempdir(), "dtype": dtype})
    dataset, tokenizer = Dataset.load(data, model_cfg.block_size)
    model_cfg = GPTConfig.from_dict({**model_cfg.to_dict(), "vocab_size": tokenizer.vocab_size})
    return model_cfg, train_cfg, dataset, tokenizer


def time_steps(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def run_mlx(preset: str, data: str, warmup: int, steps: int, init_path: str, dtype: str = "float32") -> dict:
    from mlx_gpt import cpu

    plugin = cpu.enable(build_kernels=True, log=None)  # as train.py does, before mlx.core is imported
    import mlx.core as mx

    from mlx_gpt.device import describe_device, select_device
    from mlx_gpt.training import Trainer

    device = select_device("cpu")
    model_cfg, train_cfg, dataset, tokenizer = configs(preset, data, dtype)
    trainer = Trainer(model_cfg, train_cfg, dataset, tokenizer, log=lambda _: None)
    if not Path(init_path).exists():  # the PyTorch side starts from these same weights
        import numpy as np
        from mlx.utils import tree_flatten

        np.savez(init_path, **{k: np.array(v) for k, v in tree_flatten(trainer.model.parameters())})
    times = time_steps(trainer.train_step, warmup, steps)
    return {"times": times, "params": trainer.model.num_params(), "mlx_peak_mib": mx.get_peak_memory() / 2**20,
            "device": "; ".join([describe_device(device), *plugin])}


def run_torch(preset: str, data: str, warmup: int, steps: int, init_path: str) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from torch_gpt import TorchGPT, make_optimizer

    from mlx_gpt.data import BatchSampler

    torch.set_num_threads(os.cpu_count() or 1)
    model_cfg, train_cfg, dataset, _ = configs(preset, data)
    model = TorchGPT(model_cfg)
    with np.load(init_path) as weights:
        model.load_flat(dict(weights))
    model.train()
    optimizer = make_optimizer(model, train_cfg.learning_rate, (train_cfg.beta1, train_cfg.beta2),
                               train_cfg.weight_decay)
    sampler = BatchSampler(dataset.train, model_cfg.block_size, train_cfg.batch_size, train_cfg.seed)

    def step() -> float:
        x, y = sampler.next_batch()
        loss = model(torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        return loss.item()

    times = time_steps(step, warmup, steps)
    return {"times": times, "device": f"torch {torch.__version__}, {torch.get_num_threads()} threads"}


def run_sgemm() -> dict:
    import numpy as np

    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    b = a.T.copy()
    times = time_steps(lambda: a @ b, 2, 5)
    return {"gflops": 2 * 2048**3 / statistics.median(times) / 1e9}


def child_main(args: argparse.Namespace) -> None:
    if args.child == "mlx":
        result = run_mlx(args.preset, args.data, args.warmup, args.steps, args.init, args.dtype[0])
    elif args.child == "torch":
        result = run_torch(args.preset, args.data, args.warmup, args.steps, args.init)
    else:
        result = run_sgemm()
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result))


# ----------------------------------------------------------------------------- the parent


def spawn(kind: str, *extra: str, root: Path = ROOT) -> dict:
    """A child process of ``kind`` (mlx, torch, sgemm; mlx/BLAS: MLX with MLX_GPT_OPENBLAS=BLAS; mlx/DTYPE: MLX
    computing in DTYPE), from this checkout or from ``root`` (another revision's)."""
    kind, _, variant = kind.partition("/")
    dtype = ["--dtype", variant] if variant in DTYPES else []
    env = {**os.environ, "MLX_GPT_OPENBLAS": variant} if variant and not dtype else None
    cmd = [sys.executable, str(root / "bench" / "train_speed.py"), "--child", kind, *extra, *dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{kind} child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def flops_per_step(params: int, preset: str, data: str) -> float:
    model_cfg, train_cfg, _, _ = configs(preset, data)
    per_token = 6 * params + 12 * model_cfg.n_layer * model_cfg.block_size * model_cfg.n_embd
    return per_token * model_cfg.block_size * train_cfg.batch_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["baby", "default"])
    p.add_argument("--sides", nargs="+", choices=("mlx", "torch"), default=["mlx", "torch"])
    p.add_argument("--pairs", type=int, default=3, help="interleaved rounds per config")
    p.add_argument("--steps", type=int, help="timed steps per process (default: 100 baby, 3 default)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="text to train on (Tiny Shakespeare)")
    p.add_argument("--baseline", type=Path, help="another checkout of mlx-gpt: its MLX step, interleaved with ours")
    p.add_argument("--blas", nargs="+", choices=("numpy", "system"),
                   help="MLX side once per BLAS (MLX_GPT_OPENBLAS=numpy or system), interleaved; default: as set")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=["float32"],
                   help="MLX side once per compute dtype, interleaved (PyTorch stays float32)")
    p.add_argument("--child", choices=("mlx", "torch", "sgemm"), help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    p.add_argument("--init", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(args)
        return
    sides = list(args.sides)
    if "torch" in sides and importlib.util.find_spec("torch") is None:
        print("PyTorch is not installed: measuring the MLX side only")
        sides.remove("torch")
    if "mlx" not in sides:  # the MLX process writes the shared initial weights
        sides.insert(0, "mlx")
    if args.blas and len(args.dtype) > 1:
        p.error("--blas and several --dtype: pick one of them")
    if args.blas:
        sides[sides.index("mlx"):sides.index("mlx") + 1] = [f"mlx/{blas}" for blas in args.blas]
    elif args.dtype != ["float32"]:
        sides[sides.index("mlx"):sides.index("mlx") + 1] = [f"mlx/{dtype}" for dtype in args.dtype]
    if args.baseline:
        sides.append("baseline")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            preset = CONFIGS[name]
            warmup, steps = STEPS[name]
            steps = args.steps or steps
            init = str(Path(tmp) / f"{name}-init.npz")
            common = ["--preset", preset, "--data", args.data, "--warmup", str(warmup), "--steps", str(steps),
                      "--init", init]
            results: dict[str, list[dict]] = {side: [] for side in sides}
            peaks = []
            for pair in range(args.pairs):
                peaks.append(spawn("sgemm")["gflops"])
                for side in sides:
                    results[side].append(spawn("mlx", *common, root=args.baseline.resolve()) if side == "baseline"
                                         else spawn(side, *common))
                    print(f"{name} pair {pair + 1}/{args.pairs} {side}: "
                          f"{statistics.median(results[side][-1]['times']) * 1e3:.1f} ms/step", flush=True)
            rows.append((name, preset, results, peaks))
    report(rows, args.data)


def report(rows: list, data: str) -> None:
    print()
    first = rows[0][2]
    for side, runs in first.items():
        print(f"{side}: {runs[0]['device']}")
    print()
    print("| config | side | ms/step (median) | tokens/s | % of sgemm peak | peak RSS (MiB) | MLX peak (MiB) |")
    print("|---|---|---|---|---|---|---|")
    summary = []
    for name, preset, results, peaks in rows:
        model_cfg, train_cfg, _, _ = configs(preset, data)
        tokens = model_cfg.block_size * train_cfg.batch_size
        mlx_sides = [side for side in results if side.startswith("mlx")]
        flops = flops_per_step(results[mlx_sides[0]][0]["params"], preset, data)
        peak = statistics.median(peaks)
        medians, rss = {}, {}
        for side, runs in results.items():
            per_run = [statistics.median(r["times"]) for r in runs]
            ms = statistics.median(per_run)
            medians[side] = per_run
            rss[side] = max(r["peak_rss_mib"] for r in runs)
            mlx_peak = max((r["mlx_peak_mib"] for r in runs if "mlx_peak_mib" in r), default=None)
            print(f"| {name} | {side} | {ms * 1e3:.1f} | {tokens / ms:,.0f} | {100 * flops / ms / 1e9 / peak:.0f} % "
                  f"| {rss[side]:,.0f} | {'-' if mlx_peak is None else f'{mlx_peak:,.0f}'} |")
        # The first MLX side's tokens/s over each other side's (another BLAS, PyTorch), pair by pair.
        for other in [side for side in medians if side != mlx_sides[0]]:
            ratios = [o / m for m, o in zip(medians[mlx_sides[0]], medians[other], strict=True)]
            label = "MLX/PyTorch" if (mlx_sides[0], other) == ("mlx", "torch") else f"{mlx_sides[0]} : {other}"
            summary.append(f"{name}: {label} tokens/s per pair {', '.join(f'{r:.2f}' for r in ratios)}; "
                           f"median {statistics.median(ratios):.2f}")
        summary.append(f"{name}: peak RSS (MiB, the largest of each side's processes) "
                       + ", ".join(f"{side} {mib:,.0f}" for side, mib in rss.items()) + "; "
                       + ", ".join(f"{mlx_sides[0]} : {other} {rss[mlx_sides[0]] / mib:.2f}"
                                   for other, mib in rss.items() if other != mlx_sides[0]))
        summary.append(f"{name}: sgemm peak {peak:.0f} GFLOP/s (numpy float32 2048^3, median of "
                       f"{len(peaks)}); {flops / 1e9:.1f} GFLOP per step")
    print()
    print("\n".join(summary))


if __name__ == "__main__":
    main()
