"""The training loop: schedule, optimizer semantics, compiled == eager, overfitting, exact resume."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gpt import cpu
from mlx_gpt.checkpoint import Checkpoint
from mlx_gpt.config import GPTConfig, TrainConfig
from mlx_gpt.data import Dataset
from mlx_gpt.errors import MlxGptError
from mlx_gpt.tokenizer import CharTokenizer
from mlx_gpt.training import Trainer, run_configs
from mlx_gpt.training.optim import AdamW, lr_schedule
from mlx_gpt.training.step import spread_over_streams

TINY_MODEL = dict(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def make_trainer(text: str, out_dir: Path, resume: Checkpoint | None = None, **overrides) -> Trainer:
    model_fields = {k: overrides.pop(k) for k in list(overrides) if k in GPTConfig.__dataclass_fields__}
    tokenizer = resume.tokenizer if resume else CharTokenizer.from_text(text)
    model_cfg = resume.config if resume else GPTConfig(vocab_size=tokenizer.vocab_size,
                                                       **{**TINY_MODEL, **model_fields})
    defaults = dict(batch_size=4, eval_iters=2, eval_interval=1000, log_interval=1000, warmup_iters=2,
                    lr_decay_iters=20)
    train_cfg = TrainConfig(out_dir=str(out_dir), **{**defaults, **overrides})
    dataset = Dataset(text, tokenizer, model_cfg.block_size)
    return Trainer(model_cfg, train_cfg, dataset, tokenizer, resume=resume, log=lambda _: None)


def nanogpt_get_lr(it: int, cfg: TrainConfig) -> float:
    """nanoGPT's train.py get_lr, verbatim in meaning."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def test_lr_schedule_matches_nanogpt() -> None:
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=5000)
    schedule = lr_schedule(cfg)
    for it in [0, 1, 50, 99, 100, 101, 2500, 4999, 5000, 5001, 9000]:
        assert schedule(mx.array(it)).item() == pytest.approx(nanogpt_get_lr(it, cfg), rel=1e-5)


def test_adamw_matches_pytorch_semantics() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)
    grads = [(rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)) for _ in range(5)]

    tw, tb = torch.nn.Parameter(torch.tensor(weight)), torch.nn.Parameter(torch.tensor(bias))
    # nanoGPT's configure_optimizers: decay only tensors with dim >= 2.
    topt = torch.optim.AdamW([{"params": [tw], "weight_decay": 0.1}, {"params": [tb], "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.99))
    opt = AdamW(1e-2, (0.9, 0.99), 0.1)
    params = {"w": mx.array(weight), "b": mx.array(bias)}
    for gw, gb in grads:
        tw.grad, tb.grad = torch.tensor(gw), torch.tensor(gb)
        topt.step()
        params = opt.apply_gradients({"w": mx.array(gw), "b": mx.array(gb)}, params)
    np.testing.assert_allclose(np.array(params["w"]), tw.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(np.array(params["b"]), tb.detach().numpy(), atol=1e-6)


def test_compiled_and_eager_steps_give_the_same_losses(small_text: Path, tmp_path: Path) -> None:
    text = small_text.read_text()
    runs = []
    for compiled in (True, False):
        trainer = make_trainer(text, tmp_path / str(compiled), compile=compiled, dropout=0.1)
        runs.append([trainer.train_step()[0] for _ in range(8)])
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5)


def test_gradient_accumulation_equals_one_big_batch(small_text: Path, tmp_path: Path) -> None:
    text = small_text.read_text()
    big = make_trainer(text, tmp_path / "big", batch_size=8)
    accumulated = make_trainer(text, tmp_path / "acc", gradient_accumulation_steps=2)
    assert accumulated.sampler.batch_size == 8  # the same 8 rows per step, drawn from the same seed
    losses_big = [big.train_step()[0] for _ in range(3)]
    losses_acc = [accumulated.train_step()[0] for _ in range(3)]
    np.testing.assert_allclose(losses_big, losses_acc, rtol=1e-5)


@pytest.mark.skipif(not any(line.startswith("CPU plug-in: BLAS: OpenBLAS") for line in cpu.describe()),
                    reason="streams need the CPU plug-in with a BLAS whose threads it sets (OpenBLAS)")
def test_a_batch_split_over_cpu_streams_trains_like_one_stream(small_text: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    text = small_text.read_text()
    runs = []
    for streams in ("1", "4"):
        monkeypatch.setenv("MLX_GPT_CPU_STREAMS", streams)
        trainer = make_trainer(text, tmp_path / streams, batch_size=8)
        assert (trainer.step.streams is None) == (streams == "1") and len(trainer.step.streams or [None]) in (1, 4)
        runs.append(([trainer.train_step() for _ in range(4)], trainer.estimate_loss(),
                     dict(tree_flatten(trainer.model.parameters()))))
    (steps_one, eval_one, weights_one), (steps_four, eval_four, weights_four) = runs
    np.testing.assert_allclose(steps_one, steps_four, rtol=1e-5)  # losses and gradient norms
    assert eval_one == pytest.approx(eval_four, rel=1e-5)
    for name, w in weights_one.items():
        np.testing.assert_allclose(np.array(w), np.array(weights_four[name]), rtol=1e-4, atol=1e-6, err_msg=name)


def test_per_parameter_work_is_spread_over_the_streams_by_size() -> None:
    tree = {"a": mx.zeros((10,)), "b": mx.zeros((6,)), "c": mx.zeros((5,)), "drop": {}}
    first, second = mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)
    assert spread_over_streams(tree, [first, second]) == {"a": first, "b": second, "c": second}
    # without streams: the default stream for each, and no empty containers (the averaged gradients have none)
    assert spread_over_streams(tree, None) == {"a": None, "b": None, "c": None}


def test_overfits_a_200_character_text(tmp_path: Path) -> None:
    text = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
            "First Citizen: You are all resolved rather to die than to famish? All: Resolved. resolved. "
            "First Citizen: First, you know Caius Marcius is chief enemy")[:200]
    trainer = make_trainer(text * 10, tmp_path, learning_rate=1e-2, min_lr=1e-2, weight_decay=0.0,
                           block_size=128, n_embd=64, batch_size=8)
    trainer.dataset.train = trainer.tokenizer.encode(text)  # train on exactly these 200 characters
    trainer.sampler.tokens = trainer.dataset.train
    losses = [trainer.train_step()[0] for _ in range(250)]
    assert losses[0] > 2.5 and min(losses[-10:]) < 0.1, losses[-10:]


def test_resume_is_exact(small_text: Path, tmp_path: Path) -> None:
    text = small_text.read_text()[:20_000]
    straight = make_trainer(text, tmp_path / "a", dropout=0.1, max_iters=10)
    straight_losses = [straight.train_step()[0] for _ in range(10)]

    first = make_trainer(text, tmp_path / "b", dropout=0.1, max_iters=10)
    half_losses = [first.train_step()[0] for _ in range(5)]
    path = first.checkpoint().save(tmp_path / "half.npz")
    resumed = make_trainer(text, tmp_path / "b", resume=Checkpoint.load(path), max_iters=10)
    assert resumed.iter == 5
    rest_losses = [resumed.train_step()[0] for _ in range(5)]

    np.testing.assert_allclose(half_losses + rest_losses, straight_losses, rtol=0, atol=1e-6)
    for (name, a), (_, b) in zip(tree_flatten(straight.model.parameters()), tree_flatten(resumed.model.parameters()),
                                 strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6, err_msg=name)


def test_run_writes_checkpoints_metrics_and_prunes(small_text: Path, tmp_path: Path) -> None:
    trainer = make_trainer(small_text.read_text(), tmp_path, max_iters=12, eval_interval=4, keep_last=2)
    result = trainer.run()
    assert result.iter == 12 and result.val_loss is not None and not result.interrupted
    names = sorted((p.name for p in tmp_path.glob("gpt-*.npz")), key=len)
    assert len(names) == 2 and names[-1].endswith("step12.npz")
    latest = Checkpoint.load(tmp_path / "latest.npz")
    assert latest.iter == 12 and latest.best_val_loss == result.best_val_loss
    best = Checkpoint.load(tmp_path / "best.npz")
    assert best.best_val_loss == result.best_val_loss
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert any('"val_loss"' in line for line in lines)


def test_run_configs_precedence(small_text: Path, tmp_path: Path) -> None:
    model_cfg, train_cfg = run_configs("baby", {"max_iters": 7, "n_layer": 2})
    assert (model_cfg.n_layer, model_cfg.n_embd, train_cfg.max_iters, train_cfg.batch_size) == (2, 128, 7, 12)
    assert run_configs(None, {})[0].n_layer == 6  # the shakespeare preset by default

    trainer = make_trainer(small_text.read_text(), tmp_path, max_iters=3, learning_rate=3e-3)
    resume = Checkpoint.load(trainer.checkpoint().save(tmp_path / "c.npz"))
    model_cfg, train_cfg = run_configs(None, {"max_iters": 9}, resume)
    assert model_cfg == resume.config and train_cfg.learning_rate == 3e-3 and train_cfg.max_iters == 9
    with pytest.raises(MlxGptError, match="drop --n_embd"):
        run_configs(None, {"n_embd": 64}, resume)


def test_a_new_run_into_a_folder_with_checkpoints_is_refused_unless_forced(small_text: Path, tmp_path: Path) -> None:
    text = small_text.read_text()
    make_trainer(text, tmp_path, max_iters=4, eval_interval=2).run()
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npz")}
    with pytest.raises(MlxGptError, match="already holds checkpoints; continue them with --resume"):
        make_trainer(text, tmp_path, max_iters=2, eval_interval=2).run()
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npz")} == before  # nothing touched
    make_trainer(text, tmp_path, max_iters=6, eval_interval=2, keep_last=1, seed=7).run(force=True)
    old = [name for name in before if name.startswith("gpt-")]
    assert all((tmp_path / name).exists() for name in old)  # another lineage: never pruned
    assert Checkpoint.load(tmp_path / "latest.npz").iter == 6


def test_resuming_from_an_older_checkpoint_prunes_only_its_own_lineage(small_text: Path, tmp_path: Path) -> None:
    text = small_text.read_text()
    make_trainer(text, tmp_path, max_iters=12, eval_interval=2, keep_last=10).run()
    by_step = {int(p.stem.rsplit("step", 1)[1]): p for p in tmp_path.glob("gpt-*.npz")}
    assert sorted(by_step) == [2, 4, 6, 8, 10, 12]
    resumed_from = by_step[4]
    resume = Checkpoint.load(resumed_from)
    make_trainer(text, tmp_path, resume=resume, max_iters=9, eval_interval=1000, save_interval=1, keep_last=2).run()
    left = sorted(p.name for p in tmp_path.glob("gpt-*.npz"))
    # kept: the file resumed from, the abandoned branch (6..12), and this run's newest two (8, 9)
    assert resumed_from.exists() and all(by_step[s].exists() for s in (6, 8, 10, 12))
    assert not by_step[2].exists()  # an ancestor of this run, older than what it keeps
    new = [name for name in left if name not in {p.name for p in by_step.values()}]
    assert sorted(int(n.rsplit("step", 1)[1][:-4]) for n in new) == [8, 9]
    lineage = Checkpoint.load(tmp_path / "latest.npz").lineage
    assert len(lineage) == 2 and lineage[0][1] == 4 and lineage[1][1] is None
