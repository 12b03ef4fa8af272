// The optimizer update of a whole train step (every parameter array) as one XLA FFI call,
// for XLA:CPU: AdamW, or SGD with Nesterov momentum after weight decay, as optax's `adamw`
// and `chain(add_decayed_weights, sgd(nesterov=True))` compute them (`mobisearch.optim`).
//
// Through optax, XLA compiles the update of each parameter array as its own fused loop:
// about 80 of the ~100 kernels of a MobileNet train step, two thirds of its compile time.
// Here it is one call. The step-dependent scalars (learning rate, Adam's bias corrections)
// come as a float32[steps, 3] table that JAX computed once per recipe with optax's schedule
// (so the schedule stays optax's), and the call reads row `count` and returns count + 1: the
// schedule's dozen scalar operations are not traced, lowered and compiled (two LLVM kernels)
// into every candidate's train step.
//
// Per element, in optax's order and float32 (c1 = 1 - b1, c2 = 1 - b2, rounded in Python):
//   AdamW: m' = c1·g + b1·m; v' = c2·g² + b2·v;
//          u = (m'/bc1) / (sqrt(v'/bc2) + eps) [+ wd·p]
//   SGD:   t = g [+ wd·p]; m' = t + b1·m; u = t + b1·m' (Nesterov)
// then the update (-lr)·u, or with `apply` the new parameter p + (-lr)·u (optax's
// `apply_updates` of it, fused). `[+ wd·p]` only for the arrays whose `decay` flag is set.
// Elementwise, so the result does not depend on how the work is split between threads.
//
// The moments are one flat buffer each (m, and v for AdamW), the arrays' moments one after
// the other in parameter order: a Fashion-MNIST candidate has 83 parameter arrays, and a
// moment array per parameter would give XLA's compile of the train step 166 more operands
// and results (and as many copies).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
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
  bool adam, apply;
  float b1, c1, b2, c2, eps, wd, neg_lr, bc1, bc2;
};

// One branch-free loop per (optimizer, decay) pair, so the compiler vectorises it
// (`-fno-math-errno` lets it use the vector square root).
template <bool kAdam, bool kDecay, bool kApply>
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
    p_out[i] = kApply ? p[i] + h.neg_lr * u : h.neg_lr * u;
  }
}

template <bool kApply>
void UpdateRangeAs(const Leaf& l, const Hyper& h, int64_t e0, int64_t e1) {
  if (h.adam) {
    l.decay ? UpdateLoop<true, true, kApply>(l, h, e0, e1)
            : UpdateLoop<true, false, kApply>(l, h, e0, e1);
  } else {
    l.decay ? UpdateLoop<false, true, kApply>(l, h, e0, e1)
            : UpdateLoop<false, false, kApply>(l, h, e0, e1);
  }
}

void UpdateRange(const Leaf& l, const Hyper& h, int64_t e0, int64_t e1) {
  h.apply ? UpdateRangeAs<true>(l, h, e0, e1) : UpdateRangeAs<false>(l, h, e0, e1);
}

ffi::Error Update(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::S32> count,
                  ffi::RemainingArgs args, ffi::ResultBuffer<ffi::S32> new_count,
                  ffi::RemainingRets rets, int32_t adam, int32_t apply, float b1, float c1,
                  float b2, float c2, float eps, float wd, ffi::Span<const int32_t> decay) {
  const int64_t n = static_cast<int64_t>(decay.size());
  const int64_t moments = adam ? 2 : 1;
  const auto td = table.dimensions();
  if (td.size() != 2 || td[1] != 3) return ffi::Error::InvalidArgument("table must be f32[steps, 3]");
  if (count.element_count() != 1) return ffi::Error::InvalidArgument("count must be one int32");
  const int64_t step = count.typed_data()[0];
  if (step < 0 || step >= td[0])
    return ffi::Error::InvalidArgument("optimizer step " + std::to_string(step) +
                                       " is past the recipe's " + std::to_string(td[0]) +
                                       " steps (its coefficient table)");
  if (static_cast<int64_t>(args.size()) != 2 * n + moments ||
      static_cast<int64_t>(rets.size()) != n + moments)
    return ffi::Error::InvalidArgument("need params and grads for every flag, and the moments");
  new_count->typed_data()[0] = static_cast<int32_t>(step + 1);
  const float* c = table.typed_data() + 3 * step;
  const Hyper h{adam != 0, apply != 0, b1, c1, b2, c2, eps, wd, -c[0], c[1], c[2]};
  std::vector<Leaf> leaves(static_cast<size_t>(n));
  std::vector<int64_t> starts(static_cast<size_t>(n + 1), 0);
  const float* flat_in[2] = {nullptr, nullptr};
  float* flat_out[2] = {nullptr, nullptr};
  int64_t flat_size[2] = {0, 0};
  for (int64_t k = 0; k < moments; ++k) {
    auto in = args.get<ffi::Buffer<ffi::F32>>(2 * n + k);
    auto out = rets.get<ffi::Buffer<ffi::F32>>(n + k);
    if (!in || !out) return ffi::Error::InvalidArgument("the moments must be float32 buffers");
    flat_in[k] = in->typed_data();
    flat_out[k] = (*out)->typed_data();
    flat_size[k] = static_cast<int64_t>(in->element_count());
    if (static_cast<int64_t>((*out)->element_count()) != flat_size[k])
      return ffi::Error::InvalidArgument("a moment result differs from its operand");
  }
  for (int64_t j = 0; j < n; ++j) {
    auto p = args.get<ffi::Buffer<ffi::F32>>(j);
    auto g = args.get<ffi::Buffer<ffi::F32>>(n + j);
    auto p_out = rets.get<ffi::Buffer<ffi::F32>>(j);
    if (!p || !g || !p_out) return ffi::Error::InvalidArgument("every operand must be float32");
    const int64_t size = static_cast<int64_t>(p->element_count());
    if (static_cast<int64_t>(g->element_count()) != size)
      return ffi::Error::InvalidArgument("a gradient differs from its parameter");
    const int64_t at = starts[static_cast<size_t>(j)];
    Leaf& l = leaves[static_cast<size_t>(j)];
    l = {p->typed_data(), g->typed_data(), flat_in[0] + at, adam ? flat_in[1] + at : nullptr,
         (*p_out)->typed_data(), flat_out[0] + at, adam ? flat_out[1] + at : nullptr,
         size, decay[static_cast<size_t>(j)] != 0};
    starts[static_cast<size_t>(j + 1)] = at + size;
  }
  for (int64_t k = 0; k < moments; ++k)
    if (flat_size[k] != starts.back())
      return ffi::Error::InvalidArgument("a moment buffer's size is not the parameters' total");
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
                                  .Arg<ffi::Buffer<ffi::F32>>()  // [steps, (lr, bc1, bc2)]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // count: this step's row
                                  .RemainingArgs()  // params, grads: n each; flat m[, v]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // count + 1
                                  .RemainingRets()  // updates or params: n; flat m[, v]
                                  .Attr<int32_t>("adam")
                                  .Attr<int32_t>("apply")
                                  .Attr<float>("b1")
                                  .Attr<float>("c1")
                                  .Attr<float>("b2")
                                  .Attr<float>("c2")
                                  .Attr<float>("eps")
                                  .Attr<float>("weight_decay")
                                  .Attr<ffi::Span<const int32_t>>("decay"));
