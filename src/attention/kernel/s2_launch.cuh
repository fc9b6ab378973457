// Launchers of the S2 kernels: grid, shared-memory attribute, launch, launch check.
// Callers (the dispatch in s2_fwd.cu / s2_bwd.cu) pick T and D; nothing above this
// layer sees launch geometry.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "longlora/attention/kernel/s2_params.h"
#include "s2_bwd_wgmma_kernel.cuh"  // s2_bwd_main_kernel
#include "s2_fwd_wgmma_kernel.cuh"  // s2_fwd_main_kernel
#include "s2_traits.cuh"

// Throws std::runtime_error naming the failing call.
#define S2_CUDA_CHECK(expr)                                                          \
  do {                                                                               \
    const cudaError_t s2_err_ = (expr);                                              \
    if (s2_err_ != cudaSuccess)                                                      \
      throw std::runtime_error(std::string("S2 kernel: ") + #expr + ": " +          \
                               cudaGetErrorString(s2_err_));                         \
  } while (0)

namespace longlora::attention::kernel {

inline int s2_ceil_div(int a, int b) { return (a + b - 1) / b; }

// True when the environment variable `name` is "1": the dispatch's switches to the
// alternative tiles (LONGLORA_S2_FWD_ALT, LONGLORA_S2_BWD_ALT), read once by callers.
inline bool s2_env_flag(const char* name) {
  const char* e = std::getenv(name);
  return e != nullptr && std::string(e) == "1";
}
// A default that is on: true unless the variable is "0".
inline bool s2_env_default_on(const char* name) {
  const char* e = std::getenv(name);
  return e == nullptr || std::string(e) != "0";
}

// Whether the wgmma kernels can run on the current device: compute capability 9.0 and
// sm_90a code in this binary (TORCH_CUDA_ARCH_LIST holds 9.0a). Probed once (s2_fwd.cu).
bool s2_wgmma_available();

template <typename Kernel>
void s2_set_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024)
    S2_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

template <typename Traits>
void launch_s2_fwd(const S2FwdParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.H == 0 || p.L == 0) return;
  auto kernel = s2_fwd_main_kernel<Traits>();
  constexpr int smem = Traits::kSmemBytes;
  s2_set_smem(kernel, smem);
  const dim3 grid(s2_ceil_div(p.L, Traits::kBlockM), p.H, p.B);
  kernel<<<grid, Traits::kThreads, smem, stream>>>(p);
  S2_CUDA_CHECK(cudaGetLastError());
}

template <typename Traits>
void launch_s2_bwd(const S2BwdParams& p, cudaStream_t stream) {
  using T = typename Traits::T;
  constexpr int D = Traits::kHeadDim;
  if (p.B == 0 || p.H == 0 || p.L == 0) return;
  const int64_t rows = static_cast<int64_t>(p.B) * p.H * p.L;

  // 1. delta = rowsum(dout * o): D / 8 threads per row.
  constexpr int kDeltaThreads = 256;
  const int64_t delta_blocks = (rows * (D / 8) + kDeltaThreads - 1) / kDeltaThreads;
  s2_bwd_delta_kernel<T, D>
      <<<static_cast<unsigned>(delta_blocks), kDeltaThreads, 0, stream>>>(p);
  S2_CUDA_CHECK(cudaGetLastError());

  // 2. dK, dV (=), dq_accum (+=): the warps tiled in one dimension or in two.
  auto kernel = s2_bwd_main_kernel<Traits>();
  constexpr int smem = Traits::kSmemBytes;
  s2_set_smem(kernel, smem);
  const dim3 grid(s2_ceil_div(p.L, Traits::kBlockN), p.Hkv, p.B);
  kernel<<<grid, Traits::kThreads, smem, stream>>>(p);
  S2_CUDA_CHECK(cudaGetLastError());

  // 3. dq = dq_accum (grid-stride loop, 8 elements per thread and step).
  constexpr int kConvThreads = 256;
  const int64_t n = rows * (D / 8);
  const int64_t conv_blocks = std::min<int64_t>((n + kConvThreads - 1) / kConvThreads, 65536);
  s2_bwd_convert_kernel<T, D><<<static_cast<unsigned>(conv_blocks), kConvThreads, 0, stream>>>(p);
  S2_CUDA_CHECK(cudaGetLastError());
}

}  // namespace longlora::attention::kernel
