#include "longlora/common/device.h"

#include "longlora/common/error.h"

#include <sys/resource.h>
#include <unistd.h>

#ifdef LONGLORA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace longlora {

torch::Device pick_device(const std::string& name) {
  if (name == "cpu") return torch::kCPU;
  if (name == "cuda") {
    if (!torch::cuda::is_available()) throw Error("device: cuda requested but no CUDA device is available");
    return torch::Device(torch::kCUDA, 0);
  }
  if (name == "auto")
    return torch::cuda::is_available() ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  throw Error("device: '" + name + "' is unknown (expected auto, cpu or cuda)");
}

torch::ScalarType pick_dtype(const std::string& name, const torch::Device& device) {
  if (name == "auto") return device.is_cuda() ? torch::kBFloat16 : torch::kFloat32;
  if (name == "fp32") return torch::kFloat32;
  if (name == "bf16") return torch::kBFloat16;
  if (name == "fp16") return torch::kFloat16;
  throw Error("dtype: '" + name + "' is unknown (expected auto, fp32, bf16 or fp16)");
}

std::string dtype_string(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32: return "fp32";
    case torch::kBFloat16: return "bf16";
    case torch::kFloat16: return "fp16";
    default: return c10::toString(t);
  }
}

namespace {

// The caching allocator's peak reserved (or allocated) bytes on a GPU in GiB; the
// process's peak resident set elsewhere.
double peak_gib(const torch::Device& d, bool reserved) {
#ifdef LONGLORA_WITH_CUDA
  if (d.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(d.index());
    return (reserved ? stats.reserved_bytes : stats.allocated_bytes)[0].peak / double(1 << 30);
  }
#endif
  (void)reserved;
  struct rusage ru {};
  ::getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss / double(1 << 20);  // KiB -> GiB
}

}  // namespace

double device_memory_gib(const torch::Device& d) {
#ifdef LONGLORA_WITH_CUDA
  if (d.is_cuda())
    return at::cuda::getDeviceProperties(d.has_index() ? d.index() : at::cuda::current_device())->totalGlobalMem /
           double(1 << 30);
#endif
  return static_cast<double>(::sysconf(_SC_PHYS_PAGES)) * static_cast<double>(::sysconf(_SC_PAGESIZE)) / double(1 << 30);
}

double peak_memory_gib(const torch::Device& d) { return peak_gib(d, /*reserved=*/true); }
double peak_allocated_gib(const torch::Device& d) { return peak_gib(d, /*reserved=*/false); }

}  // namespace longlora
