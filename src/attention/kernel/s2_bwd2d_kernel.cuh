// S2-Attention backward, main kernel with the warps tiled in two dimensions
// (flash-attention 2's layout): the alternative to s2_bwd_kernel, selected with
// LONGLORA_S2_BWD_2D=1. Same contract, inputs and outputs as s2_bwd_kernel
// (s2_bwd_kernel.cuh: dk, dv written once, dq_accum += with atomics; the delta and
// convert passes are shared); tile layout in S2Bwd2DTraits (s2_traits.cuh).
//
// Why: s2_bwd_kernel gives every warp 16 keys x all queries of a step, so every warp
// re-reads all of Q and dO from shared memory (0.6 ldmatrix per mma) and its 128
// accumulator registers leave none for prefetching fragments. Here S and dP are split
// 2 x 4 and dK, dV 4 x 2 over the 8 warps, with P and dS passed through shared memory.
//
// Per step (query head, query tile of 64), three barriers:
//   top     every warp is done with the previous step: its Q/dO stage, sP and sdS are
//           free; the next step's copies are issued into that stage, this step's waited
//           for; a second barrier makes them visible;
//   middle  P and dS are in shared memory;
// and dV, dK, dQ are computed after the middle barrier.
#pragma once

#include <cmath>

#include "longlora/attention/kernel/s2_params.h"
#include "s2_bwd_common.cuh"
#include "s2_bwd_kernel.cuh"
#include "s2_mask.cuh"
#include "s2_mma.cuh"
#include "s2_traits.cuh"

namespace longlora::attention::kernel {

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads) s2_bwd2d_kernel(const S2BwdParams p) {
  using T = typename Traits::T;
  constexpr int D = Traits::kHeadDim;
  constexpr int BM = Traits::kBlockM;
  constexpr int BN = Traits::kBlockN;
  constexpr int LD = Traits::kLd;
  constexpr int LDP = Traits::kLdP;
  constexpr int kKSteps = D / 16;                // k-steps of S = Q K^T and dP = dO V^T
  constexpr int kNDkv = Traits::kDimsDkv / 8;    // n-tiles of dK, dV per warp
  constexpr int kNDq = Traits::kDimsDq / 8;      // n-tiles of dQ per warp

  extern __shared__ __align__(16) unsigned char s2_smem[];
  T* sK = reinterpret_cast<T*>(s2_smem);
  T* sV = sK + Traits::kSmemK;
  T* sQ0 = sV + Traits::kSmemK;  // stage st: sQ0 + st * kSmemQ
  T* sdO0 = sQ0 + 2 * Traits::kSmemQ;
  T* sP = sdO0 + 2 * Traits::kSmemQ;  // P (BM x BN), row = query, col = key
  T* sdS = sP + Traits::kSmemP;       // dS, the same layout
  float* sLse0 = reinterpret_cast<float*>(sdS + Traits::kSmemP);  // stage st: + st * BM
  float* sDelta0 = sLse0 + 2 * BM;

  const int n_block = blockIdx.x;
  const int hk = blockIdx.y;
  const int b = blockIdx.z;
  const int k0 = n_block * BN;
  const int warp = threadIdx.x / 32;
  const int g = lane_g(), t = lane_t();
  const int ratio = p.H / p.Hkv;
  const float scale_log2 = p.softmax_scale * kS2Log2e;
  const int wm = warp / 4, wn = warp % 4;  // S, dP, dQ: queries 32 wm.., keys/dims by wn
  const int wk = warp / 2, wd = warp % 2;  // dK, dV: keys 32 wk.., dims kDimsDkv wd..
  const int dkv0 = wd * Traits::kDimsDkv, dq0 = wn * Traits::kDimsDq;

  const S2BwdSteps<Traits> steps{p, b, hk, k0, ratio, sQ0, sdO0, sLse0, sDelta0};
  steps.load_kv(sK, sV);

  float dk[2][kNDkv][4], dv[2][kNDkv][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nd = 0; nd < kNDkv; ++nd)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[mt][nd][e] = dv[mt][nd][e] = 0.f;

  // The flat sequence of steps (S2BwdSteps): this kv head's query heads x their tiles.
  int hq = 0, m_block = -1;
  S2TileSpan span;
  steps.first_from(hq, m_block, span);
  if (m_block >= 0) steps.load(hq, m_block, 0);

  for (int stage = 0; m_block >= 0; stage ^= 1) {
    int hq_next = hq, m_next = m_block;
    S2TileSpan span_next = span;
    steps.advance(hq_next, m_next, span_next);
    __syncthreads();  // the previous step is done everywhere: stage ^ 1, sP, sdS are free
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

    // S = Q K^T and dP = dO V^T: this warp's 32 queries (two m-tiles) x 32 keys.
    float s[2][4][4], dp[2][4][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = dp[mt][nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t aq[2][4], ao[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        load_a(aq[mt], sQ + (wm * 32 + mt * 16) * LD + kk * 16, LD);
        load_a(ao[mt], sdO + (wm * 32 + mt * 16) * LD + kk * 16, LD);
      }
#pragma unroll
      for (int nt = 0; nt < 4; nt += 2) {
        uint32_t bk[2][2], bv[2][2];
        load_b_nk2(bk[0], bk[1], sK + (wn * 32 + nt * 8) * LD + kk * 16, LD);
        load_b_nk2(bv[0], bv[1], sV + (wn * 32 + nt * 8) * LD + kk * 16, LD);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_16816<T>(s[mt][nt], aq[mt], bk[0]);
          mma_16816<T>(s[mt][nt + 1], aq[mt], bk[1]);
          mma_16816<T>(dp[mt][nt], ao[mt], bv[0]);
          mma_16816<T>(dp[mt][nt + 1], ao[mt], bv[1]);
        }
      }
    }

    // P = exp2(s * scale_log2 - lse * log2(e)), zero where the query does not see the
    // key (boundary tiles only); dS = P (dP - delta) scale. Both to shared memory, a
    // thread's two adjacent keys of one query as one 32-bit store.
    const bool masked = s2_tile_needs_mask(mask, q0, k0, BM, BN);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int il = wm * 32 + mt * 16 + g + rr * 8;
        const float lse_log2 = sLse[il] * kS2Log2e;
        const float delta = sDelta[il];
        // Read on boundary tiles only; row_keys costs a division.
        const S2Bounds keys = masked ? mask.row_keys(q0 + il) : S2Bounds{0, 0, 0, 0};
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          float pe[2], dse[2];
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int e = 2 * rr + c;
            float pv = s2_exp2(fmaf(s[mt][nt][e], scale_log2, -lse_log2));
            if (masked && !keys.contains(k0 + wn * 32 + nt * 8 + 2 * t + c)) pv = 0.f;
            pe[c] = pv;
            dse[c] = pv * (dp[mt][nt][e] - delta) * p.softmax_scale;
          }
          const int off = il * LDP + wn * 32 + nt * 8 + 2 * t;
          *reinterpret_cast<uint32_t*>(sP + off) = S2Elem<T>::pack(pe[0], pe[1]);
          *reinterpret_cast<uint32_t*>(sdS + off) = S2Elem<T>::pack(dse[0], dse[1]);
        }
      }
    __syncthreads();

    // dV += P^T dO, dK += dS^T Q: this warp's 32 keys x kDimsDkv dims, over the step's
    // queries (the k dimension; P^T and dS^T read transposed from the query-major tiles).
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t ap[2][4], ads[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        load_a_trans(ap[mt], sP + kk * 16 * LDP + wk * 32 + mt * 16, LDP);
        load_a_trans(ads[mt], sdS + kk * 16 * LDP + wk * 32 + mt * 16, LDP);
      }
#pragma unroll
      for (int nd = 0; nd < kNDkv; nd += 2) {
        uint32_t bo[2][2], bq[2][2];
        load_b_kn2(bo[0], bo[1], sdO + kk * 16 * LD + dkv0 + nd * 8, LD);
        load_b_kn2(bq[0], bq[1], sQ + kk * 16 * LD + dkv0 + nd * 8, LD);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_16816<T>(dv[mt][nd], ap[mt], bo[0]);
          mma_16816<T>(dv[mt][nd + 1], ap[mt], bo[1]);
          mma_16816<T>(dk[mt][nd], ads[mt], bq[0]);
          mma_16816<T>(dk[mt][nd + 1], ads[mt], bq[1]);
        }
      }
    }

    // dQ = dS K: this warp's 32 queries x kDimsDq dims over the CTA's keys, added to
    // dq_accum with fp32 atomics (other key blocks add theirs).
    {
      float dq[2][kNDq][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nd = 0; nd < kNDq; ++nd)
#pragma unroll
          for (int e = 0; e < 4; ++e) dq[mt][nd][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) load_a(a[mt], sdS + (wm * 32 + mt * 16) * LDP + kk * 16, LDP);
#pragma unroll
        for (int nd = 0; nd < kNDq; nd += 2) {
          uint32_t bk[2][2];
          load_b_kn2(bk[0], bk[1], sK + kk * 16 * LD + dq0 + nd * 8, LD);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma_16816<T>(dq[mt][nd], a[mt], bk[0]);
            mma_16816<T>(dq[mt][nd + 1], a[mt], bk[1]);
          }
        }
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int i = q0 + wm * 32 + mt * 16 + g + rr * 8;
          if (i < p.L) {
            s2_atomic_add_acc_row(dq_acc + static_cast<int64_t>(i) * D + dq0, dq[mt], rr);
          }
        }
    }
    hq = hq_next;
    m_block = m_next;
    span = span_next;
  }
  cp_async_wait<0>();  // no copy may outlive the CTA (none is pending here: defensive)

  // Epilogue: dK, dV (=) for this warp's keys and dims.
  T* dkp = static_cast<T*>(p.dk) + b * p.dk_stride.batch + hk * p.dk_stride.head;
  T* dvp = static_cast<T*>(p.dv) + b * p.dv_stride.batch + hk * p.dv_stride.head;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int j = k0 + wk * 32 + mt * 16 + g + rr * 8;
      if (j < p.L) {
        store_acc_row(dkp + j * p.dk_stride.row + dkv0, dk[mt], rr);
        store_acc_row(dvp + j * p.dv_stride.row + dkv0, dv[mt], rr);
      }
    }
}

}  // namespace longlora::attention::kernel
