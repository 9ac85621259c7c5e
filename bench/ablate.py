"""Ablations of the training recipe: each setting alone and all of them together, against the baseline, at the baby
budget, over several seeds; then a markdown table of whole-split val losses and training times.

    python bench/ablate.py --data PATH                          # every built-in setting, seeds 1337 1338 1339
    python bench/ablate.py --settings baseline muon rope --seeds 1 2 3 4 5
    python bench/ablate.py --add lr3e-3="--learning_rate 3e-3" --add muon+rope --settings baseline lr3e-3 muon+rope
    python bench/ablate.py --resume-table                       # the table from the runs done so far, no training

Every run is its own ``train.py`` process (``--config baby --max_iters ITERS --eval_whole_val``) writing into
WORK/runs/SETTING-seedSEED. The runs go round-robin (for each seed: every setting), so a machine whose speed drifts
moves all settings alike. A run already complete in WORK (same command, exit status 0) is not run again: an
interrupted harness continues where it stopped. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_gpt.errors import MlxGptError  # noqa: E402
from mlx_gpt.plot import number, read_run  # noqa: E402  (metrics.jsonl as train.py writes it; no MLX)

BASELINE = "baseline"
COMBINED = "all"  # every other chosen setting at once
DEFAULT_SETTINGS = {
    BASELINE: "",
    "muon": "--optimizer muon",
    "qk_norm": "--qk_norm",
    "relu2": "--activation relu2",
    "zero_init": "--zero_init_proj",
    "rope": "--position_encoding rope",
    "untied": "--no-tie_weights",
    "softcap": "--logit_softcap 30",
    "value_residual": "--value_residual",
    "embed_shortcut": "--embed_shortcut",
    "momentum_warmup": "--optimizer muon --momentum_warmup_iters 300",
    "wsd": "--lr_schedule wsd",
    "baby-fast": "--config baby-fast",  # the preset: what helps, together
}
NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")  # a setting's name is part of a folder name


@dataclass
class Run:
    setting: str
    seed: int
    out_dir: Path
    command: list[str]  # train.py's arguments


@dataclass
class Result:
    """What one finished run left: its evaluations (iter, whole-split val loss, train_seconds) and wall time."""

    evals: list[tuple[int, float, float]] = field(default_factory=list)
    wall_seconds: float | None = None
    returncode: int | None = None  # None: not run (yet)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and bool(self.evals)

    def val_at(self, iteration: int) -> float | None:
        return next((val for it, val, _ in self.evals if it == iteration), None)

    def seconds_at(self, iteration: int) -> float | None:
        return next((sec for it, _, sec in self.evals if it == iteration), None)

    def seconds_to(self, threshold: float) -> float:
        """train_seconds at the first evaluation at or below ``threshold`` (inf: not reached)."""
        return next((sec for _, val, sec in self.evals if val <= threshold), math.inf)


# ----------------------------------------------------------------------------- settings and runs


def parse_settings(chosen: list[str] | None, added: list[str]) -> dict[str, list[str]]:
    """name -> train.py arguments: the built-in settings plus ``--add`` ones (NAME=ARGS, or a+b to combine named
    settings), narrowed to ``chosen`` (all when None); ``all`` combines every other chosen setting but the baseline."""
    known = {name: shlex.split(args) for name, args in DEFAULT_SETTINGS.items()}
    extra = {}
    for text in added:
        name, sep, args = text.partition("=")
        if not sep:  # a combination of named settings
            parts = name.split("+")
            unknown = [p for p in parts if p not in known]
            if unknown:
                raise SystemExit(f"error: --add {text}: no setting named {', '.join(unknown)}")
            extra[name] = [arg for p in parts for arg in known[p]]
        else:
            extra[name] = shlex.split(args)
        if not NAME.match(name):
            raise SystemExit(f"error: --add {text}: a name may hold only letters, digits and _ . + -")
    known.update(extra)
    names = chosen if chosen is not None else [*DEFAULT_SETTINGS, *extra, COMBINED]
    unknown = [n for n in names if n not in known and n != COMBINED]
    if unknown:
        raise SystemExit(f"error: no setting named {', '.join(unknown)}; known: {', '.join([*known, COMBINED])}")
    settings = {name: known[name] for name in names if name != COMBINED}
    if COMBINED in names:
        settings[COMBINED] = [arg for name, args in settings.items() if name != BASELINE for arg in args]
    return settings


def plan(settings: dict[str, list[str]], seeds: list[int], opts: argparse.Namespace) -> list[Run]:
    """The runs, round-robin: for each seed, every setting."""
    data = opts.data  # None: train.py finds (or downloads) Tiny Shakespeare
    common = ["--config", opts.config, "--max_iters", str(opts.iters), "--lr_decay_iters", str(opts.iters),
              "--eval_whole_val", "--eval_interval", str(opts.eval_interval),
              *(["--data", str(data.resolve())] if data else []), *shlex.split(opts.train_args)]
    runs = []
    for seed in seeds:
        for name, args in settings.items():
            out_dir = opts.work / "runs" / f"{name}-seed{seed}"
            runs.append(Run(name, seed, out_dir, [*common, *args, "--seed", str(seed), "--out_dir", str(out_dir)]))
    return runs


def is_complete(run: Run) -> bool:
    """Whether ``run`` finished before, with this very command."""
    try:
        record = json.loads((run.out_dir / "harness.json").read_text())
    except (OSError, ValueError):
        return False
    return record.get("returncode") == 0 and record.get("command") == run.command


def execute(run: Run, threads: int | None) -> None:
    """Run ``train.py`` for ``run`` in a fresh folder (train.py refuses one holding checkpoints), its output in
    train.log, and record the command, exit status and wall time in harness.json."""
    shutil.rmtree(run.out_dir, ignore_errors=True)
    run.out_dir.mkdir(parents=True)
    env = dict(os.environ)
    if threads is not None:  # parallel runs: each its share of the cores (the CPU plug-in then uses one stream)
        env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with open(run.out_dir / "train.log", "w") as log:
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *run.command], stdout=log,
                              stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    (run.out_dir / "harness.json").write_text(json.dumps({"command": run.command, "returncode": proc.returncode,
                                                          "wall_seconds": wall}))
    last = ([line for line in (run.out_dir / "train.log").read_text(errors="replace").splitlines() if line.strip()]
            or [""])[-1]
    status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}: {last.strip()[:200]}; see " \
        f"{run.out_dir / 'train.log'})"
    print(f"{run.setting} seed {run.seed}: {status} in {wall:.0f} s", flush=True)


def read_result(run: Run) -> Result:
    """A run's evaluations from its metrics.jsonl and its wall time from harness.json (empty if not run, or run
    with another command)."""
    result = Result()
    try:
        record = json.loads((run.out_dir / "harness.json").read_text())
    except (OSError, ValueError):
        return result
    if record.get("command") != run.command:
        return result
    result.returncode, result.wall_seconds = record.get("returncode"), record.get("wall_seconds")
    try:
        records = read_run(run.out_dir).records
    except MlxGptError:  # no metrics (yet), or not readable
        return result
    result.evals = [(rec["iter"], rec["val_loss"], rec["train_seconds"]) for rec in records
                    if number(rec.get("val_loss")) is not None and "train_seconds" in rec]
    return result


# ----------------------------------------------------------------------------- the table


def _spread(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    median = f"{statistics.median(values):.{digits}f}"
    return median if len(values) == 1 else f"{median} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def _paired(results: list[Result], base: list[Result], value: Callable[[Result], float | None]) -> list[float]:
    """(setting - baseline) for each seed where both have ``value``."""
    pairs = [(value(r), value(b)) for r, b in zip(results, base, strict=True) if r.ok and b.ok]
    return [a - b for a, b in pairs if a is not None and b is not None]


def build_table(results: dict[str, list[Result]], at: list[int], final: int, threshold: float) -> str:
    """The markdown table: per setting (results per seed, in the same seed order for each setting)."""
    base = results.get(BASELINE)
    head = ["setting", *(f"val@{i}" for i in at), f"Δ val@{final}", f"train s @{final}", "Δ train s",
            "wall s", f"train s to val ≤ {threshold}", "runs"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in results.items():
        done = [r for r in runs if r.ok]
        cells = [name]
        cells += [_spread([v for r in done if (v := r.val_at(i)) is not None], 4) for i in at]
        if base is not None and name != BASELINE:
            delta = _paired(runs, base, lambda r: r.val_at(final))
            cells.append(f"{statistics.median(delta):+.4f}" if delta else "-")
        else:
            cells.append("")
        seconds = [s for r in done if (s := r.seconds_at(final)) is not None]
        cells.append(f"{statistics.median(seconds):.1f}" if seconds else "-")
        if base is not None and name != BASELINE:
            ratio = [r.seconds_at(final) / b.seconds_at(final) - 1 for r, b in zip(runs, base, strict=True)
                     if r.ok and b.ok and r.seconds_at(final) and b.seconds_at(final)]
            cells.append(f"{100 * statistics.median(ratio):+.1f}%" if ratio else "-")
        else:
            cells.append("")
        walls = [r.wall_seconds for r in done if r.wall_seconds is not None]
        cells.append(f"{statistics.median(walls):.1f}" if walls else "-")
        reach = [r.seconds_to(threshold) for r in done]
        reached = sum(math.isfinite(s) for s in reach)
        if reach and math.isfinite(statistics.median(reach)):
            cells.append(f"{statistics.median(reach):.1f} ({reached}/{len(reach)})")
        else:
            cells.append(f"not reached ({reached}/{len(reach)})" if reach else "-")
        failed = sum(r.returncode not in (None, 0) for r in runs)
        cells.append(f"{len(done)}/{len(runs)}" + (f", {failed} failed" if failed else ""))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


NOTES = """\
val@N: whole-split val loss at iter N, median over seeds [min, max]. Δ: median over seeds of (setting - baseline)
at the same seed (train s: as a fraction of the baseline's). train s: seconds spent training (evaluations and saves
left out, from metrics.jsonl); wall s: the whole process. "train s to val ≤ X": train_seconds at the first
evaluation at or below X, the median over seeds with a run that never got there counted as never (n/m: runs that
got there)."""


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", metavar="NAME", help="the settings to run, by name (default: all)")
    p.add_argument("--add", action="append", default=[], metavar="NAME=ARGS",
                   help='another setting: NAME="train.py args", or a+b to combine named ones (repeatable)')
    p.add_argument("--seeds", nargs="+", type=int, default=[1337, 1338, 1339])
    p.add_argument("--iters", type=int, default=2000, help="max_iters (and lr_decay_iters) of every run")
    p.add_argument("--eval_interval", type=int, default=250)
    p.add_argument("--at", nargs="+", type=int,
                   help="iters whose val loss the table shows (default: 1/4, 1/2 and all of --iters, if evaluated)")
    p.add_argument("--threshold", type=float, default=1.88, help="the val loss whose time to reach is shown")
    p.add_argument("--config", default="baby", help="train.py's --config (default: baby)")
    p.add_argument("--data", type=Path, help="the text (default: Tiny Shakespeare, as train.py finds it)")
    p.add_argument("--train-args", default="", help="more train.py arguments for every run, e.g. '--device cpu'")
    p.add_argument("--parallel", type=int, default=1, metavar="K",
                   help="run K processes at once, each with cores/K BLAS threads (wall times then compare only "
                        "with each other)")
    p.add_argument("--work", type=Path, default=ROOT / "assets" / "ablate", help="where the runs and the table go")
    p.add_argument("--table", type=Path, help="the markdown file to write (default: WORK/ablation.md)")
    p.add_argument("--resume-table", action="store_true", help="only build the table from the runs in WORK")
    opts = p.parse_args(argv)
    if opts.iters <= 0 or opts.eval_interval <= 0 or opts.parallel <= 0:
        p.error("--iters, --eval_interval and --parallel must be positive")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    settings = parse_settings(opts.settings, opts.add)
    opts.work = opts.work.resolve()
    runs = plan(settings, opts.seeds, opts)
    if not opts.resume_table:
        todo = [run for run in runs if not is_complete(run)]
        print(f"{len(runs)} runs, {len(runs) - len(todo)} already done; {len(todo)} to go into {opts.work}",
              flush=True)
        threads = max(1, (os.cpu_count() or 1) // opts.parallel) if opts.parallel > 1 else None
        with ThreadPoolExecutor(opts.parallel) as pool:
            list(pool.map(lambda run: execute(run, threads), todo))
    results = {name: [read_result(run) for run in runs if run.setting == name] for name in settings}
    at = opts.at or sorted(i for i in {opts.iters // 4, opts.iters // 2, opts.iters}  # those evaluated
                           if i == opts.iters or (i > 0 and i % opts.eval_interval == 0))
    table = build_table(results, at, opts.iters, opts.threshold)
    parallel = f"; {opts.parallel} runs at a time (wall times relative only)" if opts.parallel > 1 else ""
    text = (f"# Ablation: --config {opts.config}, {opts.iters} iters, seeds {' '.join(map(str, opts.seeds))}"
            f"{parallel}\n\n{table}\n\n{NOTES}\n")
    print(text)
    out = opts.table or opts.work / "ablation.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"table written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
