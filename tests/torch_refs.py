"""Small PyTorch models with exactly the layouts convert.py reads, saved the way each code base saves them.

Used only by test_convert.py (imports torch at module level: import this file only when torch is installed).
"""

from __future__ import annotations

import copy
import math
import pickle
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlx_gpt.config import GPTConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from torch_gpt import TorchGPT  # noqa: E402  (the one PyTorch GPT, shared with the benchmarks)

# ---------------------------------------------------------------------------------------------------------------
# The seed's miniGPT and "Let's build GPT" gpt.py: per-head attention modules, nn.Sequential blocks.


class Head(nn.Module):
    def __init__(self, n_embd: int, head_size: int, block_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        k, q, v = self.key(x), self.query(x), self.value(x)
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
        return F.softmax(wei, dim=-1) @ v


class MultiHeadAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList([Head(n_embd, n_embd // n_head, block_size) for _ in range(n_head)])
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([h(x) for h in self.heads], dim=-1))


class FeedForward(nn.Module):
    def __init__(self, n_embd: int, activation: nn.Module) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), activation, nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class HeadsBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int, activation: nn.Module) -> None:
        super().__init__()
        self.sa = MultiHeadAttention(n_embd, n_head, block_size)
        self.ffwd = FeedForward(n_embd, activation)
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.sa(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class HeadsGPT(nn.Module):
    """miniGPT (GELU tanh, tied head) or the lecture's gpt.py (ReLU, untied head); both heads have a bias."""

    def __init__(self, vocab_size: int, n_embd: int, n_head: int, n_layer: int, block_size: int, *,
                 activation: str, tied: bool) -> None:
        super().__init__()
        self.block_size = block_size
        act = nn.GELU(approximate="tanh") if activation == "gelu_tanh" else nn.ReLU()
        self.token_embedding_table = nn.Embedding(vocab_size, n_embd)
        self.position_embedding_table = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*[HeadsBlock(n_embd, n_head, block_size, act) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size)
        if tied:
            self.lm_head.weight = self.token_embedding_table.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.token_embedding_table(idx) + self.position_embedding_table(torch.arange(T))
        return self.lm_head(self.ln_f(self.blocks(x)))


def minigpt(vocab_size: int, **shape: int) -> HeadsGPT:
    return HeadsGPT(vocab_size, **shape, activation="gelu_tanh", tied=True)


def lecture_gpt(vocab_size: int, **shape: int) -> HeadsGPT:
    return HeadsGPT(vocab_size, **shape, activation="relu", tied=False)


def save_minigpt(model: HeadsGPT, ema: HeadsGPT, chars: list[str], path: Path, iteration: int = 1234) -> None:
    """The seed's checkpoint dict: model keys with torch.compile's prefix, EMA without, vocabulary in meta."""
    n_embd = model.token_embedding_table.weight.shape[1]
    meta = {"chars": chars, "vocab_size": len(chars), "n_embd": n_embd, "n_head": len(model.blocks[0].sa.heads),
            "n_layer": len(model.blocks), "block_size": model.block_size, "dropout": 0.1}
    torch.save({"model_state_dict": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()},
                "optimizer_state_dict": adamw_state(model), "iter": iteration, "meta": meta,
                "ema_state_dict": ema.state_dict()}, path)


# ---------------------------------------------------------------------------------------------------------------
# nanoGPT: the project's one PyTorch GPT (bench/torch_gpt.py), saved with nanoGPT's names and model_args.


class NanoGPT(TorchGPT):
    """nanoGPT's model: the reference GPT, called with nanoGPT's arguments and giving every position's logits."""

    def __init__(self, vocab_size: int, n_embd: int, n_head: int, n_layer: int, block_size: int, *,
                 bias: bool, tied: bool = True) -> None:
        super().__init__(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                                   n_embd=n_embd, dropout=0.0, bias=bias, activation="gelu", tie_weights=tied))
        self.block_size = block_size
        self.model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                               vocab_size=vocab_size, dropout=0.0)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return super().forward(idx, last_only=False)


def save_nanogpt(model: NanoGPT, path: Path, prefix: str = "", dataset: str = "shakespeare_char") -> None:
    """nanoGPT's train.py checkpoint dict (prefix: "_orig_mod." after torch.compile, "module." under DDP)."""
    torch.save({"model": {prefix + k: v for k, v in model.nanogpt_state_dict().items()},
                "optimizer": adamw_state(model), "model_args": model.model_args, "iter_num": 250,
                "best_val_loss": torch.tensor(1.47),
                "config": {"dataset": dataset, "n_layer": model.model_args["n_layer"], "compile": True}}, path)


def save_meta_pkl(chars: list[str], path: Path) -> None:
    """nanoGPT's data/shakespeare_char/prepare.py vocabulary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers


def adamw_state(model: nn.Module) -> dict:
    """What AdamW.state_dict() holds after some steps (built by hand: creating an optimizer costs seconds)."""
    params = list(model.parameters())
    state = {i: {"step": torch.tensor(100.0), "exp_avg": torch.randn(p.shape), "exp_avg_sq": torch.rand(p.shape)}
             for i, p in enumerate(params)}
    group = {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False,
             "params": list(range(len(params)))}
    return {"state": state, "param_groups": [group]}


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random weights unlike any init: LayerNorm gains away from 1 and non-zero biases, so mapping bugs show."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # shared (tied) tensors are listed once
        noise = torch.randn(p.shape, generator=g)
        if p.ndim == 1:
            p.copy_(1 + 0.3 * noise if name.endswith("weight") else 0.3 * noise)
        else:
            p.copy_(noise / math.sqrt(p.shape[-1]))
    return model.eval()


@torch.no_grad()
def perturbed_copy(model: nn.Module, seed: int) -> nn.Module:
    """Another set of weights with the same structure (an EMA stand-in); deepcopy keeps the tie."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for p in other.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g))
    return other.eval()


@torch.no_grad()
def greedy_decode(model: nn.Module, ids: list[int], max_new_tokens: int) -> list[int]:
    ids = list(ids)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids[-model.block_size:]]))[0, -1]
        ids.append(int(torch.argmax(logits)))
    return ids
