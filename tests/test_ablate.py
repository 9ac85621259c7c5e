"""bench/ablate.py without training: settings, the run plan, reading finished runs and the table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("ablate", ROOT / "bench" / "ablate.py")
ablate = importlib.util.module_from_spec(spec)
sys.modules["ablate"] = ablate  # dataclasses look their module up there
spec.loader.exec_module(ablate)


def test_settings_subset_additions_and_combinations() -> None:
    settings = ablate.parse_settings(["baseline", "rope", "x", "muon+rope", "all"],
                                     ['x=--learning_rate "3e-3"', "muon+rope"])
    assert settings == {"baseline": [], "rope": ["--position_encoding", "rope"], "x": ["--learning_rate", "3e-3"],
                        "muon+rope": ["--optimizer", "muon", "--position_encoding", "rope"],
                        "all": ["--position_encoding", "rope", "--learning_rate", "3e-3", "--optimizer", "muon",
                                "--position_encoding", "rope"]}
    assert list(ablate.parse_settings(None, []))[-1] == "all"
    with pytest.raises(SystemExit, match="no setting named nope"):
        ablate.parse_settings(["nope"], [])
    with pytest.raises(SystemExit, match="no setting named nope"):
        ablate.parse_settings(None, ["muon+nope"])


def test_runs_go_round_robin_each_in_its_own_folder(tmp_path: Path) -> None:
    opts = ablate.parse_args(["--work", str(tmp_path), "--seeds", "1", "2", "--iters", "20", "--eval_interval", "5",
                              "--data", "t.txt", "--train-args", "--device cpu"])
    runs = ablate.plan({"baseline": [], "relu": ["--activation", "relu"]}, opts.seeds, opts)
    assert [(r.setting, r.seed) for r in runs] == [("baseline", 1), ("relu", 1), ("baseline", 2), ("relu", 2)]
    assert len({r.out_dir for r in runs}) == 4
    command = runs[1].command
    for flag in ("--eval_whole_val", "--max_iters 20", "--eval_interval 5", "--activation relu", "--seed 1",
                 "--device cpu", f"--out_dir {tmp_path / 'runs' / 'relu-seed1'}", "--config baby"):
        assert flag in " ".join(command), flag


def fake_run(run, evals: list[tuple[int, float, float]], wall: float, returncode: int = 0) -> None:
    """What train.py and the harness leave in a run's folder."""
    run.out_dir.mkdir(parents=True)
    records = [{"iter": i, "loss": 9.0, "train_seconds": s} for i, _, s in evals]  # step records: ignored
    records += [{"iter": i, "train_loss": v + 0.1, "val_loss": v, "val_whole": True, "train_seconds": s}
                for i, v, s in evals]
    (run.out_dir / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    (run.out_dir / "harness.json").write_text(json.dumps({"command": run.command, "returncode": returncode,
                                                          "wall_seconds": wall}))


def test_table_from_fake_metrics(tmp_path: Path) -> None:
    opts = ablate.parse_args(["--work", str(tmp_path), "--seeds", "1", "2", "3", "--iters", "200"])
    settings = {"baseline": [], "fast": ["--a"], "broken": ["--b"], "unrun": ["--c"]}
    runs = ablate.plan(settings, opts.seeds, opts)
    by = {(r.setting, r.seed): r for r in runs}
    for seed, (v50, v100, v200, t) in zip((1, 2, 3), ((2.5, 2.0, 1.90, 10.0), (2.4, 1.95, 1.85, 12.0),
                                                       (2.6, 2.1, 1.95, 11.0)), strict=True):
        fake_run(by["baseline", seed], [(0, 4.2, 0.0), (50, v50, t / 4), (100, v100, t / 2), (200, v200, t)],
                 wall=t + 5)
        fake_run(by["fast", seed], [(0, 4.2, 0.0), (50, v50 - 0.1, t / 8), (100, v100 - 0.1, t / 4),
                                    (200, v200 - 0.1, t / 2)], wall=t)
    fake_run(by["broken", 1], [], wall=1.0, returncode=2)
    fake_run(by["broken", 2], [(0, 4.2, 0.0)], wall=1.0, returncode=1)
    assert ablate.is_complete(by["fast", 1]) and not ablate.is_complete(by["broken", 1])
    assert not ablate.is_complete(by["unrun", 1])

    results = {name: [ablate.read_result(r) for r in runs if r.setting == name] for name in settings}
    table = ablate.build_table(results, [50, 100, 200], 200, 1.88).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["setting", "val@50", "val@100", "val@200", "Δ val@200", "train s @200", "Δ train s",
                      "wall s", "train s to val ≤ 1.88", "runs"]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in table[2:]}
    assert rows["baseline"] == ["baseline", "2.5000 [2.4000, 2.6000]", "2.0000 [1.9500, 2.1000]",
                                "1.9000 [1.8500, 1.9500]", "", "11.0", "", "16.0", "not reached (1/3)", "3/3"]
    # fast: 0.1 lower at every seed, half the training time; it reaches 1.88 at iter 200 with seeds 1 and 3 (at 5.0
    # and 5.5 s) and at iter 100 with seed 2 (3.0 s): the median is 5.0. The baseline reaches it with seed 2 only,
    # and a run that never does counts as never: not reached.
    assert rows["fast"] == ["fast", "2.4000 [2.3000, 2.5000]", "1.9000 [1.8500, 2.0000]", "1.8000 [1.7500, 1.8500]",
                            "-0.1000", "5.5", "-50.0%", "11.0", "5.0 (3/3)", "3/3"]
    assert rows["broken"][1:4] == ["-", "-", "-"] and rows["broken"][-1] == "0/3, 2 failed"
    assert rows["unrun"][-1] == "0/3"


def test_a_run_recorded_with_another_command_counts_as_not_run(tmp_path: Path) -> None:
    opts = ablate.parse_args(["--work", str(tmp_path), "--seeds", "1", "--iters", "10"])
    (run,) = ablate.plan({"x": ["--a"]}, opts.seeds, opts)
    fake_run(run, [(10, 2.0, 1.0)], wall=2.0)
    (changed,) = ablate.plan({"x": ["--b"]}, opts.seeds, opts)
    assert ablate.is_complete(run) and ablate.read_result(run).ok
    assert not ablate.is_complete(changed) and not ablate.read_result(changed).ok


def test_resume_table_only_reads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    opts = ablate.parse_args(["--work", str(tmp_path), "--seeds", "1", "--iters", "8", "--eval_interval", "2"])
    (run,) = ablate.plan({"baseline": []}, opts.seeds, opts)
    fake_run(run, [(2, 3.0, 1.0), (4, 2.5, 2.0), (8, 1.5, 4.0)], wall=9.0)
    before = sorted(p.name for p in run.out_dir.iterdir())
    assert ablate.main(["--work", str(tmp_path), "--seeds", "1", "--iters", "8", "--eval_interval", "2",
                        "--settings", "baseline", "--resume-table"]) == 0
    assert sorted(p.name for p in run.out_dir.iterdir()) == before  # nothing trained
    text = (tmp_path / "ablation.md").read_text()
    assert "| setting | val@2 | val@4 | val@8 |" in text  # 1/4, 1/2 and all of the iters
    assert "| baseline | 3.0000 | 2.5000 | 1.5000 |  | 4.0 |  | 9.0 | 4.0 (1/1) | 1/1 |" in text
    assert text in capsys.readouterr().out
