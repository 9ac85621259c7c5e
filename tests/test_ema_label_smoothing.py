"""EMA weights and label smoothing: updated once per parameter, saved, resumed exactly, used by sampling."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from test_training import make_trainer

from mlx_gpt.checkpoint import Checkpoint, load_model
from mlx_gpt.training.step import loss_fn


def flat(tree) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def test_ema_follows_the_weights_once_per_parameter(small_text: Path, tmp_path: Path) -> None:
    trainer = make_trainer(small_text.read_text(), tmp_path, ema_decay=0.9)
    assert set(flat(trainer.ema)) == set(flat(trainer.model.parameters()))  # tied head: wte appears once
    expected = flat(trainer.model.parameters())
    for step in range(4):
        trainer.train_step()
        decay = min(0.9, (1 + step + 1) / (10 + step + 1))  # the optimizer step counter after update
        expected = {k: decay * e + (1 - decay) * p for (k, e), p in
                    zip(expected.items(), flat(trainer.model.parameters()).values(), strict=True)}
    for name, value in flat(trainer.ema).items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_ema_compiled_equals_eager_and_resumes_exactly(small_text: Path, tmp_path: Path) -> None:
    text = small_text.read_text()[:20_000]
    eager = make_trainer(text, tmp_path / "e", ema_decay=0.99, compile=False)
    straight = make_trainer(text, tmp_path / "a", ema_decay=0.99)
    for _ in range(6):
        eager.train_step()
        straight.train_step()
    first = make_trainer(text, tmp_path / "b", ema_decay=0.99)
    for _ in range(3):
        first.train_step()
    resumed = make_trainer(text, tmp_path / "b", resume=Checkpoint.load(first.checkpoint().save(tmp_path / "h.npz")),
                           ema_decay=0.99)
    for _ in range(3):
        resumed.train_step()
    for name, value in flat(straight.ema).items():
        np.testing.assert_allclose(flat(resumed.ema)[name], value, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(flat(eager.ema)[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_eval_reports_both_and_sampling_uses_ema(small_text: Path, tmp_path: Path) -> None:
    trainer = make_trainer(small_text.read_text(), tmp_path, ema_decay=0.5, max_iters=4, eval_interval=4)
    trainer.run()
    lines = (tmp_path / "metrics.jsonl").read_text()
    assert '"ema_val_loss"' in lines and '"val_loss"' in lines
    ckpt = Checkpoint.load(tmp_path / "latest.npz")
    assert set(ckpt.ema) == set(ckpt.model)
    model, _, _ = load_model(tmp_path / "latest.npz")
    np.testing.assert_array_equal(np.array(model.wte.weight), ckpt.ema["wte.weight"])
    raw, _, _ = load_model(tmp_path / "latest.npz", weights="raw")
    np.testing.assert_array_equal(np.array(raw.wte.weight), ckpt.model["wte.weight"])


def test_label_smoothing_changes_the_training_loss_only(small_text: Path, tmp_path: Path) -> None:
    text = small_text.read_text()
    plain = make_trainer(text, tmp_path / "p")
    smooth = make_trainer(text, tmp_path / "s", label_smoothing=0.1)  # same seed: same initial weights
    x, y = (mx.array(a) for a in plain.sampler.next_batch())
    logits = plain.model(x)
    ce = loss_fn(plain.model, x, y).item()
    mean_nll_over_vocab = -mx.mean(logits - mx.logsumexp(logits, axis=-1, keepdims=True)).item()
    smoothed = loss_fn(plain.model, x, y, label_smoothing=0.1).item()
    assert abs(smoothed - (0.9 * ce + 0.1 * mean_nll_over_vocab)) < 1e-5
    # Evaluation is plain cross-entropy: identical weights give identical eval numbers.
    assert smooth.estimate_loss() == plain.estimate_loss()
    assert plain.train_step()[0] != smooth.train_step()[0]
