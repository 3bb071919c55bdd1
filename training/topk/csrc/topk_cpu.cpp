// CPU kernels of the swarmgrad top-k operators: an exact selection of the k largest magnitudes without sorting.
//
// Every float is ranked by a 31-bit key, its IEEE bits with the sign cleared (15 bits for float16/bfloat16): for
// non-negative floats the bit order is the magnitude order, and NaN keys rank above +Inf. The main path takes a
// sample of keys, picks a threshold that the k-th largest key clears with a wide margin, streams once over the
// data collecting the few candidates above the threshold (per-thread buffers, in index order), and finishes with
// an exact selection among the candidates. If the sample misled (too few or too many candidates), a two-level
// radix select on histograms of the keys (16 high bits, then 15 low bits) finds the exact k-th key instead.
// Output indices are ascending; ties at the k-th key go to the lowest indices, so the result is deterministic.
//
// The error-feedback steps run the same selection over a "source" that adds the gradient into the residual as
// it streams (one fused pass instead of several torch ops). This file includes only ATen headers.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "topk.h"

namespace swarmgrad_topk {
namespace {

constexpr int64_t kBlock = 16;                // elements tested together (vectorised) before any branch
constexpr int64_t kGrain = int64_t{1} << 20;  // fewer elements per thread than this: threading does not pay
constexpr int64_t kSmall = int64_t{1} << 15;  // up to this size every element is a candidate
constexpr int64_t kSamples = int64_t{1} << 15;
constexpr int kLowBits = 15;  // radix levels: key >> 15 (16 bits), then key & 0x7fff
constexpr int64_t kHighBins = int64_t{1} << 16;
constexpr int64_t kLowBins = int64_t{1} << kLowBits;
constexpr uint32_t kLowMask = (1u << kLowBits) - 1;

inline uint32_t key_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u & 0x7fffffffu;
}

inline uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// A fixed partition of [0, n) into chunks, the same for every pass, so per-chunk counts line up across passes.
struct Chunks {
  int64_t n;
  int64_t count;
  int64_t begin(int64_t c) const { return n / count * c + std::min(c, n % count); }
  int64_t end(int64_t c) const { return begin(c + 1); }
};

Chunks make_chunks(int64_t n) {
  const int64_t threads = at::get_num_threads();
  return {n, std::max<int64_t>(1, std::min<int64_t>(threads, n / kGrain))};
}

template <class F>
void for_each_chunk(const Chunks& chunks, const F& f) {
  if (chunks.count == 1) {
    f(0);
    return;
  }
  at::parallel_for(0, chunks.count, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) f(c);
  });
}

// ---- sources: where keys come from. `peek` is the key an element will have, `advance` applies the element's
// update (if any) and returns its key, `key` reads it after the update. Each element is advanced exactly once.

template <typename Bits>
struct ReadSource {
  const Bits* p;
  static constexpr uint32_t kMask = sizeof(Bits) == 4 ? 0x7fffffffu : 0x7fffu;
  uint32_t key(int64_t i) const { return static_cast<uint32_t>(p[i]) & kMask; }
  uint32_t peek(int64_t i) const { return key(i); }
  uint32_t advance(int64_t i) const { return key(i); }
  void advance_block(int64_t i, uint32_t* keys) const {
    for (int64_t j = 0; j < kBlock; ++j) keys[j] = static_cast<uint32_t>(p[i + j]) & kMask;
  }
};

struct FeedbackSource {
  float* r;
  const float* g;
  uint32_t key(int64_t i) const { return key_of(r[i]); }
  uint32_t peek(int64_t i) const { return key_of(r[i] + g[i]); }
  uint32_t advance(int64_t i) const {
    r[i] = r[i] + g[i];
    return key_of(r[i]);
  }
  void advance_block(int64_t i, uint32_t* keys) const {
    for (int64_t j = 0; j < kBlock; ++j) {
      const float s = r[i + j] + g[i + j];
      r[i + j] = s;
      keys[j] = key_of(s);
    }
  }
};

struct MomentumSource {
  float* r;
  float* v;
  const float* g;
  float m;
  // Two roundings, as torch's `v.mul_(m).add_(g)` does (built with -ffp-contract=off: no fused multiply-add).
  float velocity(int64_t i) const {
    const float u = v[i] * m;
    return u + g[i];
  }
  uint32_t key(int64_t i) const { return key_of(r[i]); }
  uint32_t peek(int64_t i) const { return key_of(r[i] + velocity(i)); }
  uint32_t advance(int64_t i) const {
    const float u = velocity(i);
    v[i] = u;
    r[i] = r[i] + u;
    return key_of(r[i]);
  }
  void advance_block(int64_t i, uint32_t* keys) const {
    for (int64_t j = 0; j < kBlock; ++j) {
      const float u = v[i + j] * m;
      const float w = u + g[i + j];
      v[i + j] = w;
      const float s = r[i + j] + w;
      r[i + j] = s;
      keys[j] = key_of(s);
    }
  }
};

// ---- candidates: the elements of one chunk whose key clears a threshold, in index order.

struct Candidates {
  std::unique_ptr<int64_t[]> idx;
  std::unique_ptr<uint32_t[]> key;
  int64_t count = 0;     // may exceed capacity: then the chunk overflowed and its buffers are incomplete
  int64_t capacity = 0;
};

template <class Src>
void scan_chunk(const Src& src, int64_t b, int64_t e, uint32_t threshold, int64_t capacity, Candidates& out) {
  out.idx.reset(new int64_t[capacity]);
  out.key.reset(new uint32_t[capacity]);
  out.capacity = capacity;
  int64_t* idx = out.idx.get();
  uint32_t* key = out.key.get();
  int64_t count = 0;
  auto push = [&](int64_t i, uint32_t k) {
    if (count < capacity) {
      idx[count] = i;
      key[count] = k;
    }
    ++count;
  };
  alignas(64) uint32_t keys[kBlock];
  int64_t i = b;
  for (; i + kBlock <= e; i += kBlock) {
    src.advance_block(i, keys);
    uint32_t hit = 0;
    for (int64_t j = 0; j < kBlock; ++j) hit |= static_cast<uint32_t>(keys[j] >= threshold);
    if (hit) {
      for (int64_t j = 0; j < kBlock; ++j) {
        if (keys[j] >= threshold) push(i + j, keys[j]);
      }
    }
  }
  for (; i < e; ++i) {
    const uint32_t k = src.advance(i);
    if (k >= threshold) push(i, k);
  }
  out.count = count;
}

// Given, per chunk, how many keys are above the k-th key and how many equal it, the output offset of each chunk
// and how many of its ties it takes (the lowest indices first).
void plan_output(const std::vector<int64_t>& above, const std::vector<int64_t>& equal, int64_t ties,
                 std::vector<int64_t>& offset, std::vector<int64_t>& tie_quota) {
  const size_t chunks = above.size();
  offset.assign(chunks, 0);
  tie_quota.assign(chunks, 0);
  int64_t pos = 0;
  for (size_t c = 0; c < chunks; ++c) {
    offset[c] = pos;
    tie_quota[c] = std::min(equal[c], ties);
    ties -= tie_quota[c];
    pos += above[c] + tie_quota[c];
  }
}

// The k largest keys among complete candidate buffers (whose union holds at least k elements), ascending indices.
void finish_from_candidates(const std::vector<Candidates>& cands, int64_t k, int64_t* out) {
  std::vector<uint32_t> keys;
  for (const Candidates& c : cands) keys.insert(keys.end(), c.key.get(), c.key.get() + c.count);
  const int64_t m = static_cast<int64_t>(keys.size());
  std::nth_element(keys.begin(), keys.begin() + (m - k), keys.end());
  const uint32_t kth = keys[m - k];
  int64_t above_total = 0;
  std::vector<int64_t> above(cands.size(), 0), equal(cands.size(), 0);
  for (size_t c = 0; c < cands.size(); ++c) {
    for (int64_t j = 0; j < cands[c].count; ++j) {
      above[c] += cands[c].key[j] > kth;
      equal[c] += cands[c].key[j] == kth;
    }
    above_total += above[c];
  }
  std::vector<int64_t> offset, tie_quota;
  plan_output(above, equal, k - above_total, offset, tie_quota);
  for (size_t c = 0; c < cands.size(); ++c) {
    int64_t pos = offset[c];
    int64_t ties = tie_quota[c];
    for (int64_t j = 0; j < cands[c].count; ++j) {
      const uint32_t key = cands[c].key[j];
      if (key > kth || (key == kth && ties-- > 0)) out[pos++] = cands[c].idx[j];
    }
  }
}

// Exact two-level radix select over the current keys of `src` (already advanced).
template <class Src>
void radix_select(const Src& src, const Chunks& chunks, int64_t k, int64_t* out) {
  const int64_t count = chunks.count;
  std::vector<int64_t> high(count * kHighBins, 0);
  for_each_chunk(chunks, [&](int64_t c) {
    int64_t* h = high.data() + c * kHighBins;
    for (int64_t i = chunks.begin(c); i < chunks.end(c); ++i) ++h[src.key(i) >> kLowBits];
  });
  std::vector<int64_t> total(kHighBins, 0);
  for (int64_t c = 0; c < count; ++c) {
    for (int64_t b = 0; b < kHighBins; ++b) total[b] += high[c * kHighBins + b];
  }
  int64_t above = 0;
  int64_t bin = kHighBins - 1;
  while (above + total[bin] < k) above += total[bin--];
  const uint32_t high_bits = static_cast<uint32_t>(bin);

  std::vector<int64_t> low(count * kLowBins, 0);
  for_each_chunk(chunks, [&](int64_t c) {
    int64_t* h = low.data() + c * kLowBins;
    for (int64_t i = chunks.begin(c); i < chunks.end(c); ++i) {
      const uint32_t key = src.key(i);
      if ((key >> kLowBits) == high_bits) ++h[key & kLowMask];
    }
  });
  std::vector<int64_t> low_total(kLowBins, 0);
  for (int64_t c = 0; c < count; ++c) {
    for (int64_t b = 0; b < kLowBins; ++b) low_total[b] += low[c * kLowBins + b];
  }
  int64_t low_bin = kLowBins - 1;
  while (above + low_total[low_bin] < k) above += low_total[low_bin--];
  const uint32_t kth = (high_bits << kLowBits) | static_cast<uint32_t>(low_bin);

  std::vector<int64_t> chunk_above(count, 0), chunk_equal(count, 0);
  for (int64_t c = 0; c < count; ++c) {
    for (int64_t b = bin + 1; b < kHighBins; ++b) chunk_above[c] += high[c * kHighBins + b];
    for (int64_t b = low_bin + 1; b < kLowBins; ++b) chunk_above[c] += low[c * kLowBins + b];
    chunk_equal[c] = low[c * kLowBins + low_bin];
  }
  std::vector<int64_t> offset, tie_quota;
  plan_output(chunk_above, chunk_equal, k - above, offset, tie_quota);
  for_each_chunk(chunks, [&](int64_t c) {
    int64_t pos = offset[c];
    int64_t ties = tie_quota[c];
    for (int64_t i = chunks.begin(c); i < chunks.end(c); ++i) {
      const uint32_t key = src.key(i);
      if (key > kth || (key == kth && ties-- > 0)) out[pos++] = i;
    }
  });
}

template <class Src>
void advance_all(const Src& src, const Chunks& chunks) {
  for_each_chunk(chunks, [&](int64_t c) {
    for (int64_t i = chunks.begin(c); i < chunks.end(c); ++i) src.advance(i);
  });
}

// Writes the ascending indices of the k largest keys of `src` (n elements) to `out`, advancing every element
// exactly once, whatever the path. Requires 0 <= k <= n.
template <class Src>
void select_topk(const Src& src, int64_t n, int64_t k, int64_t* out) {
  const Chunks chunks = make_chunks(n);
  if (k == 0) {
    advance_all(src, chunks);
    return;
  }
  if (n <= kSmall) {
    std::vector<Candidates> all(1);
    scan_chunk(src, 0, n, 0, n, all[0]);
    finish_from_candidates(all, k, out);
    return;
  }
  if (k * 8 > n) {  // a threshold would keep most elements: go straight to the radix select
    advance_all(src, chunks);
    radix_select(src, chunks, k, out);
    return;
  }
  // Threshold from a fixed pseudo-random sample: its r-th largest key, with r well above the sample's expected
  // count above the true k-th key (+25 %, +4 standard deviations, +16), so the stream keeps more than k elements.
  std::vector<uint32_t> sample(kSamples);
  for (int64_t j = 0; j < kSamples; ++j) {
    sample[j] = src.peek(static_cast<int64_t>(splitmix64(static_cast<uint64_t>(j)) % static_cast<uint64_t>(n)));
  }
  const double expected = static_cast<double>(kSamples) * static_cast<double>(k) / static_cast<double>(n);
  const int64_t rank =
      std::min<int64_t>(kSamples, static_cast<int64_t>(std::ceil(expected * 1.25 + 4.0 * std::sqrt(expected) + 16)));
  std::nth_element(sample.begin(), sample.begin() + (kSamples - rank), sample.end());
  const uint32_t threshold = sample[kSamples - rank];

  std::vector<Candidates> cands(chunks.count);
  for_each_chunk(chunks, [&](int64_t c) {
    const int64_t b = chunks.begin(c), e = chunks.end(c);
    const double planned = static_cast<double>(e - b) * static_cast<double>(rank) / static_cast<double>(kSamples);
    const int64_t capacity = std::min<int64_t>(e - b, std::max<int64_t>(4096, static_cast<int64_t>(3.0 * planned)));
    scan_chunk(src, b, e, threshold, capacity, cands[c]);
  });
  int64_t kept = 0;
  bool overflow = false;
  for (const Candidates& c : cands) {
    kept += c.count;
    overflow = overflow || c.count > c.capacity;
  }
  if (!overflow && kept >= k) {
    finish_from_candidates(cands, k, out);
  } else {
    radix_select(src, chunks, k, out);
  }
}

template <typename T>
void gather(const T* src, const int64_t* idx, int64_t k, T* dst) {
  at::parallel_for(0, k, int64_t{1} << 16, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) dst[j] = src[idx[j]];
  });
}

// Reads the selected entries of the residual into `values`, then zeroes them in every buffer of `zeroed`.
void take_selected(float* residual, const std::vector<float*>& zeroed, const int64_t* idx, int64_t k, float* values) {
  at::parallel_for(0, k, int64_t{1} << 16, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      values[j] = residual[idx[j]];
      for (float* buf : zeroed) buf[idx[j]] = 0.0f;
    }
  });
}

void check_feedback_args(const char* op, const at::Tensor& residual, const at::Tensor& grad, int64_t k) {
  TORCH_CHECK(residual.device().is_cpu() && grad.device().is_cpu(), op, ": CPU kernel got tensors on ",
              residual.device(), " and ", grad.device());
  TORCH_CHECK(residual.scalar_type() == at::kFloat && grad.scalar_type() == at::kFloat, op,
              ": residual and grad must be float32, got ", residual.scalar_type(), " and ", grad.scalar_type());
  TORCH_CHECK(residual.is_contiguous(), op, ": residual must be contiguous");
  TORCH_CHECK(grad.numel() == residual.numel(), op, ": grad has ", grad.numel(), " elements, residual has ",
              residual.numel());
  TORCH_CHECK(k >= 0 && k <= residual.numel(), op, ": k must be in [0, ", residual.numel(), "], got ", k);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_abs_cpu(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu(), "swarmgrad::topk_abs: CPU kernel got a tensor on ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "swarmgrad::topk_abs: x must be float32, float16 or bfloat16, got ", dtype);
  const int64_t n = x.numel();
  TORCH_CHECK(k >= 0 && k <= n, "swarmgrad::topk_abs: k must be in [0, ", n, "], got ", k);
  const at::Tensor xc = x.contiguous();
  at::Tensor indices = at::empty({k}, x.options().dtype(at::kLong));
  at::Tensor values = at::empty({k}, x.options());
  int64_t* idx = indices.data_ptr<int64_t>();
  if (x.element_size() == 4) {
    const auto* bits = static_cast<const uint32_t*>(xc.data_ptr());
    select_topk(ReadSource<uint32_t>{bits}, n, k, idx);
    gather(bits, idx, k, static_cast<uint32_t*>(values.data_ptr()));
  } else {
    const auto* bits = static_cast<const uint16_t*>(xc.data_ptr());
    select_topk(ReadSource<uint16_t>{bits}, n, k, idx);
    gather(bits, idx, k, static_cast<uint16_t*>(values.data_ptr()));
  }
  return {indices, values};
}

std::tuple<at::Tensor, at::Tensor> ef_step_cpu(at::Tensor& residual, const at::Tensor& grad, int64_t k) {
  check_feedback_args("swarmgrad::ef_step", residual, grad, k);
  const at::Tensor g = grad.contiguous();
  at::Tensor indices = at::empty({k}, residual.options().dtype(at::kLong));
  at::Tensor values = at::empty({k}, residual.options());
  float* r = residual.data_ptr<float>();
  select_topk(FeedbackSource{r, g.data_ptr<float>()}, residual.numel(), k, indices.data_ptr<int64_t>());
  take_selected(r, {r}, indices.data_ptr<int64_t>(), k, values.data_ptr<float>());
  return {indices, values};
}

std::tuple<at::Tensor, at::Tensor> ef_step_momentum_cpu(
    at::Tensor& residual, at::Tensor& velocity, const at::Tensor& grad, double momentum, int64_t k) {
  check_feedback_args("swarmgrad::ef_step_momentum", residual, grad, k);
  TORCH_CHECK(velocity.device().is_cpu() && velocity.scalar_type() == at::kFloat && velocity.is_contiguous() &&
                  velocity.numel() == residual.numel(),
              "swarmgrad::ef_step_momentum: velocity must be a contiguous float32 CPU tensor like residual");
  TORCH_CHECK(std::isfinite(momentum) && momentum >= 0.0 && momentum < 1.0,
              "swarmgrad::ef_step_momentum: momentum must be in [0, 1), got ", momentum);
  const at::Tensor g = grad.contiguous();
  at::Tensor indices = at::empty({k}, residual.options().dtype(at::kLong));
  at::Tensor values = at::empty({k}, residual.options());
  float* r = residual.data_ptr<float>();
  float* v = velocity.data_ptr<float>();
  select_topk(MomentumSource{r, v, g.data_ptr<float>(), static_cast<float>(momentum)}, residual.numel(), k,
              indices.data_ptr<int64_t>());
  take_selected(r, {r, v}, indices.data_ptr<int64_t>(), k, values.data_ptr<float>());
  return {indices, values};
}

}  // namespace swarmgrad_topk
