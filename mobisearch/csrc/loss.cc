// The softmax cross-entropy of a train step's logits against integer labels (with optional
// label smoothing), and its gradient, as one XLA FFI call for XLA:CPU.
//
// Through optax and autodiff, XLA compiles the loss as about a dozen small fusions (the
// max, exp, sum and log of the log-softmax, the take_along_axis of the labels and its
// scatter-add transpose): a quarter of a train step's XLA compile when the rest of the
// step is native. Here it is one call, in double:
//
//   t_c   = (1 - eps)·[c == y] + eps/C                   (optax.smooth_labels; eps = 0: one-hot)
//   loss  = mean_b(logsumexp(z_b) - Σ_c t_c·z_bc)         (= -Σ t·log_softmax(z))
//   dz_bc = (softmax(z_b)_c - t_c) / B                     (the gradient of that mean)

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error SoftmaxCrossEntropy(ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> labels,
                               ffi::ResultBuffer<ffi::F32> loss,
                               ffi::ResultBuffer<ffi::F32> dlogits, float smoothing) {
  const auto dims = logits.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("logits must be [batch, classes]");
  const int64_t B = dims[0], C = dims[1];
  if (labels.element_count() != static_cast<size_t>(B))
    return ffi::Error::InvalidArgument("labels must hold one class per row of logits");
  if (B == 0 || C == 0) return ffi::Error::InvalidArgument("logits are empty");
  const float* z = logits.typed_data();
  const int32_t* y = labels.typed_data();
  float* dz = dlogits->typed_data();
  const double off = static_cast<double>(smoothing) / C, on = 1.0 - smoothing + off;
  std::vector<double> e(static_cast<size_t>(C));  // exp(z - max) of the current row
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    if (y[b] < 0 || y[b] >= C)
      return ffi::Error::InvalidArgument("label " + std::to_string(y[b]) + " of row " +
                                         std::to_string(b) + " is not in [0, " +
                                         std::to_string(C) + ")");
    const float* zb = z + b * C;
    double m = zb[0];
    for (int64_t c = 1; c < C; ++c) m = std::max(m, static_cast<double>(zb[c]));
    double s = 0.0, target_dot = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      e[c] = std::exp(zb[c] - m);
      s += e[c];
      target_dot += (c == y[b] ? on : off) * zb[c];
    }
    total += m + std::log(s) - target_dot;
    for (int64_t c = 0; c < C; ++c)
      dz[b * C + c] = static_cast<float>((e[c] / s - (c == y[b] ? on : off)) / B);
  }
  *loss->typed_data() = static_cast<float>(total / B);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobisearchSoftmaxCrossEntropy, SoftmaxCrossEntropy,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // logits
                                  .Arg<ffi::Buffer<ffi::S32>>()  // labels
                                  .Ret<ffi::Buffer<ffi::F32>>()  // loss (mean)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // its gradient
                                  .Attr<float>("smoothing"));
