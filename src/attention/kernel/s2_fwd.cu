// S2-Attention forward: dispatch of the runtime (dtype, head dim) to the templated
// launcher. Contract of the kernel: s2_fwd_kernel.cuh; of the parameters: s2_params.h.
#include <stdexcept>
#include <string>

#include "longlora/attention/kernel/s2_params.h"
#include "s2_launch.cuh"

namespace longlora::attention::kernel {

// 1 where this binary holds sm_90a code for the running device (the wgmma kernel's
// instructions exist only there), else 0.
__global__ void s2_wgmma_probe_kernel(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 1;
#else
  *out = 0;
#endif
}

// Whether the wgmma forward can run on the current device: compute capability 9.0 and
// sm_90a code in the binary (CMAKE_CUDA_ARCHITECTURES holds 90a). Probed once.
static bool s2_wgmma_available() {
  static const bool ok = [] {
    int dev = 0;
    cudaDeviceProp prop;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess) return false;
    if (prop.major != 9 || prop.minor != 0) return false;
    int* flag = nullptr;
    int host = 0;
    S2_CUDA_CHECK(cudaMalloc(&flag, sizeof(int)));
    s2_wgmma_probe_kernel<<<1, 1>>>(flag);
    const cudaError_t e = cudaMemcpy(&host, flag, sizeof(int), cudaMemcpyDeviceToHost);
    cudaFree(flag);
    S2_CUDA_CHECK(e);
    return host == 1;
  }();
  return ok;
}

template <typename T, int D>
static void s2_fwd_dim(const S2FwdParams& p, cudaStream_t stream) {
  // The alternative tiles (s2_traits.cuh) keep both code paths tested and comparable.
  // LONGLORA_S2_FWD_WGMMA=1 selects the Hopper kernel (s2_fwd_wgmma_kernel.cuh) where it
  // can run.
  static const bool alt = s2_env_flag("LONGLORA_S2_FWD_ALT");
  static const bool wgmma = s2_env_flag("LONGLORA_S2_FWD_WGMMA") && s2_wgmma_available();
  if (wgmma) {
    launch_s2_fwd<S2FwdWgmmaTraits<T, D>>(p, stream);
  } else if (alt) {
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
