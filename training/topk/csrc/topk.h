// Declarations shared by the registration file and the kernels of the swarmgrad top-k extension.
// Kernels include only ATen headers (a cold build then takes ~16 s instead of ~105 s with torch/extension.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace swarmgrad_topk {

// Indices (int64, ascending) and signed values of the k largest |x| of x flattened; NaN ranks above +Inf.
std::tuple<at::Tensor, at::Tensor> topk_abs_cpu(const at::Tensor& x, int64_t k);

// residual += grad; select the top-k of residual; return them and zero them in residual.
std::tuple<at::Tensor, at::Tensor> ef_step_cpu(at::Tensor& residual, const at::Tensor& grad, int64_t k);

// velocity = momentum * velocity + grad; residual += velocity; select the top-k of residual; return them and zero
// them in both residual and velocity (Deep Gradient Compression's momentum correction and factor masking).
std::tuple<at::Tensor, at::Tensor> ef_step_momentum_cpu(
    at::Tensor& residual, at::Tensor& velocity, const at::Tensor& grad, double momentum, int64_t k);

}  // namespace swarmgrad_topk
