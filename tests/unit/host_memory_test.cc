// KeepFreedHostMemory: a large block freed and allocated again comes from
// memory the process already has, without new page faults.
#include "icd/core/host_memory.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <cstdlib>
#include <cstring>

namespace icd {
namespace {

constexpr size_t kBytes = size_t{256} << 20;

// Minor page faults taken while allocating, touching and freeing kBytes.
long FaultsOfOneLargeTemporary() {
  rusage before{}, after{};
  getrusage(RUSAGE_SELF, &before);
  void* block = std::malloc(kBytes);
  EXPECT_NE(block, nullptr);
  std::memset(block, 1, kBytes);
  asm volatile("" : : "g"(block) : "memory");  // the block escapes: no elision
  std::free(block);
  getrusage(RUSAGE_SELF, &after);
  return after.ru_minflt - before.ru_minflt;
}

TEST(HostMemoryTest, LargeTemporariesReuseFreedMemory) {
  const long pages = static_cast<long>(kBytes / 4096);
  FaultsOfOneLargeTemporary();
  const long with_defaults = FaultsOfOneLargeTemporary();  // glibc: a fresh mmap each time
  EXPECT_THAT(KeepFreedHostMemory(), ::testing::HasSubstr("kept for reuse"));
  FaultsOfOneLargeTemporary();  // the heap grows once
  const long kept = FaultsOfOneLargeTemporary();
  std::printf("minor faults per 256 MB temporary: %ld with glibc's defaults, %ld kept (%ld pages)\n",
              with_defaults, kept, pages);
  EXPECT_LT(kept, pages / 100);
  EXPECT_LT(kept, with_defaults);
}

}  // namespace
}  // namespace icd
