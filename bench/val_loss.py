"""The loss of a checkpoint over the whole val split, not a sample of batches: the mean cross-entropy over the split's
non-overlapping block_size windows (each character predicted once, from the window's start).

    python bench/val_loss.py out/best.npz                       # float32, on Tiny Shakespeare
    python bench/val_loss.py out/best.npz --dtype bfloat16 --data my_text.txt

The split is train.py's (the last 10 % of the text); the weights are the checkpoint's raw ones (--weights ema for
the average). Prints one line: the checkpoint, its iteration, the dtype, the windows and the loss.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_gpt import cpu  # noqa: E402

WINDOWS_PER_BATCH = 64


def whole_split_loss(model, tokens, block_size: int) -> tuple[float, int]:
    """(mean cross-entropy over every target of the non-overlapping windows of ``tokens``, windows)."""
    import mlx.core as mx
    import numpy as np

    from mlx_gpt.training.step import loss_fn

    windows = (len(tokens) - 1) // block_size
    starts = np.arange(windows) * block_size
    total = 0.0
    for first in range(0, windows, WINDOWS_PER_BATCH):
        batch = starts[first:first + WINDOWS_PER_BATCH]
        x = np.stack([tokens[s:s + block_size] for s in batch])
        y = np.stack([tokens[s + 1:s + block_size + 1] for s in batch])
        total += loss_fn(model, mx.array(x), mx.array(y)).item() * len(batch)
    return total / windows, windows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="a checkpoint (e.g. out_dir/best.npz)")
    p.add_argument("--data", default=None, help="the text it was trained on (default: Tiny Shakespeare)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--weights", choices=("raw", "ema"), default="raw")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="cpu")
    args = p.parse_args()
    cpu.enable(log=None)
    from mlx_gpt.checkpoint import load_model
    from mlx_gpt.data import Dataset
    from mlx_gpt.device import select_device

    select_device(args.device)
    model, tokenizer, ckpt = load_model(args.ckpt, weights=args.weights, dtype=args.dtype)
    dataset, _ = Dataset.load(args.data, model.config.block_size, tokenizer)
    loss, windows = whole_split_loss(model, dataset.val, model.config.block_size)
    print(f"{args.ckpt}: iter {ckpt.iter}, {args.dtype}: whole val split ({windows} windows of "
          f"{model.config.block_size}, {windows * model.config.block_size:,} characters): loss {loss:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
