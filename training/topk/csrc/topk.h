// Declarations shared by the registration file and the kernels of the swarmgrad top-k extension.
// Kernels include only ATen headers (a cold build then takes ~16 s instead of ~105 s with torch/extension.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace swarmgrad_topk {

// Indices (int64, ascending) and signed values of the k largest |x| of x flattened; NaN ranks above +Inf.
std::tuple<at::Tensor, at::Tensor> topk_abs_cpu(const at::Tensor& x, int64_t k);

}  // namespace swarmgrad_topk
