"""Training: ``train()`` runs one training run (or resumes one) from its settings.

The pieces, one job each: ``setup`` (settings and the checkpoint to resume), ``optim`` (AdamW, schedule, clipping),
``step`` (the compiled step), ``checkpoints`` (the checkpoint folder), ``run_log`` (banner, progress, metrics),
``signals`` (Ctrl+C, SIGTERM) and ``loop`` (the run).
"""

from __future__ import annotations

from collections.abc import Callable

from ..checkpoint import Checkpoint
from ..config import GPTConfig, TrainConfig
from ..data import Dataset
from ..errors import MlxGptError
from .loop import Trainer, TrainResult
from .run_log import banner
from .setup import resolve_resume, run_configs

__all__ = ["Trainer", "TrainResult", "resolve_resume", "run_configs", "train"]


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
