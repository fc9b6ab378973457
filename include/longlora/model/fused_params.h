// Plain parameter structs for the fused elementwise CUDA kernels of the decoder
// layer (no torch types): RMSNorm, rotary embedding and SwiGLU, forward and
// backward. The binding (src/model/fused/fused_binding_cuda.cpp) fills them; the
// kernels (src/model/fused/fused_ops.cu) read nothing else.
//
// Each kernel rounds where LibTorch's sequence of ops rounds (an op's bf16/fp16
// result), so the fused result equals the unfused one up to the order of fp32 sums.
// Every pointer is 16-byte aligned and rows move in chunks of 8 elements.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace longlora::model::fused {

enum class Dtype : int { BF16 = 0, FP16 = 1 };

// y = w * (x * rstd) per row, rstd = 1/sqrt(mean(x^2) + eps) in fp32 (also written).
struct RmsNormFwdParams {
  const void* x = nullptr;  // (rows, cols) contiguous
  const void* w = nullptr;  // (cols), the compute dtype
  void* y = nullptr;        // (rows, cols)
  float* rstd = nullptr;    // (rows)
  int64_t rows = 0;
  int cols = 0;  // multiple of 8
  float eps = 0.f;
  Dtype dtype = Dtype::BF16;
};

// gx = rstd * (gh - xhat * mean(gh * xhat)), gh = g * w, xhat = x * rstd;
// gw += sum over rows of g * xhat (fp32; the caller zeroes it), when gw is set.
struct RmsNormBwdParams {
  const void* g = nullptr;
  const void* x = nullptr;
  const void* w = nullptr;
  const float* rstd = nullptr;
  void* gx = nullptr;
  float* gw = nullptr;
  int64_t rows = 0;
  int cols = 0;
  Dtype dtype = Dtype::BF16;
};

// Rotary embedding of x (B, H, L, D), any strides with the last dim contiguous:
// out = x * cos + rotate_half(x) * sin; backward (x holds the gradient):
// out = x * cos - rotate_half(x * sin). cos, sin (L, D) contiguous; D multiple of 16.
struct RopeParams {
  const void* x = nullptr;
  const void* cos = nullptr;
  const void* sin = nullptr;
  void* out = nullptr;
  int B = 0, H = 0, L = 0, D = 0;
  int64_t x_stride[3] = {0, 0, 0};    // batch, head, position
  int64_t out_stride[3] = {0, 0, 0};
  bool backward = false;
  Dtype dtype = Dtype::BF16;
};

// y = silu(a) * b; backward from g: da, db. n elements, multiple of 8, contiguous.
struct SwiGluParams {
  const void* a = nullptr;
  const void* b = nullptr;
  const void* g = nullptr;  // backward only
  void* y = nullptr;        // forward only
  void* da = nullptr;       // backward only
  void* db = nullptr;       // backward only
  int64_t n = 0;
  Dtype dtype = Dtype::BF16;
};

void rms_norm_fwd(const RmsNormFwdParams& p, cudaStream_t stream);
void rms_norm_bwd(const RmsNormBwdParams& p, int num_sms, cudaStream_t stream);
void rope(const RopeParams& p, cudaStream_t stream);
void swiglu_fwd(const SwiGluParams& p, cudaStream_t stream);
void swiglu_bwd(const SwiGluParams& p, cudaStream_t stream);

// The largest row (cols) the RMSNorm backward handles: its fp32 weight-grad
// accumulator lives in 48 KiB of shared memory.
constexpr int kRmsNormMaxCols = 12288;

}  // namespace longlora::model::fused
