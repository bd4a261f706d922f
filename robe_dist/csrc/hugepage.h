// robe_dist._C: large CPU buffers in transparent huge pages, reused across steps.
//
// ROBE reads and writes blocks at random offsets of its array: with 4 KiB pages nearly every
// block is a TLB miss, with 2 MiB pages the whole 108 MB array needs 54 TLB entries. The array,
// its gradient, the pooled output and the block starts live in their own anonymous mappings,
// 2 MiB aligned and advised MADV_HUGEPAGE. Released per-step buffers go to a
// small cache (at most 8 mappings, 512 MiB in all; ROBE_DIST_BUFFER_CACHE=0 turns it off), so the
// next step reuses them instead of faulting fresh pages in. Buffers under 2 MiB, or a failed
// mapping, come from ATen's allocator.
#pragma once

#include <ATen/ATen.h>

namespace robe_dist {

// Uninitialised.
at::Tensor hugepage_empty(at::IntArrayRef sizes, at::ScalarType dtype);
// Zeroed (fresh mappings are zero already; reused ones are cleared).
at::Tensor hugepage_zeros(at::IntArrayRef sizes, at::ScalarType dtype);

}  // namespace robe_dist
