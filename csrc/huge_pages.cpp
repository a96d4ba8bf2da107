// Transparent huge pages in `madvise` mode (huge_pages.h): an N x N output is
// written once, and faulting it in 4 KiB pages costs more than the fused
// chain's arithmetic on flat kernels.
#include "huge_pages.h"

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace torchntk {

torch::Tensor empty_huge_pages(at::IntArrayRef shape, const torch::TensorOptions& options) {
  torch::Tensor tensor = torch::empty(shape, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (tensor.device().is_cpu() && tensor.nbytes() >= 2 * kHuge) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(tensor.data_ptr());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t last = (begin + tensor.nbytes()) & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return tensor;
}

}  // namespace torchntk
