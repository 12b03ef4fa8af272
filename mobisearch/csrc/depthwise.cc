// Depthwise k×k convolution (NHWC, float32, TF/Keras SAME padding) for XLA:CPU, as two
// XLA FFI handlers: the forward pass and the backward pass (input and kernel gradients in
// one sweep over the output gradient).
//
// XLA:CPU has no fast depthwise convolution: its grouped convolution lowers the weight
// gradient to a dense C×C convolution, and the shift-and-add formulation (k² shifted
// slices) materialises every tap. Here each output pixel reads its k×k window once, with
// the channel loop innermost (contiguous in NHWC), which the compiler vectorises.
//
// Work is split over the batch between the caller and XLA's intra-op thread pool. The
// kernel gradient is accumulated per chunk and summed at the end in chunk order, so the
// result does not depend on thread timing.
//
// Built on first use by mobisearch/kernels.py (g++ -O3 -march=native) against the FFI
// headers shipped with jaxlib (`jax.ffi.include_dir()`).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mobisearch::NumChunks;
using mobisearch::ParallelFor;

struct Geometry {
  int64_t n, h, w, c, k, oh, ow, stride, lo_h, lo_w;
};

// Checks the shapes, then reads the geometry into *g (out_dims: y's, or dy's in the
// backward pass).
ffi::Error ReadGeometry(ffi::Span<const int64_t> x_dims, ffi::Span<const int64_t> w_dims,
                        ffi::Span<const int64_t> out_dims, int32_t stride, int32_t lo_h,
                        int32_t lo_w, Geometry* g) {
  if (x_dims.size() != 4) return ffi::Error::InvalidArgument("x must be NHWC (rank 4)");
  if (w_dims.size() != 3 || w_dims[0] != w_dims[1] || w_dims[2] != x_dims[3])
    return ffi::Error::InvalidArgument("kernel must be [k, k, C] with x's C");
  if (out_dims.size() != 4) return ffi::Error::InvalidArgument("output must be rank 4");
  if (stride < 1) return ffi::Error::InvalidArgument("stride must be >= 1");
  *g = Geometry{x_dims[0],   x_dims[1], x_dims[2], x_dims[3], w_dims[0],
                out_dims[1], out_dims[2], stride,  lo_h,      lo_w};
  return ffi::Error::Success();
}

void ForwardChunk(const Geometry& g, const float* __restrict x, const float* __restrict w,
                  float* __restrict y, int64_t n0, int64_t n1) {
  const int64_t C = g.c;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t oh = 0; oh < g.oh; ++oh) {
      for (int64_t ow = 0; ow < g.ow; ++ow) {
        float* __restrict yp = y + ((n * g.oh + oh) * g.ow + ow) * C;
        std::fill(yp, yp + C, 0.0f);
        for (int64_t i = 0; i < g.k; ++i) {
          const int64_t ih = oh * g.stride + i - g.lo_h;
          if (ih < 0 || ih >= g.h) continue;
          for (int64_t j = 0; j < g.k; ++j) {
            const int64_t iw = ow * g.stride + j - g.lo_w;
            if (iw < 0 || iw >= g.w) continue;
            const float* __restrict xp = x + ((n * g.h + ih) * g.w + iw) * C;
            const float* __restrict wp = w + (i * g.k + j) * C;
            for (int64_t c = 0; c < C; ++c) yp[c] += xp[c] * wp[c];
          }
        }
      }
    }
  }
}

void BackwardChunk(const Geometry& g, const float* __restrict x, const float* __restrict w,
                   const float* __restrict dy, float* __restrict dx, float* __restrict dw,
                   int64_t n0, int64_t n1) {
  const int64_t C = g.c;
  std::fill(dx + n0 * g.h * g.w * C, dx + n1 * g.h * g.w * C, 0.0f);
  std::fill(dw, dw + g.k * g.k * C, 0.0f);
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

ffi::Error DepthwiseForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                            int32_t stride, int32_t lo_h, int32_t lo_w) {
  Geometry g;
  if (auto err = ReadGeometry(x.dimensions(), w.dimensions(), y->dimensions(), stride, lo_h,
                              lo_w, &g);
      !err.success())
    return err;
  const float* xd = x.typed_data();
  const float* wd = w.typed_data();
  float* yd = y->typed_data();
  const int64_t chunks = NumChunks(pool, g.n);
  ParallelFor(pool, chunks, [&](int64_t t) {
    ForwardChunk(g, xd, wd, yd, g.n * t / chunks, g.n * (t + 1) / chunks);
  });
  return ffi::Error::Success();
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
  std::vector<float> partial(static_cast<size_t>(chunks * taps));
  const float* xd = x.typed_data();
  const float* wd = w.typed_data();
  const float* dyd = dy.typed_data();
  float* dxd = dx->typed_data();
  ParallelFor(pool, chunks, [&](int64_t t) {
    BackwardChunk(g, xd, wd, dyd, dxd, partial.data() + t * taps, g.n * t / chunks,
                  g.n * (t + 1) / chunks);
  });
  float* dwd = dw->typed_data();
  std::memcpy(dwd, partial.data(), taps * sizeof(float));
  for (int64_t t = 1; t < chunks; ++t) {
    const float* p = partial.data() + t * taps;
    for (int64_t i = 0; i < taps; ++i) dwd[i] += p[i];
  }
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
