// Fused elementwise kernels of the decoder layer: RMSNorm, rotary embedding and
// SwiGLU, forward and backward. Each replaces a chain of LibTorch ops that read and
// wrote whole activations several times (RMSNorm alone made 3 fp32 copies), with one
// pass over memory. Arithmetic is fp32; results are rounded to bf16/fp16 exactly where
// the unfused ops round, so both paths agree (see include/longlora/model/fused_params.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "longlora/model/fused_params.h"

namespace longlora::model::fused {
namespace {

constexpr int kVec = 8;  // elements per 16-byte access

template <class T>
struct alignas(16) Vec {
  T v[kVec];
};

__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <class T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
// A product or sum rounded to the storage type, as a LibTorch op's output is.
template <class T>
__device__ __forceinline__ float rnd(float v) { return to_f(from_f<T>(v)); }

template <class T>
__device__ __forceinline__ Vec<T> load(const T* p) { return *reinterpret_cast<const Vec<T>*>(p); }
template <class T>
__device__ __forceinline__ void store(T* p, const Vec<T>& v) { *reinterpret_cast<Vec<T>*>(p) = v; }

// Sum over the block; `scratch` holds 32 floats. Safe to call repeatedly.
__device__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  __syncthreads();  // the previous call's readers are done with scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- RMSNorm -------------------------------------------------------------------
// One block per row. The row is read twice; the second read hits L1/L2.
template <class T>
__global__ void rms_norm_fwd_kernel(RmsNormFwdParams p) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.cols;
  const T* w = static_cast<const T*>(p.w);
  T* y = static_cast<T*>(p.y) + row * p.cols;
  float ss = 0.f;
  for (int c = threadIdx.x * kVec; c < p.cols; c += blockDim.x * kVec) {
    const Vec<T> a = load(x + c);
#pragma unroll
    for (int i = 0; i < kVec; ++i) ss += to_f(a.v[i]) * to_f(a.v[i]);
  }
  ss = block_sum(ss, scratch);
  const float r = rsqrtf(ss / p.cols + p.eps);
  if (threadIdx.x == 0) p.rstd[row] = r;
  for (int c = threadIdx.x * kVec; c < p.cols; c += blockDim.x * kVec) {
    const Vec<T> a = load(x + c), wv = load(w + c);
    Vec<T> out;
#pragma unroll
    for (int i = 0; i < kVec; ++i) out.v[i] = from_f<T>(to_f(wv.v[i]) * rnd<T>(to_f(a.v[i]) * r));
    store(y + c, out);
  }
}

// Blocks stride over rows; each keeps its weight-grad partial sums in shared memory
// (every column owned by one thread, so no atomics until the end).
template <class T>
__global__ void rms_norm_bwd_kernel(RmsNormBwdParams p) {
  __shared__ float scratch[32];
  extern __shared__ float gw_part[];
  const T* w = static_cast<const T*>(p.w);
  const bool want_gw = p.gw != nullptr;
  if (want_gw)
    for (int c = threadIdx.x; c < p.cols; c += blockDim.x) gw_part[c] = 0.f;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* g = static_cast<const T*>(p.g) + row * p.cols;
    const T* x = static_cast<const T*>(p.x) + row * p.cols;
    T* gx = static_cast<T*>(p.gx) + row * p.cols;
    const float r = p.rstd[row];
    float dot = 0.f;
    for (int c = threadIdx.x * kVec; c < p.cols; c += blockDim.x * kVec) {
      const Vec<T> gv = load(g + c), xv = load(x + c), wv = load(w + c);
#pragma unroll
      for (int i = 0; i < kVec; ++i) dot += rnd<T>(to_f(gv.v[i]) * to_f(wv.v[i])) * (to_f(xv.v[i]) * r);
    }
    const float mean = block_sum(dot, scratch) / p.cols;
    for (int c = threadIdx.x * kVec; c < p.cols; c += blockDim.x * kVec) {
      const Vec<T> gv = load(g + c), xv = load(x + c), wv = load(w + c);
      Vec<T> out;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float xhat = to_f(xv.v[i]) * r;
        const float gh = rnd<T>(to_f(gv.v[i]) * to_f(wv.v[i]));
        out.v[i] = from_f<T>(r * (gh - xhat * mean));
        if (want_gw) gw_part[c + i] += to_f(gv.v[i]) * rnd<T>(xhat);
      }
      store(gx + c, out);
    }
  }
  if (want_gw) {
    __syncthreads();
    for (int c = threadIdx.x; c < p.cols; c += blockDim.x) atomicAdd(p.gw + c, gw_part[c]);
  }
}

// ---- rotary embedding ------------------------------------------------------------
// One thread per 8 rotation pairs (d, d + D/2) of one (b, h, l) row.
template <class T>
__global__ void rope_kernel(RopeParams p) {
  const int chunks = p.D / (2 * kVec), half = p.D / 2;
  const int64_t total = static_cast<int64_t>(p.B) * p.H * p.L * chunks;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(t % chunks);
    int64_t row = t / chunks;
    const int l = static_cast<int>(row % p.L);
    row /= p.L;
    const int h = static_cast<int>(row % p.H);
    const int b = static_cast<int>(row / p.H);
    const T* x = static_cast<const T*>(p.x) + b * p.x_stride[0] + h * p.x_stride[1] + l * p.x_stride[2];
    T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + l * p.out_stride[2];
    const T* cs = static_cast<const T*>(p.cos) + static_cast<int64_t>(l) * p.D;
    const T* sn = static_cast<const T*>(p.sin) + static_cast<int64_t>(l) * p.D;
    const int d = c * kVec;
    const Vec<T> x1 = load(x + d), x2 = load(x + half + d);
    const Vec<T> c1 = load(cs + d), c2 = load(cs + half + d), s1 = load(sn + d), s2 = load(sn + half + d);
    Vec<T> o1, o2;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float a = to_f(x1.v[i]), b2 = to_f(x2.v[i]);
      if (!p.backward) {  // x*cos + (-x2, x1)*sin
        o1.v[i] = from_f<T>(rnd<T>(a * to_f(c1.v[i])) - rnd<T>(b2 * to_f(s1.v[i])));
        o2.v[i] = from_f<T>(rnd<T>(b2 * to_f(c2.v[i])) + rnd<T>(a * to_f(s2.v[i])));
      } else {  // g*cos - rotate_half(g*sin) = g*cos - (-(g2 s2), g1 s1)
        o1.v[i] = from_f<T>(rnd<T>(a * to_f(c1.v[i])) + rnd<T>(b2 * to_f(s2.v[i])));
        o2.v[i] = from_f<T>(rnd<T>(b2 * to_f(c2.v[i])) - rnd<T>(a * to_f(s1.v[i])));
      }
    }
    store(out + d, o1);
    store(out + half + d, o2);
  }
}

// ---- SwiGLU ----------------------------------------------------------------------
__device__ __forceinline__ float sigmoid(float a) { return 1.f / (1.f + expf(-a)); }

template <class T>
__global__ void swiglu_fwd_kernel(SwiGluParams p) {
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  T* y = static_cast<T*>(p.y);
  for (int64_t i = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) * kVec; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x * kVec) {
    const Vec<T> av = load(a + i), bv = load(b + i);
    Vec<T> out;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float x = to_f(av.v[k]);
      out.v[k] = from_f<T>(rnd<T>(x / (1.f + expf(-x))) * to_f(bv.v[k]));
    }
    store(y + i, out);
  }
}

// As autograd differentiates silu(a) * b: db = g * silu(a), da = silu'(a) * (g * b).
template <class T>
__global__ void swiglu_bwd_kernel(SwiGluParams p) {
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const T* g = static_cast<const T*>(p.g);
  T* da = static_cast<T*>(p.da);
  T* db = static_cast<T*>(p.db);
  for (int64_t i = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) * kVec; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x * kVec) {
    const Vec<T> av = load(a + i), bv = load(b + i), gv = load(g + i);
    Vec<T> oa, ob;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float x = to_f(av.v[k]), gg = to_f(gv.v[k]);
      const float s = sigmoid(x);
      const float silu = rnd<T>(x / (1.f + expf(-x)));
      ob.v[k] = from_f<T>(gg * silu);
      const float ds = rnd<T>(gg * to_f(bv.v[k]));
      oa.v[k] = from_f<T>(ds * s * (1.f + x * (1.f - s)));
    }
    store(da + i, oa);
    store(db + i, ob);
  }
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

int grid_for(int64_t threads, int block) {
  return static_cast<int>(std::min<int64_t>((threads + block - 1) / block, 65535LL * 16));
}

}  // namespace

void rms_norm_fwd(const RmsNormFwdParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  const int block = p.cols >= 2048 ? 256 : 128;
  if (p.dtype == Dtype::BF16)
    rms_norm_fwd_kernel<__nv_bfloat16><<<static_cast<unsigned>(p.rows), block, 0, stream>>>(p);
  else
    rms_norm_fwd_kernel<__half><<<static_cast<unsigned>(p.rows), block, 0, stream>>>(p);
  check(cudaGetLastError(), "rms_norm_fwd");
}

void rms_norm_bwd(const RmsNormBwdParams& p, int num_sms, cudaStream_t stream) {
  if (p.rows == 0) return;
  const int block = p.cols >= 2048 ? 256 : 128;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(p.rows, std::max(1, num_sms) * 8LL));
  const size_t smem = p.gw ? sizeof(float) * p.cols : 0;
  if (p.dtype == Dtype::BF16)
    rms_norm_bwd_kernel<__nv_bfloat16><<<grid, block, smem, stream>>>(p);
  else
    rms_norm_bwd_kernel<__half><<<grid, block, smem, stream>>>(p);
  check(cudaGetLastError(), "rms_norm_bwd");
}

void rope(const RopeParams& p, cudaStream_t stream) {
  const int64_t threads = static_cast<int64_t>(p.B) * p.H * p.L * (p.D / (2 * kVec));
  if (threads == 0) return;
  const int block = 256;
  if (p.dtype == Dtype::BF16)
    rope_kernel<__nv_bfloat16><<<grid_for(threads, block), block, 0, stream>>>(p);
  else
    rope_kernel<__half><<<grid_for(threads, block), block, 0, stream>>>(p);
  check(cudaGetLastError(), "rope");
}

void swiglu_fwd(const SwiGluParams& p, cudaStream_t stream) {
  if (p.n == 0) return;
  const int block = 256;
  if (p.dtype == Dtype::BF16)
    swiglu_fwd_kernel<__nv_bfloat16><<<grid_for(p.n / kVec, block), block, 0, stream>>>(p);
  else
    swiglu_fwd_kernel<__half><<<grid_for(p.n / kVec, block), block, 0, stream>>>(p);
  check(cudaGetLastError(), "swiglu_fwd");
}

void swiglu_bwd(const SwiGluParams& p, cudaStream_t stream) {
  if (p.n == 0) return;
  const int block = 256;
  if (p.dtype == Dtype::BF16)
    swiglu_bwd_kernel<__nv_bfloat16><<<grid_for(p.n / kVec, block), block, 0, stream>>>(p);
  else
    swiglu_bwd_kernel<__half><<<grid_for(p.n / kVec, block), block, 0, stream>>>(p);
  check(cudaGetLastError(), "swiglu_bwd");
}

}  // namespace longlora::model::fused
