"""Sampling speed: tokens/s without a cache, with the KV cache, batched, and PyTorch's nanoGPT baseline.

    python bench/sample_speed.py                 # baby and default configs, 500 new tokens each
    python bench/sample_speed.py --slow_tokens 200   # fewer tokens for the slow no-cache paths

Run by hand (not a test). For each model shape (the "baby" config: 4 layers, 128 wide, block 64;
the default config: 6 layers, 384 wide, block 256; vocabulary 65, randomly initialised: speed does
not depend on the weights) it times, in the same run:

* MLX, no cache: nanoGPT's crop-and-recompute (a full forward pass over the last block_size tokens
  for every new token; ``crop_and_recompute`` below);
* MLX, KV cache, one sample (``sample.py``'s path; the window slides past block_size, see cache.py);
* MLX, KV cache, ``--num_samples 8`` as one batch (total tokens/s over the 8 samples);
* PyTorch (when installed): the same architecture with nanoGPT's ``generate`` (crop and
  recompute), weights copied from the MLX model (the logits are checked to agree first).

All paths start from a one-character prompt (like sample.py's default "\\n") and sample with
sample.py's defaults (temperature 0.8, top_k 200); each is warmed up first. With fewer tokens for
the no-cache paths (--slow_tokens) their context is shorter on average, which flatters them: the
printed ratios are then lower bounds. The output ends with a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_gpt import cpu  # noqa: E402

PLUGIN = cpu.enable(log=None)  # as sample.py does, before mlx.core is imported

CONFIGS = {
    "baby": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),
    "default": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
}
TEMPERATURE, TOP_K = 0.8, 200


def crop_and_recompute(model, tokens: int, sampler, batch: int):
    """nanoGPT's generate in MLX, the no-cache baseline: each token a full forward pass over the last block_size."""
    import mlx.core as mx

    seq = mx.zeros((batch, 1), dtype=mx.int32)
    for _ in range(tokens):
        token = sampler(model(seq[:, -model.config.block_size:])[:, -1, :]).astype(mx.int32)
        seq = mx.concatenate([seq, token[:, None]], axis=1)
        yield token, None


def time_mlx(model, tokens: int, method: str, batch: int, seed: int) -> float:
    """Seconds to generate ``tokens`` new tokens per sample, reading each step's tokens as sample.py does."""
    import mlx.core as mx

    from mlx_gpt.sampling import generate_step, make_sampler

    sampler = make_sampler(TEMPERATURE, TOP_K)
    mx.random.seed(seed)
    start = time.perf_counter()
    steps = (crop_and_recompute(model, tokens, sampler, batch) if method == "crop"
             else generate_step(model, [0], tokens, sampler, num_samples=batch))
    for token, _ in steps:
        token.tolist()
    return time.perf_counter() - start


def time_torch(model, tokens: int, seed: int, prompt_length: int = 1) -> float:
    import torch

    torch.manual_seed(seed)
    idx = torch.zeros((1, prompt_length), dtype=torch.long)
    start = time.perf_counter()
    model.generate(idx, tokens, temperature=TEMPERATURE, top_k=TOP_K)
    return time.perf_counter() - start


def pick_torch_threads(model, setting: str, seed: int) -> int:
    """PyTorch's thread count for the timed run: the given number, or the faster of 1 and the default.

    On a small or busy machine PyTorch's OpenMP threads can be much slower than one thread; the
    baseline gets whichever is faster, so that the comparison does not flatter MLX.
    """
    import torch

    if setting != "best":
        torch.set_num_threads(int(setting))
        return int(setting)
    default = torch.get_num_threads()
    best, best_time = default, float("inf")
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        block = model.config.block_size  # time full-context steps, the bulk of a long run
        time_torch(model, 2, seed, block)  # warm-up for this setting
        seconds = time_torch(model, 8, seed, block)
        if seconds < best_time:
            best, best_time = threads, seconds
    torch.set_num_threads(best)
    return best


def check_same_logits(mlx_model, torch_model, block: int) -> float:
    import mlx.core as mx
    import numpy as np
    import torch

    ids = np.random.default_rng(0).integers(0, mlx_model.config.vocab_size, (1, block))
    ours = np.array(mlx_model(mx.array(ids.astype(np.int32))))
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(ids), last_only=False).numpy()
    return float(np.abs(ours - theirs).max())


def machine() -> str:
    import mlx.core as mx

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.1f}"
    return f"{cpu}, {os.cpu_count()} cores{load}; mlx {mx.__version__}; {'; '.join(PLUGIN) or 'plain MLX'}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=500, help="new tokens per sample for the KV cache paths")
    p.add_argument("--slow_tokens", type=int, default=None,
                   help="new tokens for the no-cache paths (MLX and PyTorch); default: --tokens")
    p.add_argument("--num_samples", type=int, default=8, help="batch for the batched KV cache run")
    p.add_argument("--configs", default="baby,default", help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch baseline")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="cpu")
    p.add_argument("--torch_threads", default="best",
                   help="PyTorch threads: a number, or 'best' (the faster of 1 and PyTorch's default, on a short run)")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    slow = args.slow_tokens or args.tokens
    from mlx_gpt.device import select_device

    device = select_device(args.device)

    import mlx.core as mx

    from mlx_gpt.config import GPTConfig
    from mlx_gpt.model import GPT

    torch_ref = None
    if not args.no_torch:
        try:
            import torch

            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import torch_gpt as torch_ref
        except ImportError:
            print("PyTorch is not installed: no PyTorch baseline (pip install torch)")
    print(f"machine: {machine()}; device {device}"
          + (f"; torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch_ref else ""))
    print(f"new tokens: {args.tokens} (KV cache), {slow} (no cache{', PyTorch' if torch_ref else ''}); "
          f"temperature {TEMPERATURE}, top_k {TOP_K}, prompt of 1 token")
    if slow < args.tokens:
        print(f"note: the no-cache paths generate only {slow} tokens (shorter contexts on average, so they look "
              "faster than at 500): the cache/no-cache ratios are lower bounds")

    rows = []  # (config, path, batch, tokens, seconds)
    summary = []
    for name in args.configs.split(","):
        shape = CONFIGS[name]
        cfg = GPTConfig(vocab_size=65, dropout=0.0, **shape)
        mx.random.seed(args.seed)
        model = GPT(cfg)
        model.eval()
        mx.eval(model.parameters())
        label = f"{name} ({shape['n_layer']}L, {shape['n_embd']} wide, block {shape['block_size']})"
        print(f"\n{label}: {model.num_params() / 1e6:.2f}M parameters")
        tmodel = None
        if torch_ref is not None:
            tmodel = torch_ref.build(cfg, model)
            diff = check_same_logits(model, tmodel, cfg.block_size)
            print(f"  PyTorch model logits agree with MLX's to {diff:.1e}")
            if diff > 1e-3:
                print("  warning: the PyTorch model does not match; its timing is still shown")
        # Warm-up (kernel set-up, first allocations), not timed.
        time_mlx(model, 8, "crop", 1, args.seed)
        time_mlx(model, 8, "cache", args.num_samples, args.seed)
        if tmodel is not None:
            threads = pick_torch_threads(tmodel, args.torch_threads, args.seed)
            print(f"  PyTorch: {threads} thread(s)")

        runs = [("MLX, no cache (crop + recompute)", 1, slow, "crop"),
                ("MLX, KV cache", 1, args.tokens, "cache"),
                (f"MLX, KV cache, {args.num_samples} samples (total)", args.num_samples, args.tokens, "cache")]
        if tmodel is not None:
            runs.append(("PyTorch nanoGPT generate (crop + recompute)", 1, slow, "torch"))
        speeds = {}
        for path, batch, tokens, method in runs:
            if method == "torch":
                seconds = time_torch(tmodel, tokens, args.seed)
            else:
                seconds = time_mlx(model, tokens, method, batch, args.seed)
            speed = batch * tokens / seconds
            speeds[path] = speed
            rows.append((name, path, batch, tokens, seconds, speed))
            print(f"  {path:<48} {batch * tokens:>6} tokens in {seconds:7.2f} s: {speed:9.1f} tokens/s", flush=True)
        nocache, cache = speeds[runs[0][0]], speeds[runs[1][0]]
        line = f"  KV cache / no cache: {cache / nocache:.1f}x"
        result = {"config": name, "block": shape["block_size"], "cache_vs_nocache": cache / nocache}
        if tmodel is not None:
            torch_speed = speeds[runs[3][0]]
            line += (f"; KV cache / PyTorch: {cache / torch_speed:.1f}x; "
                     f"MLX no cache / PyTorch: {nocache / torch_speed:.2f}x")
            result["cache_vs_torch"] = cache / torch_speed
        print(line)
        summary.append(result)

    print("\nTargets (block 256): KV cache >= 5x no cache, >= 3x the PyTorch recompute baseline")
    for r in summary:
        if r["block"] >= 256:
            ok = r["cache_vs_nocache"] >= 5 and r.get("cache_vs_torch", 99) >= 3
            extra = f", {r['cache_vs_torch']:.1f}x PyTorch" if "cache_vs_torch" in r else ""
            print(f"  {r['config']}: {r['cache_vs_nocache']:.1f}x no cache{extra}: {'met' if ok else 'NOT met'}")

    print("\n| config | path | samples | new tokens | seconds | tokens/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, path, batch, tokens, seconds, speed in rows:
        print(f"| {name} | {path} | {batch} | {tokens} | {seconds:.2f} | {speed:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
