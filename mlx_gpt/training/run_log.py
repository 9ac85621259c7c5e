"""What a run tells its user: the banner, the progress bar (or plain lines without a terminal), the ETA note,
``out_dir/metrics.jsonl`` (one strict-JSON record per line: non-finite numbers are written as null), and with
``--plot`` the picture of it, ``out_dir/loss.png``."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .. import ops
from ..config import GPTConfig, TrainConfig
from ..data import Dataset
from ..device import describe_device
from ..plot import LivePlot
from ..precision import describe as describe_precision

# An ETA above this on the CPU earns a note; models no larger than this config's get no "--config baby" hint.
SLOW_RUN_SECONDS = 15 * 60
BABY_SIZE = (4, 128, 64)  # n_layer, n_embd, block_size


def banner(model_cfg: GPTConfig, cfg: TrainConfig, dataset: Dataset, device: str, num_params: int,
           world_size: int = 1, requested_dtype: str | None = None) -> str:
    """The lines a run starts with; ``requested_dtype``: the --dtype asked for, when ``cfg.dtype`` resolved it."""
    sequences = cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    processes = f" x {world_size} processes" if world_size > 1 else ""
    lines = [
        describe_device(device),
        f"data: {dataset.source} ({len(dataset.train):,} train / {len(dataset.val):,} val characters, "
        f"vocab {model_cfg.vocab_size})",
        f"model: {model_cfg.n_layer} layers, {model_cfg.n_head} heads, {model_cfg.n_embd} wide, block "
        f"{model_cfg.block_size}; number of parameters: {num_params / 1e6:.2f}M",
        f"batch: {cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation{processes} = {sequences} "
        f"sequences ({sequences * model_cfg.block_size:,} tokens) per step; "
        f"compile: {'on' if cfg.compile else 'off'}; out_dir: {cfg.out_dir}",
        describe_precision(cfg.dtype, requested_dtype),
        *ops.describe(),
    ]
    return "\n".join(lines)


def strict(value: Any) -> Any:
    """``value`` with non-finite floats as None (strict JSON has no NaN or Infinity)."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


class RunLog:
    """Rank 0's voice: log lines above the progress bar, the bar itself, and metrics.jsonl."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, model_cfg: GPTConfig, tokens_per_step: int, start: int,
                 device: str, is_main: bool, log: Callable[[str], None]) -> None:
        self.metrics_path = out_dir / "metrics.jsonl"
        self.cfg, self.model_cfg, self.tokens_per_step, self.device = cfg, model_cfg, tokens_per_step, device
        self.is_main, self.log = is_main, log if is_main else (lambda _: None)
        self.bar = tqdm(total=cfg.max_iters, initial=start, desc="train", dynamic_ncols=True,
                        disable=None if is_main else True, file=sys.stdout)
        self.metrics_failed = False
        # --plot: redrawn in a background thread after each evaluation; it never raises
        self.live_plot = LivePlot(out_dir, log=self.say) if cfg.plot and is_main else None
        self.windows = 0  # log windows seen: the first includes compilation, so the ETA waits for the second
        self.window_start, self.window_steps = time.perf_counter(), 0

    def say(self, message: str) -> None:
        """A log line above the progress bar (rank 0 only)."""
        if self.is_main:
            tqdm.write(message, file=sys.stdout)

    def metrics(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        line = json.dumps({k: strict(v) for k, v in record.items()}, allow_nan=False)
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as exc:  # a log, not the work: never stop training for it
            if not self.metrics_failed:
                self.metrics_failed = True
                self.log(f"warning: could not append to {self.metrics_path} ({exc.strerror or exc}); "
                         "training goes on, some metrics are missing")

    def step(self, iteration: int, loss: float, norm: float, lr: Callable[[], float],
             loss_scale: Callable[[], float] | None = None) -> None:
        """After each step: the bar, and every log_interval steps a line, a metrics record (with float16's
        ``loss_scale``) and the ETA note."""
        self.window_steps += 1
        self.bar.update(1)
        if iteration % self.cfg.log_interval and iteration != self.cfg.max_iters:
            return
        elapsed = time.perf_counter() - self.window_start
        tok_s = self.window_steps * self.tokens_per_step / max(elapsed, 1e-9)
        rate = lr()
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{rate:.2e}", tok_s=f"{tok_s:,.0f}")
        if self.bar.disable:  # no terminal (a log file, CI): plain lines instead of the bar
            self.say(f"iter {iteration}: loss {loss:.4f}, lr {rate:.2e}, {tok_s:,.0f} tok/s")
        scale = {"loss_scale": loss_scale()} if loss_scale is not None else {}
        self.metrics({"iter": iteration, "tokens": iteration * self.tokens_per_step, "loss": loss, "lr": rate,
                      "grad_norm": norm, **scale, "tokens_per_s": tok_s, "time": time.time()})
        self.windows += 1
        if self.windows == 2:
            self._eta_note(elapsed / self.window_steps, iteration)
        self.window_start, self.window_steps = time.perf_counter(), 0

    def _eta_note(self, seconds_per_step: float, iteration: int) -> None:
        eta = seconds_per_step * (self.cfg.max_iters - iteration)
        if self.device != "cpu" or eta <= SLOW_RUN_SECONDS:
            return
        m = self.model_cfg
        larger_than_baby = any(a > b for a, b in zip((m.n_layer, m.n_embd, m.block_size), BABY_SIZE, strict=True))
        self.say(f"note: training on the CPU, ~{seconds_per_step:.2f} s/iter: about {eta / 3600:.1f} h to go"
                 + (" (try --config baby for a quick run)" if larger_than_baby else ""))

    def evaluation(self, iteration: int, losses: dict[str, float]) -> None:
        line = f"step {iteration}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
        if "ema_val" in losses:
            line += f" (EMA: train {losses['ema_train']:.4f}, val {losses['ema_val']:.4f})"
        self.say(line)
        self.metrics({"iter": iteration, "tokens": iteration * self.tokens_per_step,
                      **{f"{k}_loss": v for k, v in losses.items()}, "time": time.time()})
        if self.live_plot is not None:
            self.live_plot.refresh()

    def close(self) -> None:
        self.bar.close()
        if self.live_plot is not None:  # the last picture is complete when the run returns
            self.live_plot.close()
