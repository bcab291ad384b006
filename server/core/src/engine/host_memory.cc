#include "icd/core/host_memory.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace icd {

std::string KeepFreedHostMemory() {
#if defined(__GLIBC__)
  // Each mallopt returns 1 on success.
  const bool ok = mallopt(M_ARENA_MAX, 1) == 1 && mallopt(M_MMAP_MAX, 0) == 1 &&
                  mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 &&
                  mallopt(M_TOP_PAD, 256 << 20) == 1;
  return ok ? "host memory: freed blocks kept for reuse (glibc: one arena, no mmap, "
              "heap trimmed beyond 1 GiB)"
            : "host memory: glibc refused a mallopt setting; its defaults apply";
#else
  return "host memory: not glibc; the allocator's defaults apply";
#endif
}

}  // namespace icd
