// S2-Attention forward: dispatch of the runtime (dtype, head dim) to the templated
// launcher. Contract of the kernel: s2_fwd_kernel.cuh; of the parameters: s2_params.h.
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "longlora/attention/kernel/s2_params.h"
#include "s2_launch.cuh"

namespace longlora::attention::kernel {

// LONGLORA_S2_FWD_ALT=1 runs the alternative tiles (s2_traits.cuh), so that the tests
// keep both code paths correct and `bench attention` can compare them.
static bool alt_config() {
  static const bool alt = [] {
    const char* e = std::getenv("LONGLORA_S2_FWD_ALT");
    return e != nullptr && std::string(e) == "1";
  }();
  return alt;
}

template <typename T, int D>
static void s2_fwd_dim(const S2FwdParams& p, cudaStream_t stream) {
  if (alt_config()) {
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
