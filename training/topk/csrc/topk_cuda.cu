// CUDA kernels of the swarmgrad top-k operators, compiled and registered only where torch has CUDA (see build.py).
//
// Exact radix select on the same 31-bit keys as the CPU kernels (float bits with the sign cleared; 15 bits for
// float16/bfloat16; NaN ranks above +Inf). Digits of up to 11 bits from the top: one histogram pass over the
// data finds the top digit of the k-th key, one split pass writes the elements above it to the output and those
// on it to a candidate buffer; later digits repeat histogram + split on the (much smaller) candidate buffer. The
// last candidates all equal the k-th key and the first ones needed are taken (any choice among ties is valid).
// Appends use warp-aggregated atomics, so the output is sorted by index at the end. The small histograms go to
// the host to pick each digit (one sync per digit).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace swarmgrad_topk {
namespace {

constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
constexpr int kThreads = 256;  // a multiple of the warp size: every warp runs the appends together
constexpr unsigned kFullWarp = 0xffffffffu;

template <typename Bits>
struct KeyTraits;
template <>
struct KeyTraits<uint32_t> {
  static constexpr int kKeyBits = 31;
  static constexpr uint32_t kMask = 0x7fffffffu;
};
template <>
struct KeyTraits<uint16_t> {
  static constexpr int kKeyBits = 15;
  static constexpr uint32_t kMask = 0x7fffu;
};

// Reserves one slot per lane whose `pred` holds with a single atomic per warp; returns this lane's slot.
__device__ __forceinline__ unsigned long long warp_append(bool pred, unsigned long long* counter) {
  const unsigned ballot = __ballot_sync(kFullWarp, pred);
  const int lane = threadIdx.x & 31;
  unsigned long long base = 0;
  if (lane == 0 && ballot != 0) base = atomicAdd(counter, static_cast<unsigned long long>(__popc(ballot)));
  base = __shfl_sync(kFullWarp, base, 0);
  return base + static_cast<unsigned long long>(__popc(ballot & ((1u << lane) - 1u)));
}

// Histogram of the digit (key >> shift) & digit_mask. Keys come from the data (`x`, n elements) when `keys` is
// null, else from a candidate buffer.
template <typename Bits>
__global__ void digit_histogram(const Bits* x, const uint32_t* keys, int64_t n, int shift, uint32_t digit_mask,
                                unsigned long long* hist) {
  __shared__ unsigned int local[kBins];
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint32_t key = keys ? keys[i] : (static_cast<uint32_t>(x[i]) & KeyTraits<Bits>::kMask);
    atomicAdd(&local[(key >> shift) & digit_mask], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) {
    if (local[b] != 0) atomicAdd(&hist[b], static_cast<unsigned long long>(local[b]));
  }
}

// Elements whose digit is above `digit` go to `out`; those on it to the next candidate buffer. The source is
// the data (positions are indices) when `keys` is null, else a candidate buffer (`idx`, `keys`).
template <typename Bits>
__global__ void digit_split(const Bits* x, const int64_t* idx, const uint32_t* keys, int64_t n, int shift,
                            uint32_t digit_mask, uint32_t digit, int64_t* out, unsigned long long* out_count,
                            int64_t* next_idx, uint32_t* next_keys, unsigned long long* next_count) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // The whole warp iterates together (same base), so the ballots in warp_append see every lane.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < n; base += stride) {
    const int64_t i = base + threadIdx.x;
    const bool valid = i < n;
    uint32_t key = 0;
    int64_t position = 0;
    if (valid) {
      key = keys ? keys[i] : (static_cast<uint32_t>(x[i]) & KeyTraits<Bits>::kMask);
      position = idx ? idx[i] : i;
    }
    const uint32_t d = (key >> shift) & digit_mask;
    const bool above = valid && d > digit;
    const bool on = valid && d == digit;
    const unsigned long long slot = warp_append(above, out_count);
    if (above) out[slot] = position;
    const unsigned long long cand = warp_append(on, next_count);
    if (on) {
      next_idx[cand] = position;
      next_keys[cand] = key;
    }
  }
}

template <typename Bits>
__global__ void gather_values(const Bits* x, const int64_t* idx, int64_t k, Bits* values) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < k; j += stride) {
    values[j] = x[idx[j]];
  }
}

int grid_for(int64_t n) {
  int device = 0;
  int sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, sms * int64_t{8})));
}

unsigned long long read_counter(const at::Tensor& counter, cudaStream_t stream) {
  unsigned long long value = 0;
  C10_CUDA_CHECK(cudaMemcpyAsync(&value, counter.data_ptr(), sizeof value, cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  return value;
}

// Ascending indices and values (x's bits) of the k largest keys of x (contiguous, 1 <= k <= n).
template <typename Bits>
void select_topk_cuda(const at::Tensor& x, int64_t k, at::Tensor& indices, at::Tensor& values) {
  const int64_t n = x.numel();
  const Bits* data = static_cast<const Bits*>(x.data_ptr());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto long_options = x.options().dtype(at::kLong);
  at::Tensor out = at::empty({k}, long_options);
  at::Tensor counters = at::zeros({2}, long_options);  // [0]: written to out, [1]: candidates
  auto* out_count = static_cast<unsigned long long*>(counters.data_ptr());
  auto* cand_count = out_count + 1;
  at::Tensor hist = at::empty({kBins}, long_options);
  std::vector<unsigned long long> host_hist(kBins);

  at::Tensor cand_idx, cand_keys;  // undefined at the first level: the source is the data
  int64_t m = n;                   // size of the current source
  int64_t need = k;                // still to select from the current source
  int remaining_bits = KeyTraits<Bits>::kKeyBits;
  while (remaining_bits > 0) {
    const int shift = std::max(0, remaining_bits - kDigitBits);
    const int width = remaining_bits - shift;
    const uint32_t digit_mask = (1u << width) - 1u;
    const int64_t* src_idx = cand_idx.defined() ? cand_idx.data_ptr<int64_t>() : nullptr;
    const auto* src_keys = cand_keys.defined() ? static_cast<const uint32_t*>(cand_keys.data_ptr()) : nullptr;

    C10_CUDA_CHECK(cudaMemsetAsync(hist.data_ptr(), 0, kBins * sizeof(unsigned long long), stream));
    digit_histogram<Bits><<<grid_for(m), kThreads, 0, stream>>>(
        data, src_keys, m, shift, digit_mask, static_cast<unsigned long long*>(hist.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    C10_CUDA_CHECK(cudaMemcpyAsync(host_hist.data(), hist.data_ptr(), kBins * sizeof(unsigned long long),
                                   cudaMemcpyDeviceToHost, stream));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
    int64_t above = 0;
    int64_t digit = (1 << width) - 1;
    while (above + static_cast<int64_t>(host_hist[digit]) < need) above += static_cast<int64_t>(host_hist[digit--]);
    const auto on_digit = static_cast<int64_t>(host_hist[digit]);

    at::Tensor next_idx = at::empty({on_digit}, long_options);
    at::Tensor next_keys = at::empty({on_digit}, x.options().dtype(at::kInt));
    C10_CUDA_CHECK(cudaMemsetAsync(cand_count, 0, sizeof(unsigned long long), stream));
    digit_split<Bits><<<grid_for(m), kThreads, 0, stream>>>(
        data, src_idx, src_keys, m, shift, digit_mask, static_cast<uint32_t>(digit), out.data_ptr<int64_t>(),
        out_count, next_idx.data_ptr<int64_t>(), static_cast<uint32_t*>(next_keys.data_ptr()), cand_count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    need -= above;
    cand_idx = next_idx;
    cand_keys = next_keys;
    m = on_digit;
    remaining_bits = shift;
  }
  // Every remaining candidate equals the k-th key: take the first `need` of them.
  const auto written = static_cast<int64_t>(read_counter(counters, stream));
  TORCH_CHECK(written + need == k && need <= m, "swarmgrad::topk_abs (CUDA): selection lost count, ", written,
              " + ", need, " != ", k);
  if (need > 0) {
    C10_CUDA_CHECK(cudaMemcpyAsync(out.data_ptr<int64_t>() + written, cand_idx.data_ptr<int64_t>(),
                                   need * sizeof(int64_t), cudaMemcpyDeviceToDevice, stream));
  }
  indices = std::get<0>(at::sort(out));
  gather_values<Bits><<<grid_for(k), kThreads, 0, stream>>>(data, indices.data_ptr<int64_t>(), k,
                                                            static_cast<Bits*>(values.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> topk_abs_cuda(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.is_cuda(), "swarmgrad::topk_abs: CUDA kernel got a tensor on ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "swarmgrad::topk_abs: x must be float32, float16 or bfloat16, got ", dtype);
  const int64_t n = x.numel();
  TORCH_CHECK(k >= 0 && k <= n, "swarmgrad::topk_abs: k must be in [0, ", n, "], got ", k);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor indices = at::empty({k}, x.options().dtype(at::kLong));
  at::Tensor values = at::empty({k}, x.options());
  if (k == 0) return {indices, values};
  if (x.element_size() == 4) {
    select_topk_cuda<uint32_t>(xc, k, indices, values);
  } else {
    select_topk_cuda<uint16_t>(xc, k, indices, values);
  }
  return {indices, values};
}

}  // namespace
}  // namespace swarmgrad_topk

TORCH_LIBRARY_IMPL(swarmgrad, CUDA, m) {
  m.impl("topk_abs", &swarmgrad_topk::topk_abs_cuda);
}
