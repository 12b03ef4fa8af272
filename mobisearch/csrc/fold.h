// Eval-mode BatchNorm as a per-channel affine y = x·a + b, computed inside the kernels that
// apply it, so that an eval-mode program hands the layer's own state (scale, bias, running
// mean and variance) to one native call instead of compiling the fold as XLA fusions.

#ifndef MOBISEARCH_FOLD_H_
#define MOBISEARCH_FOLD_H_

#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace mobisearch {

namespace ffi = xla::ffi;

// The folded affine of one BatchNorm: a = scale / sqrt(var + eps), b = bias - mean·a.
struct Folded {
  std::vector<float> a, b;
};

// Folds (scale, bias, mean, var); an error if they do not hold `channels` values each.
inline ffi::Error FoldBatchNorm(ffi::Buffer<ffi::F32>& scale, ffi::Buffer<ffi::F32>& bias,
                                ffi::Buffer<ffi::F32>& mean, ffi::Buffer<ffi::F32>& var,
                                float epsilon, int64_t channels, Folded* out) {
  const auto n = static_cast<size_t>(channels);
  if (scale.element_count() != n || bias.element_count() != n || mean.element_count() != n ||
      var.element_count() != n)
    return ffi::Error::InvalidArgument(
        "scale, bias, mean and var must hold one value per channel");
  out->a.resize(n);
  out->b.resize(n);
  const float* s = scale.typed_data();
  const float* bi = bias.typed_data();
  const float* m = mean.typed_data();
  const float* v = var.typed_data();
  for (size_t c = 0; c < n; ++c) {
    out->a[c] = s[c] / std::sqrt(v[c] + epsilon);
    out->b[c] = bi[c] - m[c] * out->a[c];
  }
  return ffi::Error::Success();
}

}  // namespace mobisearch

#endif  // MOBISEARCH_FOLD_H_
