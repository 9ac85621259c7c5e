"""A training run, in nanoGPT's order: build the model and optimizer (or restore them), then step, evaluate and
save until ``max_iters``, or until Ctrl+C / SIGTERM."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .. import ops
from ..checkpoint import Checkpoint, check_arrays
from ..config import GPTConfig, TrainConfig
from ..data import BatchSampler, Dataset
from ..device import current_device
from ..errors import MlxGptError
from ..model import GPT
from ..precision import resolve_dtype
from ..tokenizer import CharTokenizer
from .checkpoints import CheckpointFolder, new_lineage
from .evaluate import whole_split_batch_size, whole_split_loss
from .loss_scale import MIN_SCALE, LossScaler
from .optim import make_optimizer
from .run_log import RunLog, TrainClock
from .signals import StopSignals
from .step import TrainStep

DISTRIBUTED_ERROR = re.compile(r"\[(ring|mpi|nccl|jaccl)\]")  # how MLX's distributed backends prefix errors


@dataclass
class TrainResult:
    iter: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    checkpoint: Path | None
    interrupted: bool


@contextlib.contextmanager
def weights_swapped(model: GPT, weights: dict) -> Iterator[None]:
    """``model`` with ``weights`` inside the block, and its own weights back afterwards, whatever happens."""
    own = model.parameters()
    model.update(weights)
    try:
        yield
    finally:
        model.update(own)


class Trainer:
    """One run's state (model, optimizer, EMA, batch sampler, counters) and its loop, ``run``."""

    def __init__(self, model_cfg: GPTConfig, train_cfg: TrainConfig, dataset: Dataset, tokenizer: CharTokenizer,
                 resume: Checkpoint | None = None, log: Callable[[str], None] = print) -> None:
        # --dtype auto becomes the dtype it means on this device: what the checkpoints record
        self.requested_dtype = train_cfg.dtype
        train_cfg = dataclasses.replace(train_cfg, dtype=resolve_dtype(train_cfg.dtype, current_device()))
        self.model_cfg, self.cfg, self.dataset, self.tokenizer = model_cfg, train_cfg, dataset, tokenizer
        # Data parallelism (mlx.launch): a size-1 group when launched as a plain process.
        self.group = mx.distributed.init()
        self.rank, self.world_size = self.group.rank(), self.group.size()
        self.is_main = self.rank == 0  # only rank 0 writes files, logs and draws the progress bar
        self.log = log if self.is_main else (lambda _: None)
        mx.random.seed(train_cfg.seed)  # model init
        self.model = GPT(model_cfg)
        self.optimizer = make_optimizer(train_cfg)
        self.optimizer.init(self.model.trainable_parameters())
        # The EMA copy: one entry per parameter (a tied embedding/head is one parameter, averaged once).
        self.ema: dict | None = tree_map(mx.array, self.model.parameters()) if train_cfg.ema_decay > 0 else None
        batch = train_cfg.batch_size * train_cfg.gradient_accumulation_steps
        self.sampler = BatchSampler(dataset.train, model_cfg.block_size, batch, train_cfg.seed,
                                    self.rank, self.world_size)
        self.scaler = LossScaler() if train_cfg.dtype == "float16" else None
        self.iter, self.best_val_loss, self.nonfinite_skipped = 0, None, 0
        self.overflow_skipped, self._overflows_unlogged, self._overflow_logged_at = 0, 0, None
        self._scale_before: float | None = None
        self.last_saved_iter: int | None = None
        self.clock = TrainClock()  # training time, without evaluations and saves
        self.resumed_from = resume.path if resume is not None else None
        self.folder = CheckpointFolder(Path(train_cfg.out_dir), train_cfg.keep_last, new_lineage(resume),
                                       self.resumed_from)
        if resume is not None:
            self._restore(resume)
        mx.eval(self.model.parameters(), self.optimizer.state, self.scaler.state if self.scaler else {})
        streams = ops.step_streams(train_cfg.batch_size)
        self.step = TrainStep(self.model, self.optimizer, self.ema, train_cfg, self.world_size, streams, self.scaler)

    # -- state ------------------------------------------------------------------------------------------

    def _restore(self, ckpt: Checkpoint) -> None:
        self.load_weights(ckpt)
        expected_opt = {k: v.shape for k, v in tree_flatten(self.optimizer.state)}
        check_arrays(ckpt.path, "optimizer state", expected_opt, ckpt.optimizer)
        self.optimizer.state = tree_unflatten([(k, mx.array(v)) for k, v in ckpt.optimizer.items()])
        self.optimizer.init(self.model.trainable_parameters())
        if ckpt.data_rng is not None:
            self.sampler.set_state(ckpt.data_rng)
        self.best_val_loss = ckpt.best_val_loss
        self.last_saved_iter = ckpt.iter
        self.clock = TrainClock(ckpt.train_seconds)
        if self.scaler is not None and ckpt.loss_scale is not None:  # else (not a float16 run before): start over
            self.scaler.load(ckpt.loss_scale)

    def load_weights(self, ckpt: Checkpoint) -> None:
        """The checkpoint's weights, EMA weights (where the run keeps an EMA) and step, without the optimizer state:
        what evaluating a checkpoint needs (imported ones have no optimizer state)."""
        expected = {k: v.shape for k, v in tree_flatten(self.model.parameters())}
        check_arrays(ckpt.path, "weights", expected, ckpt.model)
        self.model.load_weights([(k, mx.array(v)) for k, v in ckpt.model.items()])
        if self.ema is not None:
            if ckpt.ema:
                check_arrays(ckpt.path, "EMA weights", expected, ckpt.ema)
                self.ema.update(tree_unflatten([(k, mx.array(v)) for k, v in ckpt.ema.items()]))
            else:  # EMA switched on for a run that had none: start it from the current weights
                self.ema.update(tree_map(mx.array, self.model.parameters()))
        self.iter = ckpt.iter

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(
            config=self.model_cfg, tokenizer=self.tokenizer,
            model={k: np.array(v) for k, v in tree_flatten(self.model.parameters())},
            optimizer={k: np.array(v) for k, v in tree_flatten(self.optimizer.state)},
            ema={k: np.array(v) for k, v in tree_flatten(self.ema)} if self.ema is not None else {},
            train=self.cfg.to_dict(), iter=self.iter, best_val_loss=self.best_val_loss,
            data_rng=self.sampler.state(), data=self.dataset.fingerprint, lineage=self.folder.lineage,
            train_seconds=self.clock.seconds(),
            loss_scale=self.scaler.to_dict() if self.scaler is not None else None,
        )

    # -- one step, one evaluation -----------------------------------------------------------------------------

    def train_step(self) -> tuple[float, float]:
        """One optimizer step on the next batch; returns (loss, gradient norm before clipping)."""
        x, y = self.sampler.next_batch()
        self.model.train()
        self._scale_before = self.scaler.scale if self.scaler is not None else None
        loss, norm = self.step(x, y, self.iter)
        self.iter += 1
        return loss.item(), norm.item()

    def estimate_loss(self, measure: Callable[[], dict[str, float]] | None = None) -> dict[str, float]:
        """The losses ``measure`` gives (default: each split's, as ``eval_whole_val`` says) with dropout off, for
        the raw and the EMA weights (keys prefixed ``ema_``).

        The eval batches depend only on (seed, iteration), not on the training sampler, so evaluating never changes
        what training sees.
        """
        measure = measure or self._split_losses
        self.model.eval()
        try:
            out: dict[str, float] = {}
            if self.ema is not None:
                with weights_swapped(self.model, self.ema):
                    out.update({f"ema_{k}": v for k, v in measure().items()})
            out.update(measure())
            return out
        finally:
            self.model.train()

    def _split_losses(self) -> dict[str, float]:
        val = self.whole_val_loss() if self.cfg.eval_whole_val else self.sampled_loss("val")
        return {"train": self.sampled_loss("train"), "val": val}

    def sampled_loss(self, split: str) -> float:
        """The mean loss over ``eval_iters`` random batches of ``split`` (train or val), drawn from (seed, iter)."""
        index, tokens = {"train": (0, self.dataset.train), "val": (1, self.dataset.val)}[split]
        sampler = BatchSampler(tokens, self.model_cfg.block_size, self.cfg.batch_size,
                               [self.cfg.seed, self.iter, index], self.rank, self.world_size)
        # one batch at a time: a lazy graph of all of them would hold them all
        return sum(self.step.eval_loss(*sampler.next_batch()) for _ in range(self.cfg.eval_iters)) / self.cfg.eval_iters

    def whole_val_loss(self) -> float:
        """The mean loss over every target of the val split (``evaluate.whole_split_loss``), shared by the ranks."""
        batch = whole_split_batch_size(self.cfg.batch_size, self.model_cfg.block_size)
        return whole_split_loss(self.dataset.val, self.model_cfg.block_size, batch,
                                self.step.eval_loss_sum, self.rank, self.world_size)

    def _evaluate(self, log: RunLog) -> tuple[dict[str, float], bool]:
        with self.clock.paused():
            losses = self.estimate_loss()
        log.evaluation(self.iter, losses, self.clock.seconds())
        if not math.isfinite(losses["val"]):
            raise MlxGptError(f"val loss is {losses['val']} at iter {self.iter}: the weights have diverged and were "
                              f"not saved; {self._last_save()}; lower --learning_rate")
        val = min(losses["val"], losses.get("ema_val", math.inf))  # best.npz follows the better of raw and EMA
        is_best = self.best_val_loss is None or val < self.best_val_loss
        if is_best:
            self.best_val_loss = val
        return losses, is_best

    def _check_finite(self, loss: float, norm: float, log: RunLog) -> None:
        """Stop at a non-finite step, or skip it (the compiled step left the weights untouched)."""
        if math.isfinite(loss) and math.isfinite(norm):
            return
        if math.isfinite(loss) and self._scale_before is not None and self._scale_before > MIN_SCALE:
            self._overflow(log)  # the scaled float16 backward overflowed: the scaler's to handle
            return
        self.nonfinite_skipped += 1
        what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
        if self.nonfinite_skipped > self.cfg.skip_nonfinite:
            raise MlxGptError(f"non-finite {what} ({value}) at iter {self.iter}: stopped; {self._last_save()}; "
                              "lower --learning_rate, or pass --skip_nonfinite N to skip such steps")
        log.say(f"iter {self.iter}: non-finite {what}, step skipped ({self.nonfinite_skipped}/"
                f"{self.cfg.skip_nonfinite})")

    def _overflow(self, log: RunLog) -> None:
        """Count a float16 overflow (the step was skipped, the scale halved); said at most once per log_interval."""
        self.overflow_skipped += 1
        self._overflows_unlogged += 1
        if self._overflow_logged_at is None or self.iter - self._overflow_logged_at >= self.cfg.log_interval:
            self._say_overflows(log.say)

    def _say_overflows(self, say: Callable[[str], None]) -> None:
        since = f" since iter {self._overflow_logged_at}" if self._overflow_logged_at is not None else ""
        say(f"iter {self.iter}: {self._overflows_unlogged} float16 gradient overflow(s){since}, step(s) skipped; "
            f"loss scale now {self.scaler.scale:g}")
        self._overflows_unlogged, self._overflow_logged_at = 0, self.iter

    def _last_save(self) -> str:
        return self.folder.holds(self.last_saved_iter)

    # -- files ------------------------------------------------------------------------------------------------

    def save(self, is_best: bool, signals: StopSignals | None = None) -> Path | None:
        """Save to the checkpoint folder (rank 0 only: every rank holds the same weights); the weights must be
        finite. A failed write stops the run, or warns (``--on_save_error warn``) and returns None."""
        if not self.is_main:
            return None
        if not all(mx.all(mx.isfinite(p)).item() for _, p in tree_flatten(self.model.parameters())):
            raise MlxGptError(f"the weights hold NaN or infinity at iter {self.iter} and were not saved; "
                              f"{self._last_save()}; lower --learning_rate")
        signals = signals or StopSignals()
        signals.saving = True
        try:
            path = self.folder.save(self.checkpoint(), is_best)
        except OSError as exc:
            message = self.folder.save_error(exc, self.iter, self.last_saved_iter)
            if self.cfg.on_save_error == "warn":
                self.log(f"warning: {message} (training goes on: --on_save_error warn)")
                return None
            raise MlxGptError(message) from None
        finally:
            signals.saving = False
        self.last_saved_iter = self.iter
        return path

    def _stop_requested(self, signals: StopSignals) -> bool:
        """Whether any rank was asked to stop: all ranks must leave the loop at the same step."""
        if self.world_size == 1:
            return bool(signals.requested)
        return mx.distributed.all_sum(mx.array(int(bool(signals.requested)))).item() > 0

    # -- the loop ---------------------------------------------------------------------------------------------

    def run(self, device: str = "cpu", force: bool = False) -> TrainResult:
        """Train to ``max_iters`` (or a stop signal); ``force``: start a new run in a folder with checkpoints."""
        folder = self.folder
        if self.is_main:
            folder.open(resuming=self.resumed_from is not None, force=force)
        try:
            with StopSignals() as signals:
                return self._loop(signals, device)
        except RuntimeError as exc:
            if self.world_size == 1 or not DISTRIBUTED_ERROR.search(str(exc)):
                raise
            # The distributed backend lost a peer (killed rank, network): stop instead of hanging.
            raise MlxGptError(f"rank {self.rank}: lost contact with the other processes ({exc}); stopping at iter "
                              f"{self.iter}; resume from {folder.latest} with --resume") from None
        finally:
            if self.is_main:
                folder.close()

    def _loop(self, signals: StopSignals, device: str) -> TrainResult:
        cfg, folder = self.cfg, self.folder
        tokens_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * self.world_size * \
            self.model_cfg.block_size
        log = RunLog(folder.out_dir, cfg, self.model_cfg, tokens_per_step, self.iter, device, self.is_main, self.log)
        losses: dict[str, float] = {}
        saved: Path | None = None
        loss, stop = None, False
        if self.iter == 0:
            losses, _ = self._evaluate(log)
        self.clock.start()
        while self.iter < cfg.max_iters:
            if self._stop_requested(signals):  # checked here so that a signal during a save is seen too
                stop = True
                break
            loss, norm = self.train_step()
            self._check_finite(loss, norm, log)
            log.step(self.iter, loss, norm, lambda: self.optimizer.learning_rate.item(), self.clock.seconds(),
                     (lambda: self.scaler.scale) if self.scaler is not None else None)
            done = self.iter == cfg.max_iters
            is_best = False
            if self.iter % cfg.eval_interval == 0 or done:
                losses, is_best = self._evaluate(log)
            if self.iter % cfg.checkpoint_interval == 0 or done or is_best:
                with self.clock.paused():
                    saved = self.save(is_best, signals) or saved
        self.clock.stop()
        log.close()
        if self._overflows_unlogged:
            self._say_overflows(self.log)
        if stop and self.last_saved_iter != self.iter:
            saved = self.save(False, signals) or saved
        if self.is_main and self.last_saved_iter != self.iter:  # only after failed saves (--on_save_error warn)
            raise MlxGptError(f"iter {self.iter} could not be saved; {self._last_save()}; free some disk space "
                              "or fix the folder, then resume with --resume")
        if stop:
            self.log(f"interrupted at iter {self.iter}: checkpoint saved to {saved or folder.latest}")
        if self.is_main:
            folder.where(self.best_val_loss, self.log)
        return TrainResult(self.iter, losses.get("train", loss), losses.get("val"), self.best_val_loss, saved, stop)
