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
// This file includes only ATen headers.
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

constexpr int64_t kBlock = 8;                 // elements tested together (vectorised) before any branch
constexpr int64_t kGrain = int64_t{1} << 20;  // fewer elements per thread than this: threading does not pay
constexpr int64_t kSmall = int64_t{1} << 15;  // up to this size every element is a candidate
constexpr int64_t kDirect = int64_t{1} << 13;  // up to this many candidates: a direct selection, no histograms
constexpr int64_t kSampleRuns = 512;
constexpr int64_t kSampleRun = 32;
constexpr int kLowBits = 15;  // radix levels: key >> 15 (16 bits), then key & 0x7fff
constexpr int64_t kHighBins = int64_t{1} << 16;
constexpr int64_t kLowBins = int64_t{1} << kLowBits;
constexpr uint32_t kLowMask = (1u << kLowBits) - 1;

// Blocks of kBlock keys held as kQuads native 16-byte GCC/Clang generic vectors: they compile to SSE2 on x86-64
// and NEON on arm64 (plain loops here were left scalar by the compiler, and wider generic vectors than the
// hardware has get their compares split into scalar code).
constexpr int64_t kQuads = kBlock / 4;
typedef int32_t Quad __attribute__((vector_size(16)));
typedef float FloatQuad __attribute__((vector_size(16)));
typedef uint16_t HalfQuad __attribute__((vector_size(8)));

struct KeyBlock {
  Quad q[kQuads];
};

template <class V, class T>
inline V load_vec(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class V, class T>
inline void store_vec(T* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}

inline Quad bits_of(FloatQuad f) {
  Quad bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// Whether any key of the block is > below.
inline bool any_above(const KeyBlock& keys, Quad below) {
  Quad acc = keys.q[0] > below;
  for (int64_t q = 1; q < kQuads; ++q) acc |= keys.q[q] > below;
  uint64_t words[2];
  std::memcpy(words, &acc, sizeof words);
  return (words[0] | words[1]) != 0;
}

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
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

// ---- sources: where the values come from. `advance` applies an element's update (if any) and returns its raw
// bits (float32 bits, or float16/bfloat16 bits zero-extended), `raw` reads them after the update, and `peek` is
// the key the element will have. Each element is advanced exactly once. Keys are `raw & kMask`.

template <typename Bits>
struct ReadSource {
  using Value = Bits;
  static constexpr uint32_t kMask = sizeof(Bits) == 4 ? 0x7fffffffu : 0x7fffu;
  const Bits* p;
  uint32_t raw(int64_t i) const { return p[i]; }
  uint32_t peek(int64_t i) const { return raw(i) & kMask; }
  uint32_t advance(int64_t i) const { return raw(i); }
  KeyBlock advance_block(int64_t i) const {
    KeyBlock out;
    for (int64_t q = 0; q < kQuads; ++q) {
      if constexpr (sizeof(Bits) == 4) {
        out.q[q] = load_vec<Quad>(p + i + 4 * q);
      } else {
        out.q[q] = __builtin_convertvector(load_vec<HalfQuad>(p + i + 4 * q), Quad);
      }
    }
    return out;
  }
};

// ---- candidates: the elements of one chunk whose key clears a threshold, in index order, with their raw bits
// (so that the selected values need no second, random read of the data).

struct Candidates {
  std::unique_ptr<int64_t[]> idx;
  std::unique_ptr<uint32_t[]> raw;
  int64_t count = 0;
  bool overflowed = false;  // more elements cleared the threshold than the buffers hold: they are incomplete
};

// Streams over [b, e), advancing every element, and keeps those whose key is >= threshold. Blocks of kBlock keys
// are tested with vector compares (keys and threshold are below 2**31, so signed compares are exact); a block
// with a hit is stored without branches, every slot written and the count advanced by the test's outcome.
template <class Src>
void scan_chunk(const Src& src, int64_t b, int64_t e, uint32_t threshold, int64_t capacity, Candidates& out) {
  out.idx.reset(new int64_t[capacity + kBlock]);
  out.raw.reset(new uint32_t[capacity + kBlock]);
  int64_t* idx = out.idx.get();
  uint32_t* raw = out.raw.get();
  const auto t = static_cast<int32_t>(threshold);
  const Quad below = Quad{} + (t - 1);  // keys >= t as keys > t - 1: SSE2 has only a greater-than compare
  constexpr auto mask = static_cast<int32_t>(Src::kMask);
  int64_t count = 0;
  bool overflowed = false;
  int64_t i = b;
  for (; i + kBlock <= e; i += kBlock) {
    const KeyBlock bits = src.advance_block(i);
    KeyBlock keys;
    for (int64_t q = 0; q < kQuads; ++q) keys.q[q] = bits.q[q] & mask;
    if (!any_above(keys, below)) continue;
    if (overflowed || count > capacity) {
      overflowed = true;
      continue;
    }
    alignas(64) int32_t key_lanes[kBlock];
    alignas(64) uint32_t raw_lanes[kBlock];
    for (int64_t q = 0; q < kQuads; ++q) {
      store_vec(key_lanes + 4 * q, keys.q[q]);
      store_vec(raw_lanes + 4 * q, bits.q[q]);
    }
    for (int64_t j = 0; j < kBlock; ++j) {
      idx[count] = i + j;
      raw[count] = raw_lanes[j];
      count += key_lanes[j] >= t;
    }
  }
  for (; i < e; ++i) {
    const uint32_t bits = src.advance(i);
    const bool hit = static_cast<int32_t>(bits & Src::kMask) >= t;
    if (overflowed || count > capacity) {
      overflowed = overflowed || hit;
      continue;
    }
    idx[count] = i;
    raw[count] = bits;
    count += hit;
  }
  out.count = count;
  out.overflowed = overflowed;
}

// ---- exact selection: a two-level radix select on histograms of the keys (16 high bits, then 15 low bits),
// over "parts": ordered sequences of keys at ascending positions, each part's positions below the next part's.
// Per-part histograms give each part's output offset, so parts are counted and written in parallel.

template <class Src>
struct SourceParts {  // the (already advanced) data itself, chunk by chunk
  const Chunks& chunks;
  const Src& src;
  int64_t count() const { return chunks.count; }
  int64_t size(int64_t c) const { return chunks.end(c) - chunks.begin(c); }
  int64_t position(int64_t c, int64_t j) const { return chunks.begin(c) + j; }
  uint32_t raw(int64_t c, int64_t j) const { return src.raw(position(c, j)); }
  uint32_t key(int64_t c, int64_t j) const { return raw(c, j) & Src::kMask; }
};

template <class Src>
struct CandidateParts {  // the candidates kept by scan_chunk
  const std::vector<Candidates>& cands;
  int64_t count() const { return static_cast<int64_t>(cands.size()); }
  int64_t size(int64_t c) const { return cands[c].count; }
  int64_t position(int64_t c, int64_t j) const { return cands[c].idx[j]; }
  uint32_t raw(int64_t c, int64_t j) const { return cands[c].raw[j]; }
  uint32_t key(int64_t c, int64_t j) const { return raw(c, j) & Src::kMask; }
};

// Runs f on every part, in parallel only when `parallel` (a parallel region costs a barrier, which is dear on a
// busy machine: small selections run on the calling thread).
template <class Parts, class F>
void for_each_part(const Parts& parts, bool parallel, const F& f) {
  if (!parallel || parts.count() == 1) {
    for (int64_t c = 0; c < parts.count(); ++c) f(c);
    return;
  }
  at::parallel_for(0, parts.count(), 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) f(c);
  });
}

// Sums per-part histograms and finds, scanning from the top bin, the bin holding the k-th largest key; `above`
// (keys in higher bins, accumulated across levels) is updated.
int64_t find_bin(const std::vector<int64_t>& hist, int64_t parts, int64_t bins, int64_t k, int64_t& above) {
  std::vector<int64_t> total(bins, 0);
  for (int64_t c = 0; c < parts; ++c) {
    for (int64_t b = 0; b < bins; ++b) total[b] += hist[c * bins + b];
  }
  int64_t bin = bins - 1;
  while (above + total[bin] < k) above += total[bin--];
  return bin;
}

// The same selection as `radix_select` on few keys (`total`, at most kDirect): a partial selection on (key
// descending, position ascending), then the k winners in position order. Its two histograms (768 KiB to clear and
// sum) cost about 100 us a call, which dominates selections of a few thousand keys (a small model's whole vector,
// or the candidates a large one leaves after the threshold).
template <class Parts, typename Value>
void direct_select(const Parts& parts, int64_t total, int64_t k, int64_t* out_idx, Value* out_val) {
  struct Entry {
    uint32_t key;
    uint32_t raw;
    int64_t position;
  };
  std::vector<Entry> all;
  all.reserve(static_cast<size_t>(total));
  for (int64_t c = 0; c < parts.count(); ++c) {
    for (int64_t j = 0; j < parts.size(c); ++j) all.push_back({parts.key(c, j), parts.raw(c, j), parts.position(c, j)});
  }
  const auto ranks_before = [](const Entry& a, const Entry& b) {
    return a.key > b.key || (a.key == b.key && a.position < b.position);
  };
  if (k < total) std::nth_element(all.begin(), all.begin() + k, all.end(), ranks_before);
  std::sort(all.begin(), all.begin() + k, [](const Entry& a, const Entry& b) { return a.position < b.position; });
  for (int64_t i = 0; i < k; ++i) {
    out_idx[i] = all[i].position;
    out_val[i] = static_cast<Value>(all[i].raw);
  }
}

// Writes the ascending positions and the raw bits of the k largest keys of `parts` (which hold at least k keys)
// to `out_idx` and `out_val`; ties at the k-th key go to the lowest positions.
template <class Parts, typename Value>
void radix_select(const Parts& parts, int64_t k, int64_t* out_idx, Value* out_val) {
  const int64_t count = parts.count();
  int64_t total = 0;
  for (int64_t c = 0; c < count; ++c) total += parts.size(c);
  if (total <= kDirect) {
    direct_select(parts, total, k, out_idx, out_val);
    return;
  }
  const bool parallel = total >= 2 * kGrain;
  std::vector<int64_t> high(count * kHighBins, 0);
  for_each_part(parts, parallel, [&](int64_t c) {
    int64_t* h = high.data() + c * kHighBins;
    for (int64_t j = 0; j < parts.size(c); ++j) ++h[parts.key(c, j) >> kLowBits];
  });
  int64_t above = 0;
  const int64_t bin = find_bin(high, count, kHighBins, k, above);
  const auto high_bits = static_cast<uint32_t>(bin);

  std::vector<int64_t> low(count * kLowBins, 0);
  for_each_part(parts, parallel, [&](int64_t c) {
    int64_t* h = low.data() + c * kLowBins;
    for (int64_t j = 0; j < parts.size(c); ++j) {
      const uint32_t key = parts.key(c, j);
      if ((key >> kLowBits) == high_bits) ++h[key & kLowMask];
    }
  });
  const int64_t low_bin = find_bin(low, count, kLowBins, k, above);
  const uint32_t kth = (high_bits << kLowBits) | static_cast<uint32_t>(low_bin);

  // Each part's output offset and its share of the ties, lowest positions first.
  std::vector<int64_t> offset(count, 0), tie_quota(count, 0);
  int64_t ties = k - above;
  int64_t pos = 0;
  for (int64_t c = 0; c < count; ++c) {
    int64_t part_above = 0;
    for (int64_t b = bin + 1; b < kHighBins; ++b) part_above += high[c * kHighBins + b];
    for (int64_t b = low_bin + 1; b < kLowBins; ++b) part_above += low[c * kLowBins + b];
    offset[c] = pos;
    tie_quota[c] = std::min(low[c * kLowBins + low_bin], ties);
    ties -= tie_quota[c];
    pos += part_above + tie_quota[c];
  }
  for_each_part(parts, parallel, [&](int64_t c) {
    int64_t at = offset[c];
    int64_t part_ties = tie_quota[c];
    for (int64_t j = 0; j < parts.size(c); ++j) {
      const uint32_t key = parts.key(c, j);
      if (key > kth || (key == kth && part_ties-- > 0)) {
        out_idx[at] = parts.position(c, j);
        out_val[at++] = static_cast<Value>(parts.raw(c, j));
      }
    }
  });
}

template <class Src>
void advance_all(const Src& src, const Chunks& chunks) {
  for_each_chunk(chunks, [&](int64_t c) {
    for (int64_t i = chunks.begin(c); i < chunks.end(c); ++i) src.advance(i);
  });
}

// Threshold from a fixed pseudo-random sample of kSampleRuns runs of kSampleRun consecutive keys (few cache
// misses): the sample's r-th largest key, with r above the sample's expected count above the true k-th key
// (+3 standard deviations, +8), so that the stream almost always keeps at least k elements.
template <class Src>
uint32_t sample_threshold(const Src& src, int64_t n, int64_t k, int64_t& rank) {
  std::vector<uint32_t> sample(kSampleRuns * kSampleRun);
  const auto starts = static_cast<uint64_t>(n - kSampleRun + 1);
  for (int64_t r = 0; r < kSampleRuns; ++r) {
    const auto start = static_cast<int64_t>(splitmix64(static_cast<uint64_t>(r)) % starts);
    for (int64_t j = 0; j < kSampleRun; ++j) sample[r * kSampleRun + j] = src.peek(start + j);
  }
  const auto size = static_cast<int64_t>(sample.size());
  const double expected = static_cast<double>(size) * static_cast<double>(k) / static_cast<double>(n);
  rank = std::min<int64_t>(size, static_cast<int64_t>(std::ceil(expected + 3.0 * std::sqrt(expected) + 8)));
  std::nth_element(sample.begin(), sample.begin() + (size - rank), sample.end());
  return sample[size - rank];
}

// Writes the ascending indices and the raw bits of the k largest keys of `src` (n elements) to `out_idx` and
// `out_val`, advancing every element exactly once, whatever the path. Requires 0 <= k <= n.
template <class Src>
void select_topk(const Src& src, int64_t n, int64_t k, int64_t* out_idx, typename Src::Value* out_val) {
  const Chunks chunks = make_chunks(n);
  if (k == 0) {
    advance_all(src, chunks);
    return;
  }
  if (n <= kSmall) {  // every element is a candidate
    std::vector<Candidates> all(1);
    scan_chunk(src, 0, n, 0, n, all[0]);
    radix_select(CandidateParts<Src>{all}, k, out_idx, out_val);
    return;
  }
  if (k * 8 > n) {  // a threshold would keep most elements: select on the data directly
    advance_all(src, chunks);
    radix_select(SourceParts<Src>{chunks, src}, k, out_idx, out_val);
    return;
  }
  int64_t rank = 0;
  const uint32_t threshold = sample_threshold(src, n, k, rank);
  const double kept_fraction = static_cast<double>(rank) / static_cast<double>(kSampleRuns * kSampleRun);
  std::vector<Candidates> cands(chunks.count);
  for_each_chunk(chunks, [&](int64_t c) {
    const int64_t b = chunks.begin(c), e = chunks.end(c);
    const auto planned = static_cast<int64_t>(3.0 * kept_fraction * static_cast<double>(e - b));
    scan_chunk(src, b, e, threshold, std::min<int64_t>(e - b, std::max<int64_t>(4096, planned)), cands[c]);
  });
  int64_t kept = 0;
  bool overflowed = false;
  for (const Candidates& c : cands) {
    kept += c.count;
    overflowed = overflowed || c.overflowed;
  }
  if (!overflowed && kept >= k) {
    radix_select(CandidateParts<Src>{cands}, k, out_idx, out_val);
  } else {  // the sample misled: select on the (already advanced) data directly
    radix_select(SourceParts<Src>{chunks, src}, k, out_idx, out_val);
  }
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
    select_topk(ReadSource<uint32_t>{bits}, n, k, idx, static_cast<uint32_t*>(values.data_ptr()));
  } else {
    const auto* bits = static_cast<const uint16_t*>(xc.data_ptr());
    select_topk(ReadSource<uint16_t>{bits}, n, k, idx, static_cast<uint16_t*>(values.data_ptr()));
  }
  return {indices, values};
}

}  // namespace swarmgrad_topk
