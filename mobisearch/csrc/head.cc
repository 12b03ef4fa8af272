// The classifier head of a MobileNet (global average pool, then a dense layer with bias)
// and its gradients, as XLA FFI handlers for XLA:CPU.
//
//   forward:  p_bc = (Σ_hw x_bhwc) / (H·W);  z_bk = Σ_c p_bc·w_ck + b_k
//   backward: dw_ck = Σ_b p_bc·g_bk;  db_k = Σ_b g_bk;  dx_bhwc = (Σ_k g_bk·w_ck) / (H·W)
//
// Through XLA the head is the last handful of XLA kernels of a native train step that XLA
// emits through LLVM (the bias add, the bias gradient's two reductions, a broadcast for the
// pool), each a few ms of every candidate's compile, and two of each eval-mode program's.
// The head is small (a [batch, C] × [C, classes] product, C ≤ 1024 here), so plain loops
// over rows that the compiler vectorises serve; rows are split between the caller and XLA's
// intra-op thread pool. Sums over the batch (dw, db) are taken in row order on one thread,
// so the result does not depend on the split.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mobisearch::NumChunks;
using mobisearch::ParallelFor;

struct HeadGeometry {
  int64_t b, hw, c, k;
};

ffi::Error ReadHead(ffi::Span<const int64_t> x_dims, ffi::Span<const int64_t> w_dims,
                    HeadGeometry* g) {
  if (x_dims.size() != 4) return ffi::Error::InvalidArgument("x must be NHWC (rank 4)");
  if (w_dims.size() != 2 || w_dims[0] != x_dims[3])
    return ffi::Error::InvalidArgument("the head kernel must be [C, classes] with x's C");
  *g = HeadGeometry{x_dims[0], x_dims[1] * x_dims[2], x_dims[3], w_dims[1]};
  if (g->hw == 0) return ffi::Error::InvalidArgument("x has no pixels");
  return ffi::Error::Success();
}

// Rows [r0, r1): the pooled features and the logits.
void ForwardRows(const HeadGeometry& g, const float* __restrict x, const float* __restrict w,
                 const float* __restrict bias, float* __restrict pooled,
                 float* __restrict logits, int64_t r0, int64_t r1) {
  const float n = static_cast<float>(g.hw);
  for (int64_t r = r0; r < r1; ++r) {
    float* __restrict p = pooled + r * g.c;
    const float* xr = x + r * g.hw * g.c;
    std::copy(xr, xr + g.c, p);
    for (int64_t i = 1; i < g.hw; ++i)
      for (int64_t c = 0; c < g.c; ++c) p[c] += xr[i * g.c + c];
    for (int64_t c = 0; c < g.c; ++c) p[c] /= n;
    float* __restrict z = logits + r * g.k;
    std::fill(z, z + g.k, 0.0f);
    for (int64_t c = 0; c < g.c; ++c)
      for (int64_t k = 0; k < g.k; ++k) z[k] += p[c] * w[c * g.k + k];
    for (int64_t k = 0; k < g.k; ++k) z[k] += bias[k];
  }
}

ffi::Error HeadForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> logits,
                       ffi::ResultBuffer<ffi::F32> pooled) {
  HeadGeometry g;
  if (auto err = ReadHead(x.dimensions(), w.dimensions(), &g); !err.success()) return err;
  if (bias.element_count() != static_cast<size_t>(g.k))
    return ffi::Error::InvalidArgument("the head bias must have one value per class");
  const float *xd = x.typed_data(), *wd = w.typed_data(), *bd = bias.typed_data();
  float *zd = logits->typed_data(), *pd = pooled->typed_data();
  const int64_t chunks = NumChunks(pool, g.b / 16 + 1);
  ParallelFor(pool, chunks, [&](int64_t t) {
    ForwardRows(g, xd, wd, bd, pd, zd, g.b * t / chunks, g.b * (t + 1) / chunks);
  });
  return ffi::Error::Success();
}

// Rows [r0, r1) of dx: each row's d pooled, spread evenly over its pixels.
void InputGradRows(const HeadGeometry& g, const float* __restrict w, const float* __restrict gz,
                   float* __restrict dx, int64_t r0, int64_t r1) {
  const float n = static_cast<float>(g.hw);
  std::vector<float> dp(static_cast<size_t>(g.c));
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict gr = gz + r * g.k;
    for (int64_t c = 0; c < g.c; ++c) {
      float s = 0.0f;
      for (int64_t k = 0; k < g.k; ++k) s += gr[k] * w[c * g.k + k];
      dp[c] = s / n;
    }
    float* __restrict out = dx + r * g.hw * g.c;
    for (int64_t i = 0; i < g.hw; ++i) std::copy(dp.begin(), dp.end(), out + i * g.c);
  }
}

ffi::Error HeadBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> pooled,
                        ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> gz,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw,
                        ffi::ResultBuffer<ffi::F32> db) {
  HeadGeometry g;
  if (auto err = ReadHead(dx->dimensions(), w.dimensions(), &g); !err.success()) return err;
  if (pooled.element_count() != static_cast<size_t>(g.b * g.c) ||
      gz.element_count() != static_cast<size_t>(g.b * g.k))
    return ffi::Error::InvalidArgument("need pooled [batch, C] and the logits' gradient");
  const float *pd = pooled.typed_data(), *wd = w.typed_data(), *gd = gz.typed_data();
  float *dwd = dw->typed_data(), *dbd = db->typed_data(), *dxd = dx->typed_data();
  const int64_t chunks = NumChunks(pool, g.b / 16 + 1);
  ParallelFor(pool, chunks, [&](int64_t t) {
    InputGradRows(g, wd, gd, dxd, g.b * t / chunks, g.b * (t + 1) / chunks);
  });
  std::fill(dwd, dwd + g.c * g.k, 0.0f);
  std::fill(dbd, dbd + g.k, 0.0f);
  for (int64_t r = 0; r < g.b; ++r) {
    const float* __restrict gr = gd + r * g.k;
    const float* __restrict pr = pd + r * g.c;
    for (int64_t c = 0; c < g.c; ++c)
      for (int64_t k = 0; k < g.k; ++k) dwd[c * g.k + k] += pr[c] * gr[k];
    for (int64_t k = 0; k < g.k; ++k) dbd[k] += gr[k];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobisearchHeadForward, HeadForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [B, H, W, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel [C, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [K]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // logits [B, K]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // pooled [B, C]

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobisearchHeadBackward, HeadBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // pooled [B, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel [C, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d logits [B, K]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx [B, H, W, C]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d kernel [C, K]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d bias [K]
