"""A run's inputs: its settings (preset, checkpoint, flags) and the checkpoint it resumes from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint
from ..config import GPTConfig, TrainConfig, load_preset, split_fields
from ..errors import MlxGptError
from .checkpoints import find_resumable


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

    On resume the model's shape and optimizer are the checkpoint's: a flag that would change them is an error.
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
    model_cfg, train_cfg = GPTConfig.from_dict(model_values), TrainConfig.from_dict(train_values)
    if resume is not None:  # the checkpoint's optimizer state fits only the optimizer that wrote it
        saved = (resume.train or {}).get("optimizer", TrainConfig.optimizer)
        if train_cfg.optimizer != saved:
            raise MlxGptError(f"--resume: {resume.path} holds the state of --optimizer {saved}, which "
                              f"--optimizer {train_cfg.optimizer} cannot continue; resume with --optimizer {saved}, "
                              "or start a new run")
    return model_cfg, train_cfg
