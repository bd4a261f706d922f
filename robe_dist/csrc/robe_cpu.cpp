// robe_dist._C: the ROBE-Z pooled lookup on CPU (forward, exact backward, fused SGD backward).
// These are the CPU kernels of the custom ops robe_dist::pooled_lookup / pooled_lookup_backward /
// pooled_lookup_fused_update, registered in robe_dist/ops.py (the CUDA kernels are Triton's,
// robe_dist/kernels/triton_lookup.py; both take the same inputs and give the same outputs).
//
// One 1-D array M of m floats holds every embedding of every table. Element j of the
// embedding of id x in table t is M[start(t, x, j / Z) + j % Z]: an embedding is cut in
// blocks of Z contiguous floats and each block starts at a hashed offset in [0, m - Z], a
// multiple of the alignment a (1: any slot). With S = (m - Z) / a + 1 starts, the two mappings
// (docs/robe.md):
//   universal: h = fmix64(x ^ key_t); start = a * ((fmix64(h + (c + 1) * G) >> 1) mod S)
//   paper:     g = x + offset_t;      start = a * (((g * A + c * B + C) mod P) mod S)
// (fmix64 is MurmurHash3's 64-bit finaliser, G = 0x9E3779B97F4A7C15, all in uint64 arithmetic;
// the paper mapping is evaluated as (((g mod P) * A + C) mod P + c * B) mod P, equal to the
// formula in exact integers and free of int64 overflow for every id below 2^62.)
//
// Layout of the inputs (built by robe_dist/ops.py from a KeyedJaggedTensor):
//   values       int64 [N]        the KJT's ids (all keys; only the selected features are read)
//   weights      float [N] or []  per-sample weights (weighted features), same indexing as values
//   offsets      int64 [K*B+1]    the KJT's offsets: bag b of key k is values[offsets[k*B+b] : offsets[k*B+b+1]]
//   meta         int64 [F, 7]     per feature: table key (universal) / global offset (paper),
//                                 num_embeddings (paper: ids must be below it), dim, output
//                                 column, pooling (0 sum, 1 mean), index k of its key in the KJT,
//                                 occurrence r (0, or 1, 2, ... for the later tables that read a
//                                 key an earlier table of the collection already reads)
// Outputs: out [B, out_dim] (a KeyedTensor's values) and `starts` [R * N * MB], kept for the
// backward: starts[(r * N + i) * MB + c] is the start of block c of value i as read by the
// feature of occurrence r of its key, -1 where no feature reads it (MB = max blocks per id,
// R = max occurrences). One index per block, never one per element; int32 where the array has at
// most 2^31 - 1 slots (every start fits: half the bytes written and read again), else int64.
//
// Both directions group the blocks by bucket of the array (16384 slots) in a work list and walk
// it bucket by bucket, so the array is read or updated 64 KiB at a time instead of at random; the
// random accesses go to the output (the forward's non-temporal stores) and to the upstream
// gradient (prefetched). The forward does so for one-hot lookups (forward_bucketed; bag-major
// forward_impl otherwise) and leaves its list for the backward, which builds its own where the
// inputs differ (ListPool). Each thread adds only into its own buckets: no atomics, no
// per-thread copies of the array, and the summation order of each slot is independent of the
// thread count, so gradients are bit-for-bit deterministic (backward_impl).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "bus_error.h"
#include "hugepage.h"

#if defined(__SSE__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <string>

namespace {

using robe_dist::hugepage_empty;
using robe_dist::hugepage_zeros;

constexpr int64_t kHashUniversal = 0;
constexpr int64_t kHashPaper = 1;
constexpr int64_t kPoolSum = 0;
constexpr int64_t kPoolMean = 1;

enum MetaCol : int64_t {
  kKey = 0,            // universal: table key (uint64 bits); paper: global id offset
  kNumEmbeddings = 1,  // paper: ids must lie in [0, num_embeddings)
  kDim = 2,
  kOutCol = 3,
  kPooling = 4,
  kKeyIndex = 5,
  kOccurrence = 6,
  kMetaCols = 7,
};

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

inline uint64_t fmix64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ULL;
  k ^= k >> 33;
  return k;
}

struct Hash {
  int64_t mode;
  int64_t z;
  uint64_t num_starts;  // S = (m - Z) / align + 1
  uint64_t align;       // starts are multiples of it
  int64_t a, b, c, p;   // paper constants

  // Fills starts[0..nb) for one id of one feature. Returns false for an out-of-range
  // id in the paper mapping (the caller reports it).
  template <typename start_t>
  inline bool starts_for(int64_t id, const int64_t* meta, int64_t nb, start_t* starts) const {
    if (mode == kHashUniversal) {
      const uint64_t h = fmix64(static_cast<uint64_t>(id) ^ static_cast<uint64_t>(meta[kKey]));
      for (int64_t blk = 0; blk < nb; ++blk) {
        const uint64_t hb = fmix64(h + static_cast<uint64_t>(blk + 1) * kGolden);
        starts[blk] = static_cast<start_t>((hb >> 1) % num_starts * align);
      }
      return true;
    }
    if (id < 0 || id >= meta[kNumEmbeddings]) return false;
    const int64_t g = id + meta[kKey];              // < 2^62 (checked by the module)
    const int64_t base = ((g % p) * a + c) % p;      // (g mod P) * A < 2^62: no overflow
    for (int64_t blk = 0; blk < nb; ++blk) {
      starts[blk] = static_cast<start_t>(static_cast<uint64_t>((base + blk * b) % p) % num_starts * align);
    }
    return true;
  }
};

struct Problem {
  int64_t num_features;
  int64_t batch;
  int64_t num_values;   // N
  int64_t max_blocks;   // MB: the row length of `starts`
  int64_t occurrences;  // R
  const int64_t* values;
  const int64_t* offsets;
  const int64_t* meta;

  // Bag offsets of feature f: bag b is values[off[b] : off[b + 1]].
  inline const int64_t* bag_offsets(int64_t f) const { return offsets + meta[f * kMetaCols + kKeyIndex] * batch; }
  // The start of block 0 of value i as read by feature f.
  inline int64_t start_index(int64_t f, int64_t i) const {
    return (meta[f * kMetaCols + kOccurrence] * num_values + i) * max_blocks;
  }
};

// Checks everything the kernels read through (offsets, meta), so that a malformed input is an
// error naming the problem, never a read out of bounds.
Problem make_problem(int64_t num_values, const at::Tensor& offsets, int64_t batch, const at::Tensor& meta,
                     int64_t block_size, int64_t max_blocks, int64_t occurrences) {
  TORCH_CHECK_VALUE(offsets.device().is_cpu() && meta.device().is_cpu(),
              "robe: the C++ operator is CPU-only; CUDA tensors run the Triton kernels");
  TORCH_CHECK_VALUE(offsets.dtype() == at::kLong && offsets.dim() == 1 && offsets.is_contiguous(),
              "robe: offsets must be a contiguous 1-D int64 tensor");
  TORCH_CHECK_VALUE(batch >= 0, "robe: batch must be >= 0, got ", batch);
  TORCH_CHECK_VALUE(offsets.size(0) >= 1 && (offsets.size(0) - 1) % std::max<int64_t>(batch, 1) == 0,
              "robe: offsets must hold K * batch + 1 entries (batch ", batch, "), got ", offsets.size(0));
  TORCH_CHECK_VALUE(meta.dtype() == at::kLong && meta.dim() == 2 && meta.size(1) == kMetaCols && meta.is_contiguous(),
              "robe: meta must be a contiguous int64 [F, 7] tensor");
  TORCH_CHECK_VALUE(block_size >= 1 && max_blocks >= 0 && occurrences >= 1,
              "robe: need block_size >= 1, max_blocks >= 0, occurrences >= 1");
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t n_off = offsets.size(0);
  TORCH_CHECK_VALUE(off[0] == 0 && off[n_off - 1] == num_values, "robe: offsets run from ", off[0], " to ",
              off[n_off - 1], " but the KeyedJaggedTensor has ", num_values,
              " values: its lengths must cover the values exactly, from 0");
  for (int64_t k = 1; k < n_off; ++k) {
    TORCH_CHECK_VALUE(off[k] >= off[k - 1], "robe: offsets must be non-decreasing (bag lengths >= 0), but offsets[",
                k - 1, "] = ", off[k - 1], " > offsets[", k, "] = ", off[k]);
  }
  const int64_t num_keys = batch > 0 ? (n_off - 1) / batch : 0;
  const int64_t* m = meta.data_ptr<int64_t>();
  for (int64_t f = 0; f < meta.size(0); ++f) {
    const int64_t* row = m + f * kMetaCols;
    TORCH_CHECK_VALUE(batch == 0 || (row[kKeyIndex] >= 0 && row[kKeyIndex] < num_keys), "robe: feature #", f,
                " has key index ", row[kKeyIndex], " outside the input's ", num_keys, " keys");
    TORCH_CHECK_VALUE(row[kDim] > 0 && row[kDim] % block_size == 0 && row[kDim] / block_size <= max_blocks,
                "robe: feature #", f, " has embedding_dim ", row[kDim], ", not a positive multiple of block_size ",
                block_size, " with at most ", max_blocks, " blocks");
    TORCH_CHECK_VALUE(row[kOutCol] >= 0, "robe: feature #", f, " has output column ", row[kOutCol],
                ", expected >= 0");
    TORCH_CHECK_VALUE(row[kOccurrence] >= 0 && row[kOccurrence] < occurrences, "robe: feature #", f,
                " has occurrence ", row[kOccurrence], " outside [0, ", occurrences, ")");
    TORCH_CHECK_VALUE(row[kPooling] == kPoolSum || row[kPooling] == kPoolMean, "robe: feature #", f,
                " has an unknown pooling ", row[kPooling]);
  }
  return Problem{meta.size(0), batch, num_values, max_blocks, occurrences, nullptr, off, m};
}

void check_weights(const at::Tensor& weights, const at::Tensor& like, const Problem& pb) {
  if (weights.numel() == 0) return;
  TORCH_CHECK_VALUE(weights.scalar_type() == like.scalar_type() && weights.dim() == 1 && weights.is_contiguous(),
              "robe: per-sample weights must be a contiguous 1-D tensor of the array's dtype (",
              like.scalar_type(), "), got ", weights.scalar_type());
  TORCH_CHECK_VALUE(weights.numel() == pb.num_values, "robe: ", weights.numel(), " per-sample weights for ",
              pb.num_values, " values; a KeyedJaggedTensor carries one weight per id");
  for (int64_t f = 0; f < pb.num_features; ++f) {
    TORCH_CHECK_VALUE(pb.meta[f * kMetaCols + kPooling] != kPoolMean, "robe: feature #", f,
                " pools by MEAN and has per-sample weights; as in nn.EmbeddingBag, weights need SUM pooling");
  }
}

Hash make_hash(int64_t mode, int64_t array_size, int64_t z, const std::vector<int64_t>& paper, int64_t align) {
  TORCH_CHECK_VALUE(mode == kHashUniversal || mode == kHashPaper, "robe: unknown hash mode ", mode);
  TORCH_CHECK_VALUE(z >= 1 && array_size >= z, "robe: need 1 <= block_size <= array_size");
  TORCH_CHECK_VALUE(align >= 1, "robe: block_align must be >= 1, got ", align);
  TORCH_CHECK_VALUE(paper.size() == 4 && paper[3] > 0, "robe: paper constants must be [A, B, C, P] with P > 0");
  TORCH_CHECK_VALUE(mode != kHashPaper || (paper[0] >= 0 && paper[0] < paper[3] && paper[1] >= 0 && paper[1] < paper[3] &&
                                     paper[2] >= 0 && paper[2] < paper[3] && paper[3] < (int64_t(1) << 31)),
              "robe: paper constants must satisfy 0 <= A, B, C < P < 2^31");
  return Hash{mode, z, static_cast<uint64_t>((array_size - z) / align + 1), static_cast<uint64_t>(align),
              paper[0], paper[1], paper[2], paper[3]};
}

// Prefetches every 64-byte line of [p, p + bytes): an unaligned 128-byte block spans 3 lines.
inline void prefetch_lines(const void* p, int64_t bytes, bool write) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63);
  const uintptr_t last = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes) - 1;
  for (uintptr_t a = first; a <= last; a += 64) {
    if (write) {
      __builtin_prefetch(reinterpret_cast<const void*>(a), 1);
    } else {
      __builtin_prefetch(reinterpret_cast<const void*>(a), 0);
    }
  }
}

// Outputs at least this large are written with non-temporal stores (stream_row).
constexpr int64_t kStreamOutputBytes = int64_t(32) << 20;

// Writes dst[j] = src[j] (kScale: a * src[j]) for j < n with non-temporal stores, and returns
// true, where it can: float on x86, 32-byte stores (AVX) where dst is 32-byte aligned and n a
// multiple of 8, else 16-byte ones where dst is 16-byte aligned and n a multiple of 4. Returns
// false, having written nothing, otherwise. (The one-hot forward's walk is bound by these
// stores: the forward was 3-9% faster with 32-byte stores than with 16-byte ones.)
template <bool kScale, typename scalar_t>
inline bool stream_values(scalar_t* dst, const scalar_t* src, scalar_t a, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    const uintptr_t at = reinterpret_cast<uintptr_t>(dst);
#if defined(__AVX__)
    if ((at & 31) == 0 && n % 8 == 0) {
      const __m256 va = _mm256_set1_ps(a);
      for (int64_t j = 0; j < n; j += 8) {
        const __m256 v = _mm256_loadu_ps(src + j);
        _mm256_stream_ps(dst + j, kScale ? _mm256_mul_ps(va, v) : v);
      }
      return true;
    }
#endif
#if defined(__SSE__)
    if ((at & 15) == 0 && n % 4 == 0) {
      const __m128 va = _mm_set1_ps(a);
      for (int64_t j = 0; j < n; j += 4) {
        const __m128 v = _mm_loadu_ps(src + j);
        _mm_stream_ps(dst + j, kScale ? _mm_mul_ps(va, v) : v);
      }
      return true;
    }
#endif
  }
  return false;
}

// Writes n values from src (a pooled row built in cache) to dst, with non-temporal stores where
// it can (stream_values; plain copies otherwise): a pooled output larger than the caches is
// written once and read back from memory by the next operator anyway, so this skips the
// read-for-ownership of each of its lines and keeps the array cached.
template <typename scalar_t>
inline void stream_row(scalar_t* dst, const scalar_t* src, int64_t n) {
  if (!stream_values<false>(dst, src, scalar_t(1), n)) std::copy(src, src + n, dst);
}

inline void store_fence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

// Hashes the blocks of value i of feature f into st[0..nb). An id the paper mapping cannot place
// (outside its table) gets blocks at 0 and is remembered, the first one met, for check() to
// report once the parallel pass is over.
struct BadIds {
  std::atomic<int64_t> feature{-1};
  std::atomic<int64_t> id{0};

  template <typename start_t>
  bool hash(const Problem& pb, const Hash& h, int64_t f, int64_t i, int64_t nb, start_t* st) {
    if (h.starts_for(pb.values[i], pb.meta + f * kMetaCols, nb, st)) return true;
    int64_t expected = -1;
    if (feature.compare_exchange_strong(expected, f)) id.store(pb.values[i]);
    for (int64_t blk = 0; blk < nb; ++blk) st[blk] = 0;
    return false;
  }
  void check(const Problem& pb) const {
    const int64_t f = feature.load();
    TORCH_CHECK_VALUE(f < 0, "robe: id ", id.load(), " of feature #", f,
                      " is outside [0, num_embeddings) = [0, ", pb.meta[f * kMetaCols + kNumEmbeddings],
                      ") of its table; the 'paper' mapping needs ids below num_embeddings");
  }
};

template <typename scalar_t, typename start_t>
void forward_impl(const Problem& pb, const Hash& hash, const scalar_t* array, const scalar_t* weights,
                  scalar_t* out, int64_t out_dim, start_t* starts) {
  BadIds bad;
  const int64_t z = hash.z;
  const int64_t F = pb.num_features;
  const int64_t block_bytes = z * static_cast<int64_t>(sizeof(scalar_t));
  // Bag-major: a thread fills whole output rows, contiguous in memory. For each row, first hash
  // every block of every feature and prefetch it (the reads are random, so this keeps many cache
  // misses in flight), then accumulate: into the output, or, for an output larger than the caches,
  // into a cached row that is then streamed out (stream_row). The same operations either way.
  const bool stream = pb.batch * out_dim * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamOutputBytes;
  int64_t max_dim = 0;
  for (int64_t f = 0; f < F; ++f) max_dim = std::max(max_dim, pb.meta[f * kMetaCols + kDim]);
  at::parallel_for(0, pb.batch, 8, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> pooled(stream ? max_dim : 0);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t f = 0; f < F; ++f) {
        const int64_t* m = pb.meta + f * kMetaCols;
        const int64_t* off = pb.bag_offsets(f);
        const int64_t nb = m[kDim] / z;
        for (int64_t i = off[b]; i < off[b + 1]; ++i) {
          start_t* st = starts + pb.start_index(f, i);
          if (!bad.hash(pb, hash, f, i, nb, st)) continue;
          for (int64_t blk = 0; blk < nb; ++blk) prefetch_lines(array + st[blk], block_bytes, false);
        }
      }
      for (int64_t f = 0; f < F; ++f) {
        const int64_t* m = pb.meta + f * kMetaCols;
        const int64_t* off = pb.bag_offsets(f);
        const int64_t dim = m[kDim];
        const int64_t nb = dim / z;
        scalar_t* const dst_row = out + b * out_dim + m[kOutCol];
        scalar_t* row = stream ? pooled.data() : dst_row;
        const int64_t lo = off[b], hi = off[b + 1];
        if (hi == lo) {  // empty bag: zeros (the output is not pre-zeroed)
          std::fill(row, row + dim, scalar_t(0));
          if (stream) stream_row(dst_row, row, dim);
          continue;
        }
        for (int64_t i = lo; i < hi; ++i) {
          const start_t* st = starts + pb.start_index(f, i);
          const scalar_t w = weights ? weights[i] : scalar_t(1);
          for (int64_t blk = 0; blk < nb; ++blk) {
            const scalar_t* src = array + st[blk];
            scalar_t* dst = row + blk * z;
            if (i == lo) {
#pragma omp simd
              for (int64_t j = 0; j < z; ++j) dst[j] = w * src[j];
            } else {
#pragma omp simd
              for (int64_t j = 0; j < z; ++j) dst[j] += w * src[j];
            }
          }
        }
        if (m[kPooling] == kPoolMean && hi > lo) {
          const scalar_t inv = scalar_t(1) / static_cast<scalar_t>(hi - lo);
          for (int64_t j = 0; j < dim; ++j) row[j] *= inv;
        }
        if (stream) stream_row(dst_row, row, dim);
      }
    }
    if (stream) store_fence();  // the streamed rows are visible before the op returns
  });
  bad.check(pb);
}

// What the walks over a lookup's blocks read of feature f for every bag, looked up once per op
// instead of once per (bag, feature) pair (meta, a division: 15-20% of fill_list's time).
// start_t is const for the walks that only read the starts.
template <typename start_t>
struct FeatureWalk {
  const int64_t* off;  // the bag offsets of its key (Problem::bag_offsets)
  start_t* starts;     // where the starts of value 0 as read by it would be (Problem::start_index)
  int64_t blocks;      // blocks per id: embedding_dim / Z
  int64_t dim;
  int64_t out_col;
  bool mean;

  static std::vector<FeatureWalk> of(const Problem& pb, int64_t z, start_t* starts) {
    std::vector<FeatureWalk> fw(static_cast<size_t>(pb.num_features));
    for (int64_t f = 0; f < pb.num_features; ++f) {
      const int64_t* m = pb.meta + f * kMetaCols;
      fw[f] = {pb.bag_offsets(f), starts + pb.start_index(f, 0), m[kDim] / z, m[kDim], m[kOutCol],
               m[kPooling] == kPoolMean};
    }
    return fw;
  }
  // The starts of value i's blocks.
  start_t* at(const Problem& pb, int64_t i) const { return starts + i * pb.max_blocks; }
};

// The fixed walk order of a lookup's blocks is feature-major: feature, then bag, value, block (for
// one-hot input, the KeyedJaggedTensor's own order of values). Its (feature, bag) pairs are
// numbered q = f * batch + b; this calls fn(f, b0, b1) for each feature f with pairs in [q0, q1),
// [b0, b1) its bags there, in walk order. (Bag-major, as before, each bag read every feature's
// offsets, ids and starts at a stride of a whole feature: the one-hot forward took 30-35% longer
// to hash and count and 13-23% longer to fill its work list, docs/performance.md.)
template <typename Fn>
inline void for_feature_runs(const Problem& pb, int64_t q0, int64_t q1, Fn&& fn) {
  if (pb.batch <= 0) return;
  for (int64_t f = q0 / pb.batch; f < pb.num_features && f * pb.batch < q1; ++f) {
    fn(f, std::max<int64_t>(0, q0 - f * pb.batch), std::min(pb.batch, q1 - f * pb.batch));
  }
}

// Calls fn(s, g, scale) for every block of the (feature, bag) pairs [q0, q1) in the fixed walk
// order (for_feature_runs): the block starts at slot s of the array, its upstream gradient at
// grad_out[g], and it enters the pooled output with factor `scale` (its weight, times 1 / bag
// length for MEAN). fw: FeatureWalk::of the starts (const or not: they are only read).
template <typename scalar_t, typename Walk, typename Fn>
inline void walk_blocks(const Problem& pb, int64_t z, const scalar_t* weights, int64_t out_dim,
                        const std::vector<Walk>& fw, int64_t q0, int64_t q1, Fn&& fn) {
  for_feature_runs(pb, q0, q1, [&](int64_t f, int64_t b0, int64_t b1) {
    const Walk& e = fw[f];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t bag_lo = e.off[b], bag_hi = e.off[b + 1];
      if (bag_hi == bag_lo) continue;
      const scalar_t bag_scale = e.mean ? scalar_t(1) / static_cast<scalar_t>(bag_hi - bag_lo) : scalar_t(1);
      const int64_t grow = b * out_dim + e.out_col;
      for (int64_t i = bag_lo; i < bag_hi; ++i) {
        const auto* st = e.at(pb, i);
        const scalar_t scale = weights ? weights[i] * bag_scale : bag_scale;
        for (int64_t blk = 0; blk < e.blocks; ++blk) fn(st[blk], grow + blk * z, scale);
      }
    }
  });
}

// dst[s + j] += alpha * g[j] for the j with lo <= s + j < hi.
template <typename scalar_t>
inline void add_block(scalar_t* dst, int64_t s, int64_t z, int64_t lo, int64_t hi, scalar_t alpha,
                      const scalar_t* g) {
  if (s >= lo && s + z <= hi) {
    scalar_t* d = dst + s;
#pragma omp simd
    for (int64_t j = 0; j < z; ++j) d[j] += alpha * g[j];
    return;
  }
  const int64_t j0 = std::max<int64_t>(0, lo - s), j1 = std::min<int64_t>(z, hi - s);
  for (int64_t j = j0; j < j1; ++j) dst[s + j] += alpha * g[j];
}

constexpr int64_t kMax32 = std::numeric_limits<int32_t>::max();

// One block of a work list: the forward copies factor * array[s + j] to out[g + j]; the backward
// adds alpha * factor * grad_out[g + j] to target[s + j] (j < Z). The factor is the block's weight
// in its bag's pooled output (its per-sample weight, times 1 / bag length for MEAN). Entries are
// 12 bytes where the array and the output have at most 2^31 - 1 elements (24 past that), and 8
// (UnitRef, no factor: it is 1) where they do and no block is weighted or pooled by MEAN.
template <typename scalar_t, typename index_t>
struct BlockRef {
  index_t s;
  index_t g;
  scalar_t alpha;
  static BlockRef make(int64_t s, int64_t g, scalar_t factor) {
    return {static_cast<index_t>(s), static_cast<index_t>(g), factor};
  }
  scalar_t factor() const { return alpha; }
};

template <typename scalar_t>
struct UnitRef {
  int32_t s;
  int32_t g;
  static UnitRef make(int64_t s, int64_t g, scalar_t) { return {static_cast<int32_t>(s), static_cast<int32_t>(g)}; }
  scalar_t factor() const { return scalar_t(1); }
};

// Calls fn(R{}) with the entry type for these sizes: UnitRef, BlockRef<scalar_t, int32_t> or
// BlockRef<scalar_t, int64_t>.
template <typename scalar_t, typename Fn>
void with_entry_type(const Problem& pb, const scalar_t* weights, int64_t out_dim, int64_t array_size, Fn&& fn) {
  const bool narrow = array_size <= kMax32 && pb.batch * out_dim <= kMax32;
  bool unit = narrow && weights == nullptr;
  for (int64_t f = 0; f < pb.num_features && unit; ++f) unit = pb.meta[f * kMetaCols + kPooling] == kPoolSum;
  if (unit) {
    fn(UnitRef<scalar_t>{});
  } else if (narrow) {
    fn(BlockRef<scalar_t, int32_t>{});
  } else {
    fn(BlockRef<scalar_t, int64_t>{});
  }
}

constexpr int64_t kPrefetchAhead = 16;  // work-list entries between a prefetch and its use

// floor(s / d) for 0 <= s < 2^32 and 0 < d < 2^32 by a multiply with a precomputed reciprocal
// (Granlund-Montgomery / Lemire): magic = floor((2^64 - 1) / d) + 1 exceeds 2^64 / d by at most
// 1, so the product errs by less than s / 2^64 < 1 / d, which cannot carry into the next integer.
// The bucketing divides twice per block; a 64-bit idiv there cost more than the adds.
struct SlotDivider {
  uint64_t d;
  uint64_t magic;
  bool fast;
  explicit SlotDivider(int64_t divisor, int64_t max_dividend)
      : d(static_cast<uint64_t>(divisor)),
        magic(~uint64_t(0) / static_cast<uint64_t>(divisor) + 1),
        fast(divisor > 1 && max_dividend < (int64_t(1) << 32) && divisor < (int64_t(1) << 32)) {}
  inline int64_t operator()(int64_t s) const {
    if (fast) return static_cast<int64_t>((static_cast<unsigned __int128>(static_cast<uint64_t>(s)) * magic) >> 64);
    return static_cast<int64_t>(static_cast<uint64_t>(s) / d);
  }
};

// Slots of the array per bucket of a work list: a bucket's slots (64 KiB of float32) stay in L2
// while its blocks are read or added, so the random accesses go to 64 KiB at a time and the array
// is swept once, in order (docs/performance.md). Few enough buckets (1,648 for 27M slots) for
// fill_list to write each block straight to its bucket, and 4x narrower ones measured no faster.
// At most kMaxBuckets buckets: wider ones past 2^30 slots.
constexpr int64_t kBucketSlots = 16384;
constexpr int64_t kMaxBuckets = int64_t(1) << 16;

// The slots per bucket with `threads` threads: kBucketSlots (more for huge arrays), or the array
// cut in `threads` ranges where that is narrower; a multiple of 16 floats (one 64-byte line of
// float32), so no two buckets share a line of the array.
inline int64_t bucket_slots(int64_t array_size, int64_t threads) {
  const int64_t per_thread = ((array_size + threads - 1) / threads + 15) / 16 * 16;
  const int64_t wide = ((array_size + kMaxBuckets - 1) / kMaxBuckets + 15) / 16 * 16;
  return std::min(per_thread, std::max(kBucketSlots, wide));
}

// The buckets of `chunk` slots that cover the array.
inline int64_t bucket_count(int64_t array_size, int64_t chunk) { return (array_size + chunk - 1) / chunk; }

// The blocks of one lookup grouped by the bucket of array slots they touch (`chunk` slots each):
// bucket o's entries are refs[begin[o] : begin[o + 1]], in the fixed walk order (feature-major,
// walk_blocks); a block that straddles two buckets is listed in both. Its buffers are
// kept and reused (the pool below): no page faults in the steady state.
struct WorkList {
  int64_t chunk = 0;
  int64_t buckets = 0;
  std::vector<int64_t> begin;
  std::vector<int64_t> pos;     // [ranges * buckets] while building
  std::vector<uint8_t> bytes;   // R[begin[buckets]], R the entry type (BlockRef, UnitRef)
  // What it was built from, compared byte for byte before a backward reuses it (ListKey).
  std::vector<uint8_t> key;

  template <typename R>
  R* refs() { return reinterpret_cast<R*>(bytes.data()); }
  size_t footprint() const {
    return bytes.capacity() + key.capacity() + 8 * (begin.capacity() + pos.capacity());
  }
};

// Everything a work list depends on, in order: the sizes and types, then meta, offsets, weights
// and starts as bytes. Two lookups with equal keys have equal work lists (whatever the thread
// count: the list records its own chunk).
struct ListKey {
  int64_t head[12];                                  // the sizes and types
  std::vector<std::pair<const void*, size_t>> parts;  // the inputs' bytes (not copied)

  template <typename scalar_t, typename R, typename start_t>
  static ListKey of(const Problem& pb, int64_t z, const scalar_t* weights, int64_t out_dim, const start_t* starts,
                    int64_t array_size) {
    ListKey k;
    const int64_t head[12] = {pb.num_features, pb.batch, pb.num_values, pb.max_blocks, pb.occurrences, z,
                              out_dim, array_size, weights != nullptr, int64_t(sizeof(scalar_t)),
                              int64_t(sizeof(R)), int64_t(sizeof(start_t))};
    std::copy(head, head + 12, k.head);
    int64_t num_keys = 0;
    for (int64_t f = 0; f < pb.num_features; ++f) num_keys = std::max(num_keys, pb.meta[f * kMetaCols + kKeyIndex] + 1);
    k.parts.push_back({pb.meta, sizeof(int64_t) * pb.num_features * kMetaCols});
    k.parts.push_back({pb.offsets, sizeof(int64_t) * (num_keys * pb.batch + 1)});
    if (weights) k.parts.push_back({weights, sizeof(scalar_t) * pb.num_values});
    k.parts.push_back({starts, sizeof(start_t) * pb.occurrences * pb.num_values * pb.max_blocks});
    return k;
  }
  size_t bytes() const {
    size_t n = sizeof(head);
    for (const auto& p : parts) n += p.second;
    return n;
  }
  // Copies the key into `out` (its capacity reused).
  void store(std::vector<uint8_t>& out) const {
    out.resize(bytes());
    uint8_t* at = out.data();
    std::memcpy(at, head, sizeof(head));
    at += sizeof(head);
    for (const auto& p : parts) {
      std::memcpy(at, p.first, p.second);
      at += p.second;
    }
  }
  bool equals(const std::vector<uint8_t>& stored) const {
    if (stored.size() != bytes()) return false;
    const uint8_t* at = stored.data();
    if (std::memcmp(at, head, sizeof(head)) != 0) return false;
    at += sizeof(head);
    for (const auto& p : parts) {
      if (std::memcmp(at, p.first, p.second) != 0) return false;
      at += p.second;
    }
    return true;
  }
};

// The forward of a one-hot lookup builds its work list anyway (forward_bucketed); the backward
// of the same lookup needs exactly that list, so the forward leaves it here and the backward
// takes it if every input it was built from is byte-identical (starts, offsets, meta, weights,
// the sizes), and builds its own otherwise. At most kPoolLists lists (a model with a few ROBE
// collections runs their forwards before their backwards), the least recent dropped; a list
// whose buffers hold more than kPoolMaxBytes is not kept.
constexpr size_t kPoolLists = 4;
constexpr size_t kPoolMaxBytes = size_t(512) << 20;

class ListPool {
 public:
  // A list to build into: a recycled one (its buffers reused) or a new one.
  std::unique_ptr<WorkList> take_free() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!free_.empty()) {
      auto wl = std::move(free_.back());
      free_.pop_back();
      return wl;
    }
    if (ready_.size() >= kPoolLists) {  // the oldest unclaimed list
      auto wl = std::move(ready_.front());
      ready_.erase(ready_.begin());
      return wl;
    }
    return std::make_unique<WorkList>();
  }
  // A list built from exactly `key`, or nullptr.
  std::unique_ptr<WorkList> take_ready(const ListKey& key) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = ready_.begin(); it != ready_.end(); ++it) {
      if (key.equals((*it)->key)) {
        auto wl = std::move(*it);
        ready_.erase(it);
        return wl;
      }
    }
    return nullptr;
  }
  void put_ready(std::unique_ptr<WorkList> wl) {
    if (wl->footprint() > kPoolMaxBytes) return;
    std::lock_guard<std::mutex> lock(mu_);
    while (free_.size() + ready_.size() >= kPoolLists) {
      if (!free_.empty()) {
        free_.pop_back();
      } else {
        ready_.erase(ready_.begin());
      }
    }
    ready_.push_back(std::move(wl));
  }
  void put_free(std::unique_ptr<WorkList> wl) {
    if (wl->footprint() > kPoolMaxBytes) return;
    wl->key.clear();  // (its capacity kept)
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.size() + ready_.size() < kPoolLists) free_.push_back(std::move(wl));
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    free_.clear();
    ready_.clear();
  }
  size_t ready() {
    std::lock_guard<std::mutex> lock(mu_);
    return ready_.size();
  }

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<WorkList>> free_, ready_;
};

ListPool& list_pool() {
  static ListPool* pool = new ListPool();  // never destroyed: no order-of-exit problems
  return *pool;
}

// Cuts buckets [0, buckets) into `parts` contiguous runs of about equal work (entries, whose
// prefix sums are `begin`); returns the parts + 1 bucket boundaries.
std::vector<int64_t> balanced_runs(const std::vector<int64_t>& begin, int64_t buckets, int64_t parts) {
  std::vector<int64_t> cut(parts + 1, buckets);
  cut[0] = 0;
  const int64_t total = begin[buckets];
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t want = total / parts * p + std::min(p, total % parts);
    const int64_t at = std::lower_bound(begin.begin(), begin.begin() + buckets + 1, want) - begin.begin();
    cut[p] = std::min(buckets, std::max(cut[p - 1], at));
  }
  return cut;
}

// The ranges of (feature, bag) pairs that count and place blocks: one per thread, consecutive in
// walk order (for_feature_runs), so that their lists laid end to end are the walk order whatever
// the thread count.
struct PairRanges {
  int64_t pairs;
  int64_t count;
  int64_t per;
  PairRanges(const Problem& pb, int64_t threads)
      : pairs(pb.num_features * pb.batch),
        count(std::max<int64_t>(1, std::min(threads, pairs))),
        per((pairs + count - 1) / count) {}
  std::pair<int64_t, int64_t> of(int64_t w) const { return {std::min(pairs, w * per), std::min(pairs, (w + 1) * per)}; }
};

// Prepares wl for `ranges` x buckets of `chunk` slots (wl.pos zeroed for counting).
void reset_list(WorkList& wl, int64_t array_size, int64_t chunk, int64_t ranges) {
  wl.chunk = chunk;
  wl.buckets = bucket_count(array_size, chunk);
  wl.begin.assign(wl.buckets + 1, 0);
  wl.pos.assign(ranges * wl.buckets, 0);
}

// From the counts per (range, bucket) in wl.pos: every pair's first place in the list, grouped
// by bucket and, within a bucket, in range order; sizes wl.bytes.
template <typename R>
void place_counts(WorkList& wl, int64_t ranges) {
  int64_t next = 0;
  for (int64_t o = 0; o < wl.buckets; ++o) {
    wl.begin[o] = next;
    for (int64_t w = 0; w < ranges; ++w) {
      const int64_t n = wl.pos[w * wl.buckets + o];
      wl.pos[w * wl.buckets + o] = next;
      next += n;
    }
  }
  wl.begin[wl.buckets] = next;
  const size_t need = static_cast<size_t>(next) * sizeof(R);
  if (wl.bytes.size() < need) wl.bytes.resize(need);
}

// Writes every block of the lookup into its place(s) in the list: thread w walks its pair range in
// walk order and appends each block to its bucket (a straddling block to both) at the range's
// next place there (wl.pos, from place_counts), so each bucket holds its blocks in walk order.
// The stores go to ~1,650 places at a time per thread (27M slots), whose lines stay in L2: with
// four times as many buckets they left the caches between two writes, and a two-pass radix
// partition through a spill buffer as large as the list was needed (slower in all, and the
// buffer kept with each pooled list: docs/performance.md). fw: the caller's FeatureWalk table.
template <typename scalar_t, typename R, typename Walk>
void fill_list(WorkList& wl, const Problem& pb, int64_t z, const scalar_t* weights, int64_t out_dim,
               const std::vector<Walk>& fw, int64_t array_size, const PairRanges& ranges) {
  const SlotDivider bucket_of(wl.chunk, array_size);
  R* refs = wl.refs<R>();
  at::parallel_for(0, ranges.count, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      int64_t* next = wl.pos.data() + w * wl.buckets;
      const auto [q0, q1] = ranges.of(w);
      walk_blocks<scalar_t>(pb, z, weights, out_dim, fw, q0, q1, [&](int64_t s, int64_t g, scalar_t scale) {
        const R r = R::make(s, g, scale);
        for (int64_t o = bucket_of(s), last = bucket_of(s + z - 1); o <= last; ++o) refs[next[o]++] = r;
      });
    }
  });
}

// Refuses block starts outside [0, array_size - z] (found: one was seen, bad: which), before the
// backward writes anything: starts of another array, or edited.
inline void check_starts_in_array(bool found, int64_t bad, int64_t array_size, int64_t z) {
  TORCH_CHECK_VALUE(!found, "robe: the backward's block starts must lie in [0, ", array_size - z, "] (array_size ",
                    array_size, ", block_size ", z, "), found ", bad, ": starts of another array, or not the forward's");
}

// The blocks of the bags (every feature's values times its blocks per id).
inline int64_t count_blocks(const Problem& pb, int64_t z) {
  int64_t blocks = 0;
  for (int64_t f = 0; f < pb.num_features; ++f) {
    const int64_t* off = pb.bag_offsets(f);
    blocks += (off[pb.batch] - off[0]) * (pb.meta[f * kMetaCols + kDim] / z);
  }
  return blocks;
}

// The backward's work list built from the forward's starts: count (checking that every start
// lies in the array, before anything is written), place, fill.
template <typename scalar_t, typename R, typename start_t>
void build_list(WorkList& wl, const Problem& pb, int64_t z, const scalar_t* weights, int64_t out_dim,
                const start_t* starts, int64_t array_size, int64_t threads) {
  const PairRanges ranges(pb, threads);
  reset_list(wl, array_size, bucket_slots(array_size, threads), ranges.count);
  const SlotDivider bucket_of(wl.chunk, array_size);
  const int64_t max_start = array_size - z;
  std::atomic<bool> found{false};
  std::atomic<int64_t> bad{0};
  const auto fw = FeatureWalk<const start_t>::of(pb, z, starts);
  at::parallel_for(0, ranges.count, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      int64_t* count = wl.pos.data() + w * wl.buckets;
      const auto [q0, q1] = ranges.of(w);
      walk_blocks<scalar_t>(pb, z, weights, out_dim, fw, q0, q1, [&](int64_t s, int64_t, scalar_t) {
        if (s < 0 || s > max_start) {
          bad.store(s);
          found.store(true);
          return;
        }
        for (int64_t o = bucket_of(s), last = bucket_of(s + z - 1); o <= last; ++o) ++count[o];
      });
    }
  });
  check_starts_in_array(found.load(), bad.load(), array_size, z);
  place_counts<R>(wl, ranges.count);
  fill_list<scalar_t, R>(wl, pb, z, weights, out_dim, fw, array_size, ranges);
}

// Buckets between the one a walk is in and the one it prefetches (walk_list): 64 KiB ahead (a
// step 1-5% faster than two buckets ahead in 7 runs of benchmarks/operator_ab.py).
constexpr int64_t kPrefetchBuckets = 1;
// Entries of a bucket handed to walk_list's group(k0, k1, end) at a time, before fn sees them
// (the backward gathers their upstream gradient then: 32 KiB at Z = 32).
constexpr int64_t kWalkGroup = 256;

// Calls fn(entry, k, lo, hi, at) for every entry k of the list, [lo, hi) the slots of its bucket:
// the buckets cut into one run of about equal work per thread, each thread walking its run in
// order. Before the entries [k0, k1) of a bucket (at most kWalkGroup at a time) it calls
// group(k0, k1, end), end the end of the thread's run; `at` is what that call returned, for the
// group's entries.
// The walk reads or (`update`) updates `array` (elements of `element_size` bytes) a bucket at a
// time, at random within the bucket: while it walks bucket o, it prefetches every line of bucket
// o + kPrefetchBuckets, spread over o's entries, a sequential stream that the memory serves at
// full speed (the blocks alone, prefetched a few entries ahead, took twice as long in the
// backward: docs/performance.md). (64 KiB buckets; wider for arrays past 2^30 slots,
// bucket_slots.) An update's stream goes to L2 (prefetcht1: a line no other core holds comes in
// exclusive), which leaves the L1's miss buffers to the backward's random reads of the upstream
// gradient (the backward 0-3% faster than with prefetchw into L1, in 10 runs of operator_ab.py);
// the forward's stays with prefetcht0 (slower to L2).
template <typename R, typename Group, typename Fn, typename Finish>
void walk_list(WorkList& wl, int64_t array_size, int64_t threads, const void* array, int64_t element_size, bool update,
               Group&& group, Fn&& fn, Finish&& finish) {
  const int64_t parts = std::max<int64_t>(1, std::min(threads, wl.buckets));
  const std::vector<int64_t> cut = balanced_runs(wl.begin, wl.buckets, parts);
  const R* refs = wl.refs<R>();
  const int64_t* begin = wl.begin.data();
  const int64_t chunk = wl.chunk;
  const char* base = static_cast<const char*>(array);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t o = cut[p]; o < cut[p + 1]; ++o) {
        const int64_t lo = o * chunk, hi = std::min(array_size, lo + chunk);
        const int64_t stop = begin[o + 1];
        // bucket o + kPrefetchBuckets of this run: `lines` lines from `ahead_at`, issued in step
        // with o's entries
        const int64_t po = o + kPrefetchBuckets;
        const int64_t plo = std::min(array_size, po * chunk), phi = std::min(array_size, plo + chunk);
        const int64_t lines = po < cut[p + 1] ? ((phi - plo) * element_size + 63) / 64 : 0;
        const char* ahead_at = base + plo * element_size;
        const int64_t first = begin[o], n = std::max<int64_t>(1, stop - first);
        int64_t issued = 0;
        for (int64_t k0 = first; k0 < stop; k0 += kWalkGroup) {
          const int64_t k1 = std::min(stop, k0 + kWalkGroup);
          const auto at = group(k0, k1, begin[cut[p + 1]]);
          for (int64_t k = k0; k < k1; ++k) {
            for (const int64_t want = (k - first + 1) * lines / n; issued < want; ++issued) {
              if (update) {
                __builtin_prefetch(ahead_at + 64 * issued, 0, 2);  // to L2
              } else {
                __builtin_prefetch(ahead_at + 64 * issued, 0);
              }
            }
            fn(refs[k], k, lo, hi, at);
          }
        }
      }
    }
    finish();  // in each thread that walked
  });
}

// A thread's buffer for the upstream gradient blocks of one group of work-list entries
// (backward_impl): [kWalkGroup * z], in list order.
template <typename scalar_t>
std::vector<scalar_t>& gather_rows() {
  thread_local std::vector<scalar_t> rows;  // whichever thread pool runs the walk
  return rows;
}

// Adds alpha * dL/dM into `target` (a zeroed gradient with alpha = 1, or the array itself with
// alpha = -lr for the fused SGD update).
//
// The array's slots are cut into buckets (bucket_slots: 16384 floats, or one range per thread for
// small arrays), and each thread adds only into the buckets of its own run: no atomics, no
// per-thread copies of the array. The blocks are first grouped by bucket in a work list, so each
// thread reads only its own work and adds into 64 KiB of the array at a time:
//   1. the (feature, bag) pairs are cut into T ranges in walk order; thread w counts its range's
//      blocks per bucket;
//   2. prefix sums give every (range, bucket) pair its place in one work list, grouped by bucket
//      and, within a bucket, in range order; the blocks are written there (fill_list);
//   3. the buckets are cut into T runs of about equal work; thread t walks its run's lists in
//      order, prefetching its buckets' slots a bucket ahead; it copies each group of up to
//      kWalkGroup entries' upstream gradient blocks into a small buffer of its own (prefetched a
//      few entries ahead), then adds them from there.
// Steps 1 and 2 are skipped when the forward of a one-hot lookup left the same list (ListPool).
// A bucket's list is the fixed walk order restricted to its slots: every slot sums its terms in
// the same order whatever T is (and whoever built the list), so gradients are bit-for-bit
// deterministic and independent of the thread count. A block that straddles two buckets is
// listed for both, each adding its part.
template <typename scalar_t, typename R, typename start_t>
void backward_impl(const Problem& pb, int64_t z, const scalar_t* weights, const scalar_t* grad_out,
                   int64_t out_dim, const start_t* starts, scalar_t* target, int64_t array_size,
                   scalar_t alpha) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block_bytes = z * static_cast<int64_t>(sizeof(scalar_t));
  ListPool& pool = list_pool();
  std::unique_ptr<WorkList> wl;
  if (pool.ready() > 0) wl = pool.take_ready(ListKey::of<scalar_t, R, start_t>(pb, z, weights, out_dim, starts, array_size));
  if (!wl) {
    const int64_t chunk = bucket_slots(array_size, threads);
    if (chunk >= array_size || pb.batch < 2 || count_blocks(pb, z) < 4 * bucket_count(array_size, chunk)) {
      // one bucket, or fewer blocks than buckets: no work list; each (feature, bag) pair's slots
      // prefetched as many pairs ahead as there are features
      const int64_t max_start = array_size - z;
      const int64_t pairs = pb.num_features * pb.batch, ahead = pb.num_features;
      bool found = false;  // checked before anything is written (the fused update writes the array)
      int64_t bad = 0;
      const auto fw = FeatureWalk<const start_t>::of(pb, z, starts);
      walk_blocks<scalar_t>(pb, z, weights, out_dim, fw, 0, pairs, [&](int64_t s, int64_t, scalar_t) {
        if (s < 0 || s > max_start) found = true, bad = s;
      });
      check_starts_in_array(found, bad, array_size, z);
      for (int64_t q = 0; q < pairs; ++q) {
        if (q + ahead < pairs) {
          walk_blocks<scalar_t>(pb, z, weights, out_dim, fw, q + ahead, q + ahead + 1,
                                [&](int64_t s, int64_t, scalar_t) { prefetch_lines(target + s, block_bytes, true); });
        }
        walk_blocks<scalar_t>(pb, z, weights, out_dim, fw, q, q + 1, [&](int64_t s, int64_t g, scalar_t scale) {
          add_block<scalar_t>(target, s, z, 0, array_size, alpha * scale, grad_out + g);
        });
      }
      return;
    }
    wl = pool.take_free();
    build_list<scalar_t, R, start_t>(*wl, pb, z, weights, out_dim, starts, array_size, threads);
  }
  // The upstream gradient, gathered a group of entries at a time into each thread's own buffer
  // (it stays in L1) just before they are added: grad_out is read at random either way, and a
  // whole staging copy in list order (109 MB here) cost a write and a read of it through memory.
  const R* refs = wl->refs<R>();
  walk_list<R>(
      *wl, array_size, threads, target, sizeof(scalar_t), true,
      [&](int64_t k0, int64_t k1, int64_t end) {  // -> the row of entry 0 (group entry k - k0 at k * z)
        std::vector<scalar_t>& rows = gather_rows<scalar_t>();
        if (rows.size() < static_cast<size_t>(kWalkGroup * z)) rows.resize(static_cast<size_t>(kWalkGroup * z));
        for (int64_t k = k0; k < k1; ++k) {
          if (k + kPrefetchAhead < end) prefetch_lines(grad_out + refs[k + kPrefetchAhead].g, block_bytes, false);
          std::copy(grad_out + refs[k].g, grad_out + refs[k].g + z, rows.data() + (k - k0) * z);
        }
        return static_cast<const scalar_t*>(rows.data()) - k0 * z;
      },
      [&](const R& r, int64_t k, int64_t lo, int64_t hi, const scalar_t* rows) {
        add_block<scalar_t>(target, r.s, z, lo, hi, alpha * r.factor(), rows + k * z);
      },
      [] {});
  pool.put_free(std::move(wl));
}

// The forward of a one-hot lookup (no bag holds more than one id) through a work list: the
// bag-major forward_impl reads every block at a random place in the array; this one groups the
// blocks by bucket of the array first and copies them bucket by bucket, so the array is read
// once, in order, 64 KiB at a time, and the random accesses go to the output, written once
// with non-temporal stores (docs/performance.md):
//   1. thread w hashes the blocks of its range of (feature, bag) pairs (the starts) and counts
//      them per bucket; empty bags' outputs are zeroed;
//   2. places and fills the work list as the backward builds it (build_list's steps 2, 3);
//   3. each thread copies the blocks of its run of buckets to the output (alpha * block; a
//      straddling block once, from the bucket of its start).
// Each output value is one block's element times its factor, as in forward_impl: the same bits.
// The list is then left in the ListPool for this lookup's backward.
template <typename scalar_t, typename R, typename start_t>
void forward_bucketed(const Problem& pb, const Hash& hash, const scalar_t* array, const scalar_t* weights,
                      scalar_t* out, int64_t out_dim, start_t* starts, int64_t array_size) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t z = hash.z;
  const bool stream = pb.batch * out_dim * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamOutputBytes;
  const PairRanges ranges(pb, threads);
  ListPool& pool = list_pool();
  std::unique_ptr<WorkList> wl = pool.take_free();
  reset_list(*wl, array_size, bucket_slots(array_size, threads), ranges.count);
  const SlotDivider bucket_of(wl->chunk, array_size);
  BadIds bad;
  const auto fw = FeatureWalk<start_t>::of(pb, z, starts);
  at::parallel_for(0, ranges.count, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      int64_t* count = wl->pos.data() + w * wl->buckets;
      const auto [q0, q1] = ranges.of(w);
      for_feature_runs(pb, q0, q1, [&](int64_t f, int64_t b0, int64_t b1) {
        const FeatureWalk<start_t>& e = fw[f];
        const int64_t nb = e.blocks;
        for (int64_t b = b0; b < b1; ++b) {
          if (e.off[b + 1] == e.off[b]) {  // empty bag: zeros (the output is not pre-zeroed)
            scalar_t* row = out + b * out_dim + e.out_col;
            std::fill(row, row + e.dim, scalar_t(0));
            continue;
          }
          const int64_t i = e.off[b];
          start_t* st = e.at(pb, i);
          bad.hash(pb, hash, f, i, nb, st);  // (a bad id's blocks, at 0, are counted: the walks agree)
          for (int64_t blk = 0; blk < nb; ++blk) {
            for (int64_t o = bucket_of(st[blk]), last = bucket_of(st[blk] + z - 1); o <= last; ++o) ++count[o];
          }
        }
      });
    }
  });
  bad.check(pb);
  place_counts<R>(*wl, ranges.count);
  fill_list<scalar_t, R>(*wl, pb, z, weights, out_dim, fw, array_size, ranges);
  walk_list<R>(
      *wl, array_size, threads, array, sizeof(scalar_t), false, [](int64_t, int64_t, int64_t) { return 0; },
      [&](const R& r, int64_t, int64_t lo, int64_t, int) {
        if (r.s < lo) return;  // the second part of a straddling block: copied from its first bucket
        const scalar_t* src = array + r.s;
        scalar_t* dst = out + r.g;
        const scalar_t a = r.factor();
        if (stream && stream_values<true>(dst, src, a, z)) return;
#pragma omp simd
        for (int64_t j = 0; j < z; ++j) dst[j] = a * src[j];
      },
      [&] {
        if (stream) store_fence();  // the streamed blocks are visible before the op returns
      });
  ListKey::of<scalar_t, R, start_t>(pb, z, weights, out_dim, starts, array_size).store(wl->key);
  pool.put_ready(std::move(wl));
}

// Arrays from this size on are read through work lists by the one-hot forward: below it the array
// stays in the caches, where the bag-major forward's random reads are cheap (and scoring, which
// has no backward to hand the list to, would pay for it: 6% at batch 16384 with a 2.4 MB array).
constexpr int64_t kBucketedForwardBytes = int64_t(8) << 20;

// Whether forward_bucketed serves this lookup: every bag the features read holds at most one id,
// the array is at least kBucketedForwardBytes, and the blocks outnumber the buckets (a few rows
// against a large array would pay more to set up the list than it saves).
bool use_bucketed_forward(const Problem& pb, int64_t z, int64_t array_size, int64_t element_size) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = bucket_slots(array_size, threads);
  if (array_size * element_size < kBucketedForwardBytes || chunk >= array_size || pb.batch < 2) return false;
  // Features of distinct starts and disjoint output columns, as the module's LookupSpec makes them:
  // the bucketed forward counts blocks from the starts it hashes and writes each output element
  // from one bucket. A hand-made meta without that keeps the bag-major forward (its old result).
  std::vector<std::pair<int64_t, int64_t>> reads, cols;
  for (int64_t f = 0; f < pb.num_features; ++f) {
    const int64_t* m = pb.meta + f * kMetaCols;
    reads.emplace_back(m[kKeyIndex], m[kOccurrence]);
    cols.emplace_back(m[kOutCol], m[kOutCol] + m[kDim]);
  }
  std::sort(reads.begin(), reads.end());
  std::sort(cols.begin(), cols.end());
  for (size_t k = 1; k < reads.size(); ++k) {
    if (reads[k] == reads[k - 1] || cols[k].first < cols[k - 1].second) return false;
  }
  for (int64_t f = 0; f < pb.num_features; ++f) {
    const int64_t* off = pb.bag_offsets(f);
    for (int64_t b = 0; b < pb.batch; ++b) {
      if (off[b + 1] - off[b] > 1) return false;
    }
  }
  return count_blocks(pb, z) >= 4 * bucket_count(array_size, chunk);
}

// The forward's `starts` dtype: int32 where every start (< array_size) fits.
at::ScalarType starts_dtype(int64_t array_size) { return array_size <= kMax32 ? at::kInt : at::kLong; }

// backward_impl for the starts' dtype and the entry type these sizes allow (with_entry_type).
template <typename scalar_t, typename start_t>
void backward_dispatch(const Problem& pb, int64_t z, const scalar_t* weights, const scalar_t* grad_out,
                       int64_t out_dim, const start_t* starts, scalar_t* target, int64_t array_size,
                       scalar_t alpha) {
  with_entry_type<scalar_t>(pb, weights, out_dim, array_size, [&](auto entry) {
    using R = decltype(entry);
    backward_impl<scalar_t, R, start_t>(pb, z, weights, grad_out, out_dim, starts, target, array_size, alpha);
  });
}

template <typename scalar_t>
void backward_dispatch(const Problem& pb, int64_t z, const scalar_t* weights, const scalar_t* grad_out,
                       int64_t out_dim, const at::Tensor& starts, scalar_t* target, int64_t array_size,
                       scalar_t alpha) {
  if (starts.scalar_type() == at::kInt) {
    backward_dispatch<scalar_t, int32_t>(pb, z, weights, grad_out, out_dim, starts.data_ptr<int32_t>(), target,
                                         array_size, alpha);
  } else {
    backward_dispatch<scalar_t, int64_t>(pb, z, weights, grad_out, out_dim, starts.data_ptr<int64_t>(), target,
                                         array_size, alpha);
  }
}

// The forward's starts, or the same values widened to int64 (also accepted: the tests check that
// both widths give the same bits).
void check_starts(const at::Tensor& starts, const Problem& pb, int64_t array_size) {
  const auto dtype = starts.scalar_type();
  TORCH_CHECK_VALUE((dtype == starts_dtype(array_size) || dtype == at::kLong) && starts.dim() == 1 &&
                        starts.is_contiguous() && starts.numel() == pb.occurrences * pb.num_values * pb.max_blocks,
                    "robe: starts must be the forward's contiguous ", starts_dtype(array_size),
                    " [R * N * max_blocks] tensor (array_size ", array_size, "), got ", dtype, " [",
                    starts.numel(), "]");
}

void check_grad_out(const at::Tensor& g, const Problem& pb, int64_t max_col) {
  TORCH_CHECK_VALUE(g.dim() == 2 && g.size(0) == pb.batch && g.size(1) >= max_col && g.is_contiguous(),
              "robe: grad_out must be a contiguous [batch, out_dim] tensor");
}

int64_t max_out_col(const Problem& pb) {
  int64_t c = 0;
  for (int64_t f = 0; f < pb.num_features; ++f) {
    c = std::max(c, pb.meta[f * kMetaCols + kOutCol] + pb.meta[f * kMetaCols + kDim]);
  }
  return c;
}

}  // namespace

// Returns (out [B, out_dim], starts [R * N * max_blocks], int32 or int64: starts_dtype).
std::vector<at::Tensor> robe_forward(const at::Tensor& array, const at::Tensor& values,
                                     const at::Tensor& weights, const at::Tensor& offsets, int64_t batch,
                                     const at::Tensor& meta, int64_t out_dim, int64_t max_blocks,
                                     int64_t occurrences, int64_t hash_mode, int64_t block_size,
                                     std::vector<int64_t> paper_constants, int64_t block_align) {
  TORCH_CHECK_VALUE(array.dim() == 1 && array.is_contiguous() && array.device().is_cpu(),
              "robe: array must be a contiguous 1-D CPU tensor");
  TORCH_CHECK_VALUE(values.dtype() == at::kLong && values.dim() == 1 && values.is_contiguous(),
              "robe: values must be a contiguous 1-D int64 tensor");
  Problem pb = make_problem(values.size(0), offsets, batch, meta, block_size, max_blocks, occurrences);
  pb.values = values.data_ptr<int64_t>();
  const Hash hash = make_hash(hash_mode, array.size(0), block_size, paper_constants, block_align);
  TORCH_CHECK_VALUE(max_out_col(pb) <= out_dim, "robe: the features' columns run past out_dim ", out_dim);
  check_weights(weights, array, pb);
  // (in a cached mapping: a fresh 3 MB tensor per step cost ~800 page faults under glibc's malloc)
  auto starts = hugepage_empty({occurrences * pb.num_values * max_blocks}, starts_dtype(array.size(0))).fill_(-1);
  auto out = hugepage_empty({pb.batch, out_dim}, array.scalar_type());  // every column a feature owns is written
  if (max_out_col(pb) < out_dim || pb.num_features == 0) out.zero_();
  const int64_t m = array.size(0);
  const bool bucketed = use_bucketed_forward(pb, block_size, m, array.element_size());
  AT_DISPATCH_FLOATING_TYPES(array.scalar_type(), "robe_forward", [&] {
    const scalar_t* w = weights.numel() > 0 ? weights.data_ptr<scalar_t>() : nullptr;
    if (bucketed) {
      const scalar_t* a = array.data_ptr<scalar_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      with_entry_type<scalar_t>(pb, w, out_dim, m, [&](auto entry) {  // as backward_dispatch decides
        using R = decltype(entry);
        if (starts.scalar_type() == at::kInt) {
          forward_bucketed<scalar_t, R, int32_t>(pb, hash, a, w, o, out_dim, starts.data_ptr<int32_t>(), m);
        } else {
          forward_bucketed<scalar_t, R, int64_t>(pb, hash, a, w, o, out_dim, starts.data_ptr<int64_t>(), m);
        }
      });
    } else if (starts.scalar_type() == at::kInt) {
      forward_impl<scalar_t, int32_t>(pb, hash, array.data_ptr<scalar_t>(), w, out.data_ptr<scalar_t>(), out_dim,
                                      starts.data_ptr<int32_t>());
    } else {
      forward_impl<scalar_t, int64_t>(pb, hash, array.data_ptr<scalar_t>(), w, out.data_ptr<scalar_t>(), out_dim,
                                      starts.data_ptr<int64_t>());
    }
  });
  return {out, starts};
}

// Dense gradient of the array (exact: the sum over every element that maps to each slot).
at::Tensor robe_backward(const at::Tensor& grad_out, const at::Tensor& weights, const at::Tensor& offsets,
                         int64_t batch, const at::Tensor& meta, const at::Tensor& starts, int64_t array_size,
                         int64_t block_size, int64_t max_blocks, int64_t occurrences, int64_t num_values) {
  TORCH_CHECK_VALUE(block_size >= 1 && array_size >= block_size, "robe: array_size (", array_size,
                    ") must be >= block_size (", block_size, ")");
  Problem pb = make_problem(num_values, offsets, batch, meta, block_size, max_blocks, occurrences);
  check_starts(starts, pb, array_size);
  auto g = grad_out.contiguous();
  check_grad_out(g, pb, max_out_col(pb));
  check_weights(weights, g, pb);
  auto grad = hugepage_zeros({array_size}, g.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "robe_backward", [&] {
    const scalar_t* w = weights.numel() > 0 ? weights.data_ptr<scalar_t>() : nullptr;
    backward_dispatch<scalar_t>(pb, block_size, w, g.data_ptr<scalar_t>(), g.size(1), starts,
                            grad.data_ptr<scalar_t>(), array_size, scalar_t(1));
  });
  return grad;
}

// Fused SGD: array -= lr * dL/dM, touching only the slots hit in this step (no dense gradient).
void robe_backward_sgd(at::Tensor array, const at::Tensor& grad_out, const at::Tensor& weights,
                       const at::Tensor& offsets, int64_t batch, const at::Tensor& meta, const at::Tensor& starts,
                       int64_t block_size, int64_t max_blocks, int64_t occurrences, int64_t num_values, double lr) {
  TORCH_CHECK_VALUE(array.dim() == 1 && array.is_contiguous() && array.device().is_cpu(),
              "robe: array must be a contiguous 1-D CPU tensor");
  TORCH_CHECK_VALUE(block_size >= 1 && array.size(0) >= block_size, "robe: array_size (", array.size(0),
                    ") must be >= block_size (", block_size, ")");
  Problem pb = make_problem(num_values, offsets, batch, meta, block_size, max_blocks, occurrences);
  check_starts(starts, pb, array.size(0));
  auto g = grad_out.to(array.scalar_type()).contiguous();
  check_grad_out(g, pb, max_out_col(pb));
  check_weights(weights, array, pb);
  AT_DISPATCH_FLOATING_TYPES(array.scalar_type(), "robe_backward_sgd", [&] {
    const scalar_t* w = weights.numel() > 0 ? weights.data_ptr<scalar_t>() : nullptr;
    backward_dispatch<scalar_t>(pb, block_size, w, g.data_ptr<scalar_t>(), g.size(1), starts,
                            array.data_ptr<scalar_t>(), array.size(0), static_cast<scalar_t>(-lr));
  });
}

// For tests: SlotDivider(divisor, max_dividend) applied to each of `dividends` (int64 >= 0).
at::Tensor slot_quotients(int64_t divisor, int64_t max_dividend, const at::Tensor& dividends) {
  TORCH_CHECK_VALUE(divisor >= 1 && dividends.dtype() == at::kLong && dividends.dim() == 1,
                    "slot_quotients: divisor >= 1 and a 1-D int64 tensor");
  const SlotDivider div(divisor, max_dividend);
  auto in = dividends.contiguous();
  auto out = at::empty_like(in);
  const int64_t* x = in.data_ptr<int64_t>();
  int64_t* q = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < in.numel(); ++i) q[i] = div(x[i]);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "robe_dist CPU operators: ROBE-Z pooled lookup, exact backward, fused SGD backward";
  // Bumped whenever a signature or the `starts` layout changes: robe_dist/ops.py refuses (with a
  // warning naming the fix) an extension built from other sources.
  m.attr("ABI_VERSION") = 4;
  m.def("robe_forward", &robe_forward);
  m.def("robe_backward", &robe_backward);
  m.def("robe_backward_sgd", &robe_backward_sgd);
  m.def("hugepage_zeros", &robe_dist::hugepage_zeros);
  m.def("set_bus_error_message", &robe_dist::set_bus_error_message);
  m.def("_slot_quotients", &slot_quotients);  // tests only
  m.def("_work_lists_ready", [] { return static_cast<int64_t>(list_pool().ready()); });  // tests only
  m.def("_clear_work_lists", [] { list_pool().clear(); });                               // tests only
}
