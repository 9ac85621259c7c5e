"""Run under `mlx.launch -n 2`: the averaged per-rank gradients must equal the single-process gradient
of the concatenated batch. Rank 0 prints `max abs difference: X`."""
# ruff: noqa: I001, E402  (the CPU plug-in is enabled before mlx.core is imported: it may load a BLAS)

from mlx_gpt import cpu

cpu.enable()

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_gpt.config import GPTConfig
from mlx_gpt.data import BatchSampler
from mlx_gpt.model import GPT
from mlx_gpt.training.step import loss_fn

group = mx.distributed.init()
rank, world = group.rank(), group.size()
tokens = np.random.default_rng(0).integers(0, 30, size=5000).astype(np.int32)
mx.random.seed(0)
model = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0))
grad_fn = nn.value_and_grad(model, loss_fn)

x, y = BatchSampler(tokens, 16, 4, seed=1, rank=rank, world_size=world).next_batch()
_, grads = grad_fn(model, mx.array(x), mx.array(y))
averaged = nn.average_gradients(grads)

x_all, y_all = BatchSampler(tokens, 16, 4 * world, seed=1).next_batch()
_, full = grad_fn(model, mx.array(x_all), mx.array(y_all))
diff = max(float(mx.max(mx.abs(a - b))) for (_, a), (_, b) in zip(tree_flatten(averaged), tree_flatten(full),
                                                                      strict=True))
if rank == 0:
    print(f"world size: {world}; max abs difference: {diff:.3e}")
sys.exit(0 if world == 2 else 1)
