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

// Probed once per process, on the first device that asks.
bool s2_wgmma_available() {
  static const bool ok = [] {
    int dev = 0;
    cudaDeviceProp prop;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess) return false;
    if (prop.major != 9 || prop.minor != 0) return false;
    int* flag = nullptr;
    int host = 0;
    S2_CUDA_CHECK(cudaMalloc(&flag, sizeof(int)));
    s2_wgmma_probe_kernel<<<1, 1>>>(flag);
    cudaError_t e = cudaGetLastError();  // no code for this device at all: not sm_90a
    if (e == cudaSuccess) e = cudaMemcpy(&host, flag, sizeof(int), cudaMemcpyDeviceToHost);
    cudaFree(flag);
    return e == cudaSuccess && host == 1;
  }();
  return ok;
}

// The forward kernel for this process. On H100/H200 the wgmma kernel with its warpgroups
// taking turns (s2_fwd_wgmma_kernel.cuh, kStagger; 4.5 ms against 4.9 ms without the
// turns and 7.4 ms for the mma.sync kernel at L = 32768 on the H200, docs/benchmarks.md;
// LONGLORA_S2_FWD_STAGGER=0 drops the turns); LONGLORA_S2_FWD_MMA=1 forces the mma.sync kernel there. The
// alternative tiles (s2_traits.cuh, LONGLORA_S2_FWD_ALT=1) keep the mma.sync kernel's two
// code paths tested and comparable. LONGLORA_S2_FWD_PIPE=1 picks the wgmma kernel
// pipelined within each warpgroup (S2FwdWgmmaPipeTraits), an experiment: correct on the
// H100 but slower there (5.38-5.46 ms against 5.20-5.23 ms at L = 32768). Read once.
enum class S2FwdKind { kWgmma, kWgmmaPipe, kWgmmaStagger, kMma, kMmaAlt };
static S2FwdKind s2_fwd_kind() {
  static const S2FwdKind kind = [] {
    if (s2_env_flag("LONGLORA_S2_FWD_ALT")) return S2FwdKind::kMmaAlt;
    if (!s2_env_flag("LONGLORA_S2_FWD_MMA") && s2_wgmma_available())
      return s2_env_flag("LONGLORA_S2_FWD_PIPE")      ? S2FwdKind::kWgmmaPipe
             : s2_env_default_on("LONGLORA_S2_FWD_STAGGER") ? S2FwdKind::kWgmmaStagger
                                                             : S2FwdKind::kWgmma;
    return S2FwdKind::kMma;
  }();
  return kind;
}

const char* s2_fwd_kernel_name(int /*head_dim*/) {
  switch (s2_fwd_kind()) {
    case S2FwdKind::kWgmma: return "wgmma";
    case S2FwdKind::kWgmmaPipe: return "wgmma pipelined";
    case S2FwdKind::kWgmmaStagger: return "wgmma staggered";
    case S2FwdKind::kMmaAlt: return "mma.sync alt";
    default: return "mma.sync";
  }
}

template <typename T, int D>
static void s2_fwd_dim(const S2FwdParams& p, cudaStream_t stream) {
  switch (s2_fwd_kind()) {
    case S2FwdKind::kWgmma: launch_s2_fwd<S2FwdWgmmaTraits<T, D>>(p, stream); return;
    case S2FwdKind::kWgmmaPipe: launch_s2_fwd<S2FwdWgmmaPipeTraits<T, D>>(p, stream); return;
    case S2FwdKind::kWgmmaStagger: launch_s2_fwd<S2FwdWgmmaStaggerTraits<T, D>>(p, stream); return;
    case S2FwdKind::kMmaAlt: launch_s2_fwd<S2FwdAltConfig<T, D>>(p, stream); return;
    default: launch_s2_fwd<S2FwdConfig<T, D>>(p, stream); return;
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
