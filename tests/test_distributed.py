"""Data-parallel training on two local processes (MLX's ring backend on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_script

from mlx_gpt import cpu
from mlx_gpt.checkpoint import Checkpoint

pytestmark = pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch not installed")

FLAGS = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--dropout", "0",
         "--eval_interval", "5", "--eval_iters", "2", "--log_interval", "1", "--device", "cpu"]


def launch(*args: str, n: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(["mlx.launch", "-n", str(n), sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def step_losses(out_dir: Path) -> list[float]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def test_two_processes_match_one_process_with_the_same_global_batch(small_text: Path, tmp_path: Path) -> None:
    common = ["--data", str(small_text), *FLAGS, "--max_iters", "10"]
    two = launch("train.py", *common, "--batch_size", "4", "--out_dir", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("number of parameters") == 1  # only rank 0 speaks
    assert "4 x 1 accumulation x 2 processes = 8 sequences" in two.stdout
    openblas_shared = any(line.startswith("CPU plug-in: BLAS: OpenBLAS") for line in cpu.describe()) and \
        "OPENBLAS_NUM_THREADS" not in os.environ
    assert ("1 BLAS thread in each of 2 processes on this machine" in two.stdout) == openblas_shared
    one = run_script("train.py", *common, "--batch_size", "8", "--out_dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    losses_two, losses_one = step_losses(tmp_path / "two"), step_losses(tmp_path / "one")
    assert len(losses_two) == len(losses_one) == 10
    assert max(abs(a - b) for a, b in zip(losses_two, losses_one, strict=True)) < 1e-4
    assert len(list((tmp_path / "two").glob("gpt-*.npz"))) == 2  # steps 5 and 10, written once (rank 0)

    # Resume on a different world size: the data position is shared by all ranks, so it carries over.
    resumed = run_script("train.py", "--resume", "--out_dir", str(tmp_path / "two"), "--max_iters", "12",
                         "--batch_size", "8", "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr
    assert Checkpoint.load(tmp_path / "two" / "latest.npz").iter == 12


def test_averaged_gradients_equal_the_full_batch_gradient() -> None:
    proc = launch(str(ROOT / "tests" / "distributed_grad_check.py"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(line for line in proc.stdout.splitlines() if "max abs difference" in line)
    assert "world size: 2" in line and float(line.rsplit(":", 1)[1]) < 1e-6


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_two_ranks(small_text: Path, tmp_path: Path) -> list[subprocess.Popen]:
    """What mlx.launch does, by hand, so a test can signal one rank itself; returns once rank 0 is stepping."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(2)]))
    procs = []
    for rank in range(2):
        env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), "--data", str(small_text), *FLAGS, "--batch_size", "4",
             "--max_iters", "100000", "--eval_interval", "100000", "--out_dir", str(tmp_path / "out")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
    deadline = time.time() + 120
    for line in procs[0].stdout:  # rank 0 logs every step
        if line.startswith("iter 5:") or time.time() > deadline:
            break
    return procs


def test_sigterm_on_any_rank_stops_all_after_one_save(small_text: Path, tmp_path: Path) -> None:
    main, other = start_two_ranks(small_text, tmp_path)
    other.send_signal(signal.SIGTERM)  # not rank 0: the stop request must reach rank 0 through the all-reduce
    try:
        out, err = main.communicate(timeout=60)
        other.wait(timeout=60)
    finally:
        main.kill()
        other.kill()
    assert main.returncode == 0 and other.returncode == 0, err
    stopped_at = int(out.split("interrupted at iter ")[1].split(":")[0])
    assert Checkpoint.load(tmp_path / "out" / "latest.npz").iter == stopped_at >= 5
    assert len(list((tmp_path / "out").glob("gpt-*.npz"))) == 1  # one save, by rank 0


def test_a_killed_rank_makes_the_other_exit_with_a_clear_error(small_text: Path, tmp_path: Path) -> None:
    survivor, victim = start_two_ranks(small_text, tmp_path)
    victim.send_signal(signal.SIGKILL)
    try:
        _, err = survivor.communicate(timeout=60)
    finally:
        survivor.kill()
        victim.wait()
    assert survivor.returncode == 1
    assert "lost contact with the other processes" in err and "Traceback" not in err
