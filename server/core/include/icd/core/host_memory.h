// How the process's host allocator treats large freed blocks.
//
// glibc serves blocks above 32 MB (and every large block of a non-main
// thread's arena) with a fresh mmap and unmaps them on free, so each large
// temporary tensor (a [C, C] statistic or gain matrix: 200 MB at 5120
// channels) costs a page fault per 4 KB page and the kernel zeroing it,
// again on every allocation (what that cost a 5120-channel solve:
// docs/traces.md).
#ifndef ICD_CORE_HOST_MEMORY_H_
#define ICD_CORE_HOST_MEMORY_H_

#include <string>

#include "icd/core/export.h"

namespace icd {

// Keeps freed host memory for reuse: one glibc arena (gRPC threads included;
// small blocks still come from each thread's tcache), large blocks from the
// heap rather than mmap, and the heap's top trimmed only beyond 1 GiB. Call
// once, before starting threads. The cost: the resident size stays near its
// peak after large temporaries are freed (a model's unload, above 1 GiB at
// the top of the heap, is returned). Returns a line for the log: what was
// set, or why nothing was (not glibc).
ICD_CORE_API std::string KeepFreedHostMemory();

}  // namespace icd

#endif  // ICD_CORE_HOST_MEMORY_H_
