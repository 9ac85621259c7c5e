"""Train the encoder-decoder to write English dates as ISO dates: ``python -m mlx_gpt.seq2seq``.

"the twenty-third of March, 1994" -> "1994-03-23". The data are generated (``dates.py``), so nothing is
downloaded; the score is exact match on held-out dates, decoded greedily with the KV caches.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from .. import cli
from ..config import TrainConfig
from ..device import describe_device, select_device
from ..errors import MlxGptError
from ..training.optim import AdamW, lr_schedule
from .checkpoint import save_translator
from .dates import TARGET_CHARS, DatePairs, DateTask, source_chars
from .decoding import translate
from .model import Seq2Seq, Seq2SeqConfig
from .tokenizer import SpecialCharTokenizer, pad_batch

# The recipe `python -m mlx_gpt.seq2seq` runs (every field can be changed by a flag).
DEFAULT_MODEL = {"n_encoder_layer": 2, "n_decoder_layer": 2, "n_head": 4, "n_embd": 64, "dropout": 0.0}
DEFAULT_TRAIN = {"batch_size": 64, "max_iters": 1000, "learning_rate": 3e-3, "min_lr": 3e-4, "warmup_iters": 100,
                 "lr_decay_iters": 1000, "weight_decay": 0.01, "eval_interval": 250, "log_interval": 100, "seed": 0}
EXAMPLES = ["the twenty-third of March, 1994", "February twenty-ninth, 2000", "the 1st of January, 1900",
            "December thirty-first, 2099"]

Batch = tuple[mx.array, mx.array, mx.array, mx.array, mx.array, mx.array]


def make_batch(pairs: DatePairs, src_tokenizer: SpecialCharTokenizer, tgt_tokenizer: SpecialCharTokenizer,
               src_block_size: int) -> Batch:
    """(src ids, src mask, target input ids, their mask, target output ids, their mask) as padded arrays.

    Target input is BOS + text, output is text + EOS. Sources are padded to a multiple of 8 so the
    compiled step sees only a few shapes.
    """
    src = [src_tokenizer.encode(s) for s in pairs.sources]
    src_len = min(8 * math.ceil(max(map(len, src)) / 8), src_block_size)
    src_ids, src_mask = pad_batch(src, src_len)
    tgt_ids, tgt_mask = pad_batch([tgt_tokenizer.encode(t, bos=True, eos=True) for t in pairs.targets])
    arrays = (src_ids, src_mask, tgt_ids[:, :-1], tgt_mask[:, :-1], tgt_ids[:, 1:], tgt_mask[:, 1:])
    return tuple(mx.array(a) for a in arrays)


def masked_cross_entropy(logits: mx.array, targets: mx.array, mask: mx.array,
                         label_smoothing: float = 0.0) -> mx.array:
    """Mean cross-entropy over the real (mask True) target positions."""
    losses = nn.losses.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="none")
    mask = mask.astype(losses.dtype)
    return (losses * mask).sum() / mx.maximum(mask.sum(), 1.0)


def loss_fn(model: Seq2Seq, src: mx.array, src_mask: mx.array, tgt_in: mx.array, tgt_in_mask: mx.array,
            tgt_out: mx.array, tgt_out_mask: mx.array, label_smoothing: float = 0.0) -> mx.array:
    # check_masks=False: pad_batch never makes an all-PAD row, and the check (an eval) cannot run in mx.compile.
    logits = model(src, tgt_in, src_mask, tgt_in_mask, check_masks=False)
    return masked_cross_entropy(logits, tgt_out, tgt_out_mask, label_smoothing)


def exact_match(model: Seq2Seq, src_tokenizer: SpecialCharTokenizer, tgt_tokenizer: SpecialCharTokenizer,
                pairs: DatePairs) -> float:
    """Fraction of ``pairs`` translated exactly right by greedy decoding."""
    training = model.training
    model.eval()
    predictions = translate(model, src_tokenizer, tgt_tokenizer, pairs.sources)
    model.train(training)
    return float(np.mean([p == t for p, t in zip(predictions, pairs.targets, strict=True)]))


def train_translator(model_cfg: Seq2SeqConfig, cfg: TrainConfig, task: DateTask, src_tokenizer: SpecialCharTokenizer,
                     tgt_tokenizer: SpecialCharTokenizer, log: Callable[[str], None] = print
                     ) -> tuple[Seq2Seq, list[tuple[int, float]]]:
    """Train on ``task``'s stream of pairs; returns the model (eval mode) and [(iteration, held-out exact match)]."""
    mx.random.seed(cfg.seed)
    model = Seq2Seq(model_cfg)
    optimizer = AdamW(lr_schedule(cfg), (cfg.beta1, cfg.beta2), cfg.weight_decay)
    optimizer.init(model.trainable_parameters())
    grad_fn = nn.value_and_grad(model, partial(loss_fn, label_smoothing=cfg.label_smoothing))

    def step(*batch: mx.array) -> mx.array:
        loss, grads = grad_fn(model, *batch)
        if cfg.grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
        optimizer.update(model, grads)
        return loss

    if cfg.compile:
        state = [model.state, optimizer.state, mx.random.state]
        step = mx.compile(step, inputs=state, outputs=state)
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, {model_cfg.n_encoder_layer} encoder + "
        f"{model_cfg.n_decoder_layer} decoder layers, n_embd {model_cfg.n_embd}")
    history: list[tuple[int, float]] = []
    model.train()
    start = time.perf_counter()
    for it in range(1, cfg.max_iters + 1):
        batch = make_batch(task.train_batch(cfg.batch_size), src_tokenizer, tgt_tokenizer, model_cfg.src_block_size)
        loss = step(*batch)
        mx.eval(loss, model.parameters(), optimizer.state)
        if it % cfg.log_interval == 0 or it == 1:
            log(f"iter {it}: loss {loss.item():.4f}, {time.perf_counter() - start:.0f}s")
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            score = exact_match(model, src_tokenizer, tgt_tokenizer, task.test)
            history.append((it, score))
            log(f"iter {it}: held-out exact match {score:.2%} ({len(task.test.sources)} dates)")
    model.eval()
    return model, history


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    m = p.add_argument_group("model")
    for name in ("n_encoder_layer", "n_decoder_layer", "n_head", "n_embd"):
        m.add_argument(f"--{name}", type=cli.positive_int, default=DEFAULT_MODEL[name])
    m.add_argument("--dropout", type=cli.unit_interval, default=DEFAULT_MODEL["dropout"])
    t = p.add_argument_group("training")
    for name in ("batch_size", "max_iters", "warmup_iters", "lr_decay_iters", "eval_interval", "log_interval"):
        t.add_argument(f"--{name}", type=cli.positive_int, default=DEFAULT_TRAIN[name])
    for name in ("learning_rate", "min_lr", "weight_decay"):
        t.add_argument(f"--{name}", type=cli.nonnegative_float, default=DEFAULT_TRAIN[name])
    t.add_argument("--label_smoothing", type=cli.unit_interval, default=0.0)
    t.add_argument("--seed", type=cli.seed, default=DEFAULT_TRAIN["seed"])
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--n_test", type=cli.positive_int, default=1000, help="held-out dates to score on")
    r = p.add_argument_group("run")
    r.add_argument("--out", default="assets/seq2seq/dates.npz", help="where the trained model is saved")
    r.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto")
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def check_output_path(out: Path) -> None:
    """Refuse an output the save at the end could not write, before any training time is spent."""
    if out.is_dir():
        raise MlxGptError(f"--out {out} is a folder; give a file name such as {out / 'dates.npz'}")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise MlxGptError(f"--out {out}: {parent} is not a folder; give a path inside a folder")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_output_path(Path(args.out))
    device = select_device(args.device)
    print(describe_device(device))
    src_tokenizer = SpecialCharTokenizer.from_text(source_chars())
    tgt_tokenizer = SpecialCharTokenizer.from_text(TARGET_CHARS)
    model_cfg = Seq2SeqConfig(src_vocab_size=src_tokenizer.vocab_size, tgt_vocab_size=tgt_tokenizer.vocab_size,
                              src_block_size=48, tgt_block_size=16,
                              **{k: getattr(args, k) for k in DEFAULT_MODEL})
    train_cfg = TrainConfig(**{k: getattr(args, k) for k in (*DEFAULT_TRAIN, "label_smoothing", "compile")})
    task = DateTask(seed=args.seed, n_test=args.n_test)
    start = time.perf_counter()
    model, history = train_translator(model_cfg, train_cfg, task, src_tokenizer, tgt_tokenizer)
    minutes = (time.perf_counter() - start) / 60
    score = history[-1][1]
    print(f"done: held-out exact match {score:.2%} on {args.n_test} dates after {train_cfg.max_iters} iterations "
          f"({minutes:.1f} min)")
    path = save_translator(args.out, model, src_tokenizer, tgt_tokenizer,
                           info={"exact_match": score, "iters": train_cfg.max_iters, "seed": args.seed})
    print(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB)")
    sources = EXAMPLES + task.test.sources[:4]
    for source, target in zip(sources, translate(model, src_tokenizer, tgt_tokenizer, sources), strict=True):
        print(f"  {source!r:42} -> {target}")
    return 0


if __name__ == "__main__":
    cli.run(main)
