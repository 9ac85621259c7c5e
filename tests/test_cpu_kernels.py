"""The CPU plug-in's attention and LayerNorm (mlx_gpt/cpu/) agree with MLX's fused kernels to <= 1e-5 relative,
values and gradients; the C++ kernels build here and are the ones a model uses, and a build that cannot happen
leaves MLX's ops in use."""

from __future__ import annotations

import io
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gpt import cpu, ops
from mlx_gpt.config import GPTConfig
from mlx_gpt.cpu import blocked_attention, kernels, native
from mlx_gpt.cpu.toolchain import builds_for_this_cpu, system_cxx
from mlx_gpt.model import GPT

pytestmark = pytest.mark.skipif(not cpu.describe(), reason="the CPU plug-in is off (MLX_GPT_CPU=0, or not Linux)")

RTOL = 1e-5
# Where a value or gradient crosses zero, relative error is meaningless: float32 rounding of O(1) terms
# leaves ~1e-7 absolute.
ATOL = 1e-6


@pytest.fixture(autouse=True)
def on_the_cpu() -> None:
    mx.set_default_device(mx.cpu)


def test_query_blocks_cover_the_queries_in_blocks_of_about_query_block() -> None:
    assert blocked_attention.query_blocks(24, causal=True) == [(0, 24)]
    assert blocked_attention.query_blocks(256, causal=True) == [(0, 64), (64, 128), (128, 192), (192, 256)]
    assert blocked_attention.query_blocks(150, causal=True) == [(0, 75), (75, 150)]
    assert blocked_attention.query_blocks(256, causal=False) == [(0, 256)]


# (queries, keys): one block of queries, several (of uneven length), and queries that are the last of the keys
# (a prefill after a cache)
SHAPES = {"causal": (24, 24), "causal_blocks": (150, 150), "causal_shorter_queries": (5, 24),
          "causal_shorter_queries_blocks": (130, 200), "bool": (24, 24), "additive": (24, 24), "none": (24, 24)}


@pytest.mark.parametrize("case", list(SHAPES))
def test_attention_matches_the_fused_kernel_values_and_gradients(case: str) -> None:
    t_q, t_k = SHAPES[case]
    keys = [mx.random.key(i) for i in range(4)]
    q = mx.random.normal((2, 3, t_q, 16), key=keys[0])
    k, v = (mx.random.normal((2, 3, t_k, 16), key=key) for key in keys[1:3])
    mask = {"bool": mx.random.uniform(shape=(t_q, t_k), key=keys[3]) > 0.3,
            "additive": mx.random.normal((t_q, t_k), key=keys[3]), "none": None}.get(case, "causal")
    if case == "bool":
        mask[:, 0] = True  # every query sees at least one key
    cotangent = mx.random.normal(q.shape, key=mx.random.key(9))

    def run(attention):
        return mx.vjp(lambda q, k, v: attention(q, k, v, scale=0.25, mask=mask), [q, k, v], [cotangent])

    (got,), got_grads = run(blocked_attention.attention)
    (want,), want_grads = run(mx.fast.scaled_dot_product_attention)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=RTOL, atol=ATOL)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=RTOL, atol=ATOL)


def test_model_loss_and_gradients_with_the_plug_in_match_plain_mlx(monkeypatch: pytest.MonkeyPatch) -> None:
    mx.random.seed(0)
    model = GPT(GPTConfig(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    x = mx.random.randint(0, 17, (3, 16), key=mx.random.key(1))
    y = mx.random.randint(0, 17, (3, 16), key=mx.random.key(2))

    def loss(model: GPT) -> mx.array:
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    fast_loss, fast_grads = nn.value_and_grad(model, loss)(model)
    monkeypatch.setattr(ops, "_active", dict(ops.PLAIN))
    plain_loss, plain_grads = nn.value_and_grad(model, loss)(model)
    np.testing.assert_allclose(fast_loss.item(), plain_loss.item(), rtol=RTOL)
    flat_fast, flat_plain = dict(tree_flatten(fast_grads)), dict(tree_flatten(plain_grads))
    for name, g in flat_fast.items():
        scale = float(mx.abs(flat_plain[name]).max())
        np.testing.assert_allclose(np.array(g), np.array(flat_plain[name]), rtol=RTOL, atol=1e-5 * scale,
                                   err_msg=name)


def test_half_precision_attention_keeps_its_dtype() -> None:
    q = mx.random.normal((1, 2, 130, 16), key=mx.random.key(3)).astype(mx.float16)
    got = blocked_attention.attention(q, q, q, scale=0.25, mask="causal")
    want = mx.fast.scaled_dot_product_attention(q, q, q, scale=0.25, mask="causal")
    assert got.dtype == mx.float16
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)), atol=1e-2)


def ops_in_graph(*outputs: mx.array) -> str:
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return dot.getvalue()


# What the C++ kernels need to be built (as in native._build_inputs); CI and this machine have all of it.
CAN_BUILD = builds_for_this_cpu() and system_cxx() is not None


@pytest.mark.skipif(not CAN_BUILD, reason="the C++ kernels are built on Linux with g++ only")
def test_the_cpu_kernels_build_and_are_the_ones_a_model_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in kernels.CPU_KERNELS:
        assert native.load(name, build=True) is not None, native.status[name]
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    graph = ops_in_graph(model(mx.zeros((2, 8), dtype=mx.int32)))
    assert "CpuLayerNorm" in graph and "CpuCausalAttention" in graph
    monkeypatch.setattr(kernels, "FUSED_ATTENTION_MAX_T", 4)  # longer sequences: the blocked attention in MLX ops
    graph = ops_in_graph(model(mx.zeros((2, 8), dtype=mx.int32)))
    assert "CpuCausalAttention" not in graph and "AddMM" in graph


# (batch, T, heads, head_dim): T within one vector of the kernel's 16 lanes, across several, and past its groups of
# four vectors; head dims that are, and are not, multiples of 16
ATTENTION_SHAPES = [(2, 5, 2, 8), (3, 37, 4, 20), (2, 64, 4, 32), (1, 70, 1, 80), (2, 100, 2, 48)]


@pytest.mark.skipif(not CAN_BUILD, reason="the C++ attention is built on Linux with g++ only")
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
def test_causal_attention_from_qkv_matches_the_fused_kernel(shape: tuple[int, int, int, int]) -> None:
    batch, t, heads, head_dim = shape
    width = heads * head_dim
    qkv = mx.random.normal((batch, t, 3 * width), key=mx.random.key(5))
    cotangent = mx.random.normal((batch, t, width), key=mx.random.key(6))

    def reference(qkv: mx.array) -> mx.array:  # what CausalSelfAttention does on a GPU
        q, k, v = (part.reshape(batch, t, heads, head_dim).transpose(0, 2, 1, 3) for part in mx.split(qkv, 3, -1))
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=head_dim ** -0.5, mask="causal")
        return y.transpose(0, 2, 1, 3).reshape(batch, t, width)

    (got,), (got_grad,) = mx.vjp(lambda qkv: kernels.causal_self_attention(qkv, heads), [qkv], [cotangent])
    (want,), (want_grad,) = mx.vjp(reference, [qkv], [cotangent])
    assert "CpuCausalAttentionVJP" in ops_in_graph(got_grad)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.array(got_grad), np.array(want_grad), rtol=RTOL, atol=ATOL)


def test_causal_attention_leaves_what_it_does_not_take_to_the_blocked_attention() -> None:
    def graph(qkv: mx.array) -> str:
        return ops_in_graph(kernels.causal_self_attention(qkv, 2))

    qkv = mx.ones((1, 4, 24))
    assert "CpuCausalAttention" not in graph(qkv.astype(mx.float16))  # float32 only
    assert "CpuCausalAttention" not in graph(mx.ones((1, kernels.FUSED_ATTENTION_MAX_T + 1, 24)))


# (shape of x, bias): rows a multiple of the kernels' 16 lanes or not, widths too; with and without a bias
LAYER_NORM_CASES = {"model_shape": ((2, 37, 128), False), "bias": ((2, 37, 128), True),
                    "odd_width": ((3, 5, 50), True), "narrow": ((7, 3), False)}


@pytest.mark.skipif(not CAN_BUILD, reason="the C++ LayerNorm is built on Linux with g++ only")
@pytest.mark.parametrize("case", list(LAYER_NORM_CASES))
@pytest.mark.parametrize("transposed_input", [False, True])
def test_layer_norm_matches_mx_fast_values_and_gradients(case: str, transposed_input: bool) -> None:
    shape, has_bias = LAYER_NORM_CASES[case]
    keys = [mx.random.key(i) for i in range(4)]
    x = mx.random.normal(shape, key=keys[0]) * 3 + 1
    if transposed_input:  # a view that is not row-contiguous: the kernels take a copy
        x = mx.random.normal(shape[::-1], key=keys[0]).T
    params = [mx.random.normal(shape[-1:], key=keys[1])] + ([mx.random.normal(shape[-1:], key=keys[2])] * has_bias)
    cotangent = mx.random.normal(shape, key=keys[3])

    def run(layer_norm):
        return mx.vjp(lambda x, w, *b: layer_norm(x, w, b[0] if b else None, 1e-5), [x, *params], [cotangent])

    (got,), got_grads = run(kernels.layer_norm)
    (want,), want_grads = run(mx.fast.layer_norm)
    assert "CpuLayerNormVJP" in ops_in_graph(*got_grads)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=RTOL, atol=ATOL)
    for g, w in zip(got_grads, want_grads, strict=True):
        # dweight and dbias are sums over all rows: compare relative to their scale
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=RTOL, atol=RTOL * float(mx.abs(w).max()))


def test_without_a_compiler_the_cpu_ops_are_mlx_s(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached: it would have to build
    monkeypatch.setattr(native, "system_cxx", lambda: None)
    monkeypatch.setattr(native, "_loaded", {})
    assert native.load("layer_norm", build=True) is None
    said = native.status["layer_norm"]
    assert said == "MLX's own ops (no g++ on PATH)" or "Linux only" in said
    x, w = mx.ones((2, 8)), mx.ones((8,))
    assert "CpuLayerNorm" not in ops_in_graph(kernels.layer_norm(x, w, None, 1e-5))
    assert "CpuCausalAttention" not in ops_in_graph(kernels.causal_self_attention(mx.ones((1, 4, 24)), 2))


@pytest.mark.skipif(not CAN_BUILD, reason="the C++ kernels are built on Linux with g++ only")
def test_a_failed_build_says_why_and_leaves_no_module(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "SOURCE_DIR", tmp_path)
    monkeypatch.setattr(native, "_loaded", {})
    assert native.load("broken") is None and native.status["broken"] == native.NOT_BUILT  # sampling never builds
    assert native.load("broken", build=True) is None
    said = native.status["broken"]
    assert said.startswith("MLX's own ops (build failed: ") and "error" in said
    assert not list((tmp_path / "mlx-gpt").rglob("*broken*"))  # no module, no temporary file left
