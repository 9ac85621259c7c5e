"""What ``train.py --plot`` costs the training loop: runs with and without it, alternated, same settings.

    python bench/plot_overhead.py --data /path/to/tinyshakespeare.txt                 # baby, 200 iters
    python bench/plot_overhead.py --data input.txt --max_iters 400 --eval_interval 25 --repeats 3

Per run it reports: the median time of an evaluation including the ``LivePlot.refresh()`` call, the median
and longest ``refresh()`` call (all the loop waits for), the median redraw time in the background thread, and
the median step time in the few steps after each evaluation (while the redraw runs beside them) and in all other
steps. Then three redraws of the last run measure how long the main thread waits for the GIL while one runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_gpt import plot  # noqa: E402
from mlx_gpt.data import Dataset  # noqa: E402
from mlx_gpt.training import Trainer, run_configs  # noqa: E402

AFTER_EVAL = 5  # steps counted as "beside the redraw"


def timed(fn: Callable[..., Any], times: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - start)
    return wrapper


def one_run(args: argparse.Namespace, out_dir: Path, with_plot: bool) -> dict[str, float]:
    flags = {"data": args.data, "out_dir": str(out_dir), "max_iters": args.max_iters,
             "eval_interval": args.eval_interval, "plot": with_plot, "keep_last": 1}
    model_cfg, train_cfg = run_configs(args.config, flags)
    dataset, tokenizer = Dataset.load(train_cfg.data, model_cfg.block_size)
    trainer = Trainer(model_cfg, train_cfg, dataset, tokenizer, log=lambda _: None)
    trainer.say = lambda _: None
    evals, renders, refreshes, steps, eval_iters = [], [], [], [], []
    original_evaluate = trainer._evaluate

    def evaluate() -> Any:
        eval_iters.append(trainer.iter)
        return timed(original_evaluate, evals)()

    trainer._evaluate = evaluate
    trainer.train_step = timed(trainer.train_step, steps)
    if trainer.live_plot is not None:
        trainer.live_plot.render = timed(plot.plot_runs, renders)
        trainer.live_plot.refresh = timed(trainer.live_plot.refresh, refreshes)
    trainer.run("cpu")
    near = {it + k for it in eval_iters for k in range(AFTER_EVAL)}  # steps[i] is the step from iter i
    beside = [t for i, t in enumerate(steps) if i in near and i > 0]
    others = [t for i, t in enumerate(steps) if i not in near]
    return {"eval_ms": 1e3 * statistics.median(evals[1:]), "refresh_ms": 1e3 * statistics.median(refreshes or [0]),
            "refresh_max_ms": 1e3 * max(refreshes or [0]),
            "render_ms": 1e3 * statistics.median(renders or [0]),
            "beside_ms": 1e3 * statistics.median(beside), "other_ms": 1e3 * statistics.median(others)}


def gil_waits(out_dir: Path, rounds: int = 3) -> None:
    """Redraws of ``out_dir`` with a main thread that only needs the GIL now and then (as the loop does between
    MLX calls, which release it): how long refresh() takes and the main thread's longest wait per redraw."""
    live = plot.LivePlot(out_dir, output=out_dir / "gil.png")
    for round_ in range(rounds):
        start = time.perf_counter()
        live.refresh()
        last = returned = time.perf_counter()
        gaps = []
        while live._running:
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            time.sleep(0)
        print(f"redraw {round_}: refresh() {1e3 * (returned - start):.2f} ms, redraw {1e3 * (last - start):.0f} ms, "
              f"main thread's longest wait for the GIL {1e3 * max(gaps):.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="baby")
    p.add_argument("--data", required=True)
    p.add_argument("--max_iters", type=int, default=200)
    p.add_argument("--eval_interval", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out_dir", default="/tmp/plot_overhead")
    args = p.parse_args()
    print(f"{'--plot':>7} {'eval+refresh ms':>16} {'refresh() median/max ms':>24} {'redraw ms':>10} "
          f"{'step beside redraw ms':>22} {'other steps ms':>15}")
    for repeat in range(args.repeats):
        for with_plot in (False, True):
            out_dir = Path(args.out_dir) / f"{'plot' if with_plot else 'noplot'}-{repeat}"
            for old in out_dir.glob("*"):
                old.unlink()
            r = one_run(args, out_dir, with_plot)
            refresh = f"{r['refresh_ms']:.2f}/{r['refresh_max_ms']:.2f}"
            print(f"{'on' if with_plot else 'off':>7} {r['eval_ms']:16.0f} {refresh:>24} "
                  f"{r['render_ms']:10.0f} {r['beside_ms']:22.1f} {r['other_ms']:15.1f}", flush=True)
    gil_waits(Path(args.out_dir) / f"plot-{args.repeats - 1}")


if __name__ == "__main__":
    main()
