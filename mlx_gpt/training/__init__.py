"""Training: ``train()`` runs one training run (or resumes one) from its settings.

The pieces, one job each: ``setup`` (settings and the checkpoint to resume), ``optim`` (AdamW, schedule, clipping),
``step`` (the compiled step), ``checkpoints`` (the checkpoint folder), ``run_log`` (banner, progress, metrics),
``signals`` (Ctrl+C, SIGTERM), ``evaluate`` (the loss on a whole split) and ``loop`` (the run).
``evaluate_checkpoint()`` reports a saved checkpoint's losses (``train.py --eval_only``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint
from ..config import GPTConfig, TrainConfig
from ..data import Dataset
from ..errors import MlxGptError
from .loop import Trainer, TrainResult
from .run_log import banner
from .setup import resolve_resume, run_configs

__all__ = ["Trainer", "TrainResult", "evaluate_checkpoint", "resolve_resume", "run_configs", "train"]


def train(model_cfg: GPTConfig, train_cfg: TrainConfig, resume: Checkpoint | None = None, device: str = "cpu",
          force: bool = False, log: Callable[[str], None] = print) -> TrainResult:
    """Train (or resume) and return the final losses; ``device`` is already selected (``device.select_device``);
    ``force`` starts a new run in an out_dir that holds checkpoints."""
    if resume is not None and train_cfg.max_iters <= resume.iter:
        raise MlxGptError(f"--resume: {resume.path} is at iter {resume.iter} and --max_iters is "
                          f"{train_cfg.max_iters}: nothing to train; pass a larger --max_iters")
    dataset, tokenizer = Dataset.load(train_cfg.data, model_cfg.block_size,
                                      resume.tokenizer if resume is not None else None)
    if resume is None and model_cfg.vocab_size != tokenizer.vocab_size:
        model_cfg = GPTConfig.from_dict({**model_cfg.to_dict(), "vocab_size": tokenizer.vocab_size})
    trainer = Trainer(model_cfg, train_cfg, dataset, tokenizer, resume=resume, log=log)
    trainer.log(banner(model_cfg, trainer.cfg, dataset, device, trainer.model.num_params(), trainer.world_size,
                       trainer.requested_dtype))
    if resume is not None:
        trainer.log(f"resuming from {resume.path} at iter {resume.iter}")
        trained_on = resume.data or {}
        if trained_on.get("sha256") not in (None, dataset.fingerprint["sha256"]):
            trainer.log(f"note: {dataset.source} ({dataset.fingerprint['chars']:,} characters) is not the text "
                        f"{resume.path} was trained on ({trained_on.get('source')}, {trained_on.get('chars')} "
                        "characters); training goes on with it")
    return trainer.run(device, force=force)


def evaluate_checkpoint(out_dir: Path, ckpt: str | None, preset: str | None, flags: dict[str, Any],
                        device: str = "cpu", log: Callable[[str], None] = print) -> dict[str, float]:
    """``train.py --eval_only``: the losses of ``ckpt`` (default out_dir/latest.npz), with its settings (``flags``
    override them, as on resume): the usual estimate on ``eval_iters`` batches of each split and the loss on the
    whole val split, for the raw and (if the file has them) EMA weights. Writes nothing."""
    checkpoint = Checkpoint.load(Path(ckpt) if ckpt else out_dir / "latest.npz")
    model_cfg, train_cfg = run_configs(preset, flags, checkpoint)
    # the banner names the checkpoint's folder; no EMA weights to report unless the file has them
    train_cfg = dataclasses.replace(train_cfg, out_dir=str(checkpoint.path.parent),
                                    ema_decay=train_cfg.ema_decay if checkpoint.ema else 0.0)
    dataset, tokenizer = Dataset.load(train_cfg.data, model_cfg.block_size, checkpoint.tokenizer)
    trainer = Trainer(model_cfg, train_cfg, dataset, tokenizer, log=log)
    trainer.load_weights(checkpoint)
    trainer.log(banner(model_cfg, train_cfg, dataset, device, trainer.model.num_params(), trainer.world_size))

    def measure() -> dict[str, float]:
        return {"train": trainer.sampled_loss("train"), "val": trainer.sampled_loss("val"),
                "val_whole": trainer.whole_val_loss()}

    losses = trainer.estimate_loss(measure)
    trainer.log(f"checkpoint {checkpoint.path} at iter {checkpoint.iter}:")
    for prefix, name in (("", "weights"), ("ema_", "EMA weights")):
        if f"{prefix}train" in losses:
            trainer.log(f"{name}: train loss {losses[prefix + 'train']:.4f}, val loss {losses[prefix + 'val']:.4f} "
                        f"({train_cfg.eval_iters} batches of {train_cfg.batch_size}); whole val split "
                        f"({len(dataset.val) - 1:,} targets): {losses[prefix + 'val_whole']:.4f}")
    return losses
