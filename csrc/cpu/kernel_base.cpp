// Portable build of the CPU kernels (the compiler's baseline instruction set, e.g. SSE2 on x86-64).
#include <cstdint>
#include <cstring>

#include "kernel_api.h"

#define CALIBOPS_ISA_LEVEL 0
#define CALIBOPS_ISA_NS isa_base
#define CALIBOPS_ISA_NAME "base"
#include "kernel_impl.h"

namespace calibops {
namespace cpu {
const KernelTable* kernels_base() { return &isa_base::kTable; }
}  // namespace cpu
}  // namespace calibops
