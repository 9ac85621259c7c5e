"""Fault injection: kills, full disks, failed writes, NaNs, interrupts and a second run in the same out_dir.

The promise under test: a fault never costs more than the last save interval, never leaves an unreadable
checkpoint, and always ends with a one-line message (no traceback).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT, TINY_FLAGS, run_script

from mlx_gpt import files as files_module
from mlx_gpt.checkpoint import Checkpoint
from mlx_gpt.config import GPTConfig, TrainConfig
from mlx_gpt.data import Dataset
from mlx_gpt.errors import MlxGptError
from mlx_gpt.training import Trainer, resolve_resume
from mlx_gpt.training import run_log as run_log_module
from mlx_gpt.training.checkpoints import timestamped_checkpoints, writer_of

# ----------------------------------------------------------------------------- helpers


def _flags(data: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out_dir", str(out_dir), *TINY_FLAGS, *extra]


def _start(args: list[str], log: Path, delay: float | None = None) -> subprocess.Popen:
    """train.py in the background; its output goes to ``log`` (a pipe nobody reads could block it)."""
    slow = [str(Path(__file__).with_name("slow_saves.py")), str(delay)] if delay is not None else []
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, *slow, str(ROOT / "train.py"), *args], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"train.py exited early with {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting on train.py:\n{log.read_text()}")
        time.sleep(0.005)


def _trained(metrics: Path, offset: int) -> bool:
    """Whether metrics.jsonl has a training step's line after byte ``offset``."""
    if not metrics.exists():
        return False
    with open(metrics, "rb") as f:
        f.seek(offset)
        return any(b'"loss"' in line for line in f.read().splitlines())


def _logged_iters(metrics: Path, offset: int) -> list[int]:
    """Iterations that metrics.jsonl records after byte ``offset`` (what one process did)."""
    if not metrics.exists():
        return []
    iters = []
    with open(metrics, "rb") as f:
        f.seek(offset)
        for line in f.read().splitlines():
            try:
                iters.append(json.loads(line)["iter"])
            except (ValueError, KeyError):  # a line cut by the kill
                continue
    return iters


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _one_line_error(stderr: str) -> str:
    """The ``error: ...`` line of a failed script, checked to be the only line about the failure."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert "unexpected" not in errors[0], errors[0]  # "unexpected" is how cli.run reports a bug
    return errors[0]


def _assert_finite_weights(ckpt: Checkpoint) -> None:
    assert all(np.isfinite(v).all() for v in ckpt.model.values())


# ----------------------------------------------------------------------------- SIGKILL at many points

KILL_POINTS_REQUIRED = 50
SAVE_INTERVAL = 2


@pytest.mark.slow
def test_sigkill_at_many_points_loses_at_most_one_save_interval(tmp_path: Path, small_text: Path) -> None:
    """A chain of training processes, each killed with SIGKILL at a random moment and the next one resumed.

    Saves are slowed (tests/slow_saves.py: a pause before each rename) so that many kills land inside a save.
    After every kill: every checkpoint on disk loads, latest.npz is at most one save interval
    behind the last step the killed process finished, and the next process resumes from it (never from 0).
    """
    out = tmp_path / "run"
    latest, metrics = out / "latest.npz", out / "metrics.jsonl"
    args = _flags(small_text, out, "--max_iters", "1000000", "--eval_interval", "7", "--log_interval", "1",
                  "--save_interval", str(SAVE_INTERVAL), "--keep_last", "3")
    rng = random.Random(6)
    kills = inside_save = resumed = during_start = 0
    while kills < KILL_POINTS_REQUIRED + 2:
        resume_iter = Checkpoint.load(latest).iter if latest.exists() else None
        offset = _size(metrics)
        log = tmp_path / f"kill{kills}.log"
        proc = _start(args + (["--resume"] if resume_iter is not None else []), log, delay=0.01)
        if rng.random() < 0.2:  # during start-up (imports, loading, compiling) or the first steps
            time.sleep(rng.uniform(0.0, 0.8))
            during_start += _size(metrics) == offset
        else:  # while stepping and saving: once this process has logged a training step (not only an eval)
            _wait_for(lambda: _trained(metrics, offset), proc, log)  # noqa: B023
            time.sleep(rng.uniform(0.0, 0.25))
        assert proc.poll() is None, log.read_text()
        proc.kill()
        proc.wait()
        kills += 1
        resumed += resume_iter is not None
        inside_save += any(out.glob(".*.tmp")) if out.exists() else 0

        # Everything on disk loads (a temp file may be left over: the next start removes it).
        for path in [latest, out / "best.npz", *(p for _, p in timestamped_checkpoints(out))] if out.exists() else []:
            if path.exists():
                Checkpoint.load(path)
        done = _logged_iters(metrics, offset)
        if resume_iter is not None and done:
            assert min(done) > resume_iter, f"the run resumed from {resume_iter} but logged {min(done)}"
        saved = Checkpoint.load(latest).iter if latest.exists() else 0
        assert max(done, default=0) - saved <= SAVE_INTERVAL, f"lost {max(done) - saved} steps (kill {kills})"

    # The last resume runs to the end: it picks up where the kills left it and cleans up the temp files.
    start = Checkpoint.load(latest).iter
    proc = run_script("train.py", *args, "--resume", "--max_iters", str(start + 3))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resuming from {latest} at iter {start}" in proc.stdout
    assert Checkpoint.load(latest).iter == start + 3
    assert not list(out.glob(".*.tmp"))
    # --keep_last 3 of the final run's lineage; a file written by a process killed before it updated latest.npz is
    # a branch the next run did not take: kept, never pruned.
    lineage = dict(Checkpoint.load(latest).lineage)
    ours = [step for step, path in timestamped_checkpoints(out)
            if (run := writer_of(path)) in lineage and (lineage[run] is None or step <= lineage[run])]
    assert len(ours) <= 3, ours
    print(f"\nSIGKILL kill points tried: {kills} ({inside_save} inside a save, {during_start} before the first "
          f"step, {resumed} in runs started with --resume); the chain reached iter {start + 3}")
    assert kills >= KILL_POINTS_REQUIRED
    assert inside_save >= 5, "too few kills landed inside a save to prove anything about it"


# ----------------------------------------------------------------------------- failed writes (in-process)


class FullDisk:
    """A stand-in for ``open`` in a module: files opened for writing fail with ``error`` once ``capacity``
    bytes have been written through it in all (the first write that does not fit is cut short, as on a
    real full disk). ``capacity=None`` means plenty of space."""

    def __init__(self, capacity: int | None, error: int = errno.ENOSPC, only: str = "") -> None:
        self.capacity, self.error, self.only = capacity, error, only
        self.used = self.failures = 0

    def __call__(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        real = open(file, mode, *args, **kwargs)
        if not any(c in mode for c in "wa+") or self.only not in str(file):
            return real
        disk, write = self, real.write

        def limited_write(data: Any) -> int:
            room = None if disk.capacity is None else disk.capacity - disk.used
            if room is not None and len(data) > room:
                write(data[:max(room, 0)])
                disk.used += max(room, 0)
                disk.failures += 1
                raise OSError(disk.error, os.strerror(disk.error))
            disk.used += len(data)
            return write(data)

        real.write = limited_write
        return real


def _trainer(out_dir: Path, data: Path, log: Callable[[str], None] = print, **train: Any) -> Trainer:
    """A tiny uncompiled Trainer (no start-up cost) on ``data``."""
    model_cfg = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    train_cfg = TrainConfig(**{"data": str(data), "out_dir": str(out_dir), "batch_size": 4, "eval_iters": 2,
                               "eval_interval": 1000, "compile": False, **train})
    dataset, tokenizer = Dataset.load(train_cfg.data, model_cfg.block_size)
    model_cfg = GPTConfig.from_dict({**model_cfg.to_dict(), "vocab_size": tokenizer.vocab_size})
    return Trainer(model_cfg, train_cfg, dataset, tokenizer, log=log)


def _checkpoint_size(trainer: Trainer) -> int:
    return len(trainer.checkpoint().to_bytes())


def test_disk_full_stops_with_message_and_keeps_previous_checkpoint(tmp_path, small_text, monkeypatch) -> None:
    out = tmp_path / "out"
    trainer = _trainer(out, small_text, log=lambda _: None, max_iters=20, save_interval=5)
    disk = FullDisk(capacity=int(1.5 * _checkpoint_size(trainer)))  # the first save fits, the second does not
    monkeypatch.setattr(files_module, "open", disk, raising=False)
    with pytest.raises(MlxGptError) as info:
        trainer.run()
    message = str(info.value)
    assert "\n" not in message
    assert "at iter 10" in message and "No space left on device" in message and "free some disk space" in message
    assert f"{out / 'latest.npz'} holds iter 5" in message
    assert disk.failures == 1
    kept = Checkpoint.load(out / "latest.npz")
    assert kept.iter == 5
    assert [step for step, _ in timestamped_checkpoints(out)] == [5]
    assert not list(out.glob(".*.tmp")), "the half-written temp file was left behind"


def test_disk_full_with_warn_keeps_training_and_saves_when_space_is_back(tmp_path, small_text, monkeypatch) -> None:
    out, logged = tmp_path / "out", []
    trainer = _trainer(out, small_text, log=logged.append, max_iters=25, save_interval=5, on_save_error="warn")
    disk = FullDisk(capacity=int(1.5 * _checkpoint_size(trainer)))
    monkeypatch.setattr(files_module, "open", disk, raising=False)
    free_space_after = 2

    def log(line: str) -> None:  # the user frees some space after the second warning
        logged.append(line)
        if disk.failures >= free_space_after:
            disk.capacity = None

    trainer.log = log
    result = trainer.run()
    warnings = [line for line in logged if line.startswith("warning: could not write checkpoint")]
    assert len(warnings) == free_space_after and "at iter 10" in warnings[0] and "at iter 15" in warnings[1]
    assert result.iter == 25
    assert Checkpoint.load(out / "latest.npz").iter == 25
    assert not list(out.glob(".*.tmp"))


def test_disk_full_with_warn_to_the_end_says_what_was_not_saved(tmp_path, small_text, monkeypatch) -> None:
    out, logged = tmp_path / "out", []
    trainer = _trainer(out, small_text, log=logged.append, max_iters=10, save_interval=5, on_save_error="warn")
    monkeypatch.setattr(files_module, "open", FullDisk(capacity=int(1.5 * _checkpoint_size(trainer))),
                        raising=False)
    with pytest.raises(MlxGptError, match=r"^iter 10 could not be saved; .*latest.npz holds iter 5; free some"):
        trainer.run()  # a run whose end is not on disk does not end as a success
    assert Checkpoint.load(out / "latest.npz").iter == 5


def test_permission_denied_on_save(tmp_path, small_text, monkeypatch) -> None:
    out = tmp_path / "out"
    trainer = _trainer(out, small_text, max_iters=3)
    out.mkdir()
    trainer.train_step()
    trainer.save(is_best=False)
    monkeypatch.setattr(files_module, "open", FullDisk(capacity=0, error=errno.EACCES), raising=False)
    trainer.train_step()
    with pytest.raises(MlxGptError, match="Permission denied; check the folder's permissions"):
        trainer.save(is_best=False)
    assert Checkpoint.load(out / "latest.npz").iter == 1


def test_metrics_write_failure_does_not_stop_training(tmp_path, small_text, monkeypatch) -> None:
    """metrics.jsonl is a log, not the work: a failed append warns (once) and training goes on."""
    out, logged = tmp_path / "out", []
    trainer = _trainer(out, small_text, log=logged.append, max_iters=20, log_interval=1, save_interval=10)
    monkeypatch.setattr(run_log_module, "open", FullDisk(capacity=200, only="metrics.jsonl"), raising=False)
    result = trainer.run()
    assert result.iter == 20 and Checkpoint.load(out / "latest.npz").iter == 20
    assert sum("metrics" in line and line.startswith("warning:") for line in logged) == 1, logged


def test_out_dir_that_cannot_be_created(tmp_path, small_text) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    trainer = _trainer(blocker / "out", small_text, max_iters=2)
    with pytest.raises(MlxGptError, match="out_dir"):
        trainer.run()


@contextmanager
def tiny_tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A real small file system (skips the test where mounting is not allowed)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.mark.parametrize("on_save_error", ["stop", "warn"])
def test_real_full_disk(tmp_path: Path, small_text: Path, on_save_error: str) -> None:
    """train.py on a 1 MiB tmpfs: each checkpoint of the tiny model is ~350 kB, so the third save fails."""
    with tiny_tmpfs(tmp_path / "disk", "1m") as disk:
        out = disk / "out"
        proc = run_script("train.py", *_flags(small_text, out, "--max_iters", "12", "--eval_interval", "1000",
                                              "--save_interval", "2", "--on_save_error", on_save_error))
        latest = Checkpoint.load(out / "latest.npz")
        leftovers = list(out.glob(".*.tmp"))
    if on_save_error == "stop":
        assert proc.returncode == 1, proc.stdout + proc.stderr
        error = _one_line_error(proc.stderr)
        assert "No space left on device" in error and "free some disk space" in error
        stopped_at = int(error.split(" at iter ")[1].split(":")[0])
        assert latest.iter == stopped_at - 2  # work lost: one save interval
    else:
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "No space left on device" in proc.stdout and "training goes on" in proc.stdout
        assert f"iter 12 could not be saved; {out / 'latest.npz'} holds iter {latest.iter}" in \
            _one_line_error(proc.stderr)
    assert latest.iter >= 2
    assert not leftovers


# ----------------------------------------------------------------------------- non-finite loss


def test_nan_stops_with_message_and_last_good_checkpoint_loads(tmp_path: Path, small_text: Path) -> None:
    """learning rate 1e6 blows the tiny model up within a few steps; --skip_nonfinite 2 skips two more."""
    stopped = {}
    for skip in (0, 2):
        out = tmp_path / f"skip{skip}"
        proc = run_script("train.py", *_flags(small_text, out, "--max_iters", "50", "--eval_interval", "1000",
                                              "--save_interval", "1", "--learning_rate", "1e6",
                                              "--warmup_iters", "0", "--skip_nonfinite", str(skip)))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        error = _one_line_error(proc.stderr)
        stopped[skip] = int(error.split(" at iter ")[1].split(":")[0])
        latest = Checkpoint.load(out / "latest.npz")
        assert "non-finite" in error and f"{out / 'latest.npz'} holds iter {latest.iter}" in error
        assert latest.iter < stopped[skip]
        _assert_finite_weights(latest)
        if skip:
            assert proc.stdout.count("step skipped") == skip
    assert stopped[2] == stopped[0] + 2  # skipped steps left the weights as they were


def _strict_json_lines(path: Path) -> list[dict]:
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_a_diverged_run_is_never_saved_as_good(tmp_path: Path, small_text: Path) -> None:
    """Skipped non-finite steps let the weights grow until evaluation gives NaN: those weights are not saved."""
    out = tmp_path / "out"
    proc = run_script("train.py", *_flags(small_text, out, "--max_iters", "60", "--eval_interval", "2",
                                          "--learning_rate", "1e6", "--warmup_iters", "0", "--skip_nonfinite", "3"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    error = _one_line_error(proc.stderr)
    latest = Checkpoint.load(out / "latest.npz")  # finite weights (non-finite ones are refused at load too)
    _assert_finite_weights(latest)
    assert f"{out / 'latest.npz'} holds iter {latest.iter}" in error and "last good" not in error
    records = _strict_json_lines(out / "metrics.jsonl")  # NaN is written as null
    assert any(r.get("val_loss", 0) is None or r.get("loss", 0) is None for r in records), records[-3:]


def test_resume_that_has_nothing_to_train_is_an_error(tmp_path: Path, small_text: Path) -> None:
    out = tmp_path / "out"
    assert run_script("train.py", *_flags(small_text, out, "--max_iters", "4", "--eval_interval", "2")).returncode == 0
    proc = run_script("train.py", *_flags(small_text, out, "--max_iters", "3", "--resume"))
    assert proc.returncode == 1
    assert "is at iter 4 and --max_iters is 3: nothing to train; pass a larger --max_iters" in \
        _one_line_error(proc.stderr)


def test_resume_on_another_text_says_so(tmp_path: Path, small_text: Path) -> None:
    out, other = tmp_path / "out", tmp_path / "other.txt"
    other.write_text(small_text.read_text()[::-1])  # the same characters, another text
    assert run_script("train.py", *_flags(small_text, out, "--max_iters", "2", "--eval_interval", "2")).returncode == 0
    assert Checkpoint.load(out / "latest.npz").data["sha256"] != ""
    same = run_script("train.py", *_flags(small_text, out, "--max_iters", "3", "--resume"))
    assert same.returncode == 0 and "is not the text" not in same.stdout
    changed = run_script("train.py", *_flags(other, out, "--max_iters", "4", "--resume"))
    assert changed.returncode == 0, changed.stderr
    assert f"note: {other} ({len(other.read_text()):,} characters) is not the text" in changed.stdout


def test_latest_npz_that_is_a_folder_is_named_in_the_save_error(tmp_path: Path, small_text: Path) -> None:
    out = tmp_path / "out"
    (out / "latest.npz").mkdir(parents=True)
    trainer = _trainer(out, small_text, max_iters=2)
    trainer.train_step()
    with pytest.raises(MlxGptError) as info:
        trainer.save(is_best=False)
    message = str(info.value)
    assert "latest.npz" in message and "is in the way (a folder?): move it aside" in message
    assert "holds no checkpoint of this run" in message and "permissions" not in message


# ----------------------------------------------------------------------------- signals


def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path: Path, small_text: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "train.log"
    metrics = out / "metrics.jsonl"
    proc = _start(_flags(small_text, out, "--max_iters", "100000", "--eval_interval", "100000", "--log_interval",
                         "1"), log)
    _wait_for(lambda: len(_logged_iters(metrics, 0)) > 3, proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()
    text = log.read_text()
    assert "SIGTERM: finishing this step, then saving" in text
    stopped_at = int(text.split("interrupted at iter ")[1].split(":")[0])
    assert Checkpoint.load(out / "latest.npz").iter == stopped_at == max(_logged_iters(metrics, 0))  # nothing lost


def _interrupt_inside_save(tmp_path: Path, small_text: Path, interrupts: int) -> tuple[int, Path, str]:
    """Send ``interrupts`` SIGINTs while the step-10 checkpoint is being written (each pause of the save
    lasts 0.5 s); returns (exit code, out_dir, output)."""
    out, log = tmp_path / "out", tmp_path / "train.log"
    proc = _start(_flags(small_text, out, "--max_iters", "100000", "--eval_interval", "100000",
                         "--save_interval", "5"), log, delay=0.5)
    _wait_for(lambda: any(out.glob(".gpt-*-step10.npz.*.tmp")), proc, log)
    for _ in range(interrupts):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    code = proc.wait(timeout=60)
    return code, out, log.read_text()


def test_second_ctrl_c_during_save_waits_for_it(tmp_path: Path, small_text: Path) -> None:
    code, out, text = _interrupt_inside_save(tmp_path, small_text, interrupts=2)
    assert code == 0, text
    assert "waiting for the checkpoint being written" in text
    steps = [step for step, _ in timestamped_checkpoints(out)]
    assert steps == [5, 10], steps  # the save in progress was completed, and the run stopped there
    Checkpoint.load(timestamped_checkpoints(out)[1][1])
    assert Checkpoint.load(out / "latest.npz").iter == 10
    assert not list(out.glob(".*.tmp"))


def test_third_ctrl_c_exits_at_once_leaving_valid_files(tmp_path: Path, small_text: Path) -> None:
    code, out, text = _interrupt_inside_save(tmp_path, small_text, interrupts=3)
    assert code == 130, text
    assert "third interrupt: exiting now" in text
    assert [step for step, _ in timestamped_checkpoints(out)] == [5], "the third Ctrl+C waited for the save"
    assert Checkpoint.load(out / "latest.npz").iter == 5  # the previous save, intact
    assert list(out.glob(".*.tmp"))  # the abandoned write...
    proc = run_script("train.py", *_flags(small_text, out), "--resume", "--max_iters", "7")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(out.glob(".*.tmp"))  # ...is cleaned up by the next run
    assert Checkpoint.load(out / "latest.npz").iter == 7


# ----------------------------------------------------------------------------- one out_dir, one run


def test_second_training_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path: Path, small_text: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "first.log"
    first = _start(_flags(small_text, out, "--max_iters", "100000", "--eval_interval", "100000",
                          "--save_interval", "5"), log)
    _wait_for(lambda: (out / "latest.npz").exists(), first, log)
    second = run_script("train.py", *_flags(small_text, out, "--max_iters", "5"))
    assert second.returncode == 1, second.stdout + second.stderr
    error = _one_line_error(second.stderr)
    assert "in use by a training run" in error and f"pid {first.pid}" in error
    assert first.poll() is None, "the refused run disturbed the first one"

    first.kill()
    first.wait()
    assert (out / ".lock").read_text() == str(first.pid)  # stale: its holder is dead
    saved = Checkpoint.load(out / "latest.npz").iter
    third = run_script("train.py", *_flags(small_text, out), "--resume", "--max_iters", str(saved + 2))
    assert third.returncode == 0, third.stdout + third.stderr
    assert Checkpoint.load(out / "latest.npz").iter == saved + 2


# ----------------------------------------------------------------------------- corrupt latest.npz on --resume


def _corrupt(path: Path, in_place: bool = False) -> None:
    """Flip a byte in the middle. ``in_place`` damages the file's data (and so every hard link to it, as bit rot
    would); otherwise a damaged copy replaces the file (as a bad copy from a backup would)."""
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    if not in_place:
        path.unlink()
    path.write_bytes(bytes(payload))


def test_resume_with_corrupt_latest_names_the_newest_valid_checkpoint(tmp_path, small_text) -> None:
    out = tmp_path / "out"
    trainer = _trainer(out, small_text, max_iters=10)
    out.mkdir()
    for _ in range(3):
        trainer.train_step()
        trainer.save(is_best=False)
    (step1, _), (step2, second), (step3, third) = timestamped_checkpoints(out)
    assert (step1, step2, step3) == (1, 2, 3)

    _corrupt(out / "latest.npz")
    with pytest.raises(MlxGptError) as info:
        resolve_resume(out, None)
    assert "latest.npz" in str(info.value) and f"--resume --ckpt {third}" in str(info.value)

    _corrupt(third, in_place=True)  # latest.npz is a hard link to it, so latest is damaged too
    with pytest.raises(MlxGptError, match=f"--resume --ckpt {second}"):
        resolve_resume(out, None)
    assert resolve_resume(out, str(second)).iter == 2

    (out / "latest.npz").unlink()  # killed before latest.npz was first written: still offered
    with pytest.raises(MlxGptError, match=f"--resume --ckpt {second}"):
        resolve_resume(out, None)

    # The script: one line, then resuming from the offered checkpoint works.
    _corrupt(second)
    _, first = timestamped_checkpoints(out)[0]
    (out / "latest.npz").write_bytes(b"garbage")
    proc = run_script("train.py", "--resume", "--out_dir", str(out), "--device", "cpu")
    assert proc.returncode == 1
    assert f"--resume --ckpt {first}" in _one_line_error(proc.stderr)
    proc = run_script("train.py", "--resume", "--out_dir", str(out), "--ckpt", str(first), "--max_iters", "3",
                      "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resuming from {first} at iter 1" in proc.stdout
    assert Checkpoint.load(out / "latest.npz").iter == 3


def test_resume_never_starts_from_scratch(tmp_path: Path) -> None:
    """--resume with nothing valid to resume from is an error, not a fresh run."""
    with pytest.raises(MlxGptError, match="does not exist"):
        resolve_resume(tmp_path, None)
    (tmp_path / "latest.npz").write_bytes(b"garbage")
    (tmp_path / "gpt-20240101-000000-step5.npz").write_bytes(b"garbage too")
    with pytest.raises(MlxGptError) as info:
        resolve_resume(tmp_path, None)
    assert "latest.npz" in str(info.value) and "newest valid checkpoint" not in str(info.value)
