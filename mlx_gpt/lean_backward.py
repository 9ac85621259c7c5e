"""Backward passes that keep less in memory, with the same values: the model uses them in training mode.

MLX evaluates a step's graph breadth-first from its outputs, so an operation runs just before the first one that
needs it. Two patterns of autograd's graph then hold more than the backward needs (docs/performance.md, Memory):

- a weight gradient (x^T @ dy) is needed by nothing but the optimizer, so MLX computes every layer's at the very
  end, and until then keeps each layer's input x and output gradient dy. ``linear`` makes the input gradient
  depend on the weight's, so each is computed as soon as its layer's backward is;
- GELU's backward reads its forward's intermediates (the erf term, [B, T, 4C] per layer). ``recomputed``
  recomputes them in the backward from the input, which the forward keeps anyway.

Each backward is autograd's own (``mx.vjp`` of the plain function), so the gradients are the same arrays.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import mlx.core as mx


def _plain_linear(x: mx.array, weight: mx.array, *bias: mx.array) -> mx.array:
    return mx.addmm(bias[0], x, weight.T) if bias else x @ weight.T  # as nn.Linear


@mx.custom_function
def _linear(x: mx.array, weight: mx.array, *bias: mx.array) -> mx.array:
    return _plain_linear(x, weight, *bias)


@_linear.vjp
def _linear_vjp(primals: tuple, cotangent: mx.array, output: mx.array) -> tuple[mx.array, ...]:
    _, (d_x, *d_params) = mx.vjp(_plain_linear, list(primals), [cotangent])
    return (mx.depends(d_x, d_params), *d_params)


def linear(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    """``nn.Linear``'s x @ weight.T + bias, whose backward computes the weight's (and bias') gradient before the
    input's is used."""
    return _linear(x, weight, *([bias] if bias is not None else []))


@functools.lru_cache
def recomputed(fn: Callable[[mx.array], mx.array]) -> Callable[[mx.array], mx.array]:
    """The elementwise ``fn`` whose backward recomputes its intermediates from the input. The input the backward
    reads is made to depend on the cotangent: else ``mx.compile`` would merge the recomputation with the
    forward (the same operations on the same array) and keep the intermediates after all."""

    @mx.custom_function
    def f(x: mx.array) -> mx.array:
        return fn(x)

    @f.vjp
    def f_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:  # one input: not a tuple
        return mx.vjp(fn, [mx.depends(x, cotangent)], [cotangent])[1][0]

    return f
