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
// The backward partitions the array's slots between threads: the blocks are bucketed by the
// thread that owns their slots, and each thread adds only into its own slots (backward_impl).
// No atomics, no per-thread copies of the array, and the summation order of each slot is
// independent of the thread count, so gradients are bit-for-bit deterministic.

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
#include <type_traits>
#include <vector>
#include <cstdint>
#include <limits>
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

// Writes n values from src (a pooled row built in cache) to dst, with non-temporal stores where
// it can (float, x86, dst 16-byte aligned, n a multiple of 4; plain copies otherwise): a pooled
// output larger than the caches is written once and read back from memory by the next operator
// anyway, so this skips the read-for-ownership of each of its lines and keeps the array cached.
template <typename scalar_t>
inline void stream_row(scalar_t* dst, const scalar_t* src, int64_t n) {
#if defined(__SSE__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0 && n % 4 == 0) {
      for (int64_t j = 0; j < n; j += 4) _mm_stream_ps(dst + j, _mm_loadu_ps(src + j));
      return;
    }
  }
#endif
  std::copy(src, src + n, dst);
}

inline void store_fence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

template <typename scalar_t, typename start_t>
void forward_impl(const Problem& pb, const Hash& hash, const scalar_t* array, const scalar_t* weights,
                  scalar_t* out, int64_t out_dim, start_t* starts) {
  std::atomic<int64_t> bad_feature{-1};
  std::atomic<int64_t> bad_id{0};
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
          if (!hash.starts_for(pb.values[i], m, nb, st)) {
            int64_t expected = -1;
            if (bad_feature.compare_exchange_strong(expected, f)) bad_id.store(pb.values[i]);
            for (int64_t blk = 0; blk < nb; ++blk) st[blk] = 0;
            continue;
          }
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
  const int64_t f = bad_feature.load();
  TORCH_CHECK_VALUE(f < 0, "robe: id ", bad_id.load(), " of feature #", f,
              " is outside [0, num_embeddings) = [0, ", pb.meta[f * kMetaCols + kNumEmbeddings],
              ") of its table; the 'paper' mapping needs ids below num_embeddings");
}

// Calls fn(s, g, scale) for every block of the bags [b0, b1) in the fixed walk order (bag-major,
// then feature, value, block): the block starts at slot s of the array, its upstream gradient at
// grad_out[g], and it enters the pooled output with factor `scale` (its weight, times 1 / bag
// length for MEAN).
template <typename scalar_t, typename start_t, typename Fn>
inline void walk_blocks(const Problem& pb, int64_t z, const scalar_t* weights, int64_t out_dim,
                        const start_t* starts, int64_t b0, int64_t b1, Fn&& fn) {
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t f = 0; f < pb.num_features; ++f) {
      const int64_t* m = pb.meta + f * kMetaCols;
      const int64_t* off = pb.bag_offsets(f);
      const int64_t bag_lo = off[b], bag_hi = off[b + 1];
      if (bag_hi == bag_lo) continue;
      const int64_t nb = m[kDim] / z;
      const scalar_t bag_scale =
          m[kPooling] == kPoolMean ? scalar_t(1) / static_cast<scalar_t>(bag_hi - bag_lo) : scalar_t(1);
      const int64_t grow = b * out_dim + m[kOutCol];
      for (int64_t i = bag_lo; i < bag_hi; ++i) {
        const start_t* st = starts + pb.start_index(f, i);
        const scalar_t scale = weights ? weights[i] * bag_scale : bag_scale;
        for (int64_t blk = 0; blk < nb; ++blk) fn(st[blk], grow + blk * z, scale);
      }
    }
  }
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

// One block of the backward's work list: target[s + j] += alpha * grad_out[g + j] (j < Z).
// index_t is int32_t where the array and grad_out allow it: 12 bytes an entry instead of 24.
template <typename scalar_t, typename index_t>
struct BlockRef {
  index_t s;
  index_t g;
  scalar_t alpha;
};

constexpr int64_t kPrefetchAhead = 16;  // work-list entries between a prefetch and its use

// floor(s / d) for 0 <= s < 2^32 and 0 < d < 2^32 by a multiply with a precomputed reciprocal
// (Granlund-Montgomery / Lemire): magic = floor((2^64 - 1) / d) + 1 exceeds 2^64 / d by at most
// 1, so the product errs by less than s / 2^64 < 1 / d, which cannot carry into the next integer.
// The backward's bucketing divides twice per block; a 64-bit idiv there cost more than the adds.
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

// Adds alpha * dL/dM into `target` (a zeroed gradient with alpha = 1, or the array itself with
// alpha = -lr for the fused SGD update).
//
// Each of the T threads owns one slot range of the array (aligned to 16 floats, one 64-byte line,
// so no two threads write one line) and adds only into it: no atomics, no per-thread copies of
// the array. The blocks are bucketed by owner first, so each thread reads only its own work:
//   1. the batch is cut into T bag ranges; thread w counts its range's blocks per owner;
//   2. prefix sums give every (range, owner) pair its place in one work list, grouped by owner
//      and, within an owner, in range order; thread w writes its blocks there;
//   3. thread o walks owner o's list, prefetching the slots a few entries ahead, and adds.
// The walk touches every block twice (steps 1, 2) in parallel instead of once per thread, and an
// owner's list is the fixed walk order restricted to its slots: every slot sums its terms in
// the same order whatever T is, so gradients are bit-for-bit deterministic and independent of the
// thread count. A block that straddles two ranges is listed for both, each adding its part.
template <typename scalar_t, typename index_t, typename start_t>
void backward_impl(const Problem& pb, int64_t z, const scalar_t* weights, const scalar_t* grad_out,
                   int64_t out_dim, const start_t* starts, scalar_t* target, int64_t array_size,
                   scalar_t alpha) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = ((array_size + threads - 1) / threads + 15) / 16 * 16;
  const int64_t owners = (array_size + chunk - 1) / chunk;
  const SlotDivider owner_of(chunk, array_size);  // the owner of slot s: s / chunk
  const int64_t block_bytes = z * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t max_start = array_size - z;
  auto check_starts_in_range = [&](bool found, int64_t bad) {
    TORCH_CHECK_VALUE(!found, "robe: the backward's block starts must lie in [0, ", max_start,
                      "] (array_size ", array_size, ", block_size ", z, "), found ", bad,
                      ": starts of another array, or not the forward's");
  };
  if (owners <= 1 || pb.batch < 2) {  // one range: no work list; each bag's slots prefetched a bag ahead
    bool found = false;  // checked before anything is written (the fused update writes the array)
    int64_t bad = 0;
    walk_blocks<scalar_t, start_t>(pb, z, weights, out_dim, starts, 0, pb.batch, [&](int64_t s, int64_t, scalar_t) {
      if (s < 0 || s > max_start) found = true, bad = s;
    });
    check_starts_in_range(found, bad);
    for (int64_t b = 0; b < pb.batch; ++b) {
      walk_blocks<scalar_t, start_t>(pb, z, weights, out_dim, starts, b + 1, std::min(b + 2, pb.batch),
                            [&](int64_t s, int64_t, scalar_t) { prefetch_lines(target + s, block_bytes, true); });
      walk_blocks<scalar_t, start_t>(pb, z, weights, out_dim, starts, b, b + 1, [&](int64_t s, int64_t g, scalar_t scale) {
        add_block<scalar_t>(target, s, z, 0, array_size, alpha * scale, grad_out + g);
      });
    }
    return;
  }
  const int64_t ranges = std::min(threads, pb.batch);
  const int64_t bags_per_range = (pb.batch + ranges - 1) / ranges;
  auto range_bags = [&](int64_t w) {
    return std::make_pair(std::min(pb.batch, w * bags_per_range), std::min(pb.batch, (w + 1) * bags_per_range));
  };
  // 1. blocks per (range, owner); starts outside the array stop here, before anything is written
  std::vector<int64_t> pos(ranges * owners, 0);
  std::atomic<bool> found{false};
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, ranges, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      int64_t* count = pos.data() + w * owners;
      const auto [b0, b1] = range_bags(w);
      walk_blocks<scalar_t, start_t>(pb, z, weights, out_dim, starts, b0, b1, [&](int64_t s, int64_t, scalar_t) {
        if (s < 0 || s > max_start) {
          bad.store(s);
          found.store(true);
          return;
        }
        for (int64_t o = owner_of(s), last = owner_of(s + z - 1); o <= last; ++o) ++count[o];
      });
    }
  });
  check_starts_in_range(found.load(), bad.load());
  // 2. where each (range, owner) writes: grouped by owner, ranges in order
  std::vector<int64_t> owner_begin(owners + 1, 0);
  for (int64_t o = 0, next = 0; o < owners; ++o) {
    owner_begin[o] = next;
    for (int64_t w = 0; w < ranges; ++w) {
      const int64_t n = pos[w * owners + o];
      pos[w * owners + o] = next;
      next += n;
    }
    owner_begin[o + 1] = next;
  }
  // the work list: a buffer of this thread's, kept between steps (not from the huge-page cache,
  // whose few slots belong to the output and the gradient)
  thread_local std::vector<BlockRef<scalar_t, index_t>> work;
  if (work.size() < static_cast<size_t>(owner_begin[owners])) work.resize(owner_begin[owners]);
  BlockRef<scalar_t, index_t>* refs = work.data();
  at::parallel_for(0, ranges, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      int64_t* next = pos.data() + w * owners;
      const auto [b0, b1] = range_bags(w);
      walk_blocks<scalar_t, start_t>(pb, z, weights, out_dim, starts, b0, b1, [&](int64_t s, int64_t g, scalar_t scale) {
        const scalar_t a = alpha * scale;
        for (int64_t o = owner_of(s), last = owner_of(s + z - 1); o <= last; ++o) refs[next[o]++] = BlockRef<scalar_t, index_t>{static_cast<index_t>(s), static_cast<index_t>(g), a};
      });
    }
  });
  // 3. each owner adds its blocks into its range
  at::parallel_for(0, owners, 1, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t lo = o * chunk, hi = std::min(array_size, lo + chunk);
      const int64_t end = owner_begin[o + 1];
      for (int64_t k = owner_begin[o]; k < end; ++k) {
        if (k + kPrefetchAhead < end) {
          const BlockRef<scalar_t, index_t>& r = refs[k + kPrefetchAhead];
          const int64_t a = std::max<int64_t>(r.s, lo), e = std::min<int64_t>(int64_t(r.s) + z, hi);
          prefetch_lines(target + a, (e - a) * static_cast<int64_t>(sizeof(scalar_t)), true);
          prefetch_lines(grad_out + r.g, block_bytes, false);
        }
        const BlockRef<scalar_t, index_t>& r = refs[k];
        add_block<scalar_t>(target, r.s, z, lo, hi, r.alpha, grad_out + r.g);
      }
    }
  });
}

constexpr int64_t kMax32 = std::numeric_limits<int32_t>::max();

// The forward's `starts` dtype: int32 where every start (< array_size) fits.
at::ScalarType starts_dtype(int64_t array_size) { return array_size <= kMax32 ? at::kInt : at::kLong; }

// backward_impl for the starts' dtype, with 32-bit work-list entries where every slot and
// grad_out offset fits.
template <typename scalar_t, typename start_t>
void backward_dispatch(const Problem& pb, int64_t z, const scalar_t* weights, const scalar_t* grad_out,
                       int64_t out_dim, const start_t* starts, scalar_t* target, int64_t array_size,
                       scalar_t alpha) {
  if (array_size <= kMax32 && pb.batch * out_dim <= kMax32) {
    backward_impl<scalar_t, int32_t, start_t>(pb, z, weights, grad_out, out_dim, starts, target, array_size, alpha);
  } else {
    backward_impl<scalar_t, int64_t, start_t>(pb, z, weights, grad_out, out_dim, starts, target, array_size, alpha);
  }
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
  auto starts = at::full({occurrences * pb.num_values * max_blocks}, -1, values.options().dtype(starts_dtype(array.size(0))));
  auto out = hugepage_empty({pb.batch, out_dim}, array.scalar_type());  // every column a feature owns is written
  if (max_out_col(pb) < out_dim || pb.num_features == 0) out.zero_();
  AT_DISPATCH_FLOATING_TYPES(array.scalar_type(), "robe_forward", [&] {
    const scalar_t* w = weights.numel() > 0 ? weights.data_ptr<scalar_t>() : nullptr;
    if (starts.scalar_type() == at::kInt) {
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
}
