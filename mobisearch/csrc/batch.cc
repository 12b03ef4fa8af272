// A train step's minibatch, as one XLA FFI call for XLA:CPU: rows `idx` of the training
// images and their labels, which stay on the device for the whole run.
//
// `x_all[idx], y_all[idx]` in JAX left XLA two gather fusions (with their index clamps) to
// compile per candidate; this is a copy of whole rows. An index outside [0, N) fails the
// call, naming it (XLA's gather would have clamped it to a valid row).

#include <cstdint>
#include <cstring>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error TakeRows(ffi::AnyBuffer x, ffi::Buffer<ffi::S32> y, ffi::Buffer<ffi::S32> idx,
                    ffi::Result<ffi::AnyBuffer> x_out, ffi::ResultBuffer<ffi::S32> y_out) {
  const auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("the images need a leading row axis");
  const int64_t n = dims[0], b = static_cast<int64_t>(idx.element_count());
  if (static_cast<int64_t>(y.element_count()) != n)
    return ffi::Error::InvalidArgument("the labels must hold one entry per image");
  if (x_out->element_type() != x.element_type() ||
      static_cast<int64_t>(y_out->element_count()) != b ||
      (n > 0 && x_out->size_bytes() * n != x.size_bytes() * b))
    return ffi::Error::InvalidArgument("the results must hold one image and label per index");
  const size_t row = n > 0 ? x.size_bytes() / n : 0;
  const char* src = static_cast<const char*>(x.untyped_data());
  char* dst = static_cast<char*>(x_out->untyped_data());
  const int32_t* ix = idx.typed_data();
  for (int64_t k = 0; k < b; ++k) {
    const int64_t i = ix[k];
    if (i < 0 || i >= n)
      return ffi::Error::InvalidArgument("index " + std::to_string(i) + " at position " +
                                         std::to_string(k) + " is not in [0, " +
                                         std::to_string(n) + ")");
    std::memcpy(dst + k * row, src + i * row, row);
    y_out->typed_data()[k] = y.typed_data()[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobisearchTakeRows, TakeRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // images [N, ...]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // labels [N]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indices [B]
                                  .Ret<ffi::AnyBuffer>()         // images [B, ...]
                                  .Ret<ffi::Buffer<ffi::S32>>());  // labels [B]
