// S2-Attention backward, device code (flash-attention-2 style, three kernels).
//
// Contract
//   inputs   q dout o (B, H, L, D), k v (B, Hkv, L, D) bf16/fp16; lse (B, H, L) fp32 from
//            the forward; D in {64, 128}; query head h reads kv head h / (H / Hkv).
//   s2_bwd_delta_kernel    delta (B, H, L) fp32      = rowsum(dout * o)           (=)
//   s2_bwd_kernel          dk, dv (B, Hkv, L, D)      = sum over the H/Hkv query heads
//                                                      of kv head hk and the visible
//                                                      rows (=, written once)
//                          dq_accum (B, H, L, D) fp32 += dS K (atomics; caller zeroes)
//   s2_bwd_convert_kernel  dq (B, H, L, D)            = dq_accum rounded to T      (=)
//   mask: S2HeadMask (s2_mask.cuh), the same rule and tile pruning as the forward.
//
// Main kernel: grid (ceil(L / kBlockN), Hkv, B). A CTA owns kBlockN keys of one kv
// head, 16 per warp; K and V stay in shared memory, the dK and dV accumulators in fp32
// registers. For each query head h of the kv head (GQA: no repeated K/V in memory)
// and each query tile from s2_query_tiles it stages Q, dO, lse, delta and computes,
// per warp, transposed (keys x queries):
//   S^T = K Q^T,  P^T = exp(scale S^T - lse),  dP^T = V dO^T,
//   dS^T = P^T * (dP^T - delta) * scale,  dV += P^T dO,  dK += dS^T Q,
// then writes dS^T to shared memory and all warps compute dQ = dS K, added with fp32
// atomics (two floats per atomic on sm_90). The softmax scale is folded into dS, so dK
// and dQ need no final scaling.
//
// Pipeline: the (query head, query tile) steps run as one flat sequence; Q, dO, lse
// and delta have two shared-memory stages, and the copies (cp.async) of step s+1 are
// in flight while step s computes.
#pragma once

#include <cmath>

#include "longlora/attention/kernel/s2_params.h"
#include "s2_bwd_common.cuh"
#include "s2_mask.cuh"
#include "s2_mma.cuh"
#include "s2_traits.cuh"

namespace longlora::attention::kernel {

// The pre- and post-passes work on 8 consecutive elements (16 bytes of T) per thread,
// D / 8 threads per row (a power of two <= 32, so a row's threads share a warp).
// Row r of (B, H, L) starts s2_row_offset elements into a tensor with strides st.
__device__ __forceinline__ int64_t s2_row_offset(const S2Strides& st, int64_t row, int H,
                                                 int L) {
  const int i = static_cast<int>(row % L);
  const int64_t bh = row / L;
  const int h = static_cast<int>(bh % H);
  const int b = static_cast<int>(bh / H);
  return b * st.batch + h * st.head + i * st.row;
}

// delta[b, h, i] = sum_d dout[b, h, i, d] * o[b, h, i, d].
template <typename T, int D>
__global__ void s2_bwd_delta_kernel(const S2BwdParams p) {
  constexpr int kPerRow = D / 8;
  const int64_t rows = static_cast<int64_t>(p.B) * p.H * p.L;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = c / kPerRow;
  const int part = static_cast<int>(c % kPerRow);
  float acc = 0.f;
  if (row < rows) {
    const uint4 dv = *reinterpret_cast<const uint4*>(
        static_cast<const T*>(p.dout) + s2_row_offset(p.dout_stride, row, p.H, p.L) + part * 8);
    const uint4 ov = *reinterpret_cast<const uint4*>(
        static_cast<const T*>(p.o) + s2_row_offset(p.o_stride, row, p.H, p.L) + part * 8);
    const T* d8 = reinterpret_cast<const T*>(&dv);
    const T* o8 = reinterpret_cast<const T*>(&ov);
#pragma unroll
    for (int x = 0; x < 8; ++x) acc += S2Elem<T>::to_float(d8[x]) * S2Elem<T>::to_float(o8[x]);
  }
#pragma unroll
  for (int off = kPerRow / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (row < rows && part == 0) p.delta[row] = acc;  // delta is (B, H, L) contiguous
}

// dq[b, h, i, d] = dq_accum[b, h, i, d] (contiguous fp32) rounded to T (grid-stride).
template <typename T, int D>
__global__ void s2_bwd_convert_kernel(const S2BwdParams p) {
  constexpr int kPerRow = D / 8;
  const int64_t chunks = static_cast<int64_t>(p.B) * p.H * p.L * kPerRow;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = c / kPerRow;
    const int part = static_cast<int>(c % kPerRow);
    const float4* src = reinterpret_cast<const float4*>(p.dq_accum + c * 8);
    const float4 x0 = src[0], x1 = src[1];
    uint4 out;
    out.x = S2Elem<T>::pack(x0.x, x0.y);
    out.y = S2Elem<T>::pack(x0.z, x0.w);
    out.z = S2Elem<T>::pack(x1.x, x1.y);
    out.w = S2Elem<T>::pack(x1.z, x1.w);
    T* dst = static_cast<T*>(p.dq) + s2_row_offset(p.dq_stride, row, p.H, p.L) + part * 8;
    *reinterpret_cast<uint4*>(dst) = out;
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads) s2_bwd_kernel(const S2BwdParams p) {
  using T = typename Traits::T;
  constexpr int D = Traits::kHeadDim;
  constexpr int BM = Traits::kBlockM;
  constexpr int BN = Traits::kBlockN;
  constexpr int LD = Traits::kLd;
  constexpr int LDS = Traits::kLdS;
  constexpr int kKSteps = D / 16;  // k-steps of S^T = K Q^T and dP^T = V dO^T
  constexpr int kNQ = BM / 8;      // n-tiles (query columns) of S^T, dP^T
  constexpr int kND = D / 8;       // n-tiles of dK, dV
  constexpr int kNDq = Traits::kDqCols / 8;

  extern __shared__ __align__(16) unsigned char s2_smem[];
  T* sK = reinterpret_cast<T*>(s2_smem);
  T* sV = sK + Traits::kSmemK;
  T* sQ0 = sV + Traits::kSmemK;   // stage st: sQ0 + st * kSmemQ
  T* sdO0 = sQ0 + 2 * Traits::kSmemQ;
  T* sdS = sdO0 + 2 * Traits::kSmemQ;  // dS^T (BN x BM), row = key, col = query
  float* sLse0 = reinterpret_cast<float*>(sdS + Traits::kSmemS);  // stage st: + st * BM
  float* sDelta0 = sLse0 + 2 * BM;

  const int n_block = blockIdx.x;
  const int hk = blockIdx.y;
  const int b = blockIdx.z;
  const int k0 = n_block * BN;
  const int warp = threadIdx.x / 32;
  const int g = lane_g(), t = lane_t();
  const int ratio = p.H / p.Hkv;
  const float scale_log2 = p.softmax_scale * kS2Log2e;

  const S2BwdSteps<Traits> steps{p, b, hk, k0, ratio, sQ0, sdO0, sLse0, sDelta0};
  steps.load_kv(sK, sV);

  float dk[kND][4], dv[kND][4];
#pragma unroll
  for (int nd = 0; nd < kND; ++nd)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nd][e] = dv[nd][e] = 0.f;

  const int jl0 = warp * 16 + g;  // this thread's local keys: jl0 (e < 2), jl0 + 8 (e >= 2)

  // The flat sequence of steps (S2BwdSteps): this kv head's query heads x their tiles.
  int hq = 0, m_block = -1;
  S2TileSpan span;
  steps.first_from(hq, m_block, span);
  if (m_block >= 0) steps.load(hq, m_block, 0);

  for (int stage = 0; m_block >= 0; stage ^= 1) {
    int hq_next = hq, m_next = m_block;
    S2TileSpan span_next = span;
    steps.advance(hq_next, m_next, span_next);
    // Every warp passed the previous step's mid-step barrier, so it is done reading the
    // other stage: refill it with the next step while this one computes.
    steps.prefetch_and_wait(hq_next, m_next, stage);
    __syncthreads();

    const int h = hk * ratio + hq;
    const S2HeadMask mask = S2HeadMask::make(p.L, p.group, p.mode, h, p.H);
    float* dq_acc = p.dq_accum + (static_cast<int64_t>(b) * p.H + h) * p.L * D;
    const int q0 = m_block * BM;
    const T* sQ = sQ0 + stage * Traits::kSmemQ;
    const T* sdO = sdO0 + stage * Traits::kSmemQ;
    const float* sLse = sLse0 + stage * BM;
    const float* sDelta = sDelta0 + stage * BM;
    // S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys x BM queries.
    float st[kNQ][4], dpt[kNQ][4];
#pragma unroll
    for (int nt = 0; nt < kNQ; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t ak[4], av[4];
      load_a(ak, sK + warp * 16 * LD + kk * 16, LD);
      load_a(av, sV + warp * 16 * LD + kk * 16, LD);
#pragma unroll
      for (int nt = 0; nt < kNQ; nt += 2) {
        uint32_t bq[2][2], bo[2][2];
        load_b_nk2(bq[0], bq[1], sQ + nt * 8 * LD + kk * 16, LD);
        mma_16816<T>(st[nt], ak, bq[0]);
        mma_16816<T>(st[nt + 1], ak, bq[1]);
        load_b_nk2(bo[0], bo[1], sdO + nt * 8 * LD + kk * 16, LD);
        mma_16816<T>(dpt[nt], av, bo[0]);
        mma_16816<T>(dpt[nt + 1], av, bo[1]);
      }
    }

    // P^T (into st): exp2(s * scale_log2 - lse * log2(e)) as one FFMA per element.
#pragma unroll
    for (int nt = 0; nt < kNQ; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int il = nt * 8 + 2 * t + (e & 1);
        st[nt][e] = s2_exp2(fmaf(st[nt][e], scale_log2, -sLse[il] * kS2Log2e));
      }
    // Boundary tiles: zero P where the query does not see the key (one interval pair
    // per key, two compares per element), in a branch of its own.
    if (s2_tile_needs_mask(mask, q0, k0, BM, BN)) {
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const S2Bounds rows = mask.key_rows(k0 + jl0 + rr * 8);
#pragma unroll
        for (int nt = 0; nt < kNQ; ++nt)
#pragma unroll
          for (int e = 2 * rr; e < 2 * rr + 2; ++e)
            if (!rows.contains(q0 + nt * 8 + 2 * t + (e & 1))) st[nt][e] = 0.f;
      }
    }
    // dS^T (into dpt), the softmax scale folded in.
#pragma unroll
    for (int nt = 0; nt < kNQ; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int il = nt * 8 + 2 * t + (e & 1);
        dpt[nt][e] = st[nt][e] * (dpt[nt][e] - sDelta[il]) * p.softmax_scale;
      }

    // dV += P^T dO, dK += dS^T Q (queries are the k dimension).
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t ap[4], ads[4];
      pack_a_from_acc<T>(ap, st[2 * kk], st[2 * kk + 1]);
      pack_a_from_acc<T>(ads, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
      for (int nd = 0; nd < kND; nd += 2) {
        uint32_t bo[2][2], bq[2][2];
        load_b_kn2(bo[0], bo[1], sdO + kk * 16 * LD + nd * 8, LD);
        mma_16816<T>(dv[nd], ap, bo[0]);
        mma_16816<T>(dv[nd + 1], ap, bo[1]);
        load_b_kn2(bq[0], bq[1], sQ + kk * 16 * LD + nd * 8, LD);
        mma_16816<T>(dk[nd], ads, bq[0]);
        mma_16816<T>(dk[nd + 1], ads, bq[1]);
      }
    }

    // dS^T (keys x queries) to shared memory for dQ: a thread's two adjacent queries
    // of one key are one 32-bit store.
#pragma unroll
    for (int nt = 0; nt < kNQ; ++nt)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr)
        *reinterpret_cast<uint32_t*>(sdS + (jl0 + rr * 8) * LDS + nt * 8 + 2 * t) =
            S2Elem<T>::pack(dpt[nt][2 * rr], dpt[nt][2 * rr + 1]);
    __syncthreads();

    // dQ (BM x D) += dS (BM x BN) K (BN x D); warp -> (row block, column slice).
    {
      const int rb = warp % Traits::kRowBlocks;
      const int c0 = (warp / Traits::kRowBlocks) * Traits::kDqCols;
      float dq[kNDq][4];
#pragma unroll
      for (int nd = 0; nd < kNDq; ++nd)
#pragma unroll
        for (int e = 0; e < 4; ++e) dq[nd][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4];
        load_a_trans(a, sdS + kk * 16 * LDS + rb * 16, LDS);
#pragma unroll
        for (int nd = 0; nd < kNDq; nd += 2) {
          uint32_t bk[2][2];
          load_b_kn2(bk[0], bk[1], sK + kk * 16 * LD + c0 + nd * 8, LD);
          mma_16816<T>(dq[nd], a, bk[0]);
          mma_16816<T>(dq[nd + 1], a, bk[1]);
        }
      }
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int i = q0 + rb * 16 + g + rr * 8;
        if (i < p.L) {
          float* dst = dq_acc + static_cast<int64_t>(i) * D + c0 + 2 * t;
#pragma unroll
          for (int nd = 0; nd < kNDq; ++nd)
            s2_atomic_add2(dst + nd * 8, dq[nd][2 * rr], dq[nd][2 * rr + 1]);
        }
      }
    }
    hq = hq_next;
    m_block = m_next;
    span = span_next;
  }
  cp_async_wait<0>();  // no copy may outlive the CTA (none is pending here: defensive)

  // Epilogue: dK, dV (=) for this CTA's keys.
  T* dkp = static_cast<T*>(p.dk) + b * p.dk_stride.batch + hk * p.dk_stride.head;
  T* dvp = static_cast<T*>(p.dv) + b * p.dv_stride.batch + hk * p.dv_stride.head;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int j = k0 + jl0 + rr * 8;
    if (j < p.L) {
      store_acc_row(dkp + j * p.dk_stride.row, dk, rr);
      store_acc_row(dvp + j * p.dv_stride.row, dv, rr);
    }
  }
}

}  // namespace longlora::attention::kernel
