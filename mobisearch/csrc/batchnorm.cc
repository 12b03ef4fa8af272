// Training-mode BatchNorm over the channels of float32 NHWC input, with the ReLU that
// follows it fused in, for XLA:CPU, as two XLA FFI handlers (forward, backward); and the
// eval-mode BatchNorm (a per-channel affine, its ReLU and a residual add) as a third.
//
// Autodiff of a generic BatchNorm leaves XLA a dozen fusions per layer (reductions for the
// statistics, the normalisation, and their gradients), each compiled separately: about a
// third of a MobileNet's train-step compile. Here each direction is one call of two sweeps
// over the activations, with the channel loop innermost (contiguous in NHWC).
//
//   forward:  mean, var = E[x], E[x²] - E[x]² (clipped at 0, as flax's fast variance);
//             y = act(x·a + b) with a = scale/sqrt(var + eps), b = bias - mean·a; and the
//             running averages m·avg + (1 - m)·stat, which XLA otherwise compiles as two
//             more fusions per layer.
//   backward: g' = g·[y > 0] (ReLU) or g; dbias = Σg'; dscale = Σg'·x̂ with
//             x̂ = (x - mean)/sqrt(var + eps); dx = a·(g' - dbias/N - x̂·dscale/N).
//   eval:     y = act(x·a + b) [+ r] with a, b folded from the layer's state (fold.h);
//             XLA compiles this as fusions per layer, most of an eval-mode program's compile.
//
// Sums run in float over at most 64 strides, then in double, per chunk of rows, and the
// chunks are added in a fixed order, so the result does not depend on thread timing.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "fold.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mobisearch::FoldBatchNorm;
using mobisearch::Folded;
using mobisearch::NumChunks;
using mobisearch::ParallelFor;

// The loops run over the flattened [rows·C] array in strides of W = C·R floats (R whole
// rows), W >= 64 so that even a 16-channel layer fills several vector registers; per-channel
// values are tiled to length W.
int64_t Width(int64_t C) { return C * std::max<int64_t>(1, (64 + C - 1) / C); }

// Element range [e0, e1) of chunk t of `chunks`, in whole strides of W (the last chunk also
// takes the partial stride at the end).
std::pair<int64_t, int64_t> ChunkRange(int64_t total, int64_t W, int64_t t, int64_t chunks) {
  const int64_t strides = total / W;
  const int64_t e0 = strides * t / chunks * W;
  const int64_t e1 = t + 1 == chunks ? total : strides * (t + 1) / chunks * W;
  return {e0, e1};
}

// Sums of u and u·v (u² when v is null) over elements [e0, e1), per position in the stride,
// with u masked by m > 0 when m is not null. Float partial sums are flushed into the double
// ones every 64 strides.
void StrideSums(const float* __restrict u, const float* __restrict v,
                const float* __restrict m, int64_t W, int64_t e0, int64_t e1,
                double* __restrict s, double* __restrict q) {
  std::vector<float> fs(W, 0.0f), fq(W, 0.0f);
  float* __restrict ps = fs.data();
  float* __restrict pq = fq.data();
  for (int64_t j = 0; j < W; ++j) s[j] = q[j] = 0.0;
  int64_t pending = 0;
  for (int64_t i = e0; i < e1; i += W) {
    const int64_t len = std::min(W, e1 - i);
    const float* __restrict up = u + i;
    const float* __restrict vp = (v ? v : u) + i;
    if (m) {
      const float* __restrict mp = m + i;
      for (int64_t j = 0; j < len; ++j) {
        const float gu = mp[j] > 0.0f ? up[j] : 0.0f;
        ps[j] += gu;
        pq[j] += gu * vp[j];
      }
    } else {
      for (int64_t j = 0; j < len; ++j) {
        ps[j] += up[j];
        pq[j] += up[j] * vp[j];
      }
    }
    if (++pending == 64 || i + W >= e1) {
      for (int64_t j = 0; j < W; ++j) {
        s[j] += ps[j];
        q[j] += pq[j];
        ps[j] = pq[j] = 0.0f;
      }
      pending = 0;
    }
  }
}

// Per-channel sums of StrideSums over the whole array; chunk results added in a fixed order.
void ChannelSums(ffi::ThreadPool& pool, const float* u, const float* v, const float* m,
                 int64_t rows, int64_t C, std::vector<double>& s, std::vector<double>& q) {
  const int64_t W = Width(C), total = rows * C;
  const int64_t chunks = NumChunks(pool, std::max<int64_t>(1, total / W));
  std::vector<double> partial(static_cast<size_t>(chunks * 2 * W));
  ParallelFor(pool, chunks, [&](int64_t t) {
    auto [e0, e1] = ChunkRange(total, W, t, chunks);
    double* p = partial.data() + t * 2 * W;
    StrideSums(u, v, m, W, e0, e1, p, p + W);
  });
  s.assign(C, 0.0);
  q.assign(C, 0.0);
  for (int64_t t = 0; t < chunks; ++t) {
    const double* p = partial.data() + t * 2 * W;
    for (int64_t j = 0; j < W; ++j) {
      s[j % C] += p[j];
      q[j % C] += p[W + j];
    }
  }
}

std::vector<float> Tile(const std::vector<float>& per_channel, int64_t W) {
  std::vector<float> tiled(W);
  for (int64_t j = 0; j < W; ++j) tiled[j] = per_channel[j % per_channel.size()];
  return tiled;
}

// out = x·a + b per channel (then max(·, 0) if relu). With g: out = g'·a + x·p + b, where
// g' is g masked by y > 0 if relu (the backward's dx).
void Affine(ffi::ThreadPool& pool, const float* x, const float* g, const float* y,
            const std::vector<float>& a_c, const std::vector<float>& p_c,
            const std::vector<float>& b_c, bool relu, int64_t rows, int64_t C, float* out) {
  const int64_t W = Width(C), total = rows * C;
  const std::vector<float> a = Tile(a_c, W), b = Tile(b_c, W);
  const std::vector<float> p = g ? Tile(p_c, W) : std::vector<float>();
  const int64_t chunks = NumChunks(pool, std::max<int64_t>(1, total / W));
  ParallelFor(pool, chunks, [&](int64_t t) {
    auto [e0, e1] = ChunkRange(total, W, t, chunks);
    const float* __restrict pa = a.data();
    const float* __restrict pb = b.data();
    const float* __restrict pp = p.data();
    for (int64_t i = e0; i < e1; i += W) {
      const int64_t len = std::min(W, e1 - i);
      const float* __restrict xp = x + i;
      float* __restrict op = out + i;
      if (g == nullptr) {
        if (relu) {
          for (int64_t j = 0; j < len; ++j) op[j] = std::max(xp[j] * pa[j] + pb[j], 0.0f);
        } else {
          for (int64_t j = 0; j < len; ++j) op[j] = xp[j] * pa[j] + pb[j];
        }
      } else {
        const float* __restrict gp = g + i;
        const float* __restrict yp = y + i;
        if (relu) {
          for (int64_t j = 0; j < len; ++j) {
            const float gm = yp[j] > 0.0f ? gp[j] : 0.0f;
            op[j] = gm * pa[j] + xp[j] * pp[j] + pb[j];
          }
        } else {
          for (int64_t j = 0; j < len; ++j) op[j] = gp[j] * pa[j] + xp[j] * pp[j] + pb[j];
        }
      }
    }
  });
}

ffi::Error CheckShapes(ffi::Span<const int64_t> dims, int64_t C, const char* what) {
  if (dims.size() == 0 || dims[dims.size() - 1] != C)
    return ffi::Error::InvalidArgument(std::string(what) + ": channels must be last");
  return ffi::Error::Success();
}

int64_t Rows(ffi::Span<const int64_t> dims) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  return rows;
}

ffi::Error BatchNormForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                            ffi::Buffer<ffi::F32> running_mean,
                            ffi::Buffer<ffi::F32> running_var, ffi::ResultBuffer<ffi::F32> y,
                            ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var,
                            ffi::ResultBuffer<ffi::F32> new_mean,
                            ffi::ResultBuffer<ffi::F32> new_var, float epsilon, int32_t relu,
                            float momentum, float keep) {
  const int64_t C = scale.element_count();
  if (auto err = CheckShapes(x.dimensions(), C, "x"); !err.success()) return err;
  if (running_mean.element_count() != C || running_var.element_count() != C)
    return ffi::Error::InvalidArgument("running averages must have one value per channel");
  const int64_t rows = Rows(x.dimensions());
  if (rows == 0) return ffi::Error::InvalidArgument("x has no rows");
  std::vector<double> s, q;
  ChannelSums(pool, x.typed_data(), nullptr, nullptr, rows, C, s, q);
  std::vector<float> a(C), b(C);
  const float* sc = scale.typed_data();
  const float* bi = bias.typed_data();
  float* md = mean->typed_data();
  float* vd = var->typed_data();
  for (int64_t c = 0; c < C; ++c) {
    const double mu = s[c] / rows;
    const double v = std::max(q[c] / rows - mu * mu, 0.0);
    md[c] = static_cast<float>(mu);
    vd[c] = static_cast<float>(v);
    // The running averages as flax updates them, in float32: m·avg + (1 - m)·batch.
    new_mean->typed_data()[c] = momentum * running_mean.typed_data()[c] + keep * md[c];
    new_var->typed_data()[c] = momentum * running_var.typed_data()[c] + keep * vd[c];
    a[c] = static_cast<float>(sc[c] / std::sqrt(v + epsilon));
    b[c] = static_cast<float>(bi[c] - mu * a[c]);
  }
  Affine(pool, x.typed_data(), nullptr, nullptr, a, {}, b, relu != 0, rows, C, y->typed_data());
  return ffi::Error::Success();
}

ffi::Error BatchNormBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> scale,
                             ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                             ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dx,
                             ffi::ResultBuffer<ffi::F32> dscale,
                             ffi::ResultBuffer<ffi::F32> dbias, float epsilon, int32_t relu) {
  const int64_t C = scale.element_count();
  for (auto [dims, what] : {std::pair{x.dimensions(), "x"}, {y.dimensions(), "y"},
                            {g.dimensions(), "g"}})
    if (auto err = CheckShapes(dims, C, what); !err.success()) return err;
  const int64_t rows = Rows(x.dimensions());
  if (rows == 0) return ffi::Error::InvalidArgument("x has no rows");
  // s = Σg', q = Σg'·x; then Σg'·x̂ = rstd·(q - mean·s).
  std::vector<double> s, q;
  ChannelSums(pool, g.typed_data(), x.typed_data(), relu ? y.typed_data() : nullptr, rows, C,
              s, q);
  std::vector<float> a(C), p(C), b(C);
  const float* sc = scale.typed_data();
  const float* md = mean.typed_data();
  const float* vd = var.typed_data();
  float* dsd = dscale->typed_data();
  float* dbd = dbias->typed_data();
  for (int64_t c = 0; c < C; ++c) {
    const double rstd = 1.0 / std::sqrt(static_cast<double>(vd[c]) + epsilon);
    const double db = s[c];
    const double ds = rstd * (q[c] - md[c] * s[c]);
    const double ac = sc[c] * rstd;
    // dx = a·g' - a·db/N - a·rstd·ds/N·(x - mean) = a·g' + p·x + b.
    const double pc = -ac * rstd * ds / rows;
    dbd[c] = static_cast<float>(db);
    dsd[c] = static_cast<float>(ds);
    a[c] = static_cast<float>(ac);
    p[c] = static_cast<float>(pc);
    b[c] = static_cast<float>(-ac * db / rows - pc * md[c]);
  }
  Affine(pool, x.typed_data(), g.typed_data(), y.typed_data(), a, p, b, relu != 0, rows, C,
         dx->typed_data());
  return ffi::Error::Success();
}

// Rows [r0, r1) of y = act(x·a + b) [+ r], channels innermost (no tiling, no allocation:
// at batch 1 a layer is a few thousand floats, and XLA's fusion of it costs about as long).
void EvalAffineRows(const float* __restrict x, const float* __restrict a,
                    const float* __restrict b, const float* __restrict r, bool relu, int64_t C,
                    int64_t r0, int64_t r1, float* __restrict y) {
  for (int64_t i = r0 * C; i < r1 * C; i += C) {
    const float* __restrict xp = x + i;
    float* __restrict yp = y + i;
    if (relu) {
      for (int64_t c = 0; c < C; ++c) yp[c] = std::max(xp[c] * a[c] + b[c], 0.0f);
    } else {
      for (int64_t c = 0; c < C; ++c) yp[c] = xp[c] * a[c] + b[c];
    }
    if (r != nullptr) {
      const float* __restrict rp = r + i;
      for (int64_t c = 0; c < C; ++c) yp[c] += rp[c];
    }
  }
}

// Below this many elements (an eval-mode layer at batch 1) waking the thread pool costs
// more than the sweep, so the caller runs it alone.
constexpr int64_t kSerialBelow = 1 << 16;

ffi::Error EvalAffine(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x,
                      ffi::Buffer<ffi::F32>& scale, ffi::Buffer<ffi::F32>& bias,
                      ffi::Buffer<ffi::F32>& mean, ffi::Buffer<ffi::F32>& var,
                      const ffi::Buffer<ffi::F32>* residual, ffi::ResultBuffer<ffi::F32>& y,
                      float epsilon, int32_t relu) {
  const int64_t C = scale.element_count();
  if (auto err = CheckShapes(x.dimensions(), C, "x"); !err.success()) return err;
  Folded f;
  if (auto err = FoldBatchNorm(scale, bias, mean, var, epsilon, C, &f); !err.success())
    return err;
  if (residual != nullptr && residual->element_count() != x.element_count())
    return ffi::Error::InvalidArgument("the residual must be shaped like x");
  const int64_t rows = Rows(x.dimensions());
  const float* r = residual ? residual->typed_data() : nullptr;
  const int64_t chunks = rows * C < kSerialBelow ? 1 : NumChunks(pool, rows);
  ParallelFor(pool, chunks, [&](int64_t t) {
    EvalAffineRows(x.typed_data(), f.a.data(), f.b.data(), r, relu != 0, C, rows * t / chunks,
                   rows * (t + 1) / chunks, y->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error EvalBatchNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                         ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                         ffi::ResultBuffer<ffi::F32> y, float epsilon, int32_t relu) {
  return EvalAffine(pool, x, scale, bias, mean, var, nullptr, y, epsilon, relu);
}

ffi::Error EvalBatchNormAdd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                            ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                            ffi::Buffer<ffi::F32> residual, ffi::ResultBuffer<ffi::F32> y,
                            float epsilon, int32_t relu) {
  return EvalAffine(pool, x, scale, bias, mean, var, &residual, y, epsilon, relu);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobisearchBatchNormEval, EvalBatchNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // running mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // running var
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<float>("epsilon")
                                  .Attr<int32_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobisearchBatchNormEvalAdd, EvalBatchNormAdd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // running mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // running var
                                  .Arg<ffi::Buffer<ffi::F32>>()  // residual
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<float>("epsilon")
                                  .Attr<int32_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobisearchBatchNormForward, BatchNormForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // running_mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // running_var
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // var
                                  .Ret<ffi::Buffer<ffi::F32>>()  // new running mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // new running var
                                  .Attr<float>("epsilon")
                                  .Attr<int32_t>("relu")
                                  .Attr<float>("momentum")
                                  .Attr<float>("keep"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobisearchBatchNormBackward, BatchNormBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // y
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // var
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Attr<float>("epsilon")
                                  .Attr<int32_t>("relu"));
