"""Mixed precision: --dtype, float32 master weights, float16's dynamic loss scaling, half-precision sampling."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_FLAGS, run_script
from mlx.utils import tree_flatten
from test_training import make_trainer

from mlx_gpt import ops
from mlx_gpt.cache import make_cache
from mlx_gpt.checkpoint import Checkpoint, load_model
from mlx_gpt.config import TrainConfig
from mlx_gpt.errors import MlxGptError
from mlx_gpt.precision import resolve_dtype
from mlx_gpt.sampling import generate, make_sampler
from mlx_gpt.training.loss_scale import INIT_SCALE, LossScaler

HALF = ("bfloat16", "float16")


def flat(tree) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(tree)}


# ----------------------------------------------------------------------------- the setting


def test_auto_resolves_per_device_and_the_run_records_the_concrete_dtype(small_text: Path, tmp_path: Path) -> None:
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    trainer = make_trainer(small_text.read_text(), tmp_path, dtype="auto")
    assert trainer.cfg.dtype == "float32" and trainer.requested_dtype == "auto"
    assert trainer.checkpoint().train["dtype"] == "float32"


def test_bad_dtypes_are_one_line_errors(tiny_checkpoint: Path) -> None:
    with pytest.raises(MlxGptError, match="dtype must be one of float32, bfloat16, float16 or auto, got 'fp16'"):
        TrainConfig(dtype="fp16")
    with pytest.raises(MlxGptError, match="dtype must be one of float32, bfloat16, float16, got 'auto'"):
        load_model(tiny_checkpoint, dtype="auto")
    for script, args in (("train.py", ["--dtype", "half"]), ("sample.py", ["--ckpt", str(tiny_checkpoint),
                                                                            "--dtype", "auto"])):
        proc = run_script(script, *args)
        assert proc.returncode == 2 and "argument --dtype: invalid choice" in proc.stderr.strip().splitlines()[-1]
        assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- training in half precision


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_steps_keep_float32_weights_and_follow_float32(small_text: Path, tmp_path: Path,
                                                                      dtype: str) -> None:
    text = small_text.read_text()
    reference = make_trainer(text, tmp_path / "f32", dropout=0.1)
    half = make_trainer(text, tmp_path / dtype, dtype=dtype, dropout=0.1)
    ref_losses, ref_norms = zip(*[reference.train_step() for _ in range(12)], strict=True)
    losses, norms = zip(*[half.train_step() for _ in range(12)], strict=True)
    assert all(math.isfinite(loss) for loss in losses)
    np.testing.assert_allclose(losses, ref_losses, rtol=5e-3)
    np.testing.assert_allclose(norms, ref_norms, rtol=3e-2)  # the true (unscaled) gradient norm
    assert losses[-1] < losses[0] - 0.1  # it learns
    for name, array in [*tree_flatten(half.model.parameters()), *tree_flatten(half.optimizer.state)]:
        assert array.dtype in (mx.float32, mx.uint64), (name, array.dtype)
    ref_weights = flat(reference.model.parameters())
    for name, value in flat(half.model.parameters()).items():
        np.testing.assert_allclose(value, ref_weights[name], atol=2e-3, err_msg=name)
    x, y = half.sampler.next_batch()
    assert half.step.eval_loss(x, y) == pytest.approx(reference.step.eval_loss(x, y), rel=5e-3)


def test_float16_gradient_accumulation_equals_one_big_batch(small_text: Path, tmp_path: Path) -> None:
    text = small_text.read_text()
    big = make_trainer(text, tmp_path / "big", dtype="float16", batch_size=8)
    accumulated = make_trainer(text, tmp_path / "acc", dtype="float16", gradient_accumulation_steps=4, batch_size=2)
    steps_big = [big.train_step() for _ in range(3)]
    steps_acc = [accumulated.train_step() for _ in range(3)]
    np.testing.assert_allclose(steps_big, steps_acc, rtol=1e-3)  # losses and (unscaled) gradient norms


def test_the_cpu_plugin_leaves_half_precision_to_mlx() -> None:
    """Its kernels and blocked attention are float32's: other dtypes get MLX's own ops (float32 softmax)."""
    rng = np.random.default_rng(0)
    qkv = mx.array(rng.normal(size=(2, 24, 3 * 32)).astype(np.float32)).astype(mx.bfloat16)
    x, w = qkv[..., :32], mx.ones((32,), dtype=mx.bfloat16)
    assert mx.array_equal(ops.layer_norm(x, w, None, 1e-5), ops.PLAIN["layer_norm"](x, w, None, 1e-5)).item()
    ours, plain = ops.causal_self_attention(qkv, 4), ops.PLAIN["causal_self_attention"](qkv, 4)
    assert ours.dtype == mx.bfloat16
    assert mx.array_equal(ours, plain).item()


# ----------------------------------------------------------------------------- float16's loss scaling


def torch_scales(finite: list[bool], init: float, interval: int) -> list[tuple[float, int]]:
    """PyTorch's GradScaler update (torch._amp_update_scale_) over a sequence of steps."""
    torch = pytest.importorskip("torch")
    scale, tracker = torch.tensor([init]), torch.tensor([0], dtype=torch.int32)
    out = []
    for ok in finite:
        torch._amp_update_scale_(scale, tracker, torch.tensor([0.0 if ok else 1.0]), 2.0, 0.5, interval)
        out.append((scale.item(), tracker.item()))
    return out


def test_loss_scaler_updates_as_torch_grad_scaler() -> None:
    finite = [True, True, False, True, True, True, True, False, False, True, True, True]
    scaler = LossScaler(init_scale=1024.0, growth_interval=3)
    ours = []
    for ok in finite:
        scaler.update(mx.array(ok))
        ours.append((scaler.scale, scaler.state["good_steps"].item()))
    assert ours == torch_scales(finite, 1024.0, 3)
    scaler = LossScaler(init_scale=2.0)
    for _ in range(3):
        scaler.update(mx.array(False))
    assert scaler.scale == 1.0  # never below MIN_SCALE


def test_an_overflow_skips_the_step_and_halves_the_scale(small_text: Path, tmp_path: Path) -> None:
    trainer = make_trainer(small_text.read_text(), tmp_path, dtype="float16")
    assert trainer.scaler.to_dict() == {"scale": INIT_SCALE, "good_steps": 0}
    trainer.scaler.load({"scale": 2.0**40, "good_steps": 7})  # far too large: the float16 backward overflows
    weights, state = flat(trainer.model.parameters()), flat(trainer.optimizer.state)
    loss, norm = trainer.train_step()
    assert math.isfinite(loss) and not math.isfinite(norm)
    assert trainer.scaler.to_dict() == {"scale": 2.0**39, "good_steps": 0}
    for before, after in ((weights, flat(trainer.model.parameters())), (state, flat(trainer.optimizer.state))):
        assert before.keys() == after.keys()
        assert all(np.array_equal(before[k], after[k]) for k in before)


def test_overflows_do_not_count_as_nonfinite_steps_and_are_logged_now_and_then(
        small_text: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    trainer = make_trainer(small_text.read_text(), tmp_path, dtype="float16", max_iters=30, skip_nonfinite=0,
                           log_interval=10)
    trainer.scaler.load({"scale": 2.0**40, "good_steps": 0})  # some 20 overflows before the scale fits
    result = trainer.run()  # skip_nonfinite 0: a counted non-finite step would stop the run
    assert result.iter == 30 and trainer.nonfinite_skipped == 0
    assert trainer.overflow_skipped >= 10
    lines = [line for line in capsys.readouterr().out.splitlines() if "float16 gradient overflow" in line]
    assert 2 <= len(lines) <= 1 + math.ceil(trainer.overflow_skipped / 10), lines
    assert trainer.optimizer.state["step"].item() == 30 - trainer.overflow_skipped
    assert Checkpoint.load(tmp_path / "latest.npz").loss_scale == trainer.scaler.to_dict()


def test_the_scale_grows_after_growth_interval_good_steps(small_text: Path, tmp_path: Path) -> None:
    trainer = make_trainer(small_text.read_text(), tmp_path, dtype="float16")
    trainer.scaler.growth_interval = 3  # before the first step: the compiled step reads it when it is traced
    trainer.scaler.load({"scale": 8.0, "good_steps": 0})  # small: no overflow as it grows
    scales = []
    for _ in range(7):
        trainer.train_step()
        scales.append(trainer.scaler.to_dict())
    assert [s["scale"] for s in scales] == [8, 8, 16, 16, 16, 32, 32]
    assert [s["good_steps"] for s in scales] == [1, 2, 0, 1, 2, 0, 1]


def test_float16_resume_restores_the_scale_and_is_exact(small_text: Path, tmp_path: Path) -> None:
    text = small_text.read_text()[:20_000]

    def trainer(out: str, **kwargs):
        t = make_trainer(text, tmp_path / out, dtype="float16", dropout=0.1, max_iters=10, **kwargs)
        t.scaler.growth_interval = 4
        if "resume" not in kwargs:
            t.scaler.load({"scale": 8.0, "good_steps": 0})  # small: no overflow as it grows
        return t

    straight = trainer("a")
    straight_losses = [straight.train_step()[0] for _ in range(10)]
    first = trainer("b")
    half_losses = [first.train_step()[0] for _ in range(5)]
    saved = first.checkpoint().save(tmp_path / "half.npz")
    assert Checkpoint.load(saved).loss_scale == {"scale": 16.0, "good_steps": 1}
    resumed = trainer("b", resume=Checkpoint.load(saved))
    assert resumed.scaler.to_dict() == first.scaler.to_dict()
    rest_losses = [resumed.train_step()[0] for _ in range(5)]
    assert half_losses + rest_losses == straight_losses
    assert resumed.scaler.to_dict() == straight.scaler.to_dict() == {"scale": 32.0, "good_steps": 2}
    weights = flat(straight.model.parameters())
    assert all(np.array_equal(v, weights[k]) for k, v in flat(resumed.model.parameters()).items())


def test_checkpoints_without_a_loss_scale_still_load_and_start_float16_at_the_initial_scale(
        small_text: Path, tmp_path: Path) -> None:
    text = small_text.read_text()
    plain = make_trainer(text, tmp_path / "a", max_iters=3)
    plain.train_step()
    saved = Checkpoint.load(plain.checkpoint().save(tmp_path / "f32.npz"))
    assert saved.loss_scale is None
    resumed = make_trainer(text, tmp_path / "a", resume=saved, dtype="float16", max_iters=3)
    assert resumed.scaler.to_dict() == {"scale": INIT_SCALE, "good_steps": 0}


@pytest.mark.parametrize("bad", [{"scale": -1.0, "good_steps": 0}, {"scale": 2.0}, {"scale": 2.0, "good_steps": 1.5},
                                 "big"])
def test_a_bad_loss_scale_in_a_checkpoint_is_refused(small_text: Path, tmp_path: Path, bad) -> None:
    ckpt = make_trainer(small_text.read_text(), tmp_path, dtype="float16").checkpoint()
    ckpt.loss_scale = bad
    path = ckpt.save(tmp_path / "bad.npz")
    with pytest.raises(MlxGptError, match="'loss_scale' must be null or"):
        Checkpoint.load(path)


# ----------------------------------------------------------------------------- sampling in half precision

PROMPT = "ROMEO:\n"


def greedy_text(ckpt: Path, dtype: str, tokens: int = 40) -> str:
    model, tokenizer, _ = load_model(ckpt, dtype=dtype)
    return "".join(chars[0] for chars in generate(model, tokenizer, PROMPT, tokens, make_sampler(0.0)))


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_sampling_matches_float32_greedy(tiny_checkpoint: Path, dtype: str) -> None:
    model, _, _ = load_model(tiny_checkpoint, dtype=dtype)
    assert {p.dtype for _, p in tree_flatten(model.parameters())} == {getattr(mx, dtype)}
    cache = make_cache(model)
    assert model(mx.array([[1, 2, 3]]), cache=cache).dtype == getattr(mx, dtype)
    assert cache[0].keys.dtype == cache[0].values.dtype == getattr(mx, dtype)
    assert greedy_text(tiny_checkpoint, dtype)[:20] == greedy_text(tiny_checkpoint, "float32")[:20]


def test_sample_py_dtype(tiny_checkpoint: Path) -> None:
    expected = PROMPT + greedy_text(tiny_checkpoint, "float16")
    here = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"  # where the library ran
    proc = run_script("sample.py", "--ckpt", str(tiny_checkpoint), "--dtype", "float16", "--prompt", PROMPT,
                      "--temperature", "0", "--max_new_tokens", "40", "--device", here)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"


def test_train_py_dtype_flag_reaches_the_checkpoint(small_text: Path, tmp_path: Path) -> None:
    proc = run_script("train.py", "--data", str(small_text), "--out_dir", str(tmp_path), *TINY_FLAGS,
                      "--max_iters", "4", "--eval_interval", "4", "--dtype", "float16")
    assert proc.returncode == 0, proc.stderr
    assert "precision: float16 forward and backward" in proc.stdout
    ckpt = Checkpoint.load(tmp_path / "latest.npz")
    assert ckpt.train["dtype"] == "float16" and ckpt.loss_scale["scale"] == INIT_SCALE
    assert {v.dtype for v in ckpt.model.values()} == {np.dtype(np.float32)}
