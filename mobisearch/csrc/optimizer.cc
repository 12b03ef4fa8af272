// The optimizer update of a whole train step (every parameter array) as one XLA FFI call,
// for XLA:CPU: AdamW, or SGD with Nesterov momentum after weight decay, as
// `mobisearch.train.make_optimizer` builds them with optax.
//
// Through optax, XLA compiles the update of each parameter array as its own fused loop:
// about 80 of the ~100 kernels of a MobileNet train step, two thirds of its compile time.
// Here it is one call. The step-dependent scalars (learning rate, Adam's bias corrections)
// come from JAX as a float32[3] buffer, so the schedule stays optax's.
//
// Per element, in optax's order and float32 (c1 = 1 - b1, c2 = 1 - b2, rounded in Python):
//   AdamW: m' = c1·g + b1·m; v' = c2·g² + b2·v;
//          u = (m'/bc1) / (sqrt(v'/bc2) + eps) [+ wd·p]; p' = p + (-lr)·u
//   SGD:   t = g [+ wd·p]; m' = t + b1·m; u = t + b1·m' (Nesterov); p' = p + (-lr)·u
// `[+ wd·p]` only for the arrays whose `decay` flag is set. Elementwise, so the result does
// not depend on how the work is split between threads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mobisearch::NumChunks;
using mobisearch::ParallelFor;

struct Leaf {
  const float *p, *g, *m, *v;
  float *p_out, *m_out, *v_out;
  int64_t size;
  bool decay;
};

struct Hyper {
  bool adam;
  float b1, c1, b2, c2, eps, wd, neg_lr, bc1, bc2;
};

// One branch-free loop per (optimizer, decay) pair, so the compiler vectorises it
// (`-fno-math-errno` lets it use the vector square root).
template <bool kAdam, bool kDecay>
void UpdateLoop(const Leaf& l, const Hyper& h, int64_t e0, int64_t e1) {
  const float* __restrict p = l.p;
  const float* __restrict g = l.g;
  const float* __restrict m = l.m;
  const float* __restrict v = l.v;
  float* __restrict p_out = l.p_out;
  float* __restrict m_out = l.m_out;
  float* __restrict v_out = l.v_out;
  for (int64_t i = e0; i < e1; ++i) {
    float u;
    if constexpr (kAdam) {
      const float mi = h.c1 * g[i] + h.b1 * m[i];
      const float vi = h.c2 * (g[i] * g[i]) + h.b2 * v[i];
      m_out[i] = mi;
      v_out[i] = vi;
      u = (mi / h.bc1) / (std::sqrt(vi / h.bc2) + h.eps);
      if constexpr (kDecay) u = u + h.wd * p[i];
    } else {
      float t = g[i];
      if constexpr (kDecay) t = t + h.wd * p[i];
      const float mi = t + h.b1 * m[i];
      m_out[i] = mi;
      u = t + h.b1 * mi;
    }
    p_out[i] = p[i] + h.neg_lr * u;
  }
}

void UpdateRange(const Leaf& l, const Hyper& h, int64_t e0, int64_t e1) {
  if (h.adam) {
    l.decay ? UpdateLoop<true, true>(l, h, e0, e1) : UpdateLoop<true, false>(l, h, e0, e1);
  } else {
    l.decay ? UpdateLoop<false, true>(l, h, e0, e1) : UpdateLoop<false, false>(l, h, e0, e1);
  }
}

ffi::Error Update(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> coeffs, ffi::RemainingArgs args,
                  ffi::RemainingRets rets, int32_t adam, float b1, float c1, float b2, float c2,
                  float eps, float wd, ffi::Span<const int32_t> decay) {
  const int64_t n = static_cast<int64_t>(decay.size());
  const int64_t moments = adam ? 2 : 1;
  if (coeffs.element_count() != 3) return ffi::Error::InvalidArgument("coeffs must be f32[3]");
  if (static_cast<int64_t>(args.size()) != (2 + moments) * n ||
      static_cast<int64_t>(rets.size()) != (1 + moments) * n)
    return ffi::Error::InvalidArgument("need params, grads and moments for every flag");
  const float* c = coeffs.typed_data();
  const Hyper h{adam != 0, b1, c1, b2, c2, eps, wd, -c[0], c[1], c[2]};
  std::vector<Leaf> leaves(static_cast<size_t>(n));
  std::vector<int64_t> starts(static_cast<size_t>(n + 1), 0);
  for (int64_t j = 0; j < n; ++j) {
    auto in = [&](int64_t k) { return args.get<ffi::Buffer<ffi::F32>>(k * n + j); };
    auto out = [&](int64_t k) { return rets.get<ffi::Buffer<ffi::F32>>(k * n + j); };
    auto p = in(0), g = in(1), m = in(2);
    auto p_out = out(0), m_out = out(1);
    if (!p || !g || !m || !p_out || !m_out)
      return ffi::Error::InvalidArgument("every operand must be a float32 buffer");
    Leaf& l = leaves[static_cast<size_t>(j)];
    l = {p->typed_data(), g->typed_data(), m->typed_data(), nullptr,
         (*p_out)->typed_data(), (*m_out)->typed_data(), nullptr,
         static_cast<int64_t>(p->element_count()), decay[static_cast<size_t>(j)] != 0};
    if (static_cast<int64_t>(g->element_count()) != l.size ||
        static_cast<int64_t>(m->element_count()) != l.size)
      return ffi::Error::InvalidArgument("a gradient or moment differs from its parameter");
    if (adam) {
      auto v = in(3);
      auto v_out = out(2);
      if (!v || !v_out) return ffi::Error::InvalidArgument("second moments must be float32");
      if (static_cast<int64_t>(v->element_count()) != l.size)
        return ffi::Error::InvalidArgument("a second moment differs from its parameter");
      l.v = v->typed_data();
      l.v_out = (*v_out)->typed_data();
    }
    starts[static_cast<size_t>(j + 1)] = starts[static_cast<size_t>(j)] + l.size;
  }
  const int64_t total = starts.back();
  const int64_t chunks = NumChunks(pool, total / 4096 + 1);
  ParallelFor(pool, chunks, [&](int64_t t) {
    const int64_t e0 = total * t / chunks, e1 = total * (t + 1) / chunks;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t s = starts[static_cast<size_t>(j)], e = starts[static_cast<size_t>(j + 1)];
      if (e <= e0 || s >= e1) continue;
      UpdateRange(leaves[static_cast<size_t>(j)], h, std::max(e0, s) - s, std::min(e1, e) - s);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobisearchOptimizerUpdate, Update,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // [lr, bc1, bc2]
                                  .RemainingArgs()  // params, grads, m[, v]: n each
                                  .RemainingRets()  // params, m[, v]: n each
                                  .Attr<int32_t>("adam")
                                  .Attr<float>("b1")
                                  .Attr<float>("c1")
                                  .Attr<float>("b2")
                                  .Attr<float>("c2")
                                  .Attr<float>("eps")
                                  .Attr<float>("weight_decay")
                                  .Attr<ffi::Span<const int32_t>>("decay"));
