"""Sample text from a trained checkpoint: `python sample.py --prompt "ROMEO:"`.

The prompt is prefilled in one pass, then one character per step through a KV cache; past the
model's block_size the context window slides (see mlx_gpt/cache.py). Several samples run as one
batch. The same --seed gives byte-identical output.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mlx_gpt import cli, cpu
from mlx_gpt.config import DTYPES
from mlx_gpt.errors import MlxGptError

DASHES = "-" * 40
# Limits on what one command may ask for; each error names its limit. The samples run as one batch, so their
# count multiplies the memory of the KV cache and of the token history.
MAX_NUM_SAMPLES = 1024
MAX_NEW_TOKENS = 1_000_000
MAX_REPETITION_CONTEXT = 1_000_000
MAX_TOTAL_TOKENS = 2**25  # num_samples x (prompt + max_new_tokens): the history is int32 [samples, length]
MAX_PROMPT_BYTES = 2**20


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="assets/checkpoints/latest.npz", help="checkpoint to sample from")
    p.add_argument("--prompt", default="\n",
                   help=f"text to continue (default: a newline); FILE:path reads a file (at most {MAX_PROMPT_BYTES:,} "
                        "bytes)")
    p.add_argument("--max_new_tokens", type=cli.IntRange(1, MAX_NEW_TOKENS), default=500,
                   help="characters to generate per sample")
    p.add_argument("--temperature", type=cli.nonnegative_float, default=0.8, help="0 = greedy (argmax)")
    p.add_argument("--top_k", type=cli.positive_int, default=200, help="keep the k most likely characters")
    p.add_argument("--top_p", type=cli.open_unit_interval, default=None,
                   help="nucleus sampling: keep the smallest set of characters reaching this probability (0, 1]")
    p.add_argument("--min_p", type=cli.closed_unit_interval, default=None,
                   help="keep characters at least this fraction as likely as the most likely one [0, 1]")
    p.add_argument("--repetition_penalty", type=cli.positive_float, default=None,
                   help="> 1 discourages repeating recent characters (1 = off)")
    p.add_argument("--repetition_context_size", type=cli.IntRange(1, MAX_REPETITION_CONTEXT), default=20,
                   help="how many recent characters the repetition penalty looks at")
    p.add_argument("--num_samples", type=cli.IntRange(1, MAX_NUM_SAMPLES), default=1,
                   help="samples, generated as one batch")
    p.add_argument("--seed", type=cli.seed, default=None, help="same seed -> same output")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="the weights (and the KV cache) in this type while sampling")
    p.add_argument("--weights", choices=("auto", "raw", "ema"), default="auto",
                   help="auto: EMA weights when the checkpoint has them; raw: the trained weights; ema: insist on EMA")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args()


def read_prompt(prompt: str) -> str:
    if not prompt.startswith("FILE:"):
        return prompt
    from mlx_gpt.checkpoint import read_limited

    path = Path(prompt[len("FILE:"):])
    payload = read_limited(path, MAX_PROMPT_BYTES, "prompt file",
                           f"pass a UTF-8 text file of at most {MAX_PROMPT_BYTES:,} bytes")
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MlxGptError(f"cannot read prompt file {path}: it is not UTF-8 text (bad byte at offset {exc.start}); "
                          "save it as UTF-8") from None


def check_total(prompt: str, num_samples: int, max_new_tokens: int) -> None:
    total = num_samples * (len(prompt) + max_new_tokens)
    if total > MAX_TOTAL_TOKENS:
        raise MlxGptError(f"--num_samples {num_samples} x (prompt {len(prompt):,} + --max_new_tokens "
                          f"{max_new_tokens:,}) is {total:,} characters, more than the limit of {MAX_TOTAL_TOKENS:,}; "
                          "ask for fewer or shorter samples")


def main() -> int:
    args = parse_args()
    # Validate everything cheap before loading MLX and the checkpoint.
    prompt = read_prompt(args.prompt)
    if not prompt:
        raise MlxGptError("the prompt is empty; the model needs at least one character to continue "
                          "(the default is a newline: leave out --prompt)")
    check_total(prompt, args.num_samples, args.max_new_tokens)
    cpu.enable(build_kernels=False)  # before MLX is imported; sampling never waits for a compiler
    import mlx.core as mx

    from mlx_gpt.checkpoint import load_model
    from mlx_gpt.device import select_device
    from mlx_gpt.sampling import generate, make_logits_processors, make_sampler

    select_device(args.device)
    sampler = make_sampler(args.temperature, args.top_k, args.top_p, args.min_p)
    processors = make_logits_processors(args.repetition_penalty, args.repetition_context_size)
    model, tokenizer, _ = load_model(args.ckpt, weights=args.weights, dtype=args.dtype)
    tokenizer.encode(prompt)  # unknown characters: the tokenizer's error, before any output
    if args.seed is not None:
        mx.random.seed(args.seed)
    steps = generate(model, tokenizer, prompt, args.max_new_tokens, sampler, num_samples=args.num_samples,
                     logits_processors=processors, history_size=args.repetition_context_size)
    out = sys.stdout
    try:
        if args.num_samples == 1:  # stream
            out.write(prompt)
            out.flush()
            for chars in steps:
                out.write(chars[0])
                out.flush()
            out.write("\n")
        else:
            texts = [[prompt] for _ in range(args.num_samples)]
            for chars in steps:
                for text, c in zip(texts, chars, strict=True):
                    text.append(c)
            for i, text in enumerate(texts):
                if i:
                    out.write(DASHES + "\n")
                out.write("".join(text) + "\n")
        out.flush()
    except BrokenPipeError:  # e.g. `python sample.py | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the flush at exit does not fail again
        return 0
    return 0


if __name__ == "__main__":
    cli.run(main)
