// S2-Attention backward: dispatch of the runtime (dtype, head dim) to the templated
// launcher. Contract of the kernels: s2_bwd_kernel.cuh; of the parameters: s2_params.h.
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "longlora/attention/kernel/s2_params.h"
#include "s2_launch.cuh"

namespace longlora::attention::kernel {

// LONGLORA_S2_BWD_ALT=1 runs the alternative tiles (s2_traits.cuh), so that the tests
// keep both correct and `bench attention` can compare them.
static bool alt_config() {
  static const bool alt = [] {
    const char* e = std::getenv("LONGLORA_S2_BWD_ALT");
    return e != nullptr && std::string(e) == "1";
  }();
  return alt;
}

template <typename T, int D>
static void s2_bwd_dim(const S2BwdParams& p, cudaStream_t stream) {
  if (alt_config()) {
    launch_s2_bwd<S2BwdAltConfig<T, D>>(p, stream);
  } else {
    launch_s2_bwd<S2BwdConfig<T, D>>(p, stream);
  }
}

template <typename T>
static void s2_bwd_dtype(const S2BwdParams& p, cudaStream_t stream) {
  switch (p.D) {
    case 64: s2_bwd_dim<T, 64>(p, stream); return;
    case 128: s2_bwd_dim<T, 128>(p, stream); return;
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
