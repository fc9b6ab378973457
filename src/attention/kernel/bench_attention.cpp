// Attention micro-benchmark: S2 CUDA kernel vs the sdpa baseline, forward and
// forward+backward, timed with CUDA events on the current stream.
//
// Effective TFLOP/s count only unmasked work: forward 4 * D * (visible (query, key)
// pairs, summed over batch and heads); backward 2.5x that, so forward+backward 3.5x.
#include "longlora/attention/bench.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "longlora/attention/attention.h"
#include "longlora/common/strings.h"
#include "longlora/common/error.h"

#ifdef LONGLORA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime_api.h>

#include "longlora/attention/kernel/s2_params.h"  // the kernels the dispatch picks
#endif

namespace longlora::attention {

#ifdef LONGLORA_WITH_CUDA
namespace {

struct BenchResult {
  std::string backend;
  double fwd_ms = NAN, fwdbwd_ms = NAN;
  std::string error;
};

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("attention bench: ") + what + ": " +
                             cudaGetErrorString(err));
}

// Mean milliseconds per call of f over `iters` calls after `warmup` calls.
double time_ms(const std::function<void()>& f, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i) f();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  cudaEvent_t start, stop;
  check_cuda(cudaEventCreate(&start), "cudaEventCreate");
  check_cuda(cudaEventCreate(&stop), "cudaEventCreate");
  check_cuda(cudaEventRecord(start, stream), "cudaEventRecord");
  for (int i = 0; i < iters; ++i) f();
  check_cuda(cudaEventRecord(stop, stream), "cudaEventRecord");
  check_cuda(cudaEventSynchronize(stop), "cudaEventSynchronize");
  float ms = 0.f;
  check_cuda(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return static_cast<double>(ms) / std::max(iters, 1);
}

}  // namespace
#endif

int run_attention_bench(const AttentionBenchOptions& opt) {
  // Errors, on stderr as one line (printed on stdout they read as results).
#ifndef LONGLORA_WITH_CUDA
  (void)opt;
  throw Error("attention bench: this build has no CUDA kernels (LONGLORA_WITH_CUDA off); nothing to time");
#else
  if (!torch::cuda::is_available()) throw Error("attention bench: no CUDA device available; nothing to time");
  const Mode mode = parse_mode(opt.mode);
  torch::ScalarType dtype;
  if (opt.dtype == "bf16") {
    dtype = torch::kBFloat16;
  } else if (opt.dtype == "fp16") {
    dtype = torch::kHalf;
  } else {
    throw Error("bench: dtype '" + opt.dtype + "' is unknown (expected bf16 or fp16)");
  }
  const int64_t B = opt.batch, H = opt.heads, Hkv = opt.kv_heads, L = opt.seq_len,
                D = opt.head_dim;
  if (B <= 0 || H <= 0 || Hkv <= 0 || L <= 0 || D <= 0)
    throw Error("bench: batch, heads, kv_heads, seq_len, head_dim must be positive");
  const int64_t group =
      mode == Mode::Full ? L : static_cast<int64_t>(std::llround(opt.group_ratio * L));
  const int64_t G = check_s2_shape(H, Hkv, L, group, mode);

  int64_t pairs = 0;
  for (int64_t h = 0; h < H; ++h) pairs += visible_pairs(L, G, mode, h >= H / 2);
  pairs *= B;
  const double fwd_flops = 4.0 * static_cast<double>(D) * static_cast<double>(pairs);
  const double fwdbwd_flops = 3.5 * fwd_flops;

  const auto dev = at::cuda::getDeviceProperties(at::cuda::current_device());
  const std::string device_name = dev->name;
  // Which S2 kernels the `kernel` backend runs here (wgmma on H100/H200, else mma.sync).
  const std::string kernel_fwd = kernel::s2_fwd_kernel_name(static_cast<int>(D));
  const std::string kernel_bwd = kernel::s2_bwd_kernel_name(static_cast<int>(D));

  torch::manual_seed(0);
  const auto o = torch::TensorOptions().dtype(dtype).device(torch::kCUDA);
  auto q = torch::randn({B, H, L, D}, o).requires_grad_(true);
  auto k = torch::randn({B, Hkv, L, D}, o).requires_grad_(true);
  auto v = torch::randn({B, Hkv, L, D}, o).requires_grad_(true);
  auto dout = torch::randn({B, H, L, D}, o);

  using Fn = torch::Tensor (*)(const torch::Tensor&, const torch::Tensor&,
                               const torch::Tensor&, Mode, int64_t);
  const std::vector<std::pair<std::string, Fn>> backends = {{"kernel", &attention_kernel},
                                                            {"sdpa", &attention_sdpa}};
  std::vector<BenchResult> results;
  for (const auto& [name, fn] : backends) {
    BenchResult r;
    r.backend = name;
    try {
      r.fwd_ms = time_ms(
          [&] {
            torch::NoGradGuard no_grad;
            (void)fn(q, k, v, mode, G);
          },
          opt.warmup, opt.iters);
      r.fwdbwd_ms = time_ms(
          [&] {
            auto out = fn(q, k, v, mode, G);
            (void)torch::autograd::grad({out}, {q, k, v}, {dout});
          },
          opt.warmup, opt.iters);
    } catch (const std::exception& e) {
      std::string what = e.what();
      r.error = first_line(what);
      std::replace(r.error.begin(), r.error.end(), '"', '\'');  // JSON-safe
      std::replace(r.error.begin(), r.error.end(), '\\', '/');
    }
    results.push_back(r);
  }

  auto tflops = [](double flops, double ms) { return flops / (ms * 1e-3) / 1e12; };
  if (opt.json) {
    for (const auto& r : results) {
      const std::string kernels = r.backend == "kernel" ? ",\"kernel_fwd\":\"" + kernel_fwd +
                                                              "\",\"kernel_bwd\":\"" + kernel_bwd + "\""
                                                        : "";
      std::printf(
          "{\"backend\":\"%s\",\"device\":\"%s\",\"mode\":\"%s\",\"dtype\":\"%s\","
          "\"batch\":%lld,\"heads\":%lld,\"kv_heads\":%lld,\"seq_len\":%lld,"
          "\"head_dim\":%lld,\"group\":%lld,\"fwd_ms\":%.4f,\"fwd_tflops\":%.2f,"
          "\"fwdbwd_ms\":%.4f,\"fwdbwd_tflops\":%.2f%s%s%s%s}\n",
          r.backend.c_str(), device_name.c_str(), to_string(mode).c_str(), opt.dtype.c_str(),
          static_cast<long long>(B), static_cast<long long>(H), static_cast<long long>(Hkv),
          static_cast<long long>(L), static_cast<long long>(D), static_cast<long long>(G),
          r.fwd_ms, tflops(fwd_flops, r.fwd_ms), r.fwdbwd_ms,
          tflops(fwdbwd_flops, r.fwdbwd_ms), r.error.empty() ? "" : ",\"error\":\"",
          r.error.empty() ? "" : r.error.c_str(), r.error.empty() ? "" : "\"", kernels.c_str());
    }
  } else {
    std::printf("device: %s\n", device_name.c_str());
    std::printf("kernel backend: forward %s, backward %s\n", kernel_fwd.c_str(), kernel_bwd.c_str());
    std::printf("attention bench: B=%lld H=%lld Hkv=%lld L=%lld D=%lld %s mode=%s G=%lld, "
                "%d warmup + %d iters\n",
                static_cast<long long>(B), static_cast<long long>(H),
                static_cast<long long>(Hkv), static_cast<long long>(L),
                static_cast<long long>(D), opt.dtype.c_str(), to_string(mode).c_str(),
                static_cast<long long>(G), opt.warmup, opt.iters);
    std::printf("%-8s %10s %12s %12s %16s\n", "backend", "fwd ms", "fwd TFLOP/s",
                "fwd+bwd ms", "fwd+bwd TFLOP/s");
    for (const auto& r : results) {
      if (!r.error.empty()) {
        std::printf("%-8s failed: %s\n", r.backend.c_str(), r.error.c_str());
        continue;
      }
      std::printf("%-8s %10.3f %12.1f %12.3f %16.1f\n", r.backend.c_str(), r.fwd_ms,
                  tflops(fwd_flops, r.fwd_ms), r.fwdbwd_ms,
                  tflops(fwdbwd_flops, r.fwdbwd_ms));
    }
  }
  return 0;
#endif
}

}  // namespace longlora::attention
