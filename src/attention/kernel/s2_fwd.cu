// S2-Attention forward: dispatch of the runtime (dtype, head dim) to the templated
// launcher. Contract of the kernel: s2_fwd_kernel.cuh; of the parameters: s2_params.h.
#include <stdexcept>
#include <string>

#include "longlora/attention/kernel/s2_params.h"
#include "s2_launch.cuh"

namespace longlora::attention::kernel {

template <typename T, int D>
static void s2_fwd_dim(const S2FwdParams& p, cudaStream_t stream) {
  // The alternative tiles (s2_traits.cuh) keep both code paths tested and comparable.
  static const bool alt = s2_env_flag("LONGLORA_S2_FWD_ALT");
  if (alt) {
    launch_s2_fwd<S2FwdAltConfig<T, D>>(p, stream);
  } else {
    launch_s2_fwd<S2FwdConfig<T, D>>(p, stream);
  }
}

template <typename T>
static void s2_fwd_dtype(const S2FwdParams& p, cudaStream_t stream) {
  switch (p.D) {
    case 64: s2_fwd_dim<T, 64>(p, stream); return;
    case 128: s2_fwd_dim<T, 128>(p, stream); return;
    default: throw std::runtime_error("s2_fwd: head dim " + std::to_string(p.D) + " not in {64, 128}");
  }
}

void s2_fwd(const S2FwdParams& p, cudaStream_t stream) {
  if (p.dtype == S2Dtype::BF16) {
    s2_fwd_dtype<__nv_bfloat16>(p, stream);
  } else {
    s2_fwd_dtype<__half>(p, stream);
  }
}

}  // namespace longlora::attention::kernel
