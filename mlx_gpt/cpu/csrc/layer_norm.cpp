// LayerNorm as two MLX primitives for the CPU: the forward, and its vector-Jacobian product.
//
// Why: on the CPU, mx.fast.layer_norm is not one kernel but its fallback graph (means, variance, rsqrt, scale:
// two reductions and a few elementwise kernels forward, five reductions backward), each one a separately
// scheduled operation over the whole [rows, C] array. Here each direction is one pass over the rows, and the
// forward saves the rows' mean and 1/std for the backward. Built and loaded by mlx_gpt/cpu/native.py; used by
// mlx_gpt/cpu/kernels.py's layer_norm, which wraps the pair in mx.custom_function.
//
// float32 only; x and the cotangent row-contiguous (kernels.py makes them so); weight and bias any 1-D strides.

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/vector.h>

#include "cpu_kernel.h"

namespace nb = nanobind;
using namespace mlx_gpt;

namespace {

float row_centered_squares(const float* x, float mean, int n) {
  float lanes[LANES] = {};
  int i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int j = 0; j < LANES; ++j) {
      float d = x[i + j] - mean;
      lanes[j] += d * d;
    }
  float total = lane_total(lanes);
  for (; i < n; ++i) total += (x[i] - mean) * (x[i] - mean);
  return total;
}

// A 1-D parameter (weight or bias) as the kernels read it; a broadcast or strided view is fine.
struct Vector {
  const float* data;
  int64_t stride;
};

Vector vector_of(const mx::array& a) {
  return {a.data<float>(), a.strides()[0]};
}

// inputs: x [..., C], weight [C], (bias [C]); outputs: y [..., C], mean [...], rstd [...] (1 / std)
class LayerNormForward : public CpuPrimitive {
 public:
  LayerNormForward(mx::Stream stream, float eps, bool has_bias)
      : CpuPrimitive(stream, "layer_norm"), eps_(eps), has_bias_(has_bias) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const float* x = rows_of(inputs[0], "input");
    allocate(outputs);
    const int C = inputs[0].shape(-1);
    const size_t rows = inputs[0].size() / C;
    const Vector w = vector_of(inputs[1]);
    const std::optional<Vector> b = has_bias_ ? std::optional(vector_of(inputs[2])) : std::nullopt;
    float* y = outputs[0].data<float>();
    float* mean_out = outputs[1].data<float>();
    float* rstd_out = outputs[2].data<float>();
    const float eps = eps_;
    dispatch([=]() {
      for (size_t r = 0; r < rows; ++r) {
        const float* xr = x + r * C;
        float* yr = y + r * C;
        const float mean = row_sum(xr, C) / C;
        const float rstd = 1.0f / std::sqrt(row_centered_squares(xr, mean, C) / C + eps);
        for (int i = 0; i < C; ++i) yr[i] = (xr[i] - mean) * rstd * w.data[i * w.stride];
        if (b)
          for (int i = 0; i < C; ++i) yr[i] += b->data[i * b->stride];
        mean_out[r] = mean;
        rstd_out[r] = rstd;
      }
    });
  }

  const char* name() const override {
    return "CpuLayerNorm";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    if (!same_type(other)) return false;
    const auto& o = static_cast<const LayerNormForward&>(other);
    return eps_ == o.eps_ && has_bias_ == o.has_bias_;
  }

 private:
  float eps_;
  bool has_bias_;
};

// inputs: x, weight, mean, rstd, dy; outputs: dx, dweight, (dbias)
class LayerNormBackward : public CpuPrimitive {
 public:
  LayerNormBackward(mx::Stream stream, bool has_bias) : CpuPrimitive(stream, "layer_norm"), has_bias_(has_bias) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const float* x = rows_of(inputs[0], "input");
    const float* dy = rows_of(inputs[4], "cotangent");
    allocate(outputs);
    const int C = inputs[0].shape(-1);
    const size_t rows = inputs[0].size() / C;
    const Vector w = vector_of(inputs[1]);
    const float* mean = inputs[2].data<float>();
    const float* rstd = inputs[3].data<float>();
    float* dx = outputs[0].data<float>();
    float* dw = outputs[1].data<float>();
    float* db = has_bias_ ? outputs[2].data<float>() : nullptr;
    dispatch([=]() {
      std::vector<float> x_hat(C), g(C);
      std::fill(dw, dw + C, 0.0f);
      if (db) std::fill(db, db + C, 0.0f);
      for (size_t r = 0; r < rows; ++r) {
        const float* xr = x + r * C;
        const float* dyr = dy + r * C;
        for (int i = 0; i < C; ++i) {
          x_hat[i] = (xr[i] - mean[r]) * rstd[r];
          g[i] = dyr[i] * w.data[i * w.stride];
          dw[i] += dyr[i] * x_hat[i];
        }
        if (db)
          for (int i = 0; i < C; ++i) db[i] += dyr[i];
        // dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)), with g = dy * weight
        const float mean_g = row_sum(g.data(), C) / C;
        const float mean_g_x_hat = row_dot(g.data(), x_hat.data(), C) / C;
        float* dxr = dx + r * C;
        for (int i = 0; i < C; ++i) dxr[i] = rstd[r] * (g[i] - mean_g - x_hat[i] * mean_g_x_hat);
      }
    });
  }

  const char* name() const override {
    return "CpuLayerNormVJP";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return same_type(other) && has_bias_ == static_cast<const LayerNormBackward&>(other).has_bias_;
  }

 private:
  bool has_bias_;
};

std::vector<mx::array> forward(const mx::array& x, const mx::array& weight, std::optional<mx::array> bias,
                               float eps) {
  mx::Shape rows(x.shape().begin(), x.shape().end() - 1);
  std::vector<mx::array> inputs = {x, weight};
  if (bias) inputs.push_back(*bias);
  return mx::array::make_arrays({x.shape(), rows, rows}, {mx::float32, mx::float32, mx::float32},
                                std::make_shared<LayerNormForward>(current_stream(), eps, bias.has_value()), inputs);
}

std::vector<mx::array> backward(const mx::array& x, const mx::array& weight, const mx::array& mean,
                                const mx::array& rstd, const mx::array& cotangent, bool has_bias) {
  std::vector<mx::Shape> shapes = {x.shape(), weight.shape()};
  if (has_bias) shapes.push_back(weight.shape());
  std::vector<mx::Dtype> dtypes(shapes.size(), mx::float32);
  return mx::array::make_arrays(shapes, dtypes, std::make_shared<LayerNormBackward>(current_stream(), has_bias),
                                {x, weight, mean, rstd, cotangent});
}

}  // namespace

NB_MODULE(_layer_norm, m) {
  m.doc() = "mlx-gpt's LayerNorm for MLX's CPU backend (see mlx_gpt/cpu/native.py)";
  m.def("forward", &forward, nb::arg("x"), nb::arg("weight"), nb::arg("bias").none(), nb::arg("eps"),
        "(y, mean, rstd) of LayerNorm over the last axis of float32 x; rstd = 1 / sqrt(var + eps)");
  m.def("backward", &backward, nb::arg("x"), nb::arg("weight"), nb::arg("mean"), nb::arg("rstd"),
        nb::arg("cotangent"), nb::arg("has_bias"), "(dx, dweight[, dbias]) from forward's saved mean and rstd");
  MLX_GPT_TRIAL(m);
}
