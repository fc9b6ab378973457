// S2-Attention backward, main kernel on Hopper's warpgroup MMA (wgmma, sm_90a), D = 128.
//
// Same contract, inputs and outputs as s2_bwd_kernel (s2_bwd_kernel.cuh: dk, dv written
// once, dq_accum += with fp32 atomics; the delta and convert passes are shared); the
// step walk and staged copies are S2BwdSteps (s2_bwd_common.cuh), in the swizzled tile
// layout of s2_wgmma.cuh. A CTA owns BN = 128 keys of one kv head, 64 per warpgroup,
// and for each step (query head, 64 queries):
//   S^T = K Q^T, dP^T = V dO^T   64 keys x 64 queries per warpgroup, both operands from
//                                 shared memory (K-major);
//   P^T, dS^T                     in registers; dS^T also to shared memory;
//   dV += P^T dO, dK += dS^T Q    64 keys x 128 dims, in registers for the whole CTA;
//                                 A from registers (the accumulator layout of S^T is the
//                                 A operand's), B = dO, Q transposed by the descriptor;
//   dQ = dS K                     64 queries x this warpgroup's 64 dims: A = dS^T read
//                                 transposed, B = K transposed; fp32 atomics.
// Two barriers per step: at the top (this step's copies visible; every warp done with
// the previous step's stage and dS^T), and before dQ (both warpgroups' dS^T stored).
// The dV/dK products run while the warpgroups wait at the second one. The next step's
// copies are issued after this step's first products, so that their address arithmetic
// overlaps the tensor cores' work (issued before them, it left the tensor cores idle
// after every barrier: 17.5 -> 14.2 ms at L = 32768 on the H200, docs/benchmarks.md).
// Row dQ (Traits::kDqRows: S2BwdWgmmaPipeRowsTraits, the default on H100/H200;
// LONGLORA_S2_BWD_DQROWS=0 turns it off): each warp stores its 16 x 64 block of dQ to its
// own part of shared memory and adds it in the next step, while that step's products
// run, in 16-byte atomics that cover whole 128-byte lines (4 lines a warp instruction,
// where the accumulator layout's 8-byte atomics touch 8 rows): 14.0-14.2 -> 12.7-13.2 ms
// at L = 32768, 126-127 -> 114 ms at 100000.
// Pipelined (Traits::kPipelined: S2BwdWgmmaPipeTraits, the default on H100/H200,
// LONGLORA_S2_BWD_PIPE=0 turns it off; 3-4% faster there): S^T and dP^T are two groups,
// P^T is computed while dP^T runs, and dV is issued before dS^T is made, so that it
// runs meanwhile.
// Bulk dQ (Traits::kBulkDq, LONGLORA_S2_BWD_BULKDQ=1; 2-3% slower on the H100): each
// warpgroup stages its 64 x 64 dQ block in shared memory, and 64 of its threads hand one
// row each to the bulk-copy engine (cp.reduce.async.bulk .add.f32), as flash-attention 3
// does, instead of 32 vector atomics per thread; the adds run while the next step
// computes, and sDq is reused once the issuing threads' wait (.read) says it was read.
#pragma once

#include <cmath>
#include <type_traits>

#include "longlora/attention/kernel/s2_params.h"
#include "s2_bwd2d_kernel.cuh"  // s2_bwd_main_kernel (below) picks among the three
#include "s2_bwd_kernel.cuh"
#include "s2_bwd_common.cuh"
#include "s2_mask.cuh"
#include "s2_mma.cuh"
#include "s2_traits.cuh"
#include "s2_wgmma.cuh"

namespace longlora::attention::kernel {

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1) s2_bwd_wgmma_kernel(const S2BwdParams p) {
  using T = typename Traits::T;
  constexpr int D = Traits::kHeadDim;
  constexpr int BM = Traits::kBlockM;
  constexpr int BN = Traits::kBlockN;
  constexpr int kNQ = BM / 8;  // 8-query column tiles of S^T and dP^T
  constexpr int kND = D / 8;   // 8-dim column tiles of dK and dV

  extern __shared__ __align__(16) unsigned char s2_smem[];
  T* sK = reinterpret_cast<T*>(s2_smem + ((1024u - (smem_addr(s2_smem) & 1023u)) & 1023u));
  T* sV = sK + Traits::kSmemK;
  T* sQ0 = sV + Traits::kSmemK;  // stage st: sQ0 + st * kSmemQ; the same for sdO0
  T* sdO0 = sQ0 + 2 * Traits::kSmemQ;
  T* sdS = sdO0 + 2 * Traits::kSmemQ;  // dS^T: BN keys x BM queries
  float* sLse0 = reinterpret_cast<float*>(sdS + Traits::kSmemDs);  // stage st: + st * BM
  float* sDelta0 = sLse0 + 2 * BM;

  const int n_block = blockIdx.x;
  const int hk = blockIdx.y;
  const int b = blockIdx.z;
  const int k0 = n_block * BN;
  const int warp = threadIdx.x / 32;
  const int wg = warp / 4;  // warpgroup: keys 64 wg .. of the CTA; dQ dims 64 wg ..
  float* sDq = sDelta0 + 2 * BM + wg * BM * Traits::kDqLd;  // kBulkDq, kDqRows: this warpgroup's dQ rows
  const int g = lane_g(), t = lane_t();
  const int ratio = p.H / p.Hkv;
  const float scale_log2 = p.softmax_scale * kS2Log2e;
  const int krow = 64 * wg + 16 * (warp % 4) + g;  // this thread's keys: k0 + krow (+ 8)
  const int qrow = 16 * (warp % 4) + g;            // its queries in dQ: q0 + qrow (+ 8)
  const bool dq_issuer = threadIdx.x % 128 < BM;   // kBulkDq: adds dQ row threadIdx.x % 128

  const S2BwdSteps<Traits> steps{p, b, hk, k0, ratio, sQ0, sdO0, sLse0, sDelta0};
  steps.load_kv(sK, sV);

  // Descriptors (s2_wgmma.cuh). K-major A: this warpgroup's 64 rows of K or V. K-major B:
  // the 64 rows of Q or dO. MN-major B over the step's queries: Q or dO, 16 queries per
  // k-step, LBO = one column block. dQ: A = dS^T read MN-major (16 keys per k-step), B =
  // this warpgroup's column block of K.
  auto desc_kv = [&](const T* s, int kk) {
    return wgmma_desc(s + (kk / 4) * BN * 64 + wg * 64 * 64 + (kk % 4) * 16, 16, 1024);
  };
  auto desc_qo = [&](const T* s, int kk) { return wgmma_desc(s + (kk / 4) * BM * 64 + (kk % 4) * 16, 16, 1024); };
  auto desc_qo_mn = [&](const T* s, int kk) { return wgmma_desc(s + kk * 16 * 64, BM * 128, 1024); };
  auto desc_ds_mn = [&](int kk) { return wgmma_desc(sdS + kk * 16 * 64, BM * 128, 1024); };
  auto desc_k_mn = [&](int kk) { return wgmma_desc(sK + wg * BN * 64 + kk * 16 * 64, BN * 128, 1024); };

  float dk[D / 2], dv[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;

  int hq = 0, m_block = -1;
  S2TileSpan span;
  steps.first_from(hq, m_block, span);
  if (m_block >= 0) steps.load(hq, m_block, 0);
  // A step's copies are waited for and fenced by each thread before the barrier at the
  // top of the step: here for the first, at the end of the previous step for the others,
  // before that step's dQ atomics or stores (ncu showed the fence waiting behind the
  // atomics; moving it changed no timing measurably, but it waits for nothing it need not).
  cp_async_wait<0>();
  fence_proxy_async();

  // kDqRows: the rows of dQ waiting in this warp's part of sDq, added back two rows per
  // instruction, 4 floats a lane, so that each atomic instruction covers four whole
  // 128-byte lines: where they go (this lane's rows: dst + 2 i D), how many rows of the
  // sequence are left from this lane's first (L - r0), whether the step's query tile lies
  // wholly inside the sequence (the same for every lane: no divergence before the next
  // wgmma wait), and whether any wait.
  struct DqRows {
    float* dst;
    int left;
    bool whole;
    bool pending;
  } dq_rows{nullptr, 0, false, false};
  const int lane = threadIdx.x % 32;
  float* const sDqW = sDq + (warp % 4) * 16 * Traits::kDqLd;
  auto flush_dq = [&] {
    if (!dq_rows.pending) return;
    __syncwarp();  // every lane's rows stored
    // All eight loads first: with one register quad reused, each load waited for the
    // previous atomic to read it.
    float4 v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
      v[i] = *reinterpret_cast<const float4*>(sDqW + (lane / 16 + 2 * i) * Traits::kDqLd + (lane % 16) * 4);
    if (dq_rows.whole) {  // all but a ragged last tile: no branches
#pragma unroll
      for (int i = 0; i < 8; ++i) s2_atomic_add4(dq_rows.dst + 2 * i * D, v[i]);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (2 * i < dq_rows.left) s2_atomic_add4(dq_rows.dst + 2 * i * D, v[i]);
    }
    dq_rows.pending = false;
  };

  for (int stage = 0; m_block >= 0; stage ^= 1) {
    int hq_next = hq, m_next = m_block;
    S2TileSpan span_next = span;
    steps.advance(hq_next, m_next, span_next);
    __syncthreads();  // every thread's copies of this step landed and fenced (visible to the
                      // tensor cores); every warp is done with stage ^ 1 and sdS
    // The next step's copies are issued once this step's first products are: their
    // address arithmetic then runs while the tensor cores work, where issuing them first
    // left the tensor cores idle after every barrier.
    auto prefetch = [&] {
      if (m_next >= 0) steps.load(hq_next, m_next, stage ^ 1);
    };

    const int h = hk * ratio + hq;
    const S2HeadMask mask = S2HeadMask::make(p.L, p.group, p.mode, h, p.H);
    float* dq_acc = p.dq_accum + (static_cast<int64_t>(b) * p.H + h) * p.L * D;
    const int q0 = m_block * BM;
    const T* sQ = sQ0 + stage * Traits::kSmemQ;
    const T* sdO = sdO0 + stage * Traits::kSmemQ;
    const float* sLse = sLse0 + stage * BM;
    const float* sDelta = sDelta0 + stage * BM;

    // S^T = K Q^T and dP^T = V dO^T: one group, or (pipelined) two.
    float st[BM / 2], dpt[BM / 2];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) wgmma_ss<T, BM>(st, desc_kv(sK, kk), desc_qo(sQ, kk), kk > 0);
    if constexpr (Traits::kPipelined) wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) wgmma_ss<T, BM>(dpt, desc_kv(sV, kk), desc_qo(sdO, kk), kk > 0);
    wgmma_commit();
    prefetch();
    // kDqRows: the previous step's dQ rows, added while this step's products run (the
    // rows wait in shared memory, not in registers: a wgmma in flight across the loop's
    // back edge, as dQ's own would be, makes ptxas serialize every wgmma, C7514).
    if constexpr (Traits::kDqRows) flush_dq();

    // Where this tile needs the mask: the rows that see this thread's two keys (worked
    // out while the products run).
    const bool masked = s2_tile_needs_mask(mask, q0, k0, BM, BN);
    S2Bounds rows[2] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
    if (masked) {
      rows[0] = mask.key_rows(k0 + krow);
      rows[1] = mask.key_rows(k0 + krow + 8);
    }
    if constexpr (Traits::kPipelined) {
      wgmma_wait<1>();  // S^T; dP^T may still run
    } else {
      wgmma_wait<0>();
      wgmma_reg_fence(dpt);
    }
    wgmma_reg_fence(st);

    // P^T = exp2(s scale log2(e) - lse log2(e)), zero where the query does not see the key
    // (boundary tiles only); dS^T = P^T (dP^T - delta) scale. Element 4 j + 2 rr + c is key
    // krow + 8 rr, query 8 j + 2 t + c.
    // P^T from S^T (in st) where kP, dS^T from dP^T (in dpt, with P^T in st) where kDs;
    // the mask only where kMasked (a boundary tile), without branches: the unmasked
    // tiles, nearly all, run no compares.
    auto elementwise = [&](auto kP, auto kDs, auto kMasked) {
#pragma unroll
      for (int j = 0; j < kNQ; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int ql = 8 * j + 2 * t + c;
#pragma unroll
          for (int rr = 0; rr < 2; ++rr) {
            const int e = 4 * j + 2 * rr + c;
            if constexpr (decltype(kP)::value) {
              const float pv = s2_exp2(fmaf(st[e], scale_log2, -sLse[ql] * kS2Log2e));
              if constexpr (decltype(kMasked)::value) {
                const int x = q0 + ql;
                const S2Bounds& r = rows[rr];
                st[e] = ((x >= r.lo) & (x <= r.hi)) | ((x >= r.wlo) & (x <= r.whi)) ? pv : 0.f;
              } else {
                st[e] = pv;
              }
            }
            if constexpr (decltype(kDs)::value) dpt[e] = st[e] * (dpt[e] - sDelta[ql]) * p.softmax_scale;
          }
        }
    };
    constexpr std::true_type kYes{};
    constexpr std::false_type kNo{};

    // P^T and dS^T as A fragments (16 queries each); dS^T also to shared memory.
    // (The accumulators in the mma.sync C layout over kNQ column tiles.)
    auto& st4 = reinterpret_cast<float(&)[kNQ][4]>(st);
    auto& dpt4 = reinterpret_cast<float(&)[kNQ][4]>(dpt);
    uint32_t pa[BM / 16][4], dsa[BM / 16][4];
    auto pack_p = [&] {
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) pack_a_from_acc<T>(pa[kk], st4[2 * kk], st4[2 * kk + 1]);
    };
    auto pack_and_store_ds = [&] {
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) pack_a_from_acc<T>(dsa[kk], dpt4[2 * kk], dpt4[2 * kk + 1]);
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk)
#pragma unroll
        for (int x = 0; x < 4; ++x)  // dsa[kk][x]: key krow + 8 (x % 2), queries 8 (2 kk + x / 2) + 2 t
          *reinterpret_cast<uint32_t*>(sdS + sw128_offset(krow + 8 * (x % 2), 2 * kk + x / 2, BN) + 2 * t) =
              dsa[kk][x];
    };
    // dV += P^T dO and dK += dS^T Q (k = the step's queries).
    auto issue_dv = [&] {
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) wgmma_rs<T, D>(dv, pa[kk], desc_qo_mn(sdO, kk), 1);
    };
    auto issue_dk = [&] {
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) wgmma_rs<T, D>(dk, dsa[kk], desc_qo_mn(sQ, kk), 1);
    };

    auto make_p = [&] {
      if (masked) elementwise(kYes, kNo, kYes);
      else elementwise(kYes, kNo, kNo);
    };
    if constexpr (!Traits::kPipelined) {
      make_p();
      elementwise(kNo, kYes, kNo);
      pack_p();
      pack_and_store_ds();
      // dV and dK, one group, run while the warpgroups meet at the barrier below.
      wgmma_fence();
      issue_dv();
      issue_dk();
      wgmma_commit();
    } else {
      // P^T while dP^T runs; dV issued as soon as P^T is packed, and run while dS^T is
      // made; then dK, which runs while the warpgroups meet at the barrier below.
      make_p();
      pack_p();
      wgmma_fence();
      issue_dv();
      wgmma_commit();
      wgmma_wait<1>();  // dP^T; dV may still run
      wgmma_reg_fence(dpt);
      elementwise(kNo, kYes, kNo);
      pack_and_store_ds();
      wgmma_fence();
      issue_dk();
      wgmma_commit();
    }
    // kBulkDq: the previous step's bulk adds have read sDq (a thread's own groups;
    // the barrier below passes that on to every thread that writes sDq next).
    if constexpr (Traits::kBulkDq)
      if (dq_issuer) bulk_wait_read<0>();
    fence_proxy_async();  // this thread's dS^T stores visible to the tensor cores
    __syncthreads();      // ... of both warpgroups

    // dQ = dS K: the step's 64 queries x this warpgroup's 64 dims, k = the CTA's keys.
    float dq[32];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) wgmma_ss<T, 64, 1, 1>(dq, desc_ds_mn(kk), desc_k_mn(kk), kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_reg_fence(dv);
    wgmma_reg_fence(dk);
    wgmma_reg_fence(dq);
    wgmma_reg_fence(pa);  // P^T and dS^T registers stay untouched until their wgmmas are done
    wgmma_reg_fence(dsa);
    cp_async_wait<0>();   // the next step's copies (see above the loop)
    fence_proxy_async();
    if constexpr (Traits::kBulkDq) {
      // dQ's rows to sDq, then row r of the warpgroup's 64 added to dq_accum by thread
      // r of it, one bulk add each.
#pragma unroll
      for (int rr = 0; rr < 2; ++rr)
#pragma unroll
        for (int j = 0; j < 8; ++j)
          *reinterpret_cast<float2*>(sDq + (qrow + 8 * rr) * Traits::kDqLd + 8 * j + 2 * t) =
              make_float2(dq[4 * j + 2 * rr], dq[4 * j + 2 * rr + 1]);
      fence_proxy_async();              // the stores visible to the bulk-copy engine
      if (wg == 0) named_barrier_sync<1>(128);  // ... every store of this warpgroup
      else named_barrier_sync<2>(128);
      if (dq_issuer) {
        const int r = threadIdx.x % 128;
        if (q0 + r < p.L)
          bulk_reduce_add_f32(dq_acc + static_cast<int64_t>(q0 + r) * D + 64 * wg, sDq + r * Traits::kDqLd,
                              64 * static_cast<int>(sizeof(float)));
        bulk_commit();
      }
    } else if constexpr (Traits::kDqRows) {
      // This warp's 16 rows (queries q0 + 16 (warp % 4) ..) of the warpgroup's 64 dims
      // to its own part of sDq; added from there (flush_dq).
      __syncwarp();  // every lane has read the previous step's rows
#pragma unroll
      for (int rr = 0; rr < 2; ++rr)
#pragma unroll
        for (int j = 0; j < 8; ++j)
          *reinterpret_cast<float2*>(sDqW + (g + 8 * rr) * Traits::kDqLd + 8 * j + 2 * t) =
              make_float2(dq[4 * j + 2 * rr], dq[4 * j + 2 * rr + 1]);
      const int r0 = q0 + 16 * (warp % 4) + lane / 16;
      dq_rows = {dq_acc + static_cast<int64_t>(r0) * D + 64 * wg + (lane % 16) * 4, p.L - r0, q0 + BM <= p.L, true};
    } else {
      // One base address; the other 15 atomics at constant offsets from it (per-row
      // addresses overwrote registers earlier atomics still had to read).
      float* base = dq_acc + static_cast<int64_t>(q0 + qrow) * D + 64 * wg + 2 * t;
#pragma unroll
      for (int rr = 0; rr < 2; ++rr)
        if (q0 + qrow + 8 * rr < p.L)
#pragma unroll
          for (int j = 0; j < 8; ++j) s2_atomic_add2(base + 8 * rr * D + 8 * j, dq[4 * j + 2 * rr], dq[4 * j + 2 * rr + 1]);
    }
    hq = hq_next;
    m_block = m_next;
    span = span_next;
  }
  if constexpr (Traits::kDqRows) flush_dq();  // the last step's
  cp_async_wait<0>();  // no copy may outlive the CTA (none is pending here: defensive)
  if constexpr (Traits::kBulkDq)
    if (dq_issuer) bulk_wait<0>();  // nor a bulk add reading sDq

  // Epilogue: dK, dV (=) for this thread's two keys.
  T* dkp = static_cast<T*>(p.dk) + b * p.dk_stride.batch + hk * p.dk_stride.head;
  T* dvp = static_cast<T*>(p.dv) + b * p.dv_stride.batch + hk * p.dv_stride.head;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int j = k0 + krow + 8 * rr;
    if (j < p.L) {
      store_acc_row(dkp + j * p.dk_stride.row, reinterpret_cast<const float(&)[kND][4]>(dk), rr);
      store_acc_row(dvp + j * p.dv_stride.row, reinterpret_cast<const float(&)[kND][4]>(dv), rr);
    }
  }
}

// The main backward kernel of a traits type: warps tiled in one dimension
// (S2BwdTraits), in two (S2Bwd2DTraits), or wgmma (S2BwdWgmmaTraits). For the launcher
// and the emulated tests.
template <typename Traits>
inline auto s2_bwd_main_kernel() {
  if constexpr (Traits::kWgmma) return s2_bwd_wgmma_kernel<Traits>;
  else if constexpr (Traits::kTiled2D) return s2_bwd2d_kernel<Traits>;
  else return s2_bwd_kernel<Traits>;
}

}  // namespace longlora::attention::kernel
