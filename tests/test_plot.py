"""mlx_gpt.plot: reading metrics.jsonl (runs going, resumed, broken) and drawing it; train.py --plot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY_FLAGS, run_script

from mlx_gpt import plot
from mlx_gpt.errors import MlxGptError
from mlx_gpt.plot import LivePlot, Run, merge_resumed, plot_runs, read_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def step(it: int, loss: float | None = 2.0, **extra) -> dict:
    return {"iter": it, "loss": loss, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0, "time": 0.0, **extra}


def evaluation(it: int, val: float | None = 2.0, **extra) -> dict:
    return {"iter": it, "train_loss": 2.0, "val_loss": val, "time": 0.0, **extra}


def write_run(folder: Path, records: list[dict], tail: str = "") -> Path:
    """A metrics.jsonl as train.py writes it (one JSON object a line), then ``tail`` as written (no newline)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (folder / "metrics.jsonl").write_text(lines + tail, encoding="utf-8")
    return folder


def iters(run: Run, kind: str) -> list[int]:
    return [r["iter"] for r in run.of_kind(kind)]


# ----------------------------------------------------------------------------- reading (no matplotlib needed)


def test_a_run_reads_steps_and_evals_in_order(tmp_path: Path) -> None:
    run = read_run(write_run(tmp_path / "a", [evaluation(0), step(10), step(20), evaluation(20, 1.5)]))
    assert run.name == "a" and iters(run, "step") == [10, 20] and iters(run, "eval") == [0, 20]
    assert run.series("eval", "val_loss") == ([0.0, 20.0], [2.0, 1.5])
    assert run.best_val() == (20, 1.5, "val_loss") and not run.has_tokens()


def test_a_run_in_progress_ignores_its_partial_last_line(tmp_path: Path) -> None:
    run = read_run(write_run(tmp_path / "a", [evaluation(0), step(10)], tail='{"iter": 20, "lo'))
    assert iters(run, "step") == [10]
    # a last record that is complete but still waits for its newline is kept
    run = read_run(write_run(tmp_path / "b", [evaluation(0)], tail=json.dumps(step(10))))
    assert iters(run, "step") == [10]


def test_a_resumed_run_is_one_curve_and_the_newer_records_win(tmp_path: Path) -> None:
    first = [evaluation(0), step(10, 3.0), step(20, 3.0), evaluation(20, 3.0), step(30, 3.0)]
    # resumed from the checkpoint at 20 after a kill at 30: 30 again, then on
    second = [step(30, 1.0), step(40, 1.0), evaluation(40, 1.0)]
    # resumed from an older checkpoint (10) later still: everything from 20 on is replaced
    third = [step(20, 0.5), evaluation(20, 0.5)]
    run = read_run(write_run(tmp_path / "a", first + second + third))
    assert iters(run, "step") == [10, 20] and iters(run, "eval") == [0, 20]
    assert run.series("step", "loss")[1] == [3.0, 0.5] and run.best_val() == (20, 0.5, "val_loss")


def test_a_repeated_iteration_of_the_same_kind_is_a_resume(tmp_path: Path) -> None:
    records = merge_resumed([evaluation(0), step(10, 3.0), evaluation(10, 3.0), step(10, 1.0)])
    assert [(r["iter"], r["loss"]) for r in records if "loss" in r] == [(10, 1.0)]
    assert [r["iter"] for r in records if "val_loss" in r] == [0]  # the eval at 10 was of the older branch


def test_a_new_run_in_the_same_folder_replaces_the_old_one(tmp_path: Path) -> None:
    run = read_run(write_run(tmp_path / "a", [evaluation(0, 4.0), step(10), evaluation(10, 3.0),
                                              evaluation(0, 4.5), step(10)]))
    assert iters(run, "eval") == [0] and run.best_val() == (0, 4.5, "val_loss")


def test_nulls_nan_missing_and_unknown_fields_skip_points_only(tmp_path: Path) -> None:
    text = "\n".join([json.dumps(evaluation(0, None)), '{"iter": 10, "loss": NaN, "lr": 0.001}',
                      json.dumps(step(20, None, tokens=640, new_field=[1])), json.dumps(step(30, 1.5, tokens=960)),
                      json.dumps({"iter": 40, "lr": 1e-4}), json.dumps({"note": "no iter"}),
                      json.dumps({"iter": "50", "loss": 1.0}), json.dumps(evaluation(60, 1.2, ema_val_loss=1.1))])
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text(text + "\n", encoding="utf-8")
    run = read_run(folder)
    assert run.series("step", "loss") == ([30.0], [1.5])
    assert run.series("step", "lr")[0] == [10.0, 20.0, 30.0, 40.0]
    assert run.series("step", "loss", x="tokens") == ([960.0], [1.5]) and run.has_tokens()
    assert run.series("eval", "val_loss") == ([60.0], [1.2])
    assert run.best_val() == (60, 1.1, "ema_val_loss")


def test_number_keeps_only_finite_numbers() -> None:
    assert [plot.number(v) for v in (1, 2.5, None, math.nan, math.inf, True, "1")] == [1.0, 2.5] + [None] * 5


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_a_folder_without_metrics_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(MlxGptError) as excinfo:
        read_run(tmp_path)
    assert "has no metrics.jsonl" in one_line_error(excinfo)
    with pytest.raises(MlxGptError) as excinfo:
        read_run(tmp_path / "missing")
    assert "is not a folder" in one_line_error(excinfo)


def test_an_empty_file_is_a_one_line_error(tmp_path: Path) -> None:
    for name, text in (("empty", ""), ("blank", "\n\n")):
        with pytest.raises(MlxGptError) as excinfo:
            read_run(write_run(tmp_path / name, [], tail=text))
        assert "is empty" in one_line_error(excinfo)
    with pytest.raises(MlxGptError) as excinfo:  # only a record being written, or records of no known kind
        read_run(write_run(tmp_path / "partial", [{"note": 1}], tail='{"iter": 0, "va'))
    assert "holds no step or eval records" in one_line_error(excinfo)


@pytest.mark.parametrize("bad", ["not json", "[1, 2]", '{"iter": 10, "loss": 2.0', "<<<<<<< HEAD"])
def test_a_garbage_line_is_a_one_line_error_naming_the_line(tmp_path: Path, bad: str) -> None:
    folder = write_run(tmp_path / "a", [evaluation(0), step(10)])
    with open(folder / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(bad + "\n" + json.dumps(step(20)) + "\n")
    with pytest.raises(MlxGptError) as excinfo:
        read_run(folder)
    assert "metrics.jsonl line 3: not a JSON object" in one_line_error(excinfo)


def test_missing_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import of it now fails, installed or not
    with pytest.raises(MlxGptError) as excinfo:
        plot_runs([write_run(tmp_path / "a", [evaluation(0)])], tmp_path / "loss.png")
    assert 'pip install -e ".[plot]"' in one_line_error(excinfo)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "mlx_gpt.plot", str(tmp_path / "missing")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr


# ----------------------------------------------------------------------------- drawing


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory, small_text: Path) -> Path:
    """A tiny real training run with --plot (40 iterations, evaluations at 0, 20 and 40)."""
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("real_run")
    proc = run_script("train.py", "--data", str(small_text), "--out_dir", str(out), *TINY_FLAGS,
                      "--max_iters", "40", "--eval_interval", "20", "--plot")
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stdout + proc.stderr
    return out


def test_train_with_plot_writes_loss_png(real_run: Path) -> None:
    picture = real_run / "loss.png"
    assert picture.read_bytes().startswith(PNG_MAGIC) and picture.stat().st_size > 10_000
    assert not list(real_run.glob(".*.tmp"))


def test_the_plot_of_a_real_run_is_written(real_run: Path, tmp_path: Path) -> None:
    assert iters(read_run(real_run), "eval") == [0, 20, 40]
    output = plot_runs([real_run], tmp_path / "loss.png")
    assert output == tmp_path / "loss.png" and output.read_bytes().startswith(PNG_MAGIC)
    assert output.stat().st_size > 10_000


def test_several_runs_on_one_svg_from_the_command_line(real_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    # a second run with tokens and EMA losses, resumed once, still going
    other = write_run(tmp_path / "other", [evaluation(0, 4.0, ema_val_loss=4.1, tokens=0), step(10, tokens=320),
                                           evaluation(10, 3.0, ema_val_loss=2.9, tokens=320), step(10, tokens=320),
                                           step(20, 2.5, tokens=640)], tail='{"iter": 30')
    output = tmp_path / "runs.svg"
    proc = subprocess.run([sys.executable, "-m", "mlx_gpt.plot", str(real_run), str(other), "-o", str(output),
                           "--label", "tiny", "--label", "other"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(output)
    svg = output.read_text(encoding="utf-8")
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert "#1f77b4" in svg and "#ff7f0e" in svg  # matplotlib's first two colours: one per run


def test_labels_must_match_the_runs_and_the_format_must_be_known(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    folder = write_run(tmp_path / "a", [evaluation(0)])
    with pytest.raises(MlxGptError, match="one label per OUT_DIR"):
        plot_runs([folder], tmp_path / "loss.png", labels=["a", "b"])
    with pytest.raises(MlxGptError, match=r"end it in \.png or \.svg"):
        plot_runs([folder], tmp_path / "loss.txt")


def test_live_plot_failure_warns_once_and_training_goes_on(small_text: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from test_training import make_trainer

    from mlx_gpt.training import run_log

    calls = []

    def broken(*args: object) -> Path:
        calls.append(args)
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(plot, "plot_runs", broken)
    warnings = []
    # train.py's warning goes above the progress bar (RunLog.say); here it is collected
    monkeypatch.setattr(run_log, "LivePlot", lambda out_dir, log: LivePlot(out_dir, log=warnings.append))
    trainer = make_trainer(small_text.read_text(encoding="utf-8"), tmp_path, max_iters=6, eval_interval=2, plot=True)
    result = trainer.run("cpu")
    assert result.iter == 6 and result.val_loss is not None
    assert len(calls) == 1, "no second try after a failure"
    plot_warnings = [w for w in warnings if "--plot" in w]
    assert len(plot_warnings) == 1 and "renderer exploded" in plot_warnings[0] and "\n" not in plot_warnings[0]


def test_live_plot_redraws_once_more_for_asks_made_while_drawing(tmp_path: Path) -> None:
    import threading

    started, release, drawn = threading.Event(), threading.Event(), []

    def slow(out_dirs: list[Path], output: Path) -> Path:
        drawn.append(output)
        started.set()
        release.wait(10)
        return output

    live = LivePlot(tmp_path, render=slow)
    live.refresh()
    assert started.wait(10)
    live.refresh()
    live.refresh()  # both asks while drawing: one more redraw, not two
    release.set()
    live.close()
    assert len(drawn) == 2 and drawn[0] == tmp_path / "loss.png" and not live.failed


def test_live_plot_without_matplotlib_warns_once_at_the_start(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    warnings: list[str] = []
    live = LivePlot(tmp_path, log=warnings.append)
    live.refresh()
    live.refresh()
    live.close()
    assert live.failed and len(warnings) == 1 and 'pip install -e ".[plot]"' in warnings[0]
    assert "training goes on" in warnings[0] and not (tmp_path / "loss.png").exists()
