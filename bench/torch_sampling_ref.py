"""The PyTorch baseline for bench/sample_speed.py: nanoGPT's GPT and its crop-and-recompute ``generate``.

Same architecture as ``mlx_gpt.model.GPT`` (pre-LayerNorm blocks, learned absolute positions, exact
GELU, tied LM head, optional biases); nanoGPT's ``generate`` runs a full forward pass over the last
block_size tokens for every new token (no KV cache), and like nanoGPT's forward at inference it
applies the LM head to the last position only. ``load_from_mlx`` copies an MLX model's weights so
that both models compute the same logits (the benchmark checks this before timing).

Needs PyTorch (``pip install torch``); nothing in ``mlx_gpt`` imports this file.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F


class LayerNorm(nn.Module):
    def __init__(self, n: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.act = nn.GELU(approximate="tanh" if cfg.activation == "gelu_tanh" else "none")
        if cfg.activation == "relu":
            self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    """nanoGPT's GPT (inference only) for an ``mlx_gpt.config.GPTConfig``."""

    def __init__(self, cfg) -> None:
        super().__init__()
        if not cfg.tie_weights or cfg.lm_head_bias:
            raise ValueError("the PyTorch baseline supports the nanoGPT head only (tied weights, no head bias)")
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=LayerNorm(cfg.n_embd, cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        _, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        return self.lm_head(x[:, [-1], :] if last_only else x)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
        """nanoGPT's generate: crop to block_size, full forward, sample, append; repeat."""
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits = self(idx_cond)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def load_from_mlx(model: TorchGPT, mlx_model) -> TorchGPT:
    """Copy an MLX ``GPT``'s weights (nanoGPT names, same [out, in] layout) into ``model``."""
    from mlx.utils import tree_flatten

    state = {}
    for name, value in tree_flatten(mlx_model.parameters()):
        target = "lm_head.weight" if name == "wte.weight" else f"transformer.{name}"
        state[target] = torch.from_numpy(np.array(value, dtype=np.float32))
    state["transformer.wte.weight"] = state["lm_head.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    return model


def build(cfg, mlx_model=None) -> TorchGPT:
    model = TorchGPT(cfg)
    if mlx_model is not None:
        load_from_mlx(model, mlx_model)
    model.eval()
    return model


__all__ = ["TorchGPT", "build", "load_from_mlx"]
