"""Loss curves as pictures: ``python -m mlx_gpt.plot OUT_DIR [OUT_DIR ...] [-o loss.png] [--label NAME ...]``.

Reads each run's ``metrics.jsonl`` (runs still going and resumed runs too) and draws train/val loss against
iteration (and against tokens when the records carry ``tokens``), the learning rate below, one colour per run,
EMA losses where present and the best val loss marked. matplotlib is the optional ``[plot]`` extra.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MlxGptError
from .files import atomic_target

METRICS_FILE = "metrics.jsonl"
INSTALL_HINT = 'matplotlib is not installed; plotting needs the [plot] extra: pip install -e ".[plot]"'

# The curves drawn from each kind of record: (field, label, line style, line width, opacity).
STEP_CURVES = [("loss", "train (step)", "-", 0.8, 0.3)]
EVAL_CURVES = [("train_loss", "train", "--", 1.4, 1.0), ("val_loss", "val", "-", 1.8, 1.0),
               ("ema_train_loss", "EMA train", (0, (1, 1.5)), 1.4, 1.0),
               ("ema_val_loss", "EMA val", "-.", 1.8, 1.0)]
VAL_FIELDS = ("val_loss", "ema_val_loss")  # the best val is the lower of raw and EMA, as training's best.npz


# ----------------------------------------------------------------------------- reading metrics.jsonl


@dataclass
class Run:
    """One run's records, at most one per (kind, iter), in iteration order; ``kind`` is "step" or "eval"."""

    name: str
    records: list[dict[str, Any]] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if record_kind(r) == kind]

    def series(self, kind: str, name: str, x: str = "iter") -> tuple[list[float], list[float]]:
        """(x values, y values) of field ``name`` in the records of ``kind``; points missing either are skipped."""
        points = [(number(r.get(x)), number(r.get(name))) for r in self.of_kind(kind)]
        kept = [(a, b) for a, b in points if a is not None and b is not None]
        return [a for a, _ in kept], [b for _, b in kept]

    def best_val(self) -> tuple[int, float, str] | None:
        """(iter, loss, field) of the lowest val loss (raw or EMA), or None before the first eval."""
        found = [(y, x, name) for name in VAL_FIELDS for x, y in zip(*self.series("eval", name), strict=True)]
        if not found:
            return None
        loss, it, name = min(found)
        return int(it), loss, name

    def has_tokens(self) -> bool:
        return any(number(r.get("tokens")) is not None for r in self.records)


def number(value: Any) -> float | None:
    """A finite number, or None for what cannot be drawn (null, NaN/inf from older writers, strings, bools)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def record_kind(record: dict[str, Any]) -> str | None:
    if "val_loss" in record or "train_loss" in record:
        return "eval"
    if "loss" in record or "lr" in record:
        return "step"
    return None  # a record of a kind this reader does not know: ignored


def metrics_path(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise MlxGptError(f"{out_dir} is not a folder; pass a training out_dir (it holds {METRICS_FILE})")
    path = out_dir / METRICS_FILE
    if not path.is_file():
        raise MlxGptError(f"{out_dir} has no {METRICS_FILE}: not a training out_dir, or its run has not "
                          "logged yet")
    return path


def parse_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one a line; a last line without its newline is a record being written
    (the run is still going) and is dropped unless it is complete."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MlxGptError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not text.strip():
        raise MlxGptError(f"{path} is empty: its run has not logged anything yet")
    lines = text.split("\n")
    partial = lines.pop()  # "" when the file ends with a newline
    records = []
    for number_, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = parse_record(line)
        if record is None:
            raise MlxGptError(f"{path} line {number_}: not a JSON object ({shorten(line)}); is it a "
                              f"{METRICS_FILE} written by train.py?")
        records.append(record)
    last = parse_record(partial) if partial.strip() else None
    return records + ([last] if last is not None else [])


def parse_record(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)  # NaN and Infinity (older writers) parse; number() drops them later
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def shorten(line: str, limit: int = 40) -> str:
    return repr(line if len(line) <= limit else line[:limit] + "...")


def merge_resumed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One history from an append-only log: a record at an iteration already passed (a resume from an older
    checkpoint, or a new run in the same folder) drops everything logged from that iteration on."""
    kept: list[dict[str, Any]] = []
    iters: list[int] = []  # kept's iterations, non-decreasing
    for record in records:
        it, kind = record.get("iter"), record_kind(record)
        if kind is None or isinstance(it, bool) or not isinstance(it, int):
            continue  # no place on the curve
        cut = bisect.bisect_left(iters, it)  # kept[cut:] are the records at iterations >= it
        if iters and (iters[-1] > it or any(record_kind(r) == kind for r in kept[cut:])):
            del kept[cut:], iters[cut:]
        kept.append(record)
        iters.append(it)
    return kept


def read_run(out_dir: str | Path, name: str | None = None) -> Run:
    """The run in ``out_dir`` (named ``name``, default the folder's name) from its metrics.jsonl."""
    path = metrics_path(out_dir)
    records = merge_resumed(parse_lines(path))
    if not records:
        raise MlxGptError(f"{path} holds no step or eval records (no 'iter' with 'loss' or 'val_loss')")
    return Run(name or Path(out_dir).resolve().name, records)


# ----------------------------------------------------------------------------- drawing


def matplotlib_classes() -> tuple[Any, Any]:
    """(Figure, FigureCanvasAgg), or the one-line error naming the [plot] extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MlxGptError(INSTALL_HINT) from None
    return Figure, FigureCanvasAgg


def new_figure(rows: int) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot: no global state, safe off the main thread)."""
    Figure, FigureCanvasAgg = matplotlib_classes()  # noqa: N806 (classes)
    ratios = [3, 1, 3][:rows]
    fig = Figure(figsize=(9, 2.2 * sum(ratios) / 2 + 1.5), layout="constrained")
    FigureCanvasAgg(fig)
    fig.subplots(rows, 1, gridspec_kw={"height_ratios": ratios})
    return fig


def draw_run(axes: Sequence[Any], run: Run, colour: str) -> None:
    loss_ax, lr_ax, *tokens_ax = axes
    for kind, curves in (("step", STEP_CURVES), ("eval", EVAL_CURVES)):
        for name, _, style, width, alpha in curves:
            for ax, x in ((loss_ax, "iter"), *((ax, "tokens") for ax in tokens_ax)):
                xs, ys = run.series(kind, name, x)
                ax.plot(xs, ys, color=colour, linestyle=style, linewidth=width, alpha=alpha,
                        marker="o" if kind == "eval" else None, markersize=2.5)  # evals are sparse: show each
    lr_ax.plot(*run.series("step", "lr"), color=colour, linewidth=1.4)
    best = run.best_val()
    if best is not None:
        loss_ax.plot([best[0]], [best[1]], marker="*", markersize=13, color=colour, markeredgecolor="black",
                     linestyle="none", zorder=5)


def run_label(run: Run) -> str:
    best = run.best_val()
    if best is None:
        return run.name
    ema = " EMA" if best[2] == "ema_val_loss" else ""
    return f"{run.name}: best{ema} val {best[1]:.4f} @ {best[0]}"


def add_legends(ax: Any, runs: Sequence[Run], colours: Sequence[str]) -> None:
    """Colour names the run, line style the curve: two small legends instead of runs x curves entries."""
    from matplotlib.lines import Line2D

    run_handles = [Line2D([], [], color=c, linewidth=2.5, marker="*", markeredgecolor="black") for c in colours]
    ax.add_artist(ax.legend(run_handles, [run_label(r) for r in runs], loc="upper right", fontsize=8,
                            title="run (* best val)", title_fontsize=8))
    present = [c for c in STEP_CURVES + EVAL_CURVES if any(run.series(k, c[0])[0] for run in runs
                                                           for k in ("step", "eval"))]
    style_handles = [Line2D([], [], color="dimgray", linestyle=s, linewidth=w, alpha=max(a, 0.5))
                     for _, _, s, w, a in present]
    ax.legend(style_handles, [label for _, label, *_ in present], loc="upper center", fontsize=8, ncol=2)


def label_axes(axes: Sequence[Any]) -> None:
    from matplotlib.ticker import EngFormatter

    loss_ax, lr_ax, *tokens_ax = axes
    loss_ax.set_ylabel("loss (cross-entropy)")
    loss_ax.set_xlabel("iteration")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("iteration")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in tokens_ax:
        ax.set_ylabel("loss (cross-entropy)")
        ax.set_xlabel("tokens seen")
        ax.xaxis.set_major_formatter(EngFormatter())  # 2M, not 2000000 or 2e6
    for ax in axes:
        ax.grid(True, alpha=0.3)


def output_format(output: Path, supported: dict[str, str]) -> str:
    fmt = output.suffix.lower().lstrip(".")
    if fmt not in supported:
        raise MlxGptError(f"cannot tell the picture's format from {output.name!r}: end it in .png or .svg "
                          f"(or {', '.join('.' + f for f in sorted(supported) if f not in ('png', 'svg'))})")
    return fmt


def plot_runs(out_dirs: Sequence[str | Path], output: str | Path = "loss.png",
              labels: Sequence[str] | None = None) -> Path:
    """Draw the runs in ``out_dirs`` (named by ``labels``, default their folders) into ``output`` (.png or
    .svg, written atomically); returns ``output``."""
    if not out_dirs:
        raise MlxGptError("no run to plot: pass at least one training out_dir")
    if labels and len(labels) != len(out_dirs):
        raise MlxGptError(f"{len(labels)} --label for {len(out_dirs)} runs: give one label per OUT_DIR")
    runs = [read_run(d, name) for d, name in zip(out_dirs, labels or [None] * len(out_dirs), strict=True)]
    fig = new_figure(3 if any(r.has_tokens() for r in runs) else 2)
    output = Path(output)
    fmt = output_format(output, fig.canvas.get_supported_filetypes())
    axes = fig.axes
    axes[1].sharex(axes[0])
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for run, colour in zip(runs, colours, strict=True):
        draw_run(axes, run, colour)
    label_axes(axes)
    add_legends(axes[0], runs, colours)
    fig.suptitle(f"{METRICS_FILE}: " + ", ".join(r.name for r in runs), fontsize=10)
    try:
        with atomic_target(output) as tmp:
            fig.savefig(tmp, format=fmt, dpi=110)
    except OSError as exc:
        raise MlxGptError(f"cannot write {output}: {exc.strerror or exc}") from None
    return output


# ----------------------------------------------------------------------------- during training


class LivePlot:
    """``train.py --plot``: redraw ``out_dir/loss.png`` after each evaluation, in a background thread so the
    training step never waits for it. It never raises: the first failure is one warning and ends plotting."""

    def __init__(self, out_dir: str | Path, output: str | Path | None = None,
                 log: Callable[[str], None] = print, render: Callable[..., Path] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.output = Path(output) if output is not None else self.out_dir / "loss.png"
        self.log, self.render = log, render
        self.failed = False
        self._lock = threading.Lock()
        self._pending = self._running = False
        self._thread: threading.Thread | None = None
        try:  # here, before training: loading matplotlib's C extensions in the thread held the GIL (0.2 s measured)
            matplotlib_classes()
        except MlxGptError as exc:
            self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        self.failed = True
        reason = str(exc) if isinstance(exc, MlxGptError) else f"{type(exc).__name__}: {exc}"
        self.log(f"warning: --plot: could not draw {self.output} ({reason}); training goes on without plots")

    def refresh(self) -> None:
        """Ask for a redraw; returns at once (one runs at a time; asks made meanwhile become one more redraw)."""
        with self._lock:
            if self.failed:
                return
            self._pending = True
            if self._running:
                return
            self._running = True
            # Not a daemon: a redraw asked for at the last evaluation finishes before the process exits.
            self._thread = threading.Thread(target=self._work, name="mlx-gpt-plot", daemon=False)
        self._thread.start()

    def close(self, timeout: float | None = 60) -> None:
        """Wait (up to ``timeout`` seconds) for the redraws asked for so far."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._pending or self.failed:
                    self._running = False
                    return
                self._pending = False
            try:
                (self.render or plot_runs)([self.out_dir], self.output)  # looked up now: tests replace it
            except Exception as exc:  # a picture is not worth a training run: warn once, draw no more
                self._give_up(exc)


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mlx_gpt.plot", description=__doc__.split("\n")[0])
    p.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="training out_dir(s) holding metrics.jsonl")
    p.add_argument("-o", "--output", default="loss.png", help="picture to write: .png (default) or .svg")
    p.add_argument("--label", action="append", metavar="NAME",
                   help="a run's name in the legend, once per OUT_DIR in order (default: the folder's name)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(plot_runs(args.out_dirs, args.output, args.label))
    return 0


if __name__ == "__main__":
    from .cli import run

    run(main)
