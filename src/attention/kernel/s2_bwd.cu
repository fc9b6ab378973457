// S2-Attention backward: dispatch of the runtime (dtype, head dim) to the templated
// launcher. Contract of the kernels: s2_bwd_kernel.cuh; of the parameters: s2_params.h.
#include <stdexcept>
#include <string>

#include "longlora/attention/kernel/s2_params.h"
#include "s2_launch.cuh"

namespace longlora::attention::kernel {

template <typename T>
static void s2_bwd_dtype(const S2BwdParams& p, cudaStream_t stream) {
  switch (p.D) {
    case 64: launch_s2_bwd<T, 64>(p, stream); return;
    case 128: launch_s2_bwd<T, 128>(p, stream); return;
    default: throw std::runtime_error("s2_bwd: head dim " + std::to_string(p.D) + " not in {64, 128}");
  }
}

void s2_bwd(const S2BwdParams& p, cudaStream_t stream) {
  if (p.dtype == S2Dtype::BF16) {
    s2_bwd_dtype<__nv_bfloat16>(p, stream);
  } else {
    s2_bwd_dtype<__half>(p, stream);
  }
}

}  // namespace longlora::attention::kernel
