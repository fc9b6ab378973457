// Plain parameter structs for the S2-Attention CUDA kernels (no torch types).
//
// The binding (src/attention/kernel/s2_binding_cuda.cpp) fills these from tensors;
// the kernels (src/attention/kernel/*.cu) read nothing else. All strides are in
// elements; the last dimension (D) of every tensor is contiguous.
//
//   q          (B, H,   L, D)  bf16/fp16   input
//   k, v       (B, Hkv, L, D)  bf16/fp16   input; query head h reads kv head h / (H / Hkv)
//   o          (B, H,   L, D)  bf16/fp16   forward output (=)
//   lse        (B, H,   L)     fp32, contiguous: natural-log sum-exp of the scaled scores
//                              per query row (forward output (=), backward input)
//   dout       (B, H,   L, D)  backward input
//   dq         (B, H,   L, D)  backward output (=)
//   dk, dv     (B, Hkv, L, D)  backward outputs (=)
//   dq_accum   (B, H,   L, D)  fp32, contiguous, 16-byte aligned (16-byte atomics), must be
//                               ZEROED by the caller (+= atomics)
//   delta      (B, H,   L)     fp32, contiguous scratch: rowsum(dout * o) (=)
//
// Row/batch/head strides must be multiples of 8 elements and the base pointers
// 16-byte aligned (the kernels move rows in 16-byte chunks); the binding makes a
// contiguous copy of any tensor that is not.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace longlora::attention::kernel {

enum class S2Mode : int { Full = 0, Segments = 1, Roll = 2 };
enum class S2Dtype : int { BF16 = 0, FP16 = 1 };

struct S2Strides {
  int64_t batch = 0, head = 0, row = 0;
};

struct S2FwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  float* lse = nullptr;

  int B = 0, H = 0, Hkv = 0, L = 0, D = 0;
  S2Strides q_stride, k_stride, v_stride, o_stride;

  int group = 0;  // G; Full mode: G == L
  S2Mode mode = S2Mode::Full;
  float softmax_scale = 0.f;  // 1/sqrt(D)
  S2Dtype dtype = S2Dtype::BF16;
};

struct S2BwdParams : S2FwdParams {
  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* dq_accum = nullptr;
  float* delta = nullptr;
  S2Strides dout_stride, dq_stride, dk_stride, dv_stride;
};

// Launch on `stream`; throw std::runtime_error on a launch error or an unsupported
// (dtype, D). Asynchronous otherwise.
void s2_fwd(const S2FwdParams& params, cudaStream_t stream);
void s2_bwd(const S2BwdParams& params, cudaStream_t stream);

// Which kernels s2_fwd and s2_bwd launch for head dim D on the current device ("wgmma",
// "mma.sync", "mma.sync 2-D", "mma.sync alt"), for benchmarks to print beside their times.
const char* s2_fwd_kernel_name(int head_dim);
const char* s2_bwd_kernel_name(int head_dim);

}  // namespace longlora::attention::kernel
