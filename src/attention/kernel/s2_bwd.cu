// S2-Attention backward: dispatch of the runtime (dtype, head dim) to the templated
// launcher. Contract of the kernels: s2_bwd_kernel.cuh; of the parameters: s2_params.h.
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "longlora/attention/kernel/s2_params.h"
#include "s2_launch.cuh"

namespace longlora::attention::kernel {

// Keys per CTA: 64 (4 warps, the default) or 128 (8 warps sharing each Q/dO tile,
// half the dQ atomics per FLOP), from LONGLORA_S2_BWD_BLOCK_N; a tuning knob for
// `bench attention`.
static bool wide_key_tiles() {
  static const bool wide = [] {
    const char* e = std::getenv("LONGLORA_S2_BWD_BLOCK_N");
    return e != nullptr && std::string(e) == "128";
  }();
  return wide;
}

template <typename T, int D>
static void s2_bwd_dim(const S2BwdParams& p, cudaStream_t stream) {
  if (wide_key_tiles()) {
    launch_s2_bwd<S2BwdTraits<T, D, (D == 64 ? 64 : 32), 128, 8>>(p, stream);
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
