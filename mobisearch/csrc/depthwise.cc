// Depthwise k×k convolution (NHWC, float32, TF/Keras SAME padding) for XLA:CPU, as XLA FFI
// handlers: the forward pass, the forward pass with an inference-mode BatchNorm and ReLU
// fused in, and the backward pass (input and kernel gradients in one sweep over the output
// gradient).
//
// XLA:CPU has no fast depthwise convolution: its grouped convolution lowers the weight
// gradient to a dense C×C convolution, and the shift-and-add formulation (k² shifted
// slices) materialises every tap. Here each output pixel reads its k×k window once, with
// the channels innermost (contiguous in NHWC): as explicit vectors with sums kept in
// registers in the forward, a loop the compiler vectorises in the backward.
//
// Work is split between the caller and XLA's intra-op thread pool: over output rows in the
// forward, over the batch in the backward. The kernel gradient is accumulated per chunk and
// summed at the end in chunk order, so the result does not depend on thread timing.
//
// Built on first use by mobisearch/kernel_build.py (c++ -O3 -march=native) against the FFI
// headers shipped with jaxlib (`jax.ffi.include_dir()`).

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "fold.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mobisearch::NumChunks;
using mobisearch::ParallelFor;
using mobisearch::ParallelSum;
using mobisearch::FoldBatchNorm;
using mobisearch::Folded;

struct Geometry {
  int64_t n, h, w, c, k, oh, ow, stride, lo_h, lo_w;
};

// Checks the shapes, then reads the geometry into *g (out_dims: y's, or dy's in the
// backward pass).
ffi::Error ReadGeometry(ffi::Span<const int64_t> x_dims, ffi::Span<const int64_t> w_dims,
                        ffi::Span<const int64_t> out_dims, int32_t stride, int32_t lo_h,
                        int32_t lo_w, Geometry* g) {
  if (x_dims.size() != 4) return ffi::Error::InvalidArgument("x must be NHWC (rank 4)");
  // [k, k, C], or flax's [k, k, 1, C] (the same bytes: no reshape in the program).
  const bool hwio = w_dims.size() == 4 && w_dims[2] == 1;
  if (!(w_dims.size() == 3 || hwio) || w_dims[0] != w_dims[1] ||
      w_dims[w_dims.size() - 1] != x_dims[3])
    return ffi::Error::InvalidArgument("kernel must be [k, k, C] or [k, k, 1, C] with x's C");
  if (out_dims.size() != 4) return ffi::Error::InvalidArgument("output must be rank 4");
  if (stride < 1) return ffi::Error::InvalidArgument("stride must be >= 1");
  *g = Geometry{x_dims[0],   x_dims[1], x_dims[2], x_dims[3], w_dims[0],
                out_dims[1], out_dims[2], stride,  lo_h,      lo_w};
  return ffi::Error::Success();
}

// Forward of one output pixel's channels [c0, C), L floats at a time as a GCC vector (the
// rest, fewer than L, are left to the caller; the return value is where they start). Each
// sum stays in a register over the k×k window and is stored once: rows [i0, i1) and
// columns [j0, j1) of the window lie inside x, and offset xo is its top-left tap, which
// may lie outside x. With scale (and shift), each output is then y·scale + shift per
// channel, and max(·, 0) if relu: an inference-mode BatchNorm and its ReLU, applied
// before the store.
template <int L, int B = 1>
int64_t ForwardPixel(const Geometry& g, const float* __restrict x, int64_t xo,
                     const float* __restrict w, const float* __restrict scale,
                     const float* __restrict shift, bool relu,
                     float* __restrict yp, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                     int64_t c0) {
  // Unaligned, and allowed to alias the float arrays it is read from and written to.
  typedef float V __attribute__((vector_size(4 * L), aligned(4), may_alias));
  const int64_t C = g.c, k = g.k, row = g.w * C;
  // B blocks of L channels at once: B independent sums hide the latency of the FMAs.
  for (; c0 + B * L <= C; c0 += B * L) {
    V acc[B] = {};
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = j0; j < j1; ++j) {
        const float* xp = x + (xo + i * row + j * C + c0);
        const float* wp = w + ((i * k + j) * C + c0);
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b)
          acc[b] += *reinterpret_cast<const V*>(xp + b * L) *
                    *reinterpret_cast<const V*>(wp + b * L);
      }
    }
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b) {
      V a = acc[b];
      if (scale != nullptr) {
        a = a * *reinterpret_cast<const V*>(scale + c0 + b * L) +
            *reinterpret_cast<const V*>(shift + c0 + b * L);
        if (relu) a = a > 0 ? a : 0;
      }
      *reinterpret_cast<V*>(yp + c0 + b * L) = a;
    }
  }
  return c0;
}

// Output rows [r0, r1) of the flattened (n, oh) axis.
void ForwardRows(const Geometry& g, const float* __restrict x, const float* __restrict w,
                 const float* __restrict scale, const float* __restrict shift, bool relu,
                 float* __restrict y, int64_t r0, int64_t r1) {
  const int64_t C = g.c, k = g.k;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / g.oh, top = r % g.oh * g.stride - g.lo_h;
    const int64_t i0 = std::max<int64_t>(0, -top), i1 = std::min<int64_t>(k, g.h - top);
    for (int64_t ow = 0; ow < g.ow; ++ow) {
      const int64_t left = ow * g.stride - g.lo_w;
      const int64_t j0 = std::max<int64_t>(0, -left), j1 = std::min<int64_t>(k, g.w - left);
      const int64_t xo = ((n * g.h + top) * g.w + left) * C;
      float* yp = y + (r * g.ow + ow) * C;
      int64_t c = ForwardPixel<16, 4>(g, x, xo, w, scale, shift, relu, yp, i0, i1, j0, j1, 0);
      c = ForwardPixel<16, 2>(g, x, xo, w, scale, shift, relu, yp, i0, i1, j0, j1, c);
      c = ForwardPixel<16>(g, x, xo, w, scale, shift, relu, yp, i0, i1, j0, j1, c);
      c = ForwardPixel<8>(g, x, xo, w, scale, shift, relu, yp, i0, i1, j0, j1, c);
      ForwardPixel<1>(g, x, xo, w, scale, shift, relu, yp, i0, i1, j0, j1, c);
    }
  }
}

// Images [n0, n1): their dx, and their kernel gradient added into dw.
void BackwardChunk(const Geometry& g, const float* __restrict x, const float* __restrict w,
                   const float* __restrict dy, float* __restrict dx, float* __restrict dw,
                   int64_t n0, int64_t n1) {
  const int64_t C = g.c;
  std::fill(dx + n0 * g.h * g.w * C, dx + n1 * g.h * g.w * C, 0.0f);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t oh = 0; oh < g.oh; ++oh) {
      for (int64_t ow = 0; ow < g.ow; ++ow) {
        const float* __restrict gp = dy + ((n * g.oh + oh) * g.ow + ow) * C;
        for (int64_t i = 0; i < g.k; ++i) {
          const int64_t ih = oh * g.stride + i - g.lo_h;
          if (ih < 0 || ih >= g.h) continue;
          for (int64_t j = 0; j < g.k; ++j) {
            const int64_t iw = ow * g.stride + j - g.lo_w;
            if (iw < 0 || iw >= g.w) continue;
            const int64_t off = ((n * g.h + ih) * g.w + iw) * C;
            const float* __restrict xp = x + off;
            float* __restrict dxp = dx + off;
            const float* __restrict wp = w + (i * g.k + j) * C;
            float* __restrict dwp = dw + (i * g.k + j) * C;
            for (int64_t c = 0; c < C; ++c) {
              dxp[c] += gp[c] * wp[c];
              dwp[c] += gp[c] * xp[c];
            }
          }
        }
      }
    }
  }
}

// Forward over output rows, not images, so a batch of one still uses every thread.
ffi::Error Forward(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w,
                   const float* scale, const float* shift, bool relu,
                   ffi::ResultBuffer<ffi::F32>& y, int32_t stride, int32_t lo_h, int32_t lo_w) {
  Geometry g;
  if (auto err = ReadGeometry(x.dimensions(), w.dimensions(), y->dimensions(), stride, lo_h,
                              lo_w, &g);
      !err.success())
    return err;
  const float* xd = x.typed_data();
  const float* wd = w.typed_data();
  float* yd = y->typed_data();
  const int64_t rows = g.n * g.oh;
  const int64_t chunks = NumChunks(pool, rows);
  ParallelFor(pool, chunks, [&](int64_t t) {
    ForwardRows(g, xd, wd, scale, shift, relu, yd, rows * t / chunks, rows * (t + 1) / chunks);
  });
  return ffi::Error::Success();
}

ffi::Error DepthwiseForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                            int32_t stride, int32_t lo_h, int32_t lo_w) {
  return Forward(pool, x, w, nullptr, nullptr, false, y, stride, lo_h, lo_w);
}

// The forward followed by the eval-mode BatchNorm of (scale, bias, mean, var), folded to
// y·a + b per channel (fold.h), and, if relu, max(·, 0).
ffi::Error DepthwiseForwardBatchNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                     ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> scale,
                                     ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> mean,
                                     ffi::Buffer<ffi::F32> var, ffi::ResultBuffer<ffi::F32> y,
                                     int32_t stride, int32_t lo_h, int32_t lo_w, float epsilon,
                                     int32_t relu) {
  const auto c = x.dimensions().size() == 4 ? x.dimensions()[3] : -1;
  Folded f;
  if (auto err = FoldBatchNorm(scale, bias, mean, var, epsilon, c, &f); !err.success())
    return err;
  return Forward(pool, x, w, f.a.data(), f.b.data(), relu != 0, y, stride, lo_h, lo_w);
}

ffi::Error DepthwiseBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> dy,
                             ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw,
                             int32_t stride, int32_t lo_h, int32_t lo_w) {
  Geometry g;
  if (auto err = ReadGeometry(x.dimensions(), w.dimensions(), dy.dimensions(), stride, lo_h,
                              lo_w, &g);
      !err.success())
    return err;
  const int64_t chunks = NumChunks(pool, g.n);
  const int64_t taps = g.k * g.k * g.c;
  const float* xd = x.typed_data();
  const float* wd = w.typed_data();
  const float* dyd = dy.typed_data();
  float* dxd = dx->typed_data();
  ParallelSum(pool, chunks, taps, dw->typed_data(), [&](int64_t t, float* partial) {
    BackwardChunk(g, xd, wd, dyd, dxd, partial, g.n * t / chunks, g.n * (t + 1) / chunks);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobisearchDepthwiseForward, DepthwiseForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("stride")
                                  .Attr<int32_t>("lo_h")
                                  .Attr<int32_t>("lo_w"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobisearchDepthwiseForwardBatchNorm, DepthwiseForwardBatchNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // running mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // running var
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("stride")
                                  .Attr<int32_t>("lo_h")
                                  .Attr<int32_t>("lo_w")
                                  .Attr<float>("epsilon")
                                  .Attr<int32_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobisearchDepthwiseBackward, DepthwiseBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("stride")
                                  .Attr<int32_t>("lo_h")
                                  .Attr<int32_t>("lo_w"));
