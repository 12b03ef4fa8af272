// The kernel gradient of a standard k×k convolution (NHWC, HWIO, float32, SAME-style zero
// padding given as the first row and column's offsets), for XLA:CPU as an XLA FFI handler.
// mobisearch uses it for the stem, the one standard convolution of a MobileNet v1.
//
// XLA:CPU compiles the stem's kernel gradient as a convolution of the transposed input and
// output gradient (a 1×k×k output, an image-sized window) with transposes around it, which
// it emits through LLVM. Here it is one call, one sweep over the output gradient: for each
// output row and kernel tap, the x·dy sums of the row's pixels stay in registers, the Cout
// channels innermost (contiguous in HWIO and NHWC): faster to compile and to run than
// XLA's (figures in docs/performance.md).
//
// Work is split over the batch between the caller and XLA's intra-op thread pool; each
// chunk sums into its own buffer and the chunks are added in chunk order at the end, so the
// result does not depend on thread timing (as the depthwise kernel gradient).

#include <algorithm>
#include <cstdint>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mobisearch::NumChunks;
using mobisearch::ParallelSum;

struct ConvGeometry {
  int64_t h, w, ci, k, oh, ow, co, stride, lo_h, lo_w;
};

// ⌊a / b⌋ for b > 0 (C++'s division rounds toward zero).
int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Sums of x[tap] · dy[pixel] over one output row of one image (n, oh) for every tap of
// kernel row i, into dk ([k, k, Ci, Co]): Co = L·B channels as B vectors of L floats, kept
// in registers over the row's pixels, so each sum is loaded and stored once per row
// instead of once per pixel.
template <int L, int B>
void KernelGradRow(const ConvGeometry& g, const float* __restrict x, const float* __restrict gp,
                   float* __restrict dk, int64_t n, int64_t oh, int64_t i) {
  // Unaligned, and allowed to alias the float arrays it is read from and written to.
  typedef float V __attribute__((vector_size(4 * L), aligned(4), may_alias));
  const int64_t ih = oh * g.stride + i - g.lo_h;
  if (ih < 0 || ih >= g.h) return;
  const int64_t Ci = g.ci, Co = g.co;
  const float* xr = x + (n * g.h + ih) * g.w * Ci;
  for (int64_t j = 0; j < g.k; ++j) {
    // The output columns whose tap j lies inside x: 0 <= ow·s + j - lo_w < w.
    const int64_t lo = std::max<int64_t>(0, -FloorDiv(j - g.lo_w, g.stride));
    const int64_t hi = std::min<int64_t>(g.ow, FloorDiv(g.w - 1 - j + g.lo_w, g.stride) + 1);
    if (lo >= hi) continue;
    for (int64_t c = 0; c < Ci; ++c) {
      float* out = dk + ((i * g.k + j) * Ci + c) * Co;
      V acc[B];
      for (int b = 0; b < B; ++b) acc[b] = *reinterpret_cast<const V*>(out + b * L);
      for (int64_t ow = lo; ow < hi; ++ow) {
        const float xv = xr[(ow * g.stride + j - g.lo_w) * Ci + c];
        const float* gv = gp + ow * Co;
#pragma GCC unroll 4
        for (int b = 0; b < B; ++b) acc[b] += xv * *reinterpret_cast<const V*>(gv + b * L);
      }
      for (int b = 0; b < B; ++b) *reinterpret_cast<V*>(out + b * L) = acc[b];
    }
  }
}

// Any Co: the same sums, one tap and pixel at a time.
void KernelGradRowAny(const ConvGeometry& g, const float* __restrict x,
                      const float* __restrict gp, float* __restrict dk, int64_t n, int64_t oh,
                      int64_t i) {
  const int64_t ih = oh * g.stride + i - g.lo_h;
  if (ih < 0 || ih >= g.h) return;
  const int64_t Ci = g.ci, Co = g.co;
  for (int64_t ow = 0; ow < g.ow; ++ow) {
    for (int64_t j = 0; j < g.k; ++j) {
      const int64_t iw = ow * g.stride + j - g.lo_w;
      if (iw < 0 || iw >= g.w) continue;
      const float* __restrict xp = x + ((n * g.h + ih) * g.w + iw) * Ci;
      for (int64_t c = 0; c < Ci; ++c) {
        const float xv = xp[c];
        float* __restrict out = dk + ((i * g.k + j) * Ci + c) * Co;
        for (int64_t o = 0; o < Co; ++o) out[o] += xv * gp[ow * Co + o];
      }
    }
  }
}

// dk += Σ over images [n0, n1), output pixels and taps of x[tap] · dy[pixel] ([k, k, Ci, Co]).
void KernelGradChunk(const ConvGeometry& g, const float* __restrict x,
                     const float* __restrict dy, float* __restrict dk, int64_t n0,
                     int64_t n1) {
  auto row = KernelGradRowAny;
  if (g.co == 8) row = KernelGradRow<8, 1>;
  if (g.co == 16) row = KernelGradRow<8, 2>;
  if (g.co == 24) row = KernelGradRow<8, 3>;
  if (g.co == 32) row = KernelGradRow<8, 4>;
  if (g.co == 48) row = KernelGradRow<16, 3>;
  if (g.co == 64) row = KernelGradRow<16, 4>;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t oh = 0; oh < g.oh; ++oh)
      for (int64_t i = 0; i < g.k; ++i)
        row(g, x, dy + (n * g.oh + oh) * g.ow * g.co, dk, n, oh, i);
}

ffi::Error ConvKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk,
                          int32_t stride, int32_t lo_h, int32_t lo_w) {
  const auto xd = x.dimensions(), gd = dy.dimensions(), kd = dk->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || kd.size() != 4)
    return ffi::Error::InvalidArgument("x and dy must be NHWC, the kernel HWIO (rank 4)");
  if (gd[0] != xd[0] || kd[0] != kd[1] || kd[2] != xd[3] || kd[3] != gd[3])
    return ffi::Error::InvalidArgument(
        "need x [N, H, W, Cin], dy [N, OH, OW, Cout] and a [k, k, Cin, Cout] kernel");
  if (stride < 1) return ffi::Error::InvalidArgument("stride must be >= 1");
  const ConvGeometry g{xd[1], xd[2], xd[3], kd[0], gd[1], gd[2], gd[3], stride, lo_h, lo_w};
  const int64_t n = xd[0], taps = g.k * g.k * g.ci * g.co;
  const int64_t chunks = NumChunks(pool, n);
  const float* xp = x.typed_data();
  const float* gp = dy.typed_data();
  ParallelSum(pool, chunks, taps, dk->typed_data(), [&](int64_t t, float* partial) {
    KernelGradChunk(g, xp, gp, partial, n * t / chunks, n * (t + 1) / chunks);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobisearchConvKernelGrad, ConvKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Attr<int32_t>("stride")
                                  .Attr<int32_t>("lo_h")
                                  .Attr<int32_t>("lo_w"));
