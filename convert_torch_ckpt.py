"""Convert a PyTorch char-GPT checkpoint (the seed's miniGPT, nanoGPT, "Let's build GPT") to mlx-gpt.

python convert_torch_ckpt.py IN.pt OUT.npz, then: python sample.py --ckpt OUT.npz
Needs PyTorch: pip install -e ".[convert]". Files are read with torch.load(weights_only=True): never runs code.
IN can also be a Hugging Face GPT-2 folder with a character tokenizer (e.g. from python -m mlx_gpt.export);
a folder with model.safetensors needs no PyTorch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlx_gpt import cli
from mlx_gpt.convert import LAYOUTS, convert_file
from mlx_gpt.errors import MlxGptError


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN.pt", help="PyTorch checkpoint, or a Hugging Face GPT-2 folder")
    p.add_argument("output", metavar="OUT.npz", help="mlx-gpt checkpoint to write")
    p.add_argument("--format", choices=("auto", *LAYOUTS), default="auto",
                   help="checkpoint layout (default: detected from the file)")
    vocab = p.add_mutually_exclusive_group()
    vocab.add_argument("--meta", default=None,
                       help="nanoGPT meta.pkl with the vocabulary (default: beside IN.pt or data/<dataset>/)")
    vocab.add_argument("--vocab_from", default=None, metavar="TEXTFILE",
                       help="build the vocabulary as sorted(set(text)) of the training text")
    p.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="miniGPT: EMA weights when the file has them (default) or the raw model weights")
    p.add_argument("--force", action="store_true", help="overwrite OUT.npz if it exists")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args()


def convert_hf_folder(args: argparse.Namespace) -> int:
    from mlx_gpt.hf import import_dir, summary

    if args.format != "auto" or args.meta or args.vocab_from:
        raise MlxGptError("a Hugging Face folder brings its own layout and vocabulary (config.json, tokenizer.json); "
                          "leave out --format, --meta and --vocab_from")
    print("\n".join(summary(import_dir(args.input, args.output, force=args.force))))
    print(f"wrote {args.output}; sample with: python sample.py --ckpt {args.output}")
    return 0


def main() -> int:
    args = parse_args()
    if Path(args.input).is_dir():
        return convert_hf_folder(args)
    result = convert_file(args.input, args.output, layout=args.format, meta=args.meta, vocab_from=args.vocab_from,
                          weights=args.weights, force=args.force)
    print("\n".join(result.summary()))
    print(f"wrote {args.output}; sample with: python sample.py --ckpt {args.output}")
    return 0


if __name__ == "__main__":
    cli.run(main)
