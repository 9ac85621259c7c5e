"""Evaluation: the loss on the whole val split, train_seconds in the metrics, and train.py --eval_only."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import TINY_FLAGS, run_script
from mlx.utils import tree_flatten

from mlx_gpt.checkpoint import FORMAT, VERSION, Checkpoint, container_bytes
from mlx_gpt.config import GPTConfig, TrainConfig
from mlx_gpt.data import Dataset
from mlx_gpt.errors import MlxGptError
from mlx_gpt.model import GPT
from mlx_gpt.tokenizer import CharTokenizer
from mlx_gpt.training import Trainer, evaluate_checkpoint
from mlx_gpt.training.evaluate import whole_split_batches, whole_split_loss, whole_split_windows
from mlx_gpt.training.run_log import TrainClock


def counted_targets(n_tokens: int, block_size: int, batch_size: int, world_size: int) -> np.ndarray:
    """How often each position of a split is a counted target, over all ranks' batches (tokens are positions)."""
    tokens = np.arange(n_tokens)
    counts = np.zeros(n_tokens, dtype=int)
    shapes = []
    for rank in range(world_size):
        batches = list(whole_split_batches(tokens, block_size, batch_size, rank, world_size))
        shapes.append([x.shape for x, _, _ in batches])
        for x, y, w in batches:
            assert np.array_equal(y[:, :-1], x[:, 1:])  # y is x shifted by one
            np.add.at(counts, y[w == 1], 1)
            assert set(np.unique(w)) <= {0.0, 1.0}
    assert all(s == shapes[0] for s in shapes)  # every rank runs the same batches (all_sum needs it)
    return counts


@pytest.mark.parametrize("n_tokens", [2, 3, 9, 16, 17, 18, 33, 100])
@pytest.mark.parametrize("block_size", [1, 4, 8, 16])
@pytest.mark.parametrize("batch_size,world_size", [(1, 1), (3, 1), (2, 2), (1, 3)])
def test_every_target_is_counted_exactly_once(n_tokens: int, block_size: int, batch_size: int,
                                              world_size: int) -> None:
    counts = counted_targets(n_tokens, block_size, batch_size, world_size)
    assert counts[0] == 0 and np.all(counts[1:] == 1), counts


def test_windows_are_non_overlapping_and_the_last_ends_at_the_split_end() -> None:
    starts, length, rest = whole_split_windows(35, 8)  # 34 targets: four windows of 8, then 2 more
    assert (length, rest) == (8, 2) and starts.tolist() == [0, 8, 16, 24, 26]
    assert whole_split_windows(33, 8)[0].tolist() == [0, 8, 16, 24] and whole_split_windows(33, 8)[2] == 0
    # shorter than block_size: one window of all the split's targets
    assert [a.tolist() if isinstance(a, np.ndarray) else a for a in whole_split_windows(5, 8)] == [[0], 4, 0]
    with pytest.raises(MlxGptError, match="no targets"):
        whole_split_windows(1, 8)


def tiny_model(block_size: int = 8, vocab: int = 11) -> GPT:
    mx.random.seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=2, n_head=2, n_embd=16, dropout=0.0))
    model.eval()
    return model


def plain_loss_sum(model: GPT):
    def loss_sum(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
        per_token = nn.losses.cross_entropy(model(mx.array(x)), mx.array(y), reduction="none")
        return (per_token * mx.array(w)).sum().item()
    return loss_sum


def by_hand(model: GPT, tokens: np.ndarray, block_size: int) -> float:
    """Each target's loss, window by window, written out: full windows from 0, then the tail's new targets."""
    losses = []
    length = min(block_size, len(tokens) - 1)
    start = 0
    while start + length + 1 <= len(tokens):
        logits = model(mx.array(tokens[None, start:start + length]))
        losses += nn.losses.cross_entropy(logits, mx.array(tokens[None, start + 1:start + length + 1]),
                                          reduction="none").reshape(-1).tolist()
        start += length
    left = len(tokens) - 1 - start  # targets start+1 .. len-1 not counted yet
    if left:
        end = len(tokens) - 1
        logits = model(mx.array(tokens[None, end - length:end]))
        tail = nn.losses.cross_entropy(logits, mx.array(tokens[None, end - length + 1:end + 1]), reduction="none")
        losses += tail.reshape(-1).tolist()[-left:]
    assert len(losses) == len(tokens) - 1
    return float(np.mean(losses))


@pytest.mark.parametrize("n_tokens", [41, 40, 33, 6])  # not a multiple of 8, a multiple plus one, shorter than 8
def test_whole_split_loss_equals_a_direct_computation(n_tokens: int) -> None:
    model = tiny_model()
    tokens = np.random.default_rng(n_tokens).integers(0, 11, size=n_tokens)
    expected = by_hand(model, tokens, 8)
    for batch_size in (1, 3, 4):
        assert whole_split_loss(tokens, 8, batch_size, plain_loss_sum(model)) == pytest.approx(expected, rel=1e-5)
    # each rank's share: in one process the all_sum is over one rank, so the shares add up to the whole
    shares = [whole_split_loss(tokens, 8, 2, plain_loss_sum(model), rank, 3) for rank in range(3)]
    assert sum(shares) == pytest.approx(expected, rel=1e-5)


def make_trainer(text: str, out_dir: Path, resume: Checkpoint | None = None, **overrides) -> Trainer:
    tokenizer = CharTokenizer.from_text(text)
    model_cfg = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32,
                          dropout=0.1)
    train_cfg = TrainConfig(out_dir=str(out_dir), **{**dict(batch_size=4, eval_iters=2, eval_interval=1000,
                                                            log_interval=1, warmup_iters=2, lr_decay_iters=20),
                                                     **overrides})
    return Trainer(model_cfg, train_cfg, Dataset(text, tokenizer, 16), tokenizer, resume=resume, log=lambda _: None)


def test_the_trainers_whole_val_loss_is_the_whole_split_loss(small_text: Path, tmp_path: Path) -> None:
    text = small_text.read_text()[:3_005]  # val: 301 characters, 300 targets: not a multiple of block_size 16
    whole = make_trainer(text, tmp_path / "whole", eval_whole_val=True)
    sampled = make_trainer(text, tmp_path / "sampled")
    for _ in range(3):
        whole.train_step(), sampled.train_step()
    losses, default = whole.estimate_loss(), sampled.estimate_loss()
    whole.model.eval()  # the compiled, stream-split evaluation against a plain one (dropout off)
    expected = whole_split_loss(whole.dataset.val, 16, 4, plain_loss_sum(whole.model))
    assert losses["val"] == pytest.approx(expected, rel=1e-5)
    assert losses["train"] == default["train"]  # the train split's estimate stays random batches
    assert default["val"] == sampled.sampled_loss("val") != pytest.approx(expected, rel=1e-5)


def test_train_clock_leaves_out_paused_time(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    clock = TrainClock(5.0)  # carried over from a checkpoint
    assert clock.seconds() == 5.0
    clock.start()
    now[0] += 2
    with clock.paused():
        now[0] += 50
        assert clock.seconds() == 7.0
    now[0] += 1
    assert clock.seconds() == 8.0
    clock.stop()
    now[0] += 10
    assert clock.seconds() == 8.0


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_seconds_in_metrics_and_checkpoints(small_text: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    text = small_text.read_text()[:20_000]
    trainer = make_trainer(text, tmp_path, max_iters=6, eval_interval=3, eval_whole_val=True)
    # evaluations and saves take 1000 "seconds" each on a clock that otherwise stands still
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    estimate, save = trainer.estimate_loss, trainer.folder.save

    def slow(function):
        def wrapped(*args, **kwargs):
            now[0] += 1000
            return function(*args, **kwargs)
        return wrapped

    trainer.estimate_loss, trainer.folder.save = slow(estimate), slow(save)
    original_step = trainer.train_step

    def step():  # each step takes one second
        now[0] += 1
        return original_step()

    trainer.train_step = step
    trainer.run()
    records = read_metrics(tmp_path)
    assert [r["train_seconds"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    evals = [r for r in records if "val_loss" in r]
    assert [(r["iter"], r["train_seconds"], r["val_whole"]) for r in evals] == [(0, 0, True), (3, 3, True),
                                                                                 (6, 6, True)]
    latest = Checkpoint.load(tmp_path / "latest.npz")
    assert latest.train_seconds == 6

    # a resumed run carries on from the checkpoint's time
    monkeypatch.undo()
    make_trainer(text, tmp_path, resume=latest, max_iters=8, eval_interval=4).run()
    records = read_metrics(tmp_path)
    seconds = [r["train_seconds"] for r in records if r["iter"] > 0]
    assert seconds == sorted(seconds) and seconds[-1] > 6
    assert [r["val_whole"] for r in records if "val_loss" in r][-1] is False


def folder_state(folder: Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir())}


def test_eval_only_prints_losses_and_writes_nothing(small_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    trained = run_script("train.py", "--data", str(small_text), "--out_dir", str(out), *TINY_FLAGS,
                         "--max_iters", "4", "--eval_interval", "4", "--eval_whole_val")
    assert trained.returncode == 0, trained.stderr
    before = folder_state(out)
    proc = run_script("train.py", "--eval_only", "--out_dir", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert folder_state(out) == before
    match = re.search(r"weights: train loss ([\d.]+), val loss ([\d.]+) \(4 batches of 8\); whole val split "
                      r"\(4,999 targets\): ([\d.]+)", proc.stdout)
    assert match, proc.stdout
    last_eval = [r for r in read_metrics(out) if "val_loss" in r][-1]
    assert float(match.group(3)) == pytest.approx(last_eval["val_loss"], abs=1e-4)  # the whole split, as trained
    assert float(match.group(1)) == pytest.approx(last_eval["train_loss"], abs=1e-4)  # the same batches

    by_path = run_script("train.py", "--eval_only", "--ckpt", str(out / "latest.npz"), "--device", "cpu")
    assert by_path.returncode == 0 and match.group(0) in by_path.stdout


def test_eval_only_errors_are_one_line(tmp_path: Path) -> None:
    for args, message in ((["--out_dir", str(tmp_path)], f"{tmp_path / 'latest.npz'} does not exist"),
                          (["--ckpt", str(tmp_path / "x.npz")], "x.npz does not exist"),
                          (["--resume"], "--eval_only trains nothing")):
        proc = run_script("train.py", "--eval_only", *args, "--device", "cpu")
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch not installed")
def test_two_processes_share_the_whole_split_evaluation(small_text: Path, tmp_path: Path) -> None:
    from test_distributed import FLAGS, launch

    common = ["--data", str(small_text), *FLAGS, "--max_iters", "5", "--eval_whole_val"]
    two = launch("train.py", *common, "--batch_size", "4", "--out_dir", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-2000:]
    one = run_script("train.py", *common, "--batch_size", "8", "--out_dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    val_two, val_one = ([(r["iter"], r["val_loss"]) for r in read_metrics(tmp_path / name) if "val_loss" in r]
                        for name in ("two", "one"))
    assert [it for it, _ in val_two] == [it for it, _ in val_one] == [0, 5]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(val_two, val_one, strict=True)), (val_two, val_one)


def test_eval_only_takes_a_checkpoint_without_optimizer_state(small_text: Path, tmp_path: Path) -> None:
    text = small_text.read_text()
    tokenizer = CharTokenizer.from_text(text)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    mx.random.seed(3)
    model = GPT(config)
    weights = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    path = Checkpoint(config=config, tokenizer=tokenizer, model=weights).save(tmp_path / "imported.npz")
    lines: list[str] = []
    losses = evaluate_checkpoint(tmp_path, str(path), None, {"data": str(small_text), "batch_size": 4,
                                                             "eval_iters": 2}, log=lines.append)
    model.eval()
    val = Dataset(text, tokenizer, 16).val
    assert losses["val_whole"] == pytest.approx(whole_split_loss(val, 16, 4, plain_loss_sum(model)), rel=1e-5)
    assert "ema_val_whole" not in losses and any("whole val split" in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imported.npz"]


def test_checkpoint_train_seconds_is_checked_and_defaults_to_zero(tmp_path: Path) -> None:
    tokenizer = CharTokenizer("abc")
    config = GPTConfig(vocab_size=3, block_size=4, n_layer=1, n_head=1, n_embd=4)
    weights = {k: np.array(v) for k, v in tree_flatten(GPT(config).parameters())}
    assert Checkpoint.load(Checkpoint(config=config, tokenizer=tokenizer, model=weights,
                                      train_seconds=12.5).save(tmp_path / "a.npz")).train_seconds == 12.5
    old = Checkpoint(config=config, tokenizer=tokenizer, model=weights)  # a file from before train_seconds
    meta = {"config": config.to_dict(), "vocab": tokenizer.chars}
    (tmp_path / "old.npz").write_bytes(container_bytes(FORMAT, VERSION, meta, {f"model/{k}": v
                                                                              for k, v in old.model.items()}))
    assert Checkpoint.load(tmp_path / "old.npz").train_seconds == 0.0
    for bad in (-1.0, "1", True):
        path = Checkpoint(config=config, tokenizer=tokenizer, model=weights, train_seconds=bad).save(tmp_path / "b.npz")
        with pytest.raises(MlxGptError, match="'train_seconds' must be a finite number >= 0"):
            Checkpoint.load(path)
