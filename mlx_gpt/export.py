"""Export a checkpoint as a Hugging Face GPT-2 folder: `python -m mlx_gpt.export CKPT.npz OUT_DIR`.

The folder loads with transformers (GPT2LMHeadModel, AutoTokenizer) and with mlx-lm (mlx_lm.load); see
docs/huggingface.md. Back to mlx-gpt: python convert_torch_ckpt.py OUT_DIR model.npz.
"""

from __future__ import annotations

import argparse

from . import cli


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mlx_gpt.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", metavar="CKPT.npz", help="mlx-gpt checkpoint to export")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created; its parent folders too)")
    p.add_argument("--weights", choices=("auto", "raw", "ema"), default="auto",
                   help="auto: EMA weights when the checkpoint has them; raw: the trained weights; ema: insist on EMA")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if an earlier export wrote it")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    from .hf import export

    result = export(args.ckpt, args.out_dir, weights=args.weights, force=args.force)
    print(f"wrote {result.out_dir} ({result.weights} weights); load it with transformers or mlx_lm.load, "
          f"or convert it back with: python convert_torch_ckpt.py {result.out_dir} model.npz")
    return 0


if __name__ == "__main__":
    cli.run(main)
