"""--optimizer muon (Muon for the blocks' matrices, AdamW for the rest), Muon's momentum warm-up, the wsd schedule,
and their exact resume."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import run_script
from mlx.utils import tree_flatten, tree_map
from test_training import make_trainer

from mlx_gpt.checkpoint import Checkpoint
from mlx_gpt.config import GPTConfig, TrainConfig
from mlx_gpt.errors import MlxGptError
from mlx_gpt.model import GPT
from mlx_gpt.training import run_configs
from mlx_gpt.training.muon import Muon, MuonWithAdamW, is_muon_parameter, momentum_schedule
from mlx_gpt.training.optim import AdamW, lr_schedule, make_optimizer

MUON = dict(optimizer="muon", momentum_warmup_iters=4, lr_schedule="wsd", wsd_decay_fraction=0.5)


def flat(tree) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def matrices_and_grads(steps: int) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(0)
    shapes = {"tall": (12, 4), "wide": (4, 12), "square": (6, 6)}
    params = {k: mx.array(rng.normal(size=s).astype(np.float32)) for k, s in shapes.items()}
    grads = [{k: mx.array(rng.normal(size=s).astype(np.float32)) for k, s in shapes.items()} for _ in range(steps)]
    return params, grads


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_muon_is_mlx_muon_with_decoupled_weight_decay(weight_decay: float) -> None:
    """Without decay, ours is MLX's Muon; with it, MLX's Muon (no decay) applied to p * (1 - lr * wd)."""
    params, grads = matrices_and_grads(5)
    ours, reference = Muon(0.02, 0.95, weight_decay), optim.Muon(0.02, momentum=0.95, weight_decay=0.0)
    expected = dict(params)
    for g in grads:
        params = ours.apply_gradients(g, params)
        expected = reference.apply_gradients(g, tree_map(lambda p: p * (1 - 0.02 * weight_decay), expected))
    for name, value in flat(params).items():
        np.testing.assert_allclose(value, np.array(expected[name]), rtol=1e-5, atol=1e-6, err_msg=name)
    moved = flat(params)["tall"] - np.array(matrices_and_grads(0)[0]["tall"])
    assert np.abs(moved).max() > 0.01  # it did update


def test_muon_scales_tall_updates_by_the_root_of_their_aspect_ratio() -> None:
    """A tall (12 x 4) matrix moves sqrt(3) times as far as its transpose (4 x 12) given the transposed gradient
    (Newton-Schulz treats the two alike), as in Keller's Muon: max(1, rows / cols) ** 0.5."""
    grad = matrices_and_grads(1)[1][0]["tall"]
    params = {"tall": mx.zeros((12, 4)), "wide": mx.zeros((4, 12))}  # zero: the new weights are the moves
    moved = flat(Muon(0.02, 0.95, 0.0).apply_gradients({"tall": grad, "wide": grad.T}, params))
    np.testing.assert_allclose(moved["tall"], math.sqrt(3) * moved["wide"].T, rtol=1e-5, atol=1e-8)
    assert np.abs(moved["wide"]).max() > 1e-3


RECIPE_MODEL = dict(position_encoding="rope", qk_norm=True, value_residual=True, embed_shortcut=True,
                    activation="relu2", zero_init_proj=True, tie_weights=False)


@pytest.mark.parametrize("shape", [{}, {"bias": True, "tie_weights": False}, RECIPE_MODEL])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(shape: dict) -> None:
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, **shape))
    optimizer = make_optimizer(TrainConfig(optimizer="muon"))
    assert isinstance(optimizer, MuonWithAdamW)
    optimizer.init(model.trainable_parameters())
    parts = {name: set(flat(tree)) for name, tree in optimizer.split(model.trainable_parameters()).items()}
    assert parts["muon"] == {f"h.{i}.{m}.weight" for i in range(2)
                             for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert parts["adamw"] == set(flat(model.trainable_parameters())) - parts["muon"]
    assert {"wte.weight", "h.0.ln_1.weight", "ln_f.weight"} <= parts["adamw"]
    assert ("wpe.weight" in parts["adamw"]) == (shape.get("position_encoding", "learned") == "learned")
    assert ("lm_head.weight" in parts["adamw"]) == (not shape.get("tie_weights", True))
    assert ("h.1.mlp.c_fc.bias" in parts["adamw"]) == shape.get("bias", False)
    assert ("h.1.x0_lambdas" in parts["adamw"]) == shape.get("embed_shortcut", False)  # a block's scalar gains
    # the state: one momentum buffer per Muon matrix, AdamW's two moments for the rest
    state = flat(optimizer.state)
    assert {k.rsplit(".", 1)[0] for k in state if k.startswith("muon.h.")} == {f"muon.{n}" for n in parts["muon"]}
    assert {k for k in state if k.startswith("muon.h.")} == {f"muon.{n}.v" for n in parts["muon"]}
    assert {k for k in state if k.startswith("adamw.") and k.count(".") > 1} == \
        {f"adamw.{n}.{m}" for n in parts["adamw"] for m in ("m", "v")}
    # scalar gains another recipe may add go to AdamW, even inside the blocks
    assert not is_muon_parameter("h.0.attn.lambda", mx.zeros(())) and not is_muon_parameter("h.0.g", mx.zeros((4,)))


def test_adamw_stays_the_default_with_its_old_state() -> None:
    optimizer = make_optimizer(TrainConfig())
    assert type(optimizer) is AdamW
    optimizer.init({"w": mx.zeros((2, 2))})
    assert set(flat(optimizer.state)) == {"step", "learning_rate", "w.m", "w.v"}  # what older checkpoints hold


def test_momentum_warmup_rises_linearly_from_085() -> None:
    schedule = momentum_schedule(TrainConfig(muon_momentum=0.95, momentum_warmup_iters=300))
    for step, expected in [(0, 0.85), (150, 0.90), (299, 0.85 + 0.1 * 299 / 300), (300, 0.95), (5000, 0.95)]:
        assert schedule(mx.array(step, dtype=mx.uint64)).item() == pytest.approx(expected, abs=1e-7), step
    assert momentum_schedule(TrainConfig(muon_momentum=0.9)) == 0.9  # no warm-up: a constant


def test_muon_steps_use_the_scheduled_momentum_and_learning_rate(small_text: Path, tmp_path: Path) -> None:
    trainer = make_trainer(small_text.read_text()[:20_000], tmp_path, **MUON, muon_learning_rate=0.05)
    momentum, rate = momentum_schedule(trainer.cfg), lr_schedule(trainer.cfg)
    for step in range(6):
        trainer.train_step()
        state = trainer.optimizer.state
        assert state["muon"]["step"].item() == state["adamw"]["step"].item() == step + 1
        assert state["muon"]["momentum"].item() == pytest.approx(momentum(mx.array(step)).item(), abs=1e-7)
        assert state["adamw"]["learning_rate"].item() == rate(mx.array(step)).item()
        assert state["muon"]["learning_rate"].item() == pytest.approx(50 * rate(mx.array(step)).item(), rel=1e-6)


def wsd_lr(it: int, cfg: TrainConfig) -> float:
    """The wsd schedule, written out: nanoGPT's warm-up, flat, then linear to min_lr over the last fraction."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    start = max(cfg.warmup_iters, cfg.lr_decay_iters * (1 - cfg.wsd_decay_fraction))
    progress = min(max((it - start) / (cfg.lr_decay_iters - start), 0.0), 1.0)
    return cfg.learning_rate + progress * (cfg.min_lr - cfg.learning_rate)


@pytest.mark.parametrize("fraction, expected", [
    (0.2, {0: 1e-3 / 101, 99: 1e-3 * 100 / 101, 100: 1e-3, 799: 1e-3, 800: 1e-3, 900: 5.5e-4, 1000: 1e-4,
           3000: 1e-4}),
    (1.0, {100: 1e-3, 550: 5.5e-4, 1000: 1e-4}),  # a decay longer than what follows the warm-up starts after it
])
def test_wsd_schedule(fraction: float, expected: dict[int, float]) -> None:
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=1000, lr_schedule="wsd",
                      wsd_decay_fraction=fraction)
    schedule = lr_schedule(cfg)
    for it, lr in expected.items():
        assert schedule(mx.array(it)).item() == pytest.approx(lr, rel=1e-5), it
    for it in range(0, 1200, 7):
        assert schedule(mx.array(it)).item() == pytest.approx(wsd_lr(it, cfg), rel=1e-5), it


def cosine_before_wsd(cfg: TrainConfig):
    """lr_schedule as it was before wsd existed (nanoGPT's get_lr as MLX ops)."""
    warmup, decay_end = cfg.warmup_iters, max(cfg.lr_decay_iters, cfg.warmup_iters + 1)

    def lr(step: mx.array) -> mx.array:
        it = step.astype(mx.float32)
        warm = cfg.learning_rate * (it + 1) / (warmup + 1)
        progress = mx.clip((it - warmup) / (decay_end - warmup), 0.0, 1.0)
        cosine = cfg.min_lr + 0.5 * (1.0 + mx.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)
        return mx.where(it < warmup, warm, cosine)

    return lr


@pytest.mark.parametrize("preset", [{}, {"warmup_iters": 0, "lr_decay_iters": 0}, {"lr_decay_iters": 2000}])
def test_cosine_is_bit_for_bit_what_it_was(preset: dict) -> None:
    cfg = TrainConfig(**preset)
    steps = mx.arange(0, 6000, dtype=mx.uint64)
    assert mx.array_equal(lr_schedule(cfg)(steps), cosine_before_wsd(cfg)(steps)).item()


def test_muon_resume_is_exact(small_text: Path, tmp_path: Path) -> None:
    text = small_text.read_text()[:20_000]
    straight = make_trainer(text, tmp_path / "a", dropout=0.1, max_iters=10, **MUON)
    straight_losses = [straight.train_step() for _ in range(10)]

    first = make_trainer(text, tmp_path / "b", dropout=0.1, max_iters=10, **MUON)
    half = [first.train_step() for _ in range(5)]
    path = first.checkpoint().save(tmp_path / "half.npz")
    resumed = make_trainer(text, tmp_path / "b", resume=Checkpoint.load(path), max_iters=10, **MUON)
    assert resumed.iter == 5 and resumed.optimizer.step.item() == 5
    rest = [resumed.train_step() for _ in range(5)]

    assert half + rest == straight_losses  # losses and gradient norms, bit for bit
    for state in ("model.parameters()", "optimizer.state"):
        a, b = flat(eval(f"straight.{state}")), flat(eval(f"resumed.{state}"))
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{state}: {name}")


def test_resume_keeps_the_optimizer_of_the_checkpoint(small_text: Path, tmp_path: Path) -> None:
    text = small_text.read_text()[:20_000]
    muon = Checkpoint.load(make_trainer(text, tmp_path, optimizer="muon").checkpoint().save(tmp_path / "m.npz"))
    assert run_configs(None, {}, muon)[1].optimizer == "muon"
    with pytest.raises(MlxGptError, match="holds the state of --optimizer muon, which --optimizer adamw cannot"):
        run_configs(None, {"optimizer": "adamw"}, muon)
    # a checkpoint from before these settings: AdamW, and the new fields take their defaults
    old = make_trainer(text, tmp_path, max_iters=3).checkpoint()
    old.train = {k: v for k, v in old.train.items() if k not in MUON and not k.startswith("muon")}
    old = Checkpoint.load(old.save(tmp_path / "old.npz"))
    _, cfg = run_configs(None, {"max_iters": 4}, old)
    assert (cfg.optimizer, cfg.lr_schedule, cfg.muon_learning_rate) == ("adamw", "cosine", 0.02)
    resumed = make_trainer(text, tmp_path, resume=old, max_iters=4)
    resumed.train_step()
    with pytest.raises(MlxGptError, match="holds the state of --optimizer adamw, .*resume with --optimizer adamw"):
        run_configs(None, {"optimizer": "muon"}, old)


@pytest.mark.parametrize("field, value, message", [
    ("optimizer", "sgd", "optimizer must be one of adamw, muon"),
    ("lr_schedule", "linear", "lr_schedule must be one of cosine, wsd"),
    ("wsd_decay_fraction", 0.0, "wsd_decay_fraction must be in (0, 1]"),
    ("wsd_decay_fraction", 1.5, "wsd_decay_fraction must be in (0, 1]"),
    ("muon_learning_rate", 0.0, "muon_learning_rate must be a finite number > 0"),
    ("muon_learning_rate", float("inf"), "muon_learning_rate must be a finite number > 0"),
    ("muon_momentum", 1.0, "muon_momentum must be in [0, 1)"),
    ("momentum_warmup_iters", -1, "momentum_warmup_iters must be >= 0"),
])
def test_bad_settings_are_refused(field: str, value, message: str) -> None:
    with pytest.raises(MlxGptError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        TrainConfig(**{field: value})


def test_train_py_with_muon_end_to_end(small_text: Path, tmp_path: Path) -> None:
    args = ["--config", "baby", "--data", str(small_text), "--out_dir", str(tmp_path), "--eval_interval", "3",
            "--eval_iters", "2", "--device", "cpu"]
    proc = run_script("train.py", *args, "--optimizer", "muon", "--momentum_warmup_iters", "3", "--max_iters", "6")
    assert proc.returncode == 0, proc.stderr
    assert "optimizer: Muon lr 0.02 (momentum 0.95, from 0.85 over 3 iters" in proc.stdout
    assert "AdamW lr 0.001" in proc.stdout and "step 6: train loss" in proc.stdout
    ckpt = Checkpoint.load(tmp_path / "latest.npz")
    assert ckpt.iter == 6 and ckpt.train["optimizer"] == "muon" and ckpt.optimizer["muon.step"] == 6
    refused = run_script("train.py", "--resume", "--out_dir", str(tmp_path), "--optimizer", "adamw",
                         "--max_iters", "8", "--device", "cpu")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().count("\n") == 0 and "resume with --optimizer muon" in refused.stderr
    resumed = run_script("train.py", "--resume", "--out_dir", str(tmp_path), "--max_iters", "8", "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr
    assert Checkpoint.load(tmp_path / "latest.npz").optimizer["muon.step"] == 8
