// robe_dist._C: huge-page buffers and their cache (hugepage.h).

#include "hugepage.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

namespace robe_dist {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;

struct Mapping {
  void* base;
  size_t total;
};

// A lookup's step holds a few distinct buffers (the pooled output, the block starts, a dense
// gradient): the cache keeps 8, so one lookup's buffers and another collection's (or a
// benchmark's other variant's) do not push each other out each step.
constexpr size_t kMaxCached = 8;
constexpr size_t kMaxCachedBytes = size_t(512) << 20;

struct BufferCache {
  std::mutex mutex;
  std::vector<Mapping> free;
  size_t bytes = 0;
  const bool enabled = [] {
    const char* env = std::getenv("ROBE_DIST_BUFFER_CACHE");
    return env == nullptr || std::string(env) != "0";
  }();

  // The smallest cached mapping of at least `total` bytes and at most 1/8 more (a buffer whose
  // size moves a little between steps, as a batch's ids vary, reuses its mapping).
  bool take(size_t total, Mapping* out) {
    std::lock_guard<std::mutex> lock(mutex);
    size_t best = free.size();
    for (size_t i = 0; i < free.size(); ++i) {
      if (free[i].total >= total && free[i].total <= total + total / 8 &&
          (best == free.size() || free[i].total < free[best].total)) {
        best = i;
      }
    }
    if (best == free.size()) return false;
    *out = free[best];
    free.erase(free.begin() + best);
    bytes -= out->total;
    return true;
  }

  // Keeps m, dropping the least recently released mappings where the cache would hold too many.
  void give(Mapping m) {
    std::vector<Mapping> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (enabled && m.total <= kMaxCachedBytes) {
        while (!free.empty() && (free.size() >= kMaxCached || bytes + m.total > kMaxCachedBytes)) {
          dropped.push_back(free.front());
          bytes -= free.front().total;
          free.erase(free.begin());
        }
        free.push_back(m);
        bytes += m.total;
      } else {
        dropped.push_back(m);
      }
    }
    for (const Mapping& d : dropped) munmap(d.base, d.total);
  }
};

BufferCache& buffer_cache() {
  static BufferCache* cache = new BufferCache();  // never destroyed: deleters may run at exit
  return *cache;
}

// An uninitialised tensor in a huge-page mapping; *fresh tells whether its pages are new (and
// therefore zero). Small sizes, or a failed mapping, fall back to ATen's allocator.
at::Tensor hugepage_empty_impl(at::IntArrayRef sizes, at::ScalarType dtype, bool* fresh) {
  const int64_t numel = c10::multiply_integers(sizes);
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  const auto options = at::TensorOptions().dtype(dtype);
  *fresh = false;
  if (bytes < kHugePage) return at::empty(sizes, options);
  const size_t total = (bytes + kHugePage - 1) / kHugePage * kHugePage + kHugePage;  // + room to align
  Mapping m{nullptr, total};
  if (!buffer_cache().take(total, &m)) {
    void* base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return at::empty(sizes, options);
    m.base = base;
    *fresh = true;
  }
  const uintptr_t aligned = (reinterpret_cast<uintptr_t>(m.base) + kHugePage - 1) & ~(uintptr_t)(kHugePage - 1);
  if (*fresh) madvise(reinterpret_cast<void*>(aligned), total - kHugePage, MADV_HUGEPAGE);
  return at::from_blob(
      reinterpret_cast<void*>(aligned), sizes, [m](void*) { buffer_cache().give(m); }, options);
}

}  // namespace

at::Tensor hugepage_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  bool fresh;
  return hugepage_empty_impl(sizes, dtype, &fresh);
}

at::Tensor hugepage_zeros(at::IntArrayRef sizes, at::ScalarType dtype) {
  bool fresh;
  at::Tensor t = hugepage_empty_impl(sizes, dtype, &fresh);
  if (!fresh) t.zero_();  // fresh anonymous pages are already zero
  return t;
}

}  // namespace robe_dist
