// The kernel gradient of a 1×1 (pointwise) convolution, for XLA:CPU as an XLA FFI handler:
// dk[ci, co] = Σ_p y[p, ci] · dz[p, co] over the pixels p of the batch (y and dz NHWC, read
// as [pixels, channels] matrices; dk [1, 1, Ci, Co]).
//
// XLA:CPU gives this product, which contracts the long pixel axis of both operands, to
// Eigen rather than YNNPACK (whose fusions take dots that contract the left operand's last
// axis), well below the speed of the forward product. Here an MR×NR block of dk stays in
// registers while a pass of pixels streams through it: per pixel, NR/L vector loads of dz,
// MR broadcasts of y and MR·NR/L vector multiply-adds. Rows of y or dz of 256 floats or more
// are packed per pass into contiguous panels first: 4 KiB apart, they fall in the same L1
// sets. Figures in docs/performance.md.
//
// Work is split over dk's column (or row) blocks when there are few pixels and many blocks,
// otherwise over the pixels, a partial dk per chunk, added in chunk order at the end: the
// result does not depend on thread timing.

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mobisearch::NumChunks;
using mobisearch::ParallelFor;
using mobisearch::ParallelSum;

#if defined(__AVX512F__)
constexpr int kL = 16;  // floats per vector
constexpr int kMR = 6;  // dk rows per block
constexpr int kB = 4;   // vectors per block row: 6 × 4 accumulators of 32 registers
#else
constexpr int kL = 8;
constexpr int kMR = 4;
constexpr int kB = 3;  // 4 × 3 accumulators of 16 registers
#endif

// Unaligned, and allowed to alias the float arrays it is read from and written to.
typedef float V __attribute__((vector_size(4 * kL), aligned(4), may_alias));

struct Gemm {
  const float* y;   // [P, Ci]
  const float* dz;  // [P, Co]
  int64_t ci, co;
};

// dk[i0 + m, j0 + b·L + l] += Σ_{p < n} yp[p·ys + m] · dp[p·ds + b·L + l], for m < MR,
// b < B, l < L, from panels of y and dz (packed, or the arrays themselves with ys = Ci and
// ds = Co): the block's MR·B vectors stay in registers over the pixels.
template <int MR, int B>
void Block(const float* __restrict yp, int64_t ys, const float* __restrict dp, int64_t ds,
           int64_t n, float* __restrict dk, int64_t co, int64_t i0, int64_t j0) {
  V acc[MR][B];
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < B; ++b)
      acc[m][b] = *reinterpret_cast<const V*>(dk + (i0 + m) * co + j0 + b * kL);
  for (int64_t p = 0; p < n; ++p, yp += ys, dp += ds) {
    V d[B];
    for (int b = 0; b < B; ++b) d[b] = *reinterpret_cast<const V*>(dp + b * kL);
    for (int m = 0; m < MR; ++m) {
      const float s = yp[m];
      for (int b = 0; b < B; ++b) acc[m][b] += s * d[b];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < B; ++b)
      *reinterpret_cast<V*>(dk + (i0 + m) * co + j0 + b * kL) = acc[m][b];
}

// dk rows [i0, i1) × columns [j0, j1) (j1 - j0 < L) += the pixels [p0, p1)'s products.
void Tail(const Gemm& g, float* __restrict dk, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
          int64_t p0, int64_t p1) {
  for (int64_t i = i0; i < i1; ++i) {
    float acc[kL] = {};
    const int64_t n = j1 - j0;
    for (int64_t p = p0; p < p1; ++p) {
      const float s = g.y[p * g.ci + i];
      const float* dp = g.dz + p * g.co + j0;
      for (int64_t l = 0; l < n; ++l) acc[l] += s * dp[l];
    }
    for (int64_t l = 0; l < n; ++l) dk[i * g.co + j0 + l] += acc[l];
  }
}

using BlockFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*,
                         int64_t, int64_t, int64_t);

template <int MR, int... Bs>
constexpr std::array<BlockFn, sizeof...(Bs)> RowOf(std::integer_sequence<int, Bs...>) {
  return {&Block<MR, Bs + 1>...};
}

template <int... MRs>
constexpr std::array<std::array<BlockFn, kB>, sizeof...(MRs)> Table(
    std::integer_sequence<int, MRs...>) {
  return {RowOf<MRs + 1>(std::make_integer_sequence<int, kB>())...};
}

// kBlocks[MR - 1][B - 1] = Block<MR, B>.
constexpr auto kBlocks = Table(std::make_integer_sequence<int, kMR>());

// Pixels per pass: a pass's packed rows of y and dz, about kPassFloats floats, stay in L2
// while every block of dk that a chunk owns takes them.
constexpr int64_t kPassFloats = 256 * 1024;
// From this many pixels, chunks split the pixels (a partial dk each) rather than dk.
constexpr int64_t kSplitPixels = 8192;
// At most this many floats of partial results, beyond one per thread.
constexpr int64_t kPartialFloats = 1 << 20;
// Rows of y (dz) this long or longer are packed per pass.
constexpr int64_t kPackFrom = 256;

int64_t PassPixels(int64_t ci, int64_t co) {
  return std::clamp<int64_t>(kPassFloats / std::max<int64_t>(1, ci + co), 128, 1024);
}

// dk rows [i0, i1) × columns [j0, j1) += the pixels [p0, p1)'s products, in passes of
// PassPixels pixels. Rows of kPackFrom floats or more are packed per pass, y's into kMR
// floats per pixel and row block, dz's per column block into B·L floats per pixel, so the
// blocks read contiguous panels (rows 4 KiB apart fall in the same L1 sets).
void Accumulate(const Gemm& g, float* dk, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                int64_t p0, int64_t p1) {
  const int64_t pass = PassPixels(g.ci, g.co);
  const int64_t row_blocks = (i1 - i0 + kMR - 1) / kMR;
  const bool pack_y = g.ci >= kPackFrom, pack_dz = g.co >= kPackFrom;
  std::vector<float> ypack(pack_y ? static_cast<size_t>(row_blocks * pass * kMR) : 0);
  std::vector<float> dpack(pack_dz ? static_cast<size_t>(pass * kB * kL) : 0);
  for (int64_t q0 = p0; q0 < p1; q0 += pass) {
    const int64_t n = std::min(p1, q0 + pass) - q0;
    for (int64_t r = 0; r < row_blocks && pack_y; ++r) {
      const int64_t i = i0 + r * kMR, rows = std::min<int64_t>(kMR, i1 - i);
      float* dst = ypack.data() + r * pass * kMR;
      for (int64_t p = 0; p < n; ++p)
        for (int64_t m = 0; m < rows; ++m) dst[p * kMR + m] = g.y[(q0 + p) * g.ci + i + m];
    }
    for (int64_t j = j0; j < j1; j += kB * kL) {
      const int64_t jt = std::min(j1, j + kB * kL);
      const int64_t vectors = (jt - j) / kL, width = vectors * kL;
      const float* dp = g.dz + q0 * g.co + j;
      int64_t ds = g.co;
      if (pack_dz && vectors > 0) {
        for (int64_t p = 0; p < n; ++p)
          std::copy_n(g.dz + (q0 + p) * g.co + j, width, dpack.data() + p * width);
        dp = dpack.data(), ds = width;
      }
      for (int64_t r = 0; r < row_blocks; ++r) {
        const int64_t i = i0 + r * kMR, rows = std::min<int64_t>(kMR, i1 - i);
        const float* yp = pack_y ? ypack.data() + r * pass * kMR : g.y + q0 * g.ci + i;
        if (vectors > 0)
          kBlocks[rows - 1][vectors - 1](yp, pack_y ? kMR : g.ci, dp, ds, n, dk, g.co, i, j);
        if (width < jt - j) Tail(g, dk, i, i + rows, j + width, jt, q0, q0 + n);
      }
    }
  }
}

ffi::Error PointwiseKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y,
                               ffi::Buffer<ffi::F32> dz, ffi::ResultBuffer<ffi::F32> dk) {
  const auto yd = y.dimensions(), zd = dz.dimensions(), kd = dk->dimensions();
  if (yd.size() < 1 || zd.size() != yd.size() || kd.size() < 2)
    return ffi::Error::InvalidArgument("need y [..., Ci], dz [..., Co] and dk [..., Ci, Co]");
  int64_t pixels = 1;
  for (size_t a = 0; a + 1 < yd.size(); ++a) {
    if (yd[a] != zd[a]) return ffi::Error::InvalidArgument("y and dz differ in a pixel axis");
    pixels *= yd[a];
  }
  const int64_t ci = yd[yd.size() - 1], co = zd[zd.size() - 1];
  if (kd[kd.size() - 2] != ci || kd[kd.size() - 1] != co)
    return ffi::Error::InvalidArgument("dk must end in [Ci, Co]");
  const Gemm g{y.typed_data(), dz.typed_data(), ci, co};
  float* out = dk->typed_data();
  const int64_t pass = PassPixels(ci, co);
  const int64_t col_blocks = (co + kB * kL - 1) / (kB * kL);
  const int64_t row_blocks = (ci + kMR - 1) / kMR;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (pixels < kSplitPixels && col_blocks * row_blocks >= 4 * threads) {
    // Few pixels, many blocks: one chunk per thread owns whole column (or row) blocks of dk
    // over every pixel (each chunk packs the rows of y it reads itself, when they are long).
    const int64_t chunks = threads;
    std::fill(out, out + ci * co, 0.0f);
    ParallelFor(pool, chunks, [&](int64_t t) {
      if (col_blocks >= chunks) {
        const int64_t c0 = col_blocks * t / chunks, c1 = col_blocks * (t + 1) / chunks;
        Accumulate(g, out, 0, ci, c0 * kB * kL, std::min(co, c1 * kB * kL), 0, pixels);
      } else {
        const int64_t r0 = row_blocks * t / chunks, r1 = row_blocks * (t + 1) / chunks;
        Accumulate(g, out, r0 * kMR, std::min(ci, r1 * kMR), 0, co, 0, pixels);
      }
    });
    return ffi::Error::Success();
  }
  // Chunks of pixels, a partial dk each, added in chunk order: as many as NumChunks gives,
  // unless their partial results would pass kPartialFloats (one per thread then).
  const int64_t by_memory = std::max(threads, kPartialFloats / std::max<int64_t>(1, ci * co));
  const int64_t chunks = NumChunks(pool, std::min(pixels / pass, by_memory));
  ParallelSum(pool, chunks, ci * co, out, [&](int64_t t, float* partial) {
    Accumulate(g, partial, 0, ci, 0, co, pixels * t / chunks, pixels * (t + 1) / chunks);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobisearchPointwiseKernelGrad, PointwiseKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // y
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dz
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dk
