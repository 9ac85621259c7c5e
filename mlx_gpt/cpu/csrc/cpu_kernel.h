// What mlx-gpt's C++ kernels for MLX's CPU backend share: row sums that vectorise, input checks, allocation,
// the stream to run on, and the base of a CPU-only primitive. Included by each csrc/*.cpp (see mlx_gpt/cpu/native.py).

#pragma once

#include <stdexcept>
#include <string>
#include <typeinfo>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"
#include "mlx/stream.h"
#include "mlx/utils.h"

namespace mlx_gpt {

namespace mx = mlx::core;

// Sums kept in this many independent lanes, so that g++ vectorises them without reassociating (no -ffast-math).
constexpr int LANES = 16;

inline float lane_total(const float* lanes) {
  float total = 0.0f;
  for (int j = 0; j < LANES; ++j) total += lanes[j];
  return total;
}

inline float row_sum(const float* x, int n) {
  float lanes[LANES] = {};
  int i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int j = 0; j < LANES; ++j) lanes[j] += x[i + j];
  float total = lane_total(lanes);
  for (; i < n; ++i) total += x[i];
  return total;
}

inline float row_dot(const float* a, const float* b, int n) {
  float lanes[LANES] = {};
  int i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int j = 0; j < LANES; ++j) lanes[j] += a[i + j] * b[i + j];
  float total = lane_total(lanes);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// A primitive with no GPU version (kernels.py never builds one there) that names itself in its errors.
class CpuPrimitive : public mx::Primitive {
 public:
  CpuPrimitive(mx::Stream stream, const char* kernel) : mx::Primitive(stream), kernel_(kernel) {}

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(std::string("mlx_gpt ") + kernel_ + ": CPU only (mlx_gpt uses MLX's ops on a GPU)");
  }

 protected:
  // For is_equivalent (how mx.compile finds duplicate operations): a forward is never its own backward.
  bool same_type(const mx::Primitive& other) const {
    return typeid(other) == typeid(*this);
  }

  // The data of an input the kernel reads row by row (kernels.py passes them through mx.contiguous).
  const float* rows_of(const mx::array& a, const char* what) const {
    if (!a.flags().row_contiguous) {
      throw std::invalid_argument(std::string("mlx_gpt ") + kernel_ + ": " + what + " must be row-contiguous");
    }
    return a.data<float>();
  }

  static void allocate(std::vector<mx::array>& outputs) {
    for (auto& out : outputs) out.set_data(mx::allocator::malloc(out.nbytes()));
  }

  // Runs `work` on this primitive's stream, after the work already queued there.
  template <class Work>
  void dispatch(Work&& work) {
    mx::cpu::get_command_encoder(stream()).dispatch(std::forward<Work>(work));
  }

 private:
  const char* kernel_;
};

// The stream that `with mx.stream(...)` made the default (a training step spreads its slices over streams).
inline mx::Stream current_stream() {
  return mx::default_stream(mx::default_device());
}

}  // namespace mlx_gpt

// native.py's check that a module and MLX's Python module share nanobind's ABI (else the call is a TypeError).
#define MLX_GPT_TRIAL(module) module.def("trial", [](const mlx::core::array& a) { return a; })
