"""The training loop: AdamW with PyTorch semantics, cosine schedule, compiled step, eval, checkpoints, signals."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from tqdm import tqdm

from . import backend, native, ops
from .checkpoint import Checkpoint, check_arrays, replace_with_copy
from .config import GPTConfig, TrainConfig, load_preset, split_fields
from .data import BatchSampler, Dataset
from .errors import MlxGptError
from .model import GPT
from .plot import LivePlot
from .tokenizer import CharTokenizer

CHECKPOINT_PATTERN = re.compile(r"^gpt-\d{8}-\d{6}-step(\d+)\.npz$")
DISTRIBUTED_ERROR = re.compile(r"\[(ring|mpi|nccl|jaccl)\]")  # how MLX's distributed backends prefix errors


# ----------------------------------------------------------------------------- optimizer


def stream_or_default(stream: mx.Stream | None) -> contextlib.AbstractContextManager:
    """``with`` this: ops on ``stream``, or where they would go anyway (MLX's default stream) for None."""
    return mx.stream(stream) if stream is not None else contextlib.nullcontext()


class AdamW(optim.AdamW):
    """AdamW as PyTorch (and nanoGPT) use it: bias correction on, weight decay only on tensors with ndim >= 2.

    ``parameter_streams`` (a tree like the parameters, see ``spread_over_streams``) runs each parameter's update
    on the stream given for it, so that the update of a step is shared between the CPU's cores too.
    """

    def __init__(self, learning_rate: Any, betas: tuple[float, float], weight_decay: float) -> None:
        super().__init__(learning_rate, betas=list(betas), weight_decay=weight_decay, bias_correction=True)
        self.parameter_streams: dict | None = None
        self._next_stream: Iterator[mx.Stream] | None = None

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        if self.parameter_streams is not None:  # apply_single is called in the order of tree_flatten
            self._next_stream = iter(stream for _, stream in tree_flatten(self.parameter_streams))
        return super().apply_gradients(gradients, parameters)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        stream = next(self._next_stream) if self._next_stream is not None else None
        with stream_or_default(stream):
            if parameter.ndim < 2:  # biases and LayerNorm gains are not decayed
                return optim.Adam.apply_single(self, gradient, parameter, state)
            return super().apply_single(gradient, parameter, state)


def lr_schedule(cfg: TrainConfig) -> Callable[[mx.array], mx.array]:
    """nanoGPT's get_lr as MLX ops (so it lives inside the compiled step): linear warmup, cosine to min_lr."""
    if not cfg.decay_lr:
        return lambda step: mx.array(cfg.learning_rate, dtype=mx.float32)
    warmup, decay_end = cfg.warmup_iters, max(cfg.lr_decay_iters, cfg.warmup_iters + 1)

    def lr(step: mx.array) -> mx.array:
        it = step.astype(mx.float32)
        warm = cfg.learning_rate * (it + 1) / (warmup + 1)
        progress = mx.clip((it - warmup) / (decay_end - warmup), 0.0, 1.0)
        cosine = cfg.min_lr + 0.5 * (1.0 + mx.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)
        return mx.where(it < warmup, warm, cosine)

    return lr


def loss_fn(model: GPT, x: mx.array, y: mx.array, label_smoothing: float = 0.0) -> mx.array:
    logits = model(x)
    return nn.losses.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="mean")


def on_stream(stream: mx.Stream | None, fn: Callable[..., mx.array], *args: mx.array) -> mx.array:
    """``fn(*args)`` with its ops on ``stream`` (None: the default stream)."""
    with stream_or_default(stream):
        return fn(*args)


def spread_over_streams(tree: Any, streams: list[mx.Stream] | None) -> Any:
    """A tree like ``tree`` (of arrays) holding a stream for each array (None for all: the default stream, when
    there are no ``streams``): the largest array goes to the stream with the fewest elements so far, so that
    per-parameter work (gradient averaging, norm, update) is balanced."""
    flat = tree_flatten(tree)  # and back below: no empty containers (nn.average_gradients drops them too)
    chosen = dict.fromkeys((name for name, _ in flat), None)
    if streams:
        load = [0] * len(streams)
        for name, array in sorted(flat, key=lambda item: -item[1].size):
            least = load.index(min(load))
            load[least] += array.size
            chosen[name] = streams[least]
    return tree_unflatten(list(chosen.items()))


def over_streams(fn: Callable[[mx.array, mx.array], Any], streams: list[mx.Stream] | None, x: mx.array,
                 y: mx.array) -> Any:
    """``fn(x, y)`` (a mean over the batch, or a tree of them), computed as the mean over equal slices of the
    batch, each slice on its own stream so that they run in parallel."""
    if streams is None:
        return fn(x, y)
    parts = []
    for stream, x_part, y_part in zip(streams, mx.split(x, len(streams)), mx.split(y, len(streams)), strict=True):
        with mx.stream(stream):
            parts.append(fn(x_part, y_part))
    return tree_map(lambda *values: sum(values) / len(values), *parts)


def clip_grad_norm(grads: dict, max_norm: float, grad_streams: Any) -> tuple[dict, mx.array]:
    """(``grads`` scaled to a global norm of at most ``max_norm`` (unchanged if ``max_norm`` <= 0), the norm
    before); ``grad_streams`` (see ``spread_over_streams``) says on which stream each gradient's share runs."""
    squares = tree_map(lambda stream, g: on_stream(stream, lambda: mx.sum(mx.square(g))), grad_streams, grads)
    norm = mx.sqrt(sum(square for _, square in tree_flatten(squares)))
    if max_norm <= 0:
        return grads, norm
    scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)  # as optim.clip_grad_norm
    return tree_map(lambda stream, g: on_stream(stream, lambda: g * scale), grad_streams, grads), norm


def ema_decay_at(decay: float, step: mx.array) -> mx.array:
    """The EMA decay at an optimizer step, ramped up early ((1 + t) / (10 + t)) so the average is not
    dominated by the random init in short runs."""
    t = step.astype(mx.float32)
    return mx.minimum(decay, (1.0 + t) / (10.0 + t))


# ----------------------------------------------------------------------------- out_dir housekeeping


class OutDirLock:
    """An exclusive lock on ``out_dir`` (released by the OS when the process dies, so stale locks free themselves)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / ".lock"
        self._file: Any = None

    def __enter__(self) -> OutDirLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        try:
            self._file = open(self.path, "a+")
        except OSError as exc:
            raise MlxGptError(f"cannot use out_dir {self.path.parent}: {exc.strerror or exc}; "
                              "pass another --out_dir") from None
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise MlxGptError(
                f"{self.path.parent} is in use by a training run (pid {holder}); "
                "wait for it to finish or pass another --out_dir"
            ) from None
        try:  # the pid only names the holder in the message above; the flock is the lock
            self._file.seek(0)
            self._file.truncate()
            self._file.write(str(os.getpid()))
            self._file.flush()
        except OSError:
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


class StopSignals:
    """Ctrl+C / SIGTERM: the first asks the loop to save and stop; during a save, the second waits for it;
    the third exits at once (files on disk stay valid: every write is atomic)."""

    def __init__(self) -> None:
        self.requested = 0
        self.saving = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.requested += 1
        if self.requested >= 3:
            print("\nthird interrupt: exiting now", file=sys.stderr, flush=True)
            os._exit(130)
        if self.requested == 2 and self.saving:
            print("\nwaiting for the checkpoint being written; interrupt once more to exit at once",
                  file=sys.stderr, flush=True)
        elif self.requested == 1:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def timestamped_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the timestamped checkpoints in ``out_dir``, oldest step first."""
    found = []
    for path in out_dir.glob("gpt-*.npz"):
        match = CHECKPOINT_PATTERN.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_resumable(out_dir: Path) -> Path | None:
    """The newest timestamped checkpoint in ``out_dir`` that loads, if any (offered when latest.npz is bad)."""
    for _, path in reversed(timestamped_checkpoints(out_dir)):
        try:
            Checkpoint.load(path)
        except MlxGptError:
            continue
        return path
    return None


# ----------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    iter: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    checkpoint: Path | None
    interrupted: bool


class Trainer:
    """One training run: a model, its optimizer and data, the compiled step, and the checkpoint files."""

    def __init__(self, model_cfg: GPTConfig, train_cfg: TrainConfig, dataset: Dataset, tokenizer: CharTokenizer,
                 resume: Checkpoint | None = None, log: Callable[[str], None] = print) -> None:
        self.model_cfg, self.cfg, self.dataset, self.tokenizer = model_cfg, train_cfg, dataset, tokenizer
        # Data parallelism (mlx.launch): a size-1 group when launched as a plain process.
        self.group = mx.distributed.init()
        self.rank, self.world_size = self.group.rank(), self.group.size()
        self.is_main = self.rank == 0  # only rank 0 writes files, logs and draws the progress bar
        processes_here = backend.processes_on_this_machine(self.rank) if self.world_size > 1 else 1
        n_streams, self.cpu_note = backend.split_cores(processes_here, train_cfg.batch_size)
        # Each (micro-)batch is split over these, one thread each (see backend.split_cores); None: one stream.
        self.streams = [mx.new_stream(mx.cpu) for _ in range(n_streams)] if n_streams > 1 else None
        self.log = log if self.is_main else (lambda _: None)
        self.out_dir = Path(train_cfg.out_dir)
        mx.random.seed(train_cfg.seed)  # model init
        self.model = GPT(model_cfg)
        self.optimizer = AdamW(lr_schedule(train_cfg), (train_cfg.beta1, train_cfg.beta2), train_cfg.weight_decay)
        self.optimizer.init(self.model.trainable_parameters())
        # The EMA copy: one entry per parameter (a tied embedding/head is one parameter, averaged once).
        self.ema: dict | None = tree_map(mx.array, self.model.parameters()) if train_cfg.ema_decay > 0 else None
        batch = train_cfg.batch_size * train_cfg.gradient_accumulation_steps
        self.sampler = BatchSampler(dataset.train, model_cfg.block_size, batch, train_cfg.seed,
                                    self.rank, self.world_size)
        self.iter = 0
        self.best_val_loss: float | None = None
        self.nonfinite_skipped = 0
        self.last_saved_iter: int | None = None
        self.metrics_failed = False
        self.live_plot = LivePlot(self.out_dir, log=self.say) if train_cfg.plot and self.is_main else None
        if resume is not None:
            self._restore(resume)
        mx.eval(self.model.parameters(), self.optimizer.state)
        self._build_steps()

    # -- state ----------------------------------------------------------------

    def _restore(self, ckpt: Checkpoint) -> None:
        expected = {k: v.shape for k, v in tree_flatten(self.model.parameters())}
        check_arrays(ckpt.path, "weights", expected, ckpt.model)
        self.model.load_weights([(k, mx.array(v)) for k, v in ckpt.model.items()])
        expected_opt = {k: v.shape for k, v in tree_flatten(self.optimizer.state)}
        check_arrays(ckpt.path, "optimizer state", expected_opt, ckpt.optimizer)
        self.optimizer.state = tree_unflatten([(k, mx.array(v)) for k, v in ckpt.optimizer.items()])
        self.optimizer.init(self.model.trainable_parameters())
        if self.ema is not None:
            if ckpt.ema:
                check_arrays(ckpt.path, "EMA weights", expected, ckpt.ema)
                self.ema.update(tree_unflatten([(k, mx.array(v)) for k, v in ckpt.ema.items()]))
            else:  # EMA switched on for a run that had none: start it from the current weights
                self.ema.update(tree_map(mx.array, self.model.parameters()))
        if ckpt.data_rng is not None:
            self.sampler.set_state(ckpt.data_rng)
        self.iter, self.best_val_loss = ckpt.iter, ckpt.best_val_loss
        self.last_saved_iter = ckpt.iter

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(
            config=self.model_cfg, tokenizer=self.tokenizer,
            model={k: np.array(v) for k, v in tree_flatten(self.model.parameters())},
            optimizer={k: np.array(v) for k, v in tree_flatten(self.optimizer.state)},
            ema={k: np.array(v) for k, v in tree_flatten(self.ema)} if self.ema is not None else {},
            train=self.cfg.to_dict(), iter=self.iter, best_val_loss=self.best_val_loss,
            data_rng=self.sampler.state(),
        )

    # -- compiled functions ------------------------------------------------------

    def _build_steps(self) -> None:
        model, optimizer, cfg = self.model, self.optimizer, self.cfg
        grad_fn = nn.value_and_grad(model, partial(loss_fn, label_smoothing=cfg.label_smoothing))
        guard = cfg.skip_nonfinite > 0
        ema = self.ema
        world_size, streams = self.world_size, self.streams
        # Each parameter's share of the update (its gradient's mean over the streams, its part of the norm, its
        # AdamW step) on one CPU stream, so that this part of a step is shared between the cores too.
        grad_streams = spread_over_streams(model.trainable_parameters(), streams)
        optimizer.parameter_streams = grad_streams

        def gradients_on(stream: mx.Stream | None) -> Callable[[mx.array, mx.array], tuple[mx.array, dict]]:
            return lambda x, y: on_stream(stream, grad_fn, model, x, y)

        def update(parts: list[tuple[mx.array, dict]]) -> tuple[mx.array, mx.array]:
            """The optimizer step from the (loss, gradients) of equal slices of the batch (streams and micro-batches):
            their mean is the batch's."""
            loss = sum(part_loss for part_loss, _ in parts) / len(parts)
            grads = tree_map(lambda stream, *values: on_stream(stream, lambda: sum(values) / len(values)),
                             grad_streams, *(g for _, g in parts))
            if world_size > 1:  # every rank gets the mean over the global batch
                grads = nn.average_gradients(grads)
                loss = mx.distributed.all_sum(loss) / world_size
            grads, norm = clip_grad_norm(grads, cfg.grad_clip, grad_streams)
            if guard:
                old_params = model.parameters()
                old_state = tree_map(lambda a: a, optimizer.state)  # new containers: update() mutates in place
            optimizer.update(model, grads)
            if guard:
                # --skip_nonfinite: a non-finite loss or gradient leaves weights and optimizer untouched.
                keep = partial(mx.where, mx.isfinite(loss) & mx.isfinite(norm))
                model.update(tree_map(keep, model.parameters(), old_params))
                optimizer.state.update(tree_map(keep, optimizer.state, old_state))
            if ema is not None:
                decay = ema_decay_at(cfg.ema_decay, optimizer.step)
                ema.update(tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, model.parameters()))
            return loss, norm

        def eval_loss(x: mx.array, y: mx.array) -> mx.array:
            loss = over_streams(partial(loss_fn, model), streams, x, y)
            return mx.distributed.all_sum(loss) / world_size if world_size > 1 else loss

        # One gradient function per stream (None: the default stream).
        self._gradients = [gradients_on(stream) for stream in streams or [None]]
        self._update, self._eval_loss = update, eval_loss
        if cfg.compile:
            # Compiled apart, one per stream: traced as one graph, mx.compile merged the streams' identical constants,
            # and one stream's kernels then read the other's (waiting for it, in slower strided loops): 5 % of a step
            # at the baby config. Each reads the model and the RNG (dropout); value_and_grad writes the model back.
            stream_state = [model.state, mx.random.state]
            self._gradients = [mx.compile(f, inputs=stream_state, outputs=stream_state) for f in self._gradients]
            state = [model.state, optimizer.state] + ([ema] if ema is not None else [])
            self._update = mx.compile(update, inputs=state, outputs=state)
            self._eval_loss = mx.compile(eval_loss, inputs=[model.state])

    def train_step(self) -> tuple[float, float]:
        """One optimizer step on the next batch; returns (loss, gradient norm before clipping)."""
        x, y = self.sampler.next_batch()
        self.model.train()
        slices = self.cfg.gradient_accumulation_steps * len(self._gradients)
        parts = []
        for i, (x_part, y_part) in enumerate(zip(np.split(x, slices), np.split(y, slices), strict=True)):
            # Dropout's randomness is a function of (seed, iteration, slice), so a resumed run draws what a straight
            # one does, and each stream draws its own (a key passed from one stream to the next would chain them).
            mx.random.seed(((self.cfg.seed * 1_000_003 + self.iter) * 1_000_003 + i) % 2**64)
            parts.append(self._gradients[i % len(self._gradients)](mx.array(x_part), mx.array(y_part)))
            if self.cfg.gradient_accumulation_steps > 1 and (i + 1) % len(self._gradients) == 0:
                mx.eval(parts)  # one micro-batch's activations in memory at a time
        loss, norm = self._update(parts)
        mx.eval(loss, norm, self.model.parameters(), self.optimizer.state, self.ema or {})
        self.iter += 1
        return loss.item(), norm.item()

    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over ``eval_iters`` batches of each split (dropout off).

        The eval batches depend only on (seed, iteration), not on the training sampler, so evaluating
        never changes what training sees.
        """
        self.model.eval()
        out: dict[str, float] = {}
        if self.ema is not None:  # the same batches through the EMA weights, then back to the raw ones
            raw = self.model.parameters()
            self.model.update(self.ema)
            out.update({f"ema_{k}": v for k, v in self._split_losses().items()})
            self.model.update(raw)
        out.update(self._split_losses())
        self.model.train()
        return out

    def _split_losses(self) -> dict[str, float]:
        out = {}
        for index, (split, tokens) in enumerate((("train", self.dataset.train), ("val", self.dataset.val))):
            sampler = BatchSampler(tokens, self.model_cfg.block_size, self.cfg.batch_size,
                                   [self.cfg.seed, self.iter, index], self.rank, self.world_size)
            total = 0.0
            for _ in range(self.cfg.eval_iters):  # one batch at a time: a lazy graph of all would hold them all
                x, y = sampler.next_batch()
                total += self._eval_loss(mx.array(x), mx.array(y)).item()
            out[split] = total / self.cfg.eval_iters
        return out

    # -- files ---------------------------------------------------------------------

    def save(self, is_best: bool, signals: StopSignals | None = None) -> Path | None:
        """Write gpt-<time>-step<N>.npz, then point latest.npz (and best.npz) at it; prune old ones.

        Only rank 0 writes (every rank holds the same weights)."""
        if not self.is_main:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = self.out_dir / f"gpt-{stamp}-step{self.iter}.npz"
        if signals is not None:
            signals.saving = True
        try:
            self.checkpoint().save(path)
            replace_with_copy(path, self.out_dir / "latest.npz")
            if is_best:
                replace_with_copy(path, self.out_dir / "best.npz")
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            hint = "free some disk space" if exc.errno == errno.ENOSPC else "check the folder's permissions"
            message = (f"could not write checkpoint {path} at iter {self.iter}: {reason}; {hint}; "
                       f"{self.out_dir / 'latest.npz'} still holds the previous save")
            if self.cfg.on_save_error == "warn":
                self.log(f"warning: {message} (training goes on: --on_save_error warn)")
                return None
            raise MlxGptError(message) from None
        finally:
            if signals is not None:
                signals.saving = False
        self.last_saved_iter = self.iter
        self._prune()
        return path

    def _prune(self) -> None:
        if self.cfg.keep_last == 0:
            return
        for _, old in timestamped_checkpoints(self.out_dir)[: -self.cfg.keep_last]:
            old.unlink(missing_ok=True)  # latest/best are separate links or copies: never touched

    def metrics(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        path = self.out_dir / "metrics.jsonl"
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:  # a log, not the work: never stop training for it
            if not self.metrics_failed:
                self.metrics_failed = True
                self.log(f"warning: could not append to {path} ({exc.strerror or exc}); "
                         "training goes on, some metrics are missing")

    # -- the loop -----------------------------------------------------------------

    def say(self, message: str) -> None:
        """A log line above the progress bar (rank 0 only)."""
        if self.is_main:
            tqdm.write(message, file=sys.stdout)

    def _evaluate(self) -> tuple[dict[str, float], bool]:
        losses = self.estimate_loss()
        val = min(losses["val"], losses.get("ema_val", math.inf))  # best.npz follows the better of raw and EMA
        is_best = self.best_val_loss is None or val < self.best_val_loss
        if is_best:
            self.best_val_loss = val
        line = f"step {self.iter}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
        if "ema_val" in losses:
            line += f" (EMA: train {losses['ema_train']:.4f}, val {losses['ema_val']:.4f})"
        self.say(line)
        self.metrics({"iter": self.iter, **{f"{k}_loss": v for k, v in losses.items()}, "time": time.time()})
        if self.live_plot is not None:  # --plot: redrawn in a background thread; never raises
            self.live_plot.refresh()
        return losses, is_best

    def _check_finite(self, loss: float, norm: float) -> None:
        """Stop at a non-finite step, or skip it (the compiled step left the weights untouched)."""
        if math.isfinite(loss) and math.isfinite(norm):
            return
        self.nonfinite_skipped += 1
        what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
        if self.nonfinite_skipped > self.cfg.skip_nonfinite:
            last = self.out_dir / "latest.npz"
            raise MlxGptError(
                f"non-finite {what} ({value}) at iter {self.iter}: stopped; the last good checkpoint is "
                f"{last if last.exists() else '(none saved yet)'}; lower --learning_rate, "
                "or pass --skip_nonfinite N to skip such steps"
            )
        self.say(f"iter {self.iter}: non-finite {what}, step skipped "
                 f"({self.nonfinite_skipped}/{self.cfg.skip_nonfinite})")

    def _stop_requested(self, signals: StopSignals) -> bool:
        """Whether any rank was asked to stop: all ranks must leave the loop at the same step."""
        if self.world_size == 1:
            return bool(signals.requested)
        return mx.distributed.all_sum(mx.array(int(bool(signals.requested)))).item() > 0

    def run(self, device: str = "cpu") -> TrainResult:
        try:
            return self._run(device)
        except RuntimeError as exc:
            if self.world_size == 1 or not DISTRIBUTED_ERROR.search(str(exc)):
                raise
            # The distributed backend lost a peer (killed rank, network): stop instead of hanging.
            raise MlxGptError(f"rank {self.rank}: lost contact with the other processes ({exc}); stopping at iter "
                              f"{self.iter}; resume from {self.out_dir / 'latest.npz'} with --resume") from None

    def _run(self, device: str) -> TrainResult:
        cfg = self.cfg
        if self.is_main:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise MlxGptError(f"cannot create out_dir {self.out_dir}: {exc.strerror or exc}; "
                                  "pass another --out_dir") from None
        lock = OutDirLock(self.out_dir) if self.is_main else contextlib.nullcontext()
        with lock, StopSignals() as signals:
            if self.is_main:
                for stale in self.out_dir.glob(".*.tmp"):  # left by a process killed mid-write
                    stale.unlink(missing_ok=True)
            tokens_per_step = (cfg.batch_size * cfg.gradient_accumulation_steps * self.world_size
                               * self.model_cfg.block_size)
            bar = tqdm(total=cfg.max_iters, initial=self.iter, desc="train", dynamic_ncols=True,
                       disable=None if self.is_main else True, file=sys.stdout)
            losses: dict[str, float] = {}
            saved: Path | None = None
            if self.iter == 0:
                losses, _ = self._evaluate()
            window_start, window_steps, eta_told = time.perf_counter(), 0, False
            loss, stop = None, False
            while self.iter < cfg.max_iters:
                if self._stop_requested(signals):  # checked here so a signal during a save is seen too
                    stop = True
                    break
                loss, norm = self.train_step()
                window_steps += 1
                self._check_finite(loss, norm)
                bar.update(1)
                if self.iter % cfg.log_interval == 0 or self.iter == cfg.max_iters:
                    elapsed = time.perf_counter() - window_start
                    tok_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
                    lr = self.optimizer.learning_rate.item()
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                    if bar.disable:  # no terminal (a log file, CI): plain lines instead of the bar
                        self.say(f"iter {self.iter}: loss {loss:.4f}, lr {lr:.2e}, {tok_s:,.0f} tok/s")
                    self.metrics({"iter": self.iter, "loss": loss, "lr": lr, "grad_norm": norm,
                                  "tokens_per_s": tok_s, "time": time.time()})
                    eta = elapsed / window_steps * (cfg.max_iters - self.iter)
                    if not eta_told and device == "cpu" and eta > 15 * 60:
                        self.say(f"note: training on the CPU, ~{elapsed / window_steps:.2f} s/iter: about "
                                 f"{eta / 3600:.1f} h to go (try --config baby for a quick run)")
                    eta_told = True
                    window_start, window_steps = time.perf_counter(), 0
                done = self.iter == cfg.max_iters
                is_best = False
                if self.iter % cfg.eval_interval == 0 or done:
                    losses, is_best = self._evaluate()
                if self.iter % cfg.checkpoint_interval == 0 or done or is_best:
                    saved = self.save(is_best, signals) or saved
            bar.close()
            if self.live_plot is not None:  # the last picture is complete when train() returns
                self.live_plot.close()
            if stop:
                if self.last_saved_iter != self.iter:
                    saved = self.save(False, signals) or saved
                self.log(f"interrupted at iter {self.iter}: checkpoint saved to {saved or self.out_dir / 'latest.npz'}")
            if self.is_main and self.last_saved_iter != self.iter:  # only after failed saves (--on_save_error warn)
                held = "no checkpoint was written" if self.last_saved_iter is None else \
                    f"{self.out_dir / 'latest.npz'} holds iter {self.last_saved_iter}"
                self.log(f"warning: iter {self.iter} was not saved; {held}")
            return TrainResult(self.iter, losses.get("train", loss), losses.get("val"), self.best_val_loss,
                               saved, stop)


# ----------------------------------------------------------------------------- entry point


def resolve_resume(out_dir: Path, ckpt: str | None) -> Checkpoint:
    """The checkpoint ``--resume`` continues from; a corrupt latest.npz names a valid alternative."""
    path = Path(ckpt) if ckpt else out_dir / "latest.npz"
    try:
        return Checkpoint.load(path)
    except MlxGptError as exc:
        if ckpt is None:  # latest.npz corrupt, or missing after a kill before its first save
            alternative = find_resumable(out_dir)
            if alternative is not None:
                raise MlxGptError(f"{exc} -- the newest valid checkpoint is {alternative}: "
                                  f"resume from it with --resume --ckpt {alternative}") from None
        raise


def run_configs(preset: str | None, flags: dict[str, Any], resume: Checkpoint | None = None
                ) -> tuple[GPTConfig, TrainConfig]:
    """The run's settings, later sources winning: the preset (``shakespeare`` unless resuming), the
    checkpoint's training settings and model shape (on resume), then the flags given on the command line.

    On resume the model's shape is the checkpoint's: a flag that would change it is an error.
    """
    values = {} if resume is not None and preset is None else load_preset(preset or "shakespeare")
    if resume is not None:
        shape = resume.config.to_dict()
        changed = [k for k, v in split_fields(flags)[0].items() if v != shape[k]]
        if changed:
            names = ", ".join("--" + k for k in changed)
            raise MlxGptError(f"--resume takes the model's shape from the checkpoint; drop {names}")
        values = {**(resume.train or {}), **values, **shape}
        values.pop("out_dir", None)  # the folder resumed from, not the one recorded in the file
    model_values, train_values = split_fields({**values, **flags})
    return GPTConfig.from_dict(model_values), TrainConfig.from_dict(train_values)


def banner(model: GPT, model_cfg: GPTConfig, cfg: TrainConfig, dataset: Dataset, device: str,
           world_size: int = 1, cpu_note: str | None = None) -> str:
    sequences = cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    processes = f" x {world_size} processes" if world_size > 1 else ""
    lines = [
        backend.describe_device(device),
        f"data: {dataset.source} ({len(dataset.train):,} train / {len(dataset.val):,} val characters, "
        f"vocab {model_cfg.vocab_size})",
        f"model: {model_cfg.n_layer} layers, {model_cfg.n_head} heads, {model_cfg.n_embd} wide, block "
        f"{model_cfg.block_size}; number of parameters: {model.num_params() / 1e6:.2f}M",
        f"batch: {cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation{processes} = {sequences} "
        f"sequences ({sequences * model_cfg.block_size:,} tokens) per step; "
        f"compile: {'on' if cfg.compile else 'off'}; out_dir: {cfg.out_dir}",
    ]
    if cpu_note:
        lines.append(cpu_note)
    if device == "cpu" and ops.on_cpu():
        lines.append(f"CPU kernels: {native.describe(ops.CPU_KERNELS)}")
    if backend.blas_hint and device == "cpu":
        lines.append(backend.blas_hint)
    return "\n".join(lines)


def train(model_cfg: GPTConfig, train_cfg: TrainConfig, resume: Checkpoint | None = None,
          device: str = "cpu", log: Callable[[str], None] = print) -> TrainResult:
    """Train (or resume) and return the final losses; ``device`` is already selected (backend.select_device)."""
    dataset, tokenizer = Dataset.load(train_cfg.data, model_cfg.block_size,
                                      resume.tokenizer if resume is not None else None)
    if resume is None and model_cfg.vocab_size != tokenizer.vocab_size:
        model_cfg = GPTConfig.from_dict({**model_cfg.to_dict(), "vocab_size": tokenizer.vocab_size})
    trainer = Trainer(model_cfg, train_cfg, dataset, tokenizer, resume=resume, log=log)
    trainer.log(banner(trainer.model, model_cfg, train_cfg, dataset, device, trainer.world_size, trainer.cpu_note))
    if resume is not None:
        trainer.log(f"resuming from {resume.path} at iter {resume.iter}")
    return trainer.run(device)
