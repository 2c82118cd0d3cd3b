// The two operators a compiled fp16 decoding step calls outside inductor's generated code, in
// C++ so that no call goes back into Python (docs/performance.md, "Native operators").
//
// linear_fp16: the product with fbgemm's packed fp16 weights, the very kernel
//   quantized::linear_dynamic_fp16 runs, so results are bit for bit the same. Calling that op from
//   Python costs ~13 us of argument conversion for its packed-weight object; here the object is
//   held once, in a table, and named by its slot.
// attend_cached: write a block's keys and values into fixed-capacity cache buffers (in place)
//   and attend over everything cached up to the block's last position.

#include <ATen/ATen.h>
#include <ATen/native/quantized/PackedParams.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

namespace {

std::vector<c10::intrusive_ptr<LinearPackedParamsBase>> held;
std::mutex held_lock;

// `packed` is the object quantized::linear_prepack_fp16 returns (a TorchScript custom class).
int64_t hold(const c10::IValue& packed) {
  TORCH_CHECK(packed.isObject(), "hold expects the result of quantized::linear_prepack_fp16");
  auto params = c10::static_intrusive_pointer_cast<LinearPackedParamsBase>(
      packed.toObject()->getSlot(0).toCapsule());
  std::lock_guard<std::mutex> guard(held_lock);
  held.push_back(std::move(params));
  return static_cast<int64_t>(held.size()) - 1;
}

void release(int64_t slot) {
  std::lock_guard<std::mutex> guard(held_lock);
  held.at(slot).reset();
}

at::Tensor linear_fp16(const at::Tensor& x, int64_t slot) {
  c10::intrusive_ptr<LinearPackedParamsBase> params;
  {  // (another thread may be packing a model: the table can grow meanwhile)
    std::lock_guard<std::mutex> guard(held_lock);
    params = held.at(slot);
  }
  TORCH_CHECK(params, "dflash_native::linear_fp16: slot ", slot, " was released");
  return params->apply_dynamic(x, /*reduce_range=*/false);
}

at::Tensor attend_cached(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& keys,
                         at::Tensor& values, const at::Tensor& positions, const std::optional<at::Tensor>& mask,
                         double scale) {
  const int64_t past = positions[0].item<int64_t>(), n = k.size(2), end = past + n;
  keys.slice(2, past, end).copy_(k);
  values.slice(2, past, end).copy_(v);
  std::optional<at::Tensor> visible;
  if (mask.has_value()) visible = mask->slice(1, 0, end);
  return at::scaled_dot_product_attention(q, keys.slice(2, 0, end), values.slice(2, 0, end), visible,
                                          /*dropout_p=*/0.0, /*is_causal=*/!mask.has_value() && n > 1, scale,
                                          /*enable_gqa=*/true);
}

}  // namespace

TORCH_LIBRARY(dflash_native, m) {
  m.def("hold(Any packed) -> int");
  m.def("release(int slot) -> ()");
  m.def("linear_fp16(Tensor x, int slot) -> Tensor");
  m.def("attend_cached(Tensor q, Tensor k, Tensor v, Tensor(a!) keys, Tensor(b!) values, Tensor positions, "
        "Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(dflash_native, CatchAll, m) {
  m.impl("hold", hold);
  m.impl("release", release);
}

TORCH_LIBRARY_IMPL(dflash_native, CPU, m) {
  m.impl("linear_fp16", linear_fp16);
  m.impl("attend_cached", attend_cached);
}
