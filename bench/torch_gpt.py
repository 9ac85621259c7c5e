"""The same GPT in PyTorch (nanoGPT's shape): the benchmarks' yardstick and the tests' reference, not the product.

Identical architecture to mlx_gpt.model.GPT for an ``mlx_gpt.config.GPTConfig`` with the nanoGPT head (tied or
untied, no head bias): pre-LayerNorm blocks, fused q/k/v, causal SDPA, the configured activation and biases, dropout
on the residual branches and the embeddings. Parameter names match mlx-gpt's (and nanoGPT's), so the same
weights load into both (``load_flat``, ``build``). bench/train_speed.py trains it with nanoGPT's AdamW
(``make_optimizer``); bench/sample_speed.py runs nanoGPT's crop-and-recompute ``generate``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {"gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": lambda: nn.ReLU()}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.activation]()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        if cfg.lm_head_bias:
            raise ValueError("the PyTorch reference has nanoGPT's head only (no head bias)")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        if not cfg.tie_weights:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                last_only: bool = True) -> torch.Tensor:
        """The mean cross-entropy with ``targets``; without them the logits, of the last position only
        unless ``last_only=False`` (as nanoGPT's forward does at inference)."""
        T = idx.shape[1]
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T)))
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        if targets is None and last_only:
            x = x[:, [-1], :]
        logits = x @ self.wte.weight.T if self.config.tie_weights else self.lm_head(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
        """nanoGPT's generate: crop to block_size, full forward, sample, append; repeat."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[:, -1, :] / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits[logits < kth] = -float("inf")
            idx = torch.cat((idx, torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)), dim=1)
        return idx

    def nanogpt_state_dict(self) -> dict[str, torch.Tensor]:
        """The state_dict nanoGPT's own model would have: ``transformer.`` names, ``lm_head.weight`` even when tied,
        and the causal-mask buffer (``attn.bias``) of nanoGPT's non-flash attention."""
        state = {f"transformer.{k}": v for k, v in self.state_dict().items() if not k.startswith("lm_head.")}
        state["lm_head.weight"] = self.wte.weight if self.config.tie_weights else self.lm_head.weight
        T = self.config.block_size
        for i in range(self.config.n_layer):
            state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
        return state

    def load_flat(self, weights: dict[str, np.ndarray]) -> None:
        """Load mlx-gpt's flat parameter names ("h.0.attn.c_attn.weight"); mlx and torch Linear are both [out, in]."""
        state = {name: torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
                 for name, value in weights.items()}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise KeyError(f"weights do not match: missing {missing}, unexpected {unexpected}")


def build(cfg: Any, mlx_model: Any = None) -> TorchGPT:
    """An inference model for ``cfg``, with an MLX ``GPT``'s weights when one is given."""
    from mlx.utils import tree_flatten

    model = TorchGPT(cfg)
    if mlx_model is not None:
        model.load_flat({name: np.array(value) for name, value in tree_flatten(mlx_model.parameters())})
    return model.eval()


def make_optimizer(model: TorchGPT, lr: float, betas: tuple[float, float], weight_decay: float) -> Any:
    """nanoGPT's AdamW: weight decay on tensors with ndim >= 2 only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)
