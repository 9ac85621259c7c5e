"""What a run tells its user: the banner, the progress bar (or plain lines without a terminal), the ETA note,
``out_dir/metrics.jsonl`` (one strict-JSON record per line: non-finite numbers are written as null), and with
``--plot`` the picture of it, ``out_dir/loss.png``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
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
# The banner's model line shows the shape; these are the rest, shown where they differ from nanoGPT's
SHAPE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")


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
        f"{model_cfg.block_size}; number of parameters: {num_params / 1e6:.2f}M{model_settings(model_cfg)}",
        f"batch: {cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation{processes} = {sequences} "
        f"sequences ({sequences * model_cfg.block_size:,} tokens) per step; "
        f"compile: {'on' if cfg.compile else 'off'}; out_dir: {cfg.out_dir}",
        optimizer_line(cfg),
        describe_precision(cfg.dtype, requested_dtype),
        *ops.describe(),
    ]
    return "\n".join(lines)


def model_settings(model_cfg: GPTConfig) -> str:
    """The model's settings that differ from nanoGPT's, as "; name=value, ..." (empty for nanoGPT's model)."""
    defaults = GPTConfig()
    changed = [f"{f.name}={getattr(model_cfg, f.name)}" for f in dataclasses.fields(GPTConfig)
               if f.name not in SHAPE_FIELDS and getattr(model_cfg, f.name) != getattr(defaults, f.name)]
    return f"; {', '.join(changed)}" if changed else ""


def optimizer_line(cfg: TrainConfig) -> str:
    """Which optimizer(s) update which weights, at what peak learning rates, on which schedule."""
    adamw = f"AdamW lr {cfg.learning_rate:g} (betas {cfg.beta1:g}, {cfg.beta2:g}; weight decay {cfg.weight_decay:g})"
    if cfg.optimizer == "muon":
        warmup = f", from 0.85 over {cfg.momentum_warmup_iters} iters" if cfg.momentum_warmup_iters else ""
        adamw = (f"Muon lr {cfg.muon_learning_rate:g} (momentum {cfg.muon_momentum:g}{warmup}; weight decay "
                 f"{cfg.weight_decay:g}) for the blocks' matrices, {adamw} for the rest")
    if not cfg.decay_lr:
        schedule = "constant"
    elif cfg.lr_schedule == "wsd":
        schedule = f"wsd (warm-up {cfg.warmup_iters}, decay over the last {cfg.wsd_decay_fraction:g} of " \
                   f"{cfg.lr_decay_iters} to min_lr {cfg.min_lr:g})"
    else:
        schedule = f"cosine (warm-up {cfg.warmup_iters}, to min_lr {cfg.min_lr:g} at {cfg.lr_decay_iters})"
    return f"optimizer: {adamw}; schedule: {schedule}"


def strict(value: Any) -> Any:
    """``value`` with non-finite floats as None (strict JSON has no NaN or Infinity)."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


class TrainClock:
    """Wall seconds spent training, carried over from the checkpoint a run resumes; ``paused`` leaves time out
    (evaluation, saving), so that metrics can say how long training took to reach a loss."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.total, self._since = seconds, None

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        self.total, self._since = self.seconds(), None

    def seconds(self) -> float:
        return self.total + (time.perf_counter() - self._since if self._since is not None else 0.0)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        running = self._since is not None
        self.stop()
        try:
            yield
        finally:
            if running:
                self.start()


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

    def step(self, iteration: int, loss: float, norm: float, lr: Callable[[], float], train_seconds: float,
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
                      "grad_norm": norm, **scale, "tokens_per_s": tok_s, "train_seconds": train_seconds,
                      "time": time.time()})
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

    def evaluation(self, iteration: int, losses: dict[str, float], train_seconds: float) -> None:
        """An evaluation's line and metrics record; ``val_whole`` says whether val was the whole split."""
        whole = " (whole split)" if self.cfg.eval_whole_val else ""
        line = f"step {iteration}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{whole}"
        if "ema_val" in losses:
            line += f" (EMA: train {losses['ema_train']:.4f}, val {losses['ema_val']:.4f})"
        self.say(line)
        self.metrics({"iter": iteration, "tokens": iteration * self.tokens_per_step,
                      **{f"{k}_loss": v for k, v in losses.items()}, "val_whole": self.cfg.eval_whole_val,
                      "train_seconds": train_seconds, "time": time.time()})
        if self.live_plot is not None:
            self.live_plot.refresh()

    def close(self) -> None:
        self.bar.close()
        if self.live_plot is not None:  # the last picture is complete when the run returns
            self.live_plot.close()
