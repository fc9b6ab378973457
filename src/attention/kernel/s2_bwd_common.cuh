// What the backward main kernels (s2_bwd_kernel.cuh, s2_bwd2d_kernel.cuh,
// s2_bwd_wgmma_kernel.cuh) share:
// the walk over the (query head, query tile) steps a CTA visits, the staged copies of
// a step's Q, dO, lse and delta, the copies of the CTA's K and V, and dQ's atomic adds.
#pragma once

#include "longlora/attention/kernel/s2_params.h"
#include "s2_mask.cuh"
#include "s2_mma.cuh"
#include "s2_wgmma.cuh"  // load_tile_sw128_async

namespace longlora::attention::kernel {

// A CTA of kv head hk (batch b) owning keys [k0, k0 + kBlockN): steps over query heads
// hq = 0..ratio-1 of the kv head (GQA: no repeated K/V in memory), each over the query
// tiles of kBlockM rows that see some of its keys. Q, dO, lse and delta of a step go to
// one of two shared-memory stages.
template <typename Traits>
struct S2BwdSteps {
  using T = typename Traits::T;
  const S2BwdParams& p;
  int b, hk, k0, ratio;
  T* sQ0;  // stage st: sQ0 + st * kSmemQ; the same for sdO0
  T* sdO0;
  float* sLse0;  // stage st: + st * kBlockM; the same for sDelta0
  float* sDelta0;

  __device__ __forceinline__ S2TileSpan span_of(int hq) const {
    return s2_query_tiles(S2HeadMask::make(p.L, p.group, p.mode, hk * ratio + hq, p.H), k0,
                          Traits::kBlockM, Traits::kBlockN);
  }
  // The first tile of head hq or, if it has none, of the next head that has one
  // (m_block -1 when no head is left).
  __device__ __forceinline__ void first_from(int& hq, int& m_block, S2TileSpan& span) const {
    for (; hq < ratio; ++hq) {
      span = span_of(hq);
      m_block = s2_span_first(span);
      if (m_block >= 0) return;
    }
    m_block = -1;
  }
  // The step after (hq, m_block).
  __device__ __forceinline__ void advance(int& hq, int& m_block, S2TileSpan& span) const {
    m_block = s2_span_next(span, m_block);
    if (m_block < 0) {
      ++hq;
      first_from(hq, m_block, span);
    }
  }
  // Copies step (hq, m_block)'s Q, dO, lse and delta into stage `stage`, one group.
  __device__ __forceinline__ void load(int hq, int m_block, int stage) const {
    constexpr int BM = Traits::kBlockM;
    const int h = hk * ratio + hq;
    const int q0 = m_block * BM;
    const T* qp = static_cast<const T*>(p.q) + b * p.q_stride.batch + h * p.q_stride.head;
    const T* dop =
        static_cast<const T*>(p.dout) + b * p.dout_stride.batch + h * p.dout_stride.head;
    tile_rows<BM>(sQ0 + stage * Traits::kSmemQ, qp + q0 * p.q_stride.row, p.q_stride.row, p.L - q0);
    tile_rows<BM>(sdO0 + stage * Traits::kSmemQ, dop + q0 * p.dout_stride.row, p.dout_stride.row, p.L - q0);
    const int64_t bh_row = (static_cast<int64_t>(b) * p.H + h) * p.L;
    for (int x = threadIdx.x; x < BM; x += Traits::kThreads) {
      const bool in = q0 + x < p.L;
      const int64_t src = bh_row + (in ? q0 + x : 0);
      cp_async_4(sLse0 + stage * BM + x, p.lse + src, in);  // rows past L: 0
      cp_async_4(sDelta0 + stage * BM + x, p.delta + src, in);
    }
    cp_async_commit();
  }
  // Issues the copies of the next step (hq_next, m_next), if any, into the other stage,
  // then waits for this step's copies (the caller's __syncthreads makes them visible).
  __device__ __forceinline__ void prefetch_and_wait(int hq_next, int m_next, int stage) const {
    if (m_next >= 0) {
      load(hq_next, m_next, stage ^ 1);
      cp_async_wait<1>();  // all but the newest group: this step's copies have landed
    } else {
      cp_async_wait<0>();
    }
  }
  // The CTA's K and V rows into sK and sV (rows past L: zeros), one group.
  __device__ __forceinline__ void load_kv(T* sK, T* sV) const {
    constexpr int BN = Traits::kBlockN;
    const T* kp = static_cast<const T*>(p.k) + b * p.k_stride.batch + hk * p.k_stride.head;
    const T* vp = static_cast<const T*>(p.v) + b * p.v_stride.batch + hk * p.v_stride.head;
    tile_rows<BN>(sK, kp + k0 * p.k_stride.row, p.k_stride.row, p.L - k0);
    tile_rows<BN>(sV, vp + k0 * p.v_stride.row, p.v_stride.row, p.L - k0);
    cp_async_commit();
  }
  // One (kRows x D) tile into shared memory, padded rows or the wgmma kernel's swizzled
  // layout; rows past `rows`: zeros.
  template <int kRows>
  static __device__ __forceinline__ void tile_rows(T* s, const T* g, int64_t stride, int rows) {
    if constexpr (Traits::kSwizzled)
      load_tile_sw128_async<kRows, Traits::kHeadDim, Traits::kThreads>(s, g, stride, rows);
    else
      load_tile_async<kRows, Traits::kHeadDim, Traits::kThreads>(s, Traits::kLd, g, stride, rows);
  }

};

// dst[0] += x, dst[1] += y (dQ's fp32 accumulator): one 8-byte atomic on sm_90.
__device__ __forceinline__ void s2_atomic_add2(float* dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x, y));
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
}

// dst[0 .. 3] += v (dQ's fp32 accumulator, 16-byte aligned): one 16-byte atomic on sm_90.
__device__ __forceinline__ void s2_atomic_add4(float* dst, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(dst), v);
#else
  atomicAdd(dst, v.x);
  atomicAdd(dst + 1, v.y);
  atomicAdd(dst + 2, v.z);
  atomicAdd(dst + 3, v.w);
#endif
}

// dst[8 nd + 2 t, + 1] += row rr of an accumulator of kN 8-column C tiles (dQ's rows).
template <int kN>
__device__ __forceinline__ void s2_atomic_add_acc_row(float* dst, const float (&acc)[kN][4], int rr) {
  const int t = lane_t();
#pragma unroll
  for (int nd = 0; nd < kN; ++nd) s2_atomic_add2(dst + nd * 8 + 2 * t, acc[nd][2 * rr], acc[nd][2 * rr + 1]);
}

}  // namespace longlora::attention::kernel
