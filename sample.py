"""Sample text from a trained checkpoint: `python sample.py --prompt "ROMEO:"`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlx_gpt import backend, cli
from mlx_gpt.checkpoint import load_model
from mlx_gpt.errors import MlxGptError
from mlx_gpt.sampling import generate, make_sampler


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", default="assets/checkpoints/latest.npz", help="checkpoint to sample from")
    p.add_argument("--prompt", default="\n", help="text to continue; FILE:path reads it from a file")
    p.add_argument("--max_new_tokens", type=cli.positive_int, default=500)
    p.add_argument("--temperature", type=cli.nonnegative_float, default=0.8, help="0 = greedy (argmax)")
    p.add_argument("--top_k", type=cli.positive_int, default=200)
    p.add_argument("--num_samples", type=cli.positive_int, default=1)
    p.add_argument("--seed", type=cli.any_int, default=None, help="same seed -> same output")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args()


def read_prompt(prompt: str) -> str:
    if not prompt.startswith("FILE:"):
        return prompt
    path = Path(prompt[len("FILE:"):])
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MlxGptError(f"cannot read prompt file {path}: {exc}") from None


def main() -> int:
    args = parse_args()
    backend.select_device(args.device)
    import mlx.core as mx

    if args.seed is not None:
        mx.random.seed(args.seed)
    model, tokenizer, _ = load_model(args.ckpt)
    prompt = read_prompt(args.prompt)
    sampler = make_sampler(args.temperature, args.top_k)
    texts = [prompt] * args.num_samples
    steps = generate(model, tokenizer, prompt, args.max_new_tokens, sampler, num_samples=args.num_samples)
    if args.num_samples == 1:  # stream
        sys.stdout.write(prompt)
        for chars in steps:
            sys.stdout.write(chars[0])
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for chars in steps:
        texts = [t + c for t, c in zip(texts, chars, strict=True)]
    print(("\n" + "-" * 40 + "\n").join(texts))
    return 0


if __name__ == "__main__":
    cli.run(main)
