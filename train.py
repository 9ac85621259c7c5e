"""Train a character-level GPT: `python train.py` (Tiny Shakespeare), `python train.py --config baby`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mlx_gpt import cli, cpu
from mlx_gpt.config import ACTIVATIONS, DTYPES, LR_SCHEDULES, OPTIMIZERS, POSITION_ENCODINGS, TrainConfig
from mlx_gpt.errors import MlxGptError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="preset (shakespeare, baby, baby-fast) or a JSON file of settings; flags "
                                    "override it")
    p.add_argument("--data", help="UTF-8 text file to train on (default: Tiny Shakespeare, downloaded once)")
    p.add_argument("--out_dir", help="where checkpoints and metrics.jsonl go (default: assets/checkpoints)")
    m = p.add_argument_group("model")
    m.add_argument("--n_layer", type=cli.positive_int)
    m.add_argument("--n_head", type=cli.positive_int)
    m.add_argument("--n_embd", type=cli.positive_int)
    m.add_argument("--block_size", type=cli.positive_int)
    m.add_argument("--dropout", type=cli.unit_interval)
    m.add_argument("--bias", action=argparse.BooleanOptionalAction, help="biases in Linear and LayerNorm layers")
    m.add_argument("--activation", choices=ACTIVATIONS, help="relu2: relu squared")
    m.add_argument("--tie_weights", action=argparse.BooleanOptionalAction,
                   help="the LM head shares the token embedding (--no-tie_weights: an untied head)")
    m.add_argument("--position_encoding", choices=POSITION_ENCODINGS, help="learned (nanoGPT's) or rope (rotary)")
    m.add_argument("--rope_base", type=cli.positive_float)
    m.add_argument("--qk_norm", action=argparse.BooleanOptionalAction, help="RMS-normalise queries and keys")
    m.add_argument("--zero_init_proj", action=argparse.BooleanOptionalAction,
                   help="the projections into the residual stream start at zero")
    m.add_argument("--logit_softcap", type=cli.nonnegative_float, help="cap * tanh(logits / cap); 0: off")
    m.add_argument("--value_residual", action=argparse.BooleanOptionalAction,
                   help="mix each layer's attention values with the first layer's")
    m.add_argument("--embed_shortcut", action=argparse.BooleanOptionalAction,
                   help="mix each block's input with the embeddings")
    t = p.add_argument_group("training")
    t.add_argument("--batch_size", type=cli.positive_int)
    t.add_argument("--gradient_accumulation_steps", type=cli.positive_int)
    t.add_argument("--max_iters", type=cli.positive_int)
    t.add_argument("--learning_rate", type=cli.positive_float)
    t.add_argument("--min_lr", type=cli.nonnegative_float)
    t.add_argument("--warmup_iters", type=cli.nonnegative_int)
    t.add_argument("--lr_decay_iters", type=cli.nonnegative_int)
    t.add_argument("--decay_lr", action=argparse.BooleanOptionalAction)
    t.add_argument("--weight_decay", type=cli.nonnegative_float)
    t.add_argument("--beta1", type=cli.unit_interval)
    t.add_argument("--beta2", type=cli.unit_interval)
    t.add_argument("--grad_clip", type=cli.nonnegative_float, help="0 disables clipping")
    t.add_argument("--lr_schedule", choices=LR_SCHEDULES,
                   help="cosine (nanoGPT) or wsd: warm-up, stable, linear decay over the last wsd_decay_fraction")
    t.add_argument("--wsd_decay_fraction", type=cli.positive_float, help="wsd: fraction of lr_decay_iters decaying")
    t.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="muon: Muon for the blocks' 2-D weights, AdamW for the rest")
    t.add_argument("--muon_learning_rate", type=cli.positive_float, help="Muon's peak learning rate")
    t.add_argument("--muon_momentum", type=cli.unit_interval)
    t.add_argument("--momentum_warmup_iters", type=cli.nonnegative_int,
                   help="Muon's momentum rises from 0.85 to muon_momentum over these iterations")
    t.add_argument("--eval_interval", type=cli.positive_int)
    t.add_argument("--eval_iters", type=cli.positive_int)
    t.add_argument("--eval_whole_val", action=argparse.BooleanOptionalAction,
                   help="evaluate val on the whole val split (every target once) instead of eval_iters batches")
    t.add_argument("--log_interval", type=cli.positive_int)
    t.add_argument("--save_interval", type=cli.nonnegative_int, help="0: every eval_interval")
    t.add_argument("--keep_last", type=cli.nonnegative_int, help="timestamped checkpoints to keep (0: all)")
    t.add_argument("--on_save_error", choices=("stop", "warn"))
    t.add_argument("--skip_nonfinite", type=cli.nonnegative_int, help="non-finite steps to skip before stopping")
    t.add_argument("--ema_decay", type=cli.unit_interval, help="EMA of the weights (0: off), e.g. 0.999")
    t.add_argument("--label_smoothing", type=cli.unit_interval, help="label smoothing of the training loss")
    t.add_argument("--seed", type=cli.seed)
    t.add_argument("--compile", action=argparse.BooleanOptionalAction)
    t.add_argument("--dtype", choices=(*DTYPES, "auto"),
                   help="forward and backward in this type (float32 weights); auto: float16 on Metal, bfloat16 on "
                        "CUDA, float32 on the CPU")
    t.add_argument("--plot", action=argparse.BooleanOptionalAction,
                   help="redraw out_dir/loss.png after each evaluation (pip install -e '.[plot]')")
    r = p.add_argument_group("run")
    r.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto")
    r.add_argument("--resume", action="store_true", default=False, help="continue from out_dir/latest.npz")
    r.add_argument("--ckpt", default=None,
                   help="with --resume: the checkpoint to continue from; with --eval_only: the one to evaluate")
    r.add_argument("--eval_only", action="store_true", default=False,
                   help="print the losses of out_dir/latest.npz (or --ckpt) and exit, writing nothing")
    r.add_argument("--force", action="store_true", default=False,
                   help="start a new run in an out_dir that holds checkpoints (they are kept)")
    r.add_argument("--debug", action="store_true", default=False, help="show tracebacks")
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    run_flags = {"config", "device", "resume", "ckpt", "force", "debug", "eval_only"}
    flags = {k: v for k, v in vars(args).items() if k not in run_flags}
    if args.ckpt and not (args.resume or args.eval_only):
        raise MlxGptError("--ckpt is for --resume or --eval_only; to sample from a checkpoint use sample.py --ckpt")
    if args.force and args.resume:
        raise MlxGptError("--force starts a new run; --resume continues one: pass one of them")
    if args.eval_only and (args.resume or args.force):
        raise MlxGptError("--eval_only trains nothing: drop --resume and --force")
    cpu.enable(build_kernels=True)  # before MLX is imported: it may load a BLAS for MLX
    from mlx_gpt.device import select_device
    from mlx_gpt.training import evaluate_checkpoint, resolve_resume, run_configs, train

    device = select_device(args.device)
    out_dir = Path(flags.get("out_dir", TrainConfig.out_dir))
    if args.eval_only:
        evaluate_checkpoint(out_dir, args.ckpt, getattr(args, "config", None), flags, device)
        return 0
    resume = resolve_resume(out_dir, args.ckpt) if args.resume else None
    model_cfg, train_cfg = run_configs(getattr(args, "config", None), flags, resume)
    train(model_cfg, train_cfg, resume=resume, device=device, force=args.force)
    return 0


if __name__ == "__main__":
    cli.run(main)
