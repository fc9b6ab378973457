// S2-Attention backward: dispatch of the runtime (dtype, head dim) to the templated
// launcher. Contract of the kernels: s2_bwd_kernel.cuh; of the parameters: s2_params.h.
#include <stdexcept>
#include <string>

#include "longlora/attention/kernel/s2_params.h"
#include "s2_launch.cuh"

namespace longlora::attention::kernel {

// The backward main kernel for head dim D in this process. On H100/H200 at D = 128 the
// wgmma kernel pipelined within each warpgroup, adding dQ a row segment at a time
// (s2_bwd_wgmma_kernel.cuh, kPipelined and kDqRows: 12.7-13.0 ms against 14.0 ms with the
// plain atomics and 22.3 ms for the 2-D-tiled mma.sync kernel at L = 32768 on the H200;
// docs/benchmarks.md). LONGLORA_S2_BWD_DQROWS=0 keeps the plain atomics (as do the
// unpipelined and the bulk-dQ kernels, which have no row dQ),
// LONGLORA_S2_BWD_PIPE=0 picks the unpipelined wgmma kernel, LONGLORA_S2_BWD_MMA=1 the
// mma.sync kernels. Otherwise the mma.sync default (s2_traits.cuh: 2-D-tiled at
// D = 128, one-dimensional at 64); LONGLORA_S2_BWD_2D=1 forces the 2-D tiling,
// LONGLORA_S2_BWD_ALT=1 the alternative one-dimensional tiles, which keep those code
// paths tested and comparable. LONGLORA_S2_BWD_BULKDQ=1 sends dQ to dq_accum by bulk
// adds (S2BwdWgmmaPipeBulkTraits, or S2BwdWgmmaBulkTraits unpipelined): slower on the
// H100 (17.5 against 17.15 ms at 32k), kept as an experiment. Flags read once.
enum class S2BwdKind { kWgmma, kWgmmaPipe, kWgmmaBulk, kWgmmaPipeBulk, kWgmmaPipeRows, kMma, kMma2D, kMmaAlt };
static S2BwdKind s2_bwd_kind(int D) {
  static const bool tiled_2d = s2_env_flag("LONGLORA_S2_BWD_2D");
  static const bool alt = s2_env_flag("LONGLORA_S2_BWD_ALT");
  static const bool mma = s2_env_flag("LONGLORA_S2_BWD_MMA");
  static const bool pipe = s2_env_default_on("LONGLORA_S2_BWD_PIPE");
  static const bool bulk = s2_env_flag("LONGLORA_S2_BWD_BULKDQ");
  static const bool rows = s2_env_default_on("LONGLORA_S2_BWD_DQROWS");
  if (tiled_2d) return S2BwdKind::kMma2D;
  if (alt) return S2BwdKind::kMmaAlt;
  if (D == 128 && !mma && s2_wgmma_available()) {
    if (bulk) return pipe ? S2BwdKind::kWgmmaPipeBulk : S2BwdKind::kWgmmaBulk;
    if (rows && pipe) return S2BwdKind::kWgmmaPipeRows;
    return pipe ? S2BwdKind::kWgmmaPipe : S2BwdKind::kWgmma;
  }
  return S2BwdKind::kMma;
}

const char* s2_bwd_kernel_name(int head_dim) {
  switch (s2_bwd_kind(head_dim)) {
    case S2BwdKind::kWgmma: return "wgmma";
    case S2BwdKind::kWgmmaPipe: return "wgmma pipelined";
    case S2BwdKind::kWgmmaBulk: return "wgmma bulk-dQ";
    case S2BwdKind::kWgmmaPipeBulk: return "wgmma pipelined bulk-dQ";
    case S2BwdKind::kWgmmaPipeRows: return "wgmma pipelined row-dQ";
    case S2BwdKind::kMma2D: return "mma.sync 2-D";
    case S2BwdKind::kMmaAlt: return "mma.sync alt";
    default: return head_dim == 128 ? "mma.sync 2-D" : "mma.sync";
  }
}

template <typename T, int D>
static void s2_bwd_dim(const S2BwdParams& p, cudaStream_t stream) {
  switch (s2_bwd_kind(D)) {
    case S2BwdKind::kWgmma:
      if constexpr (D == 128) launch_s2_bwd<S2BwdWgmmaTraits<T, D>>(p, stream);
      return;  // never chosen for other D
    case S2BwdKind::kWgmmaPipe:
      if constexpr (D == 128) launch_s2_bwd<S2BwdWgmmaPipeTraits<T, D>>(p, stream);
      return;
    case S2BwdKind::kWgmmaBulk:
      if constexpr (D == 128) launch_s2_bwd<S2BwdWgmmaBulkTraits<T, D>>(p, stream);
      return;
    case S2BwdKind::kWgmmaPipeBulk:
      if constexpr (D == 128) launch_s2_bwd<S2BwdWgmmaPipeBulkTraits<T, D>>(p, stream);
      return;
    case S2BwdKind::kWgmmaPipeRows:
      if constexpr (D == 128) launch_s2_bwd<S2BwdWgmmaPipeRowsTraits<T, D>>(p, stream);
      return;
    case S2BwdKind::kMma2D: launch_s2_bwd<S2Bwd2DTraits<T, D>>(p, stream); return;
    case S2BwdKind::kMmaAlt: launch_s2_bwd<S2BwdAltConfig<T, D>>(p, stream); return;
    default: launch_s2_bwd<S2BwdConfig<T, D>>(p, stream); return;
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
