"""The GPU check: tests, baby runs, the default config's speed and sampling speed on this machine's GPU, one table.

    bench/gpu_check.sh              # a GPU (CUDA: mlx[cuda] installed first; Metal on a Mac), under 10 minutes
    bench/gpu_check.sh --cpu        # the same checks on the CPU, scaled down (to check the script itself)
    python bench/gpu_check.py --cpu --baby_iters 20   # any plan setting can be overridden

Each stage runs in its own process with a time limit (what is left of --budget seconds); a stage that fails or
runs out of time is a row that says so, and the next stage still runs. The stages:

1. the tests that exercise the device: model, sampling, training, checkpoint, precision (MLX_ENABLE_TF32=0: float32
   matmuls on CUDA in full float32, so that the tests' tolerances against float32 references hold);
2. ``train.py --config baby`` in float32 and in the fast dtype (``--dtype auto``'s choice on this device;
   bfloat16 on the CPU, where auto is float32), evaluated on the whole val split (``--eval_whole_val``) at the end;
3. the default config (6 layers, 384 wide, block 256, batch 64) for a fixed number of steps per dtype: tokens/s
   (after warm-up steps) and MLX's peak memory;
4. ``bench/sample_speed.py``: tokens/s without a cache, with the KV cache, and batched.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
GPU_TESTS = ["tests/test_model.py", "tests/test_sampling.py", "tests/test_training.py", "tests/test_checkpoint.py",
             "tests/test_precision.py"]
# What each mode runs: the GPU's full check fits in ~10 minutes; the CPU's checks the script in a few.
PLANS = {
    "gpu": {"tests": GPU_TESTS, "baby_iters": 2000, "default_steps": 200, "default_warmup": 5,
            "default_dtypes": ["float32", "bfloat16", "float16"], "sample_tokens": 500,
            "sample_configs": "baby,default"},
    # MLX's CPU matmuls in bfloat16/float16 are ~15x slower than float32's BLAS: the half-precision runs are short
    "cpu": {"tests": ["tests/test_precision.py"], "baby_iters": 40, "default_steps": 2, "default_warmup": 1,
            "default_dtypes": ["float32"], "sample_tokens": 50, "sample_configs": "baby"},
}


# ----------------------------------------------------------------------------- a child: the default config's speed


def speed_child(args: argparse.Namespace) -> None:
    """Train the default config for warm-up + timed steps in one dtype; print RESULT {tokens/s, peak memory}."""
    sys.path.insert(0, str(ROOT))
    from mlx_gpt import cpu

    cpu.enable(build_kernels=True, log=None)  # as train.py does, before mlx.core is imported
    import mlx.core as mx
    from train_speed import configs  # bench/: the settings train_speed.py measures

    from mlx_gpt.device import select_device
    from mlx_gpt.training import Trainer

    select_device(args.device)
    model_cfg, train_cfg, dataset, tokenizer = configs("shakespeare", args.data, args.dtype)
    trainer = Trainer(model_cfg, train_cfg, dataset, tokenizer, log=lambda _: None)
    for _ in range(args.warmup):
        trainer.train_step()
    start = time.perf_counter()
    losses = [trainer.train_step()[0] for _ in range(args.steps)]
    seconds = time.perf_counter() - start
    tokens = args.steps * train_cfg.batch_size * model_cfg.block_size
    print("RESULT " + json.dumps({"tokens_per_s": tokens / seconds, "ms_per_step": 1e3 * seconds / args.steps,
                                  "peak_gib": mx.get_peak_memory() / 2**30, "last_loss": losses[-1],
                                  "dtype": trainer.cfg.dtype}))


# ----------------------------------------------------------------------------- the stages


class Check:
    """The stages, each a subprocess within what is left of the time budget, and the table's rows."""

    def __init__(self, device: str, plan: dict, data: str, budget: float, work: Path) -> None:
        self.device, self.plan, self.data, self.work = device, plan, data, work
        self.deadline = time.monotonic() + budget
        self.rows: list[tuple[str, str, str, str]] = []  # stage, setting, result, seconds

    def run(self, stage: str, setting: str, cmd: list[str], env: dict | None = None, check: bool = True
            ) -> subprocess.CompletedProcess | None:
        """Run ``cmd``; on a timeout (or a failure, with ``check``) add the row saying so and return None."""
        left = self.deadline - time.monotonic()
        if left < 5:
            self.rows.append((stage, setting, "skipped: out of time (--budget)", "-"))
            return None
        print(f"== {stage}: {setting}", flush=True)
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=left,
                                  env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            self.rows.append((stage, setting, "stopped: out of time (--budget)", f"{time.monotonic() - start:.0f}"))
            return None
        self.seconds = time.monotonic() - start
        if check and proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            self.rows.append((stage, setting, f"FAILED (exit {proc.returncode}): {tail[:200]}", f"{self.seconds:.0f}"))
            return None
        return proc

    def tests(self) -> None:
        setting = " ".join(Path(t).stem.removeprefix("test_") for t in self.plan["tests"]) + " (TF32 off)"
        proc = self.run("tests", setting, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                           *self.plan["tests"]], env={"MLX_ENABLE_TF32": "0"}, check=False)
        if proc is None:
            return
        counts = [line for line in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
        failed = [line.split(" - ")[0].split("::")[-1] for line in proc.stdout.splitlines()
                  if line.startswith(("FAILED ", "ERROR "))]
        result = (counts[-1].strip("= ") if counts else f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}")
        self.rows.append(("tests", setting, result + (f"; failed: {', '.join(failed)}" if failed else ""),
                          f"{self.seconds:.0f}"))

    def baby(self, dtype: str) -> None:
        out = self.work / f"baby-{dtype}"
        iters = self.plan["baby_iters"]
        setting = f"--config baby --dtype {dtype}, {iters} iters"
        proc = self.run("baby run", setting, [
            sys.executable, "train.py", "--config", "baby", "--data", self.data, "--out_dir", str(out), "--dtype",
            dtype, "--device", self.device, "--max_iters", str(iters), "--lr_decay_iters", str(iters),
            "--eval_interval", str(iters), "--eval_whole_val", "--log_interval", str(max(1, iters // 10))])
        if proc is None:
            return
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        val = [r["val_loss"] for r in records if r.get("val_loss") is not None][-1]
        speeds = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
        result = f"whole val split {val:.4f}"
        if len(speeds) > 1:  # the first window includes compilation
            result += f"; {speeds[-1]:,.0f} tok/s at the end"
        self.rows.append(("baby run", setting, result, f"{self.seconds:.0f}"))

    def default_speed(self, dtype: str) -> None:
        steps, warmup = self.plan["default_steps"], self.plan["default_warmup"]
        setting = f"default config, --dtype {dtype}, {steps} steps after {warmup} warm-up"
        proc = self.run("default config", setting, [
            sys.executable, __file__, "--child", "--dtype", dtype, "--device", self.device, "--data", self.data,
            "--steps", str(steps), "--warmup", str(warmup)])
        if proc is None:
            return
        r = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
        self.rows.append(("default config", setting, f"{r['tokens_per_s']:,.0f} tok/s ({r['ms_per_step']:.1f} ms/step)"
                          f", peak {r['peak_gib']:.2f} GiB, loss {r['last_loss']:.3f}", f"{self.seconds:.0f}"))

    def sampling(self) -> None:
        tokens, configs = self.plan["sample_tokens"], self.plan["sample_configs"]
        setting = f"{configs}, {tokens} new tokens"
        proc = self.run("sampling", setting, [sys.executable, "bench/sample_speed.py", "--no_torch", "--device",
                                              self.device, "--tokens", str(tokens), "--configs", configs])
        if proc is None:
            return
        for line in proc.stdout.splitlines():  # its table: | config | path | samples | new tokens | seconds | tok/s |
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 6 and cells[0] in configs.split(","):
                self.rows.append(("sampling", f"{cells[0]}: {cells[1]}", f"{cells[5]} tok/s", cells[4]))

    def table(self) -> str:
        lines = ["| stage | setting | result | seconds |", "|---|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in self.rows]
        return "\n".join(lines)


def fast_dtype(device: str) -> str:
    """auto's choice here; on the CPU (where that is float32) bfloat16, so that the half-precision path runs too."""
    sys.path.insert(0, str(ROOT))
    from mlx_gpt.precision import auto_dtype

    chosen = auto_dtype(device)
    return "bfloat16" if chosen == "float32" else chosen


def describe(device: str) -> str:
    sys.path.insert(0, str(ROOT))
    import mlx.core as mx

    from mlx_gpt.device import describe_device

    try:
        name = mx.device_info(mx.gpu if device == "gpu" else mx.cpu).get("device_name", "?")
    except (RuntimeError, ValueError) as exc:  # no such device in this MLX build
        name = f"device_info failed: {exc}"
    return f"{describe_device(device)}; {name}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU, scaled down")
    p.add_argument("--budget", type=float, default=570, help="seconds for all stages (default: 570)")
    p.add_argument("--data", default=str(DEFAULT_DATA) if DEFAULT_DATA.is_file() else None,
                   help="Tiny Shakespeare (default: the copy beside the project)")
    p.add_argument("--skip", nargs="*", default=[], choices=("tests", "baby", "default", "sampling"))
    for name in ("baby_iters", "default_steps", "default_warmup", "sample_tokens"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--device", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        speed_child(args)
        return 0
    if args.data is None:
        p.error("pass --data: the path of Tiny Shakespeare (no copy beside the project)")
    device = "cpu" if args.cpu else "gpu"
    plan = {**PLANS[device], **{k: v for k, v in vars(args).items() if k in PLANS[device] and v is not None}}
    fast = fast_dtype(device)
    print(f"gpu_check: {describe(device)}; fast dtype {fast}; budget {args.budget:.0f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
        check = Check(device, plan, args.data, args.budget, Path(work))
        start = time.monotonic()
        if "tests" not in args.skip:
            check.tests()
        if "baby" not in args.skip:
            for dtype in ("float32", fast):
                check.baby(dtype)
        if "default" not in args.skip:
            for dtype in plan["default_dtypes"]:
                check.default_speed(dtype)
        if "sampling" not in args.skip:
            check.sampling()
    print(f"\n{describe(device)}; {time.monotonic() - start:.0f} s in all\n")
    print(check.table())
    return 0 if all("FAILED" not in row[2] and " failed" not in row[2] for row in check.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
