// Work splitting shared by the native kernels: ParallelFor runs chunks of a loop on the
// caller and XLA's intra-op thread pool (the FFI `ThreadPool` context).

#ifndef MOBISEARCH_PARALLEL_H_
#define MOBISEARCH_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace mobisearch {

namespace ffi = xla::ffi;

// Runs body(chunk) for chunk in [0, chunks) on the caller and the thread pool, and returns
// when all have finished. Tasks that start after every chunk was taken do nothing; the
// shared state outlives the call for them.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, Body body) {
  if (chunks <= 1) {
    if (chunks == 1) body(0);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  // `body` is only touched while a chunk is unfinished, and the caller waits for all.
  auto run = [state, chunks, body_ptr = &body]() {
    int64_t finished = 0;
    for (int64_t i; (i = state->next.fetch_add(1)) < chunks;) {
      (*body_ptr)(i);
      ++finished;
    }
    if (finished) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->done += finished;
      if (state->done == chunks) state->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(run)(run));
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == chunks; });
}

// out = the sum of `chunks` partial results of `size` floats each (chunk t at
// partial + t·size), added in chunk order: the result does not depend on which thread ran
// which chunk.
inline void SumChunks(const float* partial, int64_t chunks, int64_t size, float* out) {
  std::memcpy(out, partial, size * sizeof(float));
  for (int64_t t = 1; t < chunks; ++t) {
    const float* p = partial + t * size;
    for (int64_t i = 0; i < size; ++i) out[i] += p[i];
  }
}

// out ([size] floats) = the sum over chunks t of what body(t, partial) adds into its own
// zeroed partial result, chunks run by ParallelFor and added in chunk order (SumChunks). One
// chunk adds into out itself (zeroed first): the same numbers without the copy.
template <typename Body>
void ParallelSum(ffi::ThreadPool& pool, int64_t chunks, int64_t size, float* out, Body body) {
  if (chunks <= 1) {
    std::fill(out, out + size, 0.0f);
    body(0, out);
    return;
  }
  std::vector<float> partial(static_cast<size_t>(chunks * size), 0.0f);
  ParallelFor(pool, chunks, [&](int64_t t) { body(t, partial.data() + t * size); });
  SumChunks(partial.data(), chunks, size, out);
}

// Chunks for n units of work: four per pool thread (at most n). XLA runs independent
// thunks side by side on the same pool, so a thread can be busy elsewhere while a kernel's
// chunks wait; small chunks let the free thread take more of them (train steps 3-8%
// shorter than with one chunk per thread; docs/performance.md).
inline int64_t NumChunks(ffi::ThreadPool& pool, int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(n, 4 * pool.num_threads()));
}

}  // namespace mobisearch

#endif  // MOBISEARCH_PARALLEL_H_
