"""Where one training step's time goes: each component of the model timed alone, forward and backward.

    python bench/profile_step.py --config baby
    python bench/profile_step.py --config shakespeare --repeats 3

Each component runs on tensors of the shape it sees in the real step, as a compiled function of
forward + backward (a vector-Jacobian product with a random cotangent), using the model's own modules,
so what ``mlx_gpt/ops.py`` routes into the model is what gets timed. The table gives ms per call, the
number of calls per step, and the share of the measured compiled training step (Trainer's own step).
The shares need not add to 100 %: the components overlap (e.g. dropout inside attention) and the
step also has glue (adds, reshapes, clipping). Everything here runs on one CPU stream with every core in BLAS
(MLX_GPT_CPU_STREAMS=1), so the step row is the step before it is split over one stream per core.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# isort: off
from mlx_gpt import cpu  # noqa: E402

cpu.enable(build_kernels=True, log=None)  # as train.py does, before mlx.core is imported
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
# isort: on

from mlx_gpt import ops  # noqa: E402
from mlx_gpt.config import GPTConfig, TrainConfig, load_preset, split_fields  # noqa: E402
from mlx_gpt.data import Dataset  # noqa: E402
from mlx_gpt.device import select_device  # noqa: E402
from mlx_gpt.training import Trainer  # noqa: E402
from mlx_gpt.training.step import loss_fn  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def fwd_bwd(fn: Callable[..., mx.array], *inputs: mx.array) -> Callable[[], object]:
    """A compiled forward + backward of ``fn`` w.r.t. all its inputs (cotangent: a fixed random array)."""
    cotangent = mx.random.normal(fn(*inputs).shape)
    mx.eval(cotangent)  # else the compiled function would regenerate it (random numbers are costly on a CPU)
    compiled = mx.compile(lambda *a: mx.vjp(fn, list(a), [cotangent]))
    return lambda: compiled(*inputs)


def forward_only(fn: Callable[..., mx.array], *inputs: mx.array) -> Callable[[], object]:
    compiled = mx.compile(fn)
    return lambda: compiled(*inputs)


def sgemm_gflops() -> float:
    """float32 matmul throughput of this process's BLAS (the yardstick for '% of peak')."""
    a, b = mx.random.normal((1024, 1024)), mx.random.normal((1024, 1024))
    ms = median_ms(lambda: a @ b, repeats=7)
    return 2 * 1024**3 / (ms * 1e-3) / 1e9


def profile(model_cfg: GPTConfig, train_cfg: TrainConfig, data: str, repeats: int) -> list[tuple[str, float, int]]:
    dataset, tokenizer = Dataset.load(data, model_cfg.block_size)
    if model_cfg.vocab_size != tokenizer.vocab_size:
        model_cfg = GPTConfig.from_dict({**model_cfg.to_dict(), "vocab_size": tokenizer.vocab_size})
    trainer = Trainer(model_cfg, train_cfg, dataset, tokenizer, log=lambda _: None)
    model = trainer.model
    model.train()
    B, T, C, L = train_cfg.batch_size, model_cfg.block_size, model_cfg.n_embd, model_cfg.n_layer
    H, V = model_cfg.n_head, model_cfg.vocab_size
    block = model.h[0]
    x_btc = mx.random.normal((B, T, C))
    x_bt4c = mx.random.normal((B, T, 4 * C))
    qkv = mx.random.normal((B, T, 3 * C))
    idx = mx.random.randint(0, V, (B, T))
    targets = mx.random.randint(0, V, (B, T))
    xb, yb = (mx.array(a) for a in trainer.sampler.next_batch())
    mx.eval(x_btc, x_bt4c, qkv, idx, targets)
    n_dropout = (2 * L + 1) if model_cfg.dropout > 0 else 0

    def weights_fb(layer: nn.Linear, x: mx.array) -> Callable[[], object]:
        """Forward + backward of a (bias-free) Linear: gradients for its input and its weight."""
        return fwd_bwd(lambda x, w: x @ w.T, x, layer.weight)

    def attention(qkv: mx.array) -> mx.array:
        """CausalSelfAttention between its two projections, as the plug-in picks it per device and length."""
        return ops.causal_self_attention(qkv, H)

    def embed(wte: mx.array, wpe: mx.array) -> mx.array:
        return wte[idx] + wpe[mx.arange(T)]

    def head_loss(x: mx.array, wte: mx.array) -> mx.array:
        return nn.losses.cross_entropy(model.ln_f(x) @ wte.T, targets, reduction="mean")

    grad_fn = nn.value_and_grad(model, loss_fn)
    grads = grad_fn(model, xb, yb)[1]
    mx.eval(grads)
    params = model.trainable_parameters()
    opt_state = trainer.optimizer.state
    update = mx.compile(lambda g: trainer.optimizer.apply_gradients(g, params), inputs=[opt_state],
                        outputs=[opt_state])
    forward_loss = mx.compile(lambda x, y: loss_fn(model, x, y), inputs=[model.state])
    forward_backward = mx.compile(lambda x, y: grad_fn(model, x, y), inputs=[model.state], outputs=[model.state])

    rows = [
        ("embeddings (gather + add)", median_ms(fwd_bwd(embed, model.wte.weight, model.wpe.weight), repeats), 1),
        ("LayerNorm", median_ms(fwd_bwd(block.ln_1, x_btc), repeats), 2 * L + 1),
        ("attention c_attn matmul", median_ms(weights_fb(block.attn.c_attn, x_btc), repeats), L),
        ("attention (causal, from q/k/v)", median_ms(fwd_bwd(attention, qkv), repeats), L),
        ("attention c_proj matmul", median_ms(weights_fb(block.attn.c_proj, x_btc), repeats), L),
        ("MLP c_fc matmul", median_ms(weights_fb(block.mlp.c_fc, x_btc), repeats), L),
        ("MLP activation", median_ms(fwd_bwd(block.mlp.activation, x_bt4c), repeats), L),
        ("MLP c_proj matmul", median_ms(weights_fb(block.mlp.c_proj, x_bt4c), repeats), L),
        ("dropout", median_ms(fwd_bwd(block.mlp.dropout, x_btc), repeats), n_dropout),
        ("ln_f + LM head + loss", median_ms(fwd_bwd(head_loss, x_btc, model.wte.weight), repeats), 1),
        ("optimizer update (AdamW)", median_ms(lambda: update(grads), repeats), 1),
        ("-- forward (loss only)", median_ms(lambda: forward_loss(xb, yb), repeats), 1),
        ("-- forward + backward", median_ms(lambda: forward_backward(xb, yb), repeats), 1),
    ]
    for _ in range(2):
        trainer.train_step()
    step_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        trainer.train_step()
        step_times.append(time.perf_counter() - start)
    rows.append(("== training step (Trainer, compiled)", statistics.median(step_times) * 1e3, 1))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="baby", help="preset or JSON file (as train.py)")
    p.add_argument("--batch_size", type=int, help="override the preset's batch size")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    args = p.parse_args()
    os.environ["MLX_GPT_CPU_STREAMS"] = "1"  # components and step alike on one stream (see the docstring)
    select_device(args.device)
    model_values, train_values = split_fields(load_preset(args.config))
    if args.batch_size:
        train_values["batch_size"] = args.batch_size
    model_cfg = GPTConfig.from_dict(model_values)
    train_cfg = TrainConfig.from_dict({**train_values, "out_dir": "/nonexistent"})
    peak = sgemm_gflops()
    rows = profile(model_cfg, train_cfg, args.data, args.repeats)
    step_ms = rows[-1][1]
    print(f"config {args.config}: {model_cfg.n_layer}L/{model_cfg.n_head}H/{model_cfg.n_embd}, block "
          f"{model_cfg.block_size}, batch {train_cfg.batch_size}; mlx {mx.__version__}; sgemm {peak:.0f} GFLOP/s")
    print(f"{'component':40s} {'ms/call':>9s} {'calls':>6s} {'ms/step':>9s} {'% step':>7s}")
    for name, ms, calls in rows:
        print(f"{name:40s} {ms:9.2f} {calls:6d} {ms * calls:9.1f} {100 * ms * calls / step_ms:6.1f}%")


if __name__ == "__main__":
    main()
