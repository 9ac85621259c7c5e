// Causal self-attention as two MLX primitives for the CPU, from the fused q/k/v projection to the heads' output.
//
// Why: in MLX ops (blocked_attention.py) a baby-config layer is ~30 scheduled operations: head transposes
// and their contiguous copies, the score matmul, max, exp, sum, the weighted sum, the output transpose, and as
// many again backward, each over small arrays where the cost per operation dominates. Here the forward reads
// q, k and v where the projection wrote them ([B, T, 3C], head h at columns h*D of each third) and writes the
// heads side by side ([B, T, C], what the output projection reads); the backward writes the gradient of the
// projection's output directly. Built and loaded by mlx_gpt/cpu/native.py; mlx_gpt/cpu/kernels.py wraps the pair
// in mx.custom_function and says when it is used.
//
// float32, row-contiguous inputs (kernels.py makes them so). The forward saves the softmax weights [B, H, T, T] for
// the backward (the upper, masked triangle is zero).

#include <algorithm>
#include <cmath>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include "cpu_kernel.h"
#include "mlx/backend/cpu/simd/simd.h"

namespace nb = nanobind;
using namespace mlx_gpt;

namespace {

float row_max(const float* x, int n) {
  float best = x[0];
  for (int j = 1; j < n; ++j) best = std::max(best, x[j]);
  return best;
}

// MLX's own exp (mlx/backend/cpu/simd), which g++ vectorises when inlined into a loop
void exp_minus(float* x, float shift, int n) {
  for (int j = 0; j < n; ++j) x[j] = mx::simd::exp(mx::simd::Simd<float, 1>(x[j] - shift)).value;
}

// One head of one sequence inside a [B, T, 3C] or [B, T, C] array: row i, columns 0..D of q, k, v or the output.
struct Head {
  const float* base;  // at this head's first column in row 0
  int64_t row_stride;
  const float* row(int i) const {
    return base + i * row_stride;
  }
};

struct Shape {
  int B, T, C, H, D, padded_T;  // padded_T: T rounded up to whole vectors of LANES
};

Shape shape_of(const mx::array& qkv, int heads) {
  const int T = qkv.shape(1), C = qkv.shape(2) / 3;
  return {qkv.shape(0), T, C, heads, C / heads, (T + LANES - 1) / LANES * LANES};
}

// A head's keys or values [T, D] as [D, padded_T] (zero past T): a row of scores is then a sum of D vectors.
void transpose_head(const Head& head, const Shape& s, float* out) {
  std::fill(out, out + int64_t(s.D) * s.padded_T, 0.0f);
  for (int j = 0; j < s.T; ++j) {
    const float* r = head.row(j);
    for (int k = 0; k < s.D; ++k) out[k * s.padded_T + j] = r[k];
  }
}

// The two loops below keep GROUPS x 2 vectors of sums in registers at once: one chain of dependent additions
// would wait for each addition's latency, several independent ones fill the vector units.
constexpr int GROUPS = 4;

// out[j0 .. j0 + G * LANES) = sum over k of a[k] * columns[k][same], even and odd k summed apart
template <int G>
void combine_column_block(const float* a, const float* columns, int64_t stride, int D, int j0, float* out) {
  float even[G][LANES] = {}, odd[G][LANES] = {};
  int k = 0;
  for (; k + 1 < D; k += 2) {
    const float a0 = a[k], a1 = a[k + 1];
    const float* c0 = columns + k * stride + j0;
    const float* c1 = c0 + stride;
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < LANES; ++j) {
        even[g][j] += a0 * c0[g * LANES + j];
        odd[g][j] += a1 * c1[g * LANES + j];
      }
  }
  if (k < D)
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < LANES; ++j) even[g][j] += a[k] * columns[k * stride + j0 + g * LANES + j];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < LANES; ++j) out[j0 + g * LANES + j] = even[g][j] + odd[g][j];
}

// out[0..n) (and on to the next whole vector) = sum over k of a[k] * columns[k][..]; columns: [D, padded_T]
void combine_columns(const float* a, const float* columns, const Shape& s, int n, float* out) {
  const int whole_vectors_end = (n + LANES - 1) / LANES * LANES;  // <= padded_T
  int j0 = 0;
  for (; j0 + GROUPS * LANES <= whole_vectors_end; j0 += GROUPS * LANES)
    combine_column_block<GROUPS>(a, columns, s.padded_T, s.D, j0, out);
  switch ((whole_vectors_end - j0) / LANES) {  // the last 1-3 vectors
    case 3: combine_column_block<3>(a, columns, s.padded_T, s.D, j0, out); break;
    case 2: combine_column_block<2>(a, columns, s.padded_T, s.D, j0, out); break;
    case 1: combine_column_block<1>(a, columns, s.padded_T, s.D, j0, out); break;
    default: break;
  }
}

// out[c0 .. c0 + G * LANES) = sum over rows r in [first, last) of coefficient(r) * rows.row(r)[same]
template <int G, class Coefficient>
void combine_row_block(Coefficient coefficient, int first, int last, const Head& rows, int c0, float* out) {
  float even[G][LANES] = {}, odd[G][LANES] = {};
  int r = first;
  for (; r + 1 < last; r += 2) {
    const float w0 = coefficient(r), w1 = coefficient(r + 1);
    const float* x0 = rows.row(r) + c0;
    const float* x1 = rows.row(r + 1) + c0;
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < LANES; ++j) {
        even[g][j] += w0 * x0[g * LANES + j];
        odd[g][j] += w1 * x1[g * LANES + j];
      }
  }
  if (r < last) {
    const float w = coefficient(r);
    const float* x = rows.row(r) + c0;
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < LANES; ++j) even[g][j] += w * x[g * LANES + j];
  }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < LANES; ++j) out[c0 + g * LANES + j] = even[g][j] + odd[g][j];
}

// out[0..D) = sum over rows r in [first, last) of coefficient(r) * rows.row(r)[0..D)
template <class Coefficient>
void combine_rows(Coefficient coefficient, int first, int last, const Head& rows, int D, float* out) {
  int c0 = 0;
  for (; c0 + GROUPS * LANES <= D; c0 += GROUPS * LANES)
    combine_row_block<GROUPS>(coefficient, first, last, rows, c0, out);
  switch ((D - c0) / LANES) {
    case 3: combine_row_block<3>(coefficient, first, last, rows, c0, out); break;
    case 2: combine_row_block<2>(coefficient, first, last, rows, c0, out); break;
    case 1: combine_row_block<1>(coefficient, first, last, rows, c0, out); break;
    default: break;
  }
  for (c0 += (D - c0) / LANES * LANES; c0 < D; ++c0) {  // a head_dim that is not a multiple of LANES
    float total = 0.0f;
    for (int r = first; r < last; ++r) total += coefficient(r) * rows.row(r)[c0];
    out[c0] = total;
  }
}

// What the forward and the backward share: the number of heads and the scale of the scores.
class AttentionPrimitive : public CpuPrimitive {
 public:
  AttentionPrimitive(mx::Stream stream, int heads, float scale)
      : CpuPrimitive(stream, "causal attention"), heads_(heads), scale_(scale) {}

  bool is_equivalent(const mx::Primitive& other) const override {
    if (!same_type(other)) return false;
    const auto& o = static_cast<const AttentionPrimitive&>(other);
    return heads_ == o.heads_ && scale_ == o.scale_;
  }

 protected:
  int heads_;
  float scale_;
};

// in: qkv [B, T, 3C]; out: y [B, T, C], softmax weights [B, H, T, T]
class CausalAttention : public AttentionPrimitive {
 public:
  using AttentionPrimitive::AttentionPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const float* qkv = rows_of(inputs[0], "qkv");
    allocate(outputs);
    const Shape s = shape_of(inputs[0], heads_);
    float* y = outputs[0].data<float>();
    float* weights = outputs[1].data<float>();
    const float scale = scale_;
    dispatch([=]() {
      const int T = s.T, D = s.D, C = s.C;
      std::vector<float> keys_t(int64_t(D) * s.padded_T), q(D), scores(s.padded_T);
      for (int b = 0; b < s.B; ++b) {
        for (int h = 0; h < s.H; ++h) {
          const float* seq = qkv + int64_t(b) * T * 3 * C;
          const Head queries{seq + h * D, 3 * C}, keys{seq + C + h * D, 3 * C}, values{seq + 2 * C + h * D, 3 * C};
          transpose_head(keys, s, keys_t.data());
          for (int i = 0; i < T; ++i) {
            const int n = i + 1;  // keys 0..i are visible to query i
            for (int k = 0; k < D; ++k) q[k] = queries.row(i)[k] * scale;
            combine_columns(q.data(), keys_t.data(), s, n, scores.data());
            exp_minus(scores.data(), row_max(scores.data(), n), n);
            const float inv_total = 1.0f / row_sum(scores.data(), n);
            float* p = weights + ((int64_t(b) * s.H + h) * T + i) * T;
            for (int j = 0; j < n; ++j) p[j] = scores[j] * inv_total;
            std::fill(p + n, p + T, 0.0f);
            combine_rows([p](int j) { return p[j]; }, 0, n, values, D, y + (int64_t(b) * T + i) * C + h * D);
          }
        }
      }
    });
  }

  const char* name() const override {
    return "CpuCausalAttention";
  }
};

// in: qkv [B, T, 3C], softmax weights [B, H, T, T], y [B, T, C], dy [B, T, C]; out: dqkv [B, T, 3C]
class CausalAttentionVJP : public AttentionPrimitive {
 public:
  using AttentionPrimitive::AttentionPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const float* qkv = rows_of(inputs[0], "qkv");
    const float* weights = rows_of(inputs[1], "softmax weights");
    const float* y = rows_of(inputs[2], "output");
    const float* dy = rows_of(inputs[3], "cotangent");
    allocate(outputs);
    const Shape s = shape_of(inputs[0], heads_);
    float* dqkv = outputs[0].data<float>();
    const float scale = scale_;
    dispatch([=]() {
      const int T = s.T, D = s.D, C = s.C, padded_T = s.padded_T;
      // d_scores: dS = P * (dP - rowsum(dP * P)) * scale for one head, with dP = dO V^T and rowsum(dP * P) = dO . O
      std::vector<float> values_t(int64_t(D) * padded_T), d_scores(int64_t(T) * padded_T);
      for (int b = 0; b < s.B; ++b) {
        for (int h = 0; h < s.H; ++h) {
          const int64_t seq_offset = int64_t(b) * T * 3 * C;
          const float* seq = qkv + seq_offset;
          const Head queries{seq + h * D, 3 * C}, keys{seq + C + h * D, 3 * C}, values{seq + 2 * C + h * D, 3 * C};
          const Head d_out{dy + int64_t(b) * T * C + h * D, C}, out{y + int64_t(b) * T * C + h * D, C};
          const float* p = weights + (int64_t(b) * s.H + h) * T * T;  // [T, T]
          float* d_seq = dqkv + seq_offset;
          transpose_head(values, s, values_t.data());
          for (int i = 0; i < T; ++i) {
            const int n = i + 1;
            float* ds = d_scores.data() + int64_t(i) * padded_T;
            const float delta = row_dot(d_out.row(i), out.row(i), D);
            combine_columns(d_out.row(i), values_t.data(), s, n, ds);
            for (int j = 0; j < n; ++j) ds[j] = p[i * T + j] * (ds[j] - delta) * scale;
            combine_rows([ds](int j) { return ds[j]; }, 0, n, keys, D, d_seq + i * 3 * C + h * D);  // dq
          }
          const float* all_ds = d_scores.data();
          for (int j = 0; j < T; ++j) {  // key j was seen by queries j..T-1
            combine_rows([=](int i) { return all_ds[int64_t(i) * padded_T + j]; }, j, T, queries, D,
                         d_seq + j * 3 * C + C + h * D);  // dk
            combine_rows([=](int i) { return p[i * T + j]; }, j, T, d_out, D, d_seq + j * 3 * C + 2 * C + h * D);  // dv
          }
        }
      }
    });
  }

  const char* name() const override {
    return "CpuCausalAttentionVJP";
  }
};

void check_qkv(const mx::array& qkv, int heads) {
  if (qkv.ndim() != 3 || qkv.shape(2) % (3 * heads) != 0 || qkv.dtype() != mx::float32) {
    throw std::invalid_argument("mlx_gpt causal attention: qkv must be float32 [B, T, 3 * heads * head_dim]");
  }
}

std::vector<mx::array> forward(const mx::array& qkv, int heads, float scale) {
  check_qkv(qkv, heads);
  const int B = qkv.shape(0), T = qkv.shape(1), C = qkv.shape(2) / 3;
  return mx::array::make_arrays({{B, T, C}, {B, heads, T, T}}, {mx::float32, mx::float32},
                                std::make_shared<CausalAttention>(current_stream(), heads, scale), {qkv});
}

mx::array backward(const mx::array& qkv, const mx::array& weights, const mx::array& y, const mx::array& cotangent,
                   int heads, float scale) {
  check_qkv(qkv, heads);
  return mx::array(qkv.shape(), mx::float32, std::make_shared<CausalAttentionVJP>(current_stream(), heads, scale),
                   {qkv, weights, y, cotangent});
}

}  // namespace

NB_MODULE(_attention, m) {
  m.doc() = "mlx-gpt's causal self-attention for MLX's CPU backend (see mlx_gpt/cpu/native.py)";
  m.def("forward", &forward, nb::arg("qkv"), nb::arg("heads"), nb::arg("scale"),
        "(y [B, T, C], softmax weights [B, H, T, T]) of causal attention over qkv [B, T, 3C]");
  m.def("backward", &backward, nb::arg("qkv"), nb::arg("weights"), nb::arg("y"), nb::arg("cotangent"),
        nb::arg("heads"), nb::arg("scale"), "dqkv [B, T, 3C] from the forward's output and softmax weights");
  MLX_GPT_TRIAL(m);
}
