// S2-Attention backward: dispatch of the runtime (dtype, head dim) to the templated
// launcher. Contract of the kernels: s2_bwd_kernel.cuh; of the parameters: s2_params.h.
#include <stdexcept>
#include <string>

#include "longlora/attention/kernel/s2_params.h"
#include "s2_launch.cuh"

namespace longlora::attention::kernel {

template <typename T, int D>
static void s2_bwd_dim(const S2BwdParams& p, cudaStream_t stream) {
  // The alternative tiles (s2_traits.cuh: the one-dimensional kernel, s2_bwd_kernel.cuh)
  // keep both code paths tested and comparable; LONGLORA_S2_BWD_2D=1 selects the
  // two-dimensional warp tiling (s2_bwd2d_kernel.cuh) also where it is not the default.
  // On H100/H200 at D = 128, the wgmma kernel (s2_bwd_wgmma_kernel.cuh; 17.9 ms against
  // 22.7 ms for the 2-D-tiled mma.sync kernel at L = 32768, docs/benchmarks.md);
  // LONGLORA_S2_BWD_MMA=1 forces the mma.sync kernels there.
  static const bool alt = s2_env_flag("LONGLORA_S2_BWD_ALT");
  static const bool tiled_2d = s2_env_flag("LONGLORA_S2_BWD_2D");
  static const bool wgmma = !s2_env_flag("LONGLORA_S2_BWD_MMA") && s2_wgmma_available();
  if constexpr (D == 128) {
    if (wgmma && !alt && !tiled_2d) {
      launch_s2_bwd<S2BwdWgmmaTraits<T, D>>(p, stream);
      return;
    }
  }
  if (tiled_2d) {
    launch_s2_bwd<S2Bwd2DTraits<T, D>>(p, stream);
  } else if (alt) {
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
