"""The recipe in training: the baby-fast preset, exact resume with every setting at once, and the preset end to end
(train, resume, --eval_only, sample past block_size)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import ROOT
from mlx.utils import tree_flatten
from test_training import make_trainer

from mlx_gpt.checkpoint import Checkpoint
from mlx_gpt.config import PRESETS, GPTConfig, TrainConfig, split_fields

ARCHITECTURE = dict(position_encoding="rope", qk_norm=True, activation="relu2", zero_init_proj=True,
                    tie_weights=False, logit_softcap=30.0, value_residual=True, embed_shortcut=True)


def test_baby_fast_is_baby_with_the_recipe() -> None:
    model_fields, train_fields = split_fields(PRESETS["baby-fast"])
    GPTConfig(**model_fields), TrainConfig(**train_fields)  # valid
    changed = {k: v for k, v in PRESETS["baby-fast"].items() if PRESETS["baby"].get(k, "unset") != v}
    assert changed == {**ARCHITECTURE, "eval_whole_val": True}


def test_resume_with_every_setting_is_exact(small_text: Path, tmp_path: Path) -> None:
    text = small_text.read_text()[:20_000]
    settings = dict(ARCHITECTURE, optimizer="muon", dropout=0.1, momentum_warmup_iters=3, lr_schedule="wsd",
                    max_iters=8)
    straight = make_trainer(text, tmp_path / "a", **settings)
    expected = [straight.train_step() for _ in range(8)]
    first = make_trainer(text, tmp_path / "b", **settings)
    half = [first.train_step() for _ in range(4)]
    path = first.checkpoint().save(tmp_path / "half.npz")
    resumed = make_trainer(text, tmp_path / "b", resume=Checkpoint.load(path), **{
        k: v for k, v in settings.items() if k in TrainConfig.__dataclass_fields__})
    assert half + [resumed.train_step() for _ in range(4)] == expected
    for a, b in zip(tree_flatten(straight.model.parameters()), tree_flatten(resumed.model.parameters()), strict=True):
        assert a[0] == b[0]
        np.testing.assert_array_equal(np.array(a[1]), np.array(b[1]), err_msg=a[0])


def run(*args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_baby_fast_trains_resumes_evaluates_and_samples(small_text: Path, tmp_path: Path) -> None:
    common = ["--config", "baby-fast", "--data", str(small_text), "--out_dir", str(tmp_path / "out"),
              "--n_layer", "2", "--block_size", "32", "--eval_interval", "3", "--eval_iters", "2"]
    banner = run(str(ROOT / "train.py"), *common, "--max_iters", "3", cwd=tmp_path)
    assert "rope" in banner
    run(str(ROOT / "train.py"), *common, "--max_iters", "6", "--resume", cwd=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "val_loss" in r] == [0, 3, 6]
    assert all(r["val_whole"] for r in records if "val_loss" in r)
    ckpt = Checkpoint.load(tmp_path / "out" / "latest.npz")
    assert ckpt.iter == 6 and ckpt.config.position_encoding == "rope" and ckpt.train["eval_whole_val"]
    evaluated = run(str(ROOT / "train.py"), "--eval_only", "--out_dir", str(tmp_path / "out"), "--data",
                    str(small_text), cwd=tmp_path)
    assert "whole val split" in evaluated
    text = run(str(ROOT / "sample.py"), "--ckpt", str(tmp_path / "out" / "latest.npz"), "--max_new_tokens", "100",
               "--seed", "1", cwd=tmp_path)
    assert len(text) >= 100  # past block_size 32: the rotary cache slides
