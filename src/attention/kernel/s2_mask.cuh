// S2-Attention index rules, shared by the forward and the backward kernels so they
// cannot disagree about which keys a query sees.
//
// Per query head h (G = group size, half = G/2, "shifted" = mode != Full && h >= H/2):
//   Full                          row i sees keys [0, i]
//   unshifted heads               row i sees [floor(i/G)*G, i]
//   Segments, shifted heads       row i sees [start(i), i], start(i) = 0 for i < half,
//                                 else half + floor((i-half)/G)*G   (last segment has half)
//   Roll, shifted heads           the sequence rolled by -half (rolled index
//                                 r = (i - half) mod L), causal in groups of G, rolled
//                                 back. For i >= half this is the Segments rule; the
//                                 last rolled group holds [L-half, L) then [0, half), so
//                                 rows i < half see [0, i] AND the wrap range [L-half, L).
//                                 (r = (i + half) mod L gives the same groups and order,
//                                 since L % G == 0.)
//   G == L (any mode)             Full: one group, nothing shifted (attention_reference's
//                                 definition).
// So every row sees one "primary" range [group_start(i), i] and, for Roll's shifted
// heads and rows i < half only, a second range [wrap_lo, L). No roll, no copy.
//
// Tiles: a (query tile, key tile) pair is computed only if some element is visible
// (work O(L*G) instead of O(L^2)); only tiles not wholly visible pay for element-wise
// masking (tile_needs_mask).
#pragma once

#include "longlora/attention/kernel/s2_params.h"

#if defined(__CUDACC__)
#define S2_HD __host__ __device__ __forceinline__
#else
#define S2_HD inline
#endif

namespace longlora::attention::kernel {

// What one row sees (or, transposed, which rows see one key) as at most two closed
// intervals, so that masking a tile costs two compares per element after one division
// per row: x is inside iff lo <= x <= hi or wlo <= x <= whi.
struct S2Bounds {
  int lo, hi, wlo, whi;
  S2_HD bool contains(int x) const { return (x >= lo && x <= hi) || (x >= wlo && x <= whi); }
};

struct S2HeadMask {
  int L = 0;          // sequence length
  int G = 0;          // group size (L in Full mode)
  int offset = 0;     // first group boundary after 0: 0 (unshifted) or G/2 (shifted)
  int wrap_rows = 0;  // rows i < wrap_rows also see [wrap_lo, L): G/2 for Roll-shifted
  int wrap_lo = 0;    // L - G/2 for Roll-shifted heads, L otherwise (empty range)

  static S2_HD S2HeadMask make(int L, int G, S2Mode mode, int h, int H) {
    S2HeadMask m;
    m.L = L;
    // One group over the whole sequence (G == L) is plain causal attention in every
    // mode, by definition (as in attention_reference): nothing is shifted.
    const bool full = (mode == S2Mode::Full) || (G >= L);
    m.G = full ? L : G;
    const bool shifted = !full && (h >= H / 2);
    m.offset = shifted ? m.G / 2 : 0;
    const bool wraps = shifted && (mode == S2Mode::Roll);
    m.wrap_rows = wraps ? m.G / 2 : 0;
    m.wrap_lo = wraps ? L - m.G / 2 : L;
    return m;
  }

  // First key of row i's primary range (nondecreasing in i).
  S2_HD int group_start(int i) const {
    return i < offset ? 0 : offset + ((i - offset) / G) * G;
  }
  // Last row whose primary range can include key j: the end of j's group.
  S2_HD int group_last(int j) const {
    const int e = j < offset ? offset - 1 : offset + ((j - offset) / G) * G + G - 1;
    return e < L - 1 ? e : L - 1;
  }
  // The rule itself. Out-of-range rows/keys (the padding of the last tile) see nothing.
  S2_HD bool visible(int i, int j) const {
    if (i >= L || j >= L) return false;
    if (j <= i && j >= group_start(i)) return true;
    return i < wrap_rows && j >= wrap_lo;
  }
  // The keys row i sees: visible(i, j) == row_keys(i).contains(j) for every j >= 0.
  S2_HD S2Bounds row_keys(int i) const {
    if (i >= L) return {1, 0, 1, 0};
    const bool wraps = i < wrap_rows;
    return {group_start(i), i, wraps ? wrap_lo : 1, wraps ? L - 1 : 0};
  }
  // The rows that see key j: visible(i, j) == key_rows(j).contains(i) for every i >= 0.
  S2_HD S2Bounds key_rows(int j) const {
    if (j >= L) return {1, 0, 1, 0};
    const bool wrapped = j >= wrap_lo;  // only Roll-shifted heads have wrap_lo < L
    return {j, group_last(j), 0, wrapped ? wrap_rows - 1 : -1};
  }
};

// Up to two half-open ranges of tile indices, ascending and disjoint.
struct S2TileSpan {
  int lo[2] = {0, 0};
  int hi[2] = {0, 0};
  int n = 0;
};

// The tiles of a span in ascending order, one at a time, so that a kernel can issue
// the loads of the next tile before computing the current one: first tile, or -1 when
// the span is empty; the tile after `tile` (a tile of the span), or -1 after the last.
S2_HD int s2_span_first(const S2TileSpan& s) {
  if (s.n >= 1 && s.lo[0] < s.hi[0]) return s.lo[0];
  if (s.n == 2 && s.lo[1] < s.hi[1]) return s.lo[1];
  return -1;
}
S2_HD int s2_span_next(const S2TileSpan& s, int tile) {
  if (tile + 1 < s.hi[0]) return tile + 1;  // ranges ascending: tile < hi[0] is range 0
  if (tile < s.hi[0]) return (s.n == 2 && s.lo[1] < s.hi[1]) ? s.lo[1] : -1;
  return (s.n == 2 && tile + 1 < s.hi[1]) ? tile + 1 : -1;
}

S2_HD S2TileSpan s2_make_span(int a0, int a1, bool has_b, int b0, int b1) {
  S2TileSpan s;
  s.lo[0] = a0;
  s.hi[0] = a1;
  s.n = 1;
  if (!has_b) return s;
  if (b0 <= a1 && a0 <= b1) {  // overlap or touch: merge
    s.lo[0] = a0 < b0 ? a0 : b0;
    s.hi[0] = a1 > b1 ? a1 : b1;
  } else if (b0 < a0) {
    s.lo[0] = b0; s.hi[0] = b1;
    s.lo[1] = a0; s.hi[1] = a1;
    s.n = 2;
  } else {
    s.lo[1] = b0; s.hi[1] = b1;
    s.n = 2;
  }
  return s;
}

// Key tiles (of kBlockN keys) that rows [q0, q0 + kBlockM) ∩ [0, L) can see. Exact:
// each listed tile holds at least one visible (row, key) pair.
S2_HD S2TileSpan s2_key_tiles(const S2HeadMask& m, int q0, int block_m, int block_n) {
  const int q_last = (q0 + block_m < m.L ? q0 + block_m : m.L) - 1;
  const int a0 = m.group_start(q0) / block_n;
  const int a1 = q_last / block_n + 1;
  const bool wrap = q0 < m.wrap_rows;
  return s2_make_span(a0, a1, wrap, m.wrap_lo / block_n, (m.L - 1) / block_n + 1);
}

// Query tiles (of kBlockM rows) that can see some key of [k0, k0 + kBlockN) ∩ [0, L).
// Exact, the transpose of s2_key_tiles.
S2_HD S2TileSpan s2_query_tiles(const S2HeadMask& m, int k0, int block_m, int block_n) {
  const int k_last = (k0 + block_n < m.L ? k0 + block_n : m.L) - 1;
  const int a0 = k0 / block_m;
  const int a1 = m.group_last(k_last) / block_m + 1;
  const bool wrap = m.wrap_rows > 0 && k_last >= m.wrap_lo;
  return s2_make_span(a0, a1, wrap, 0, (m.wrap_rows - 1) / block_m + 1);
}

// False only when every (row, key) of the tile is in range and visible, so the
// element-wise mask can be skipped.
S2_HD bool s2_tile_needs_mask(const S2HeadMask& m, int q0, int k0, int block_m,
                              int block_n) {
  const int q_last = q0 + block_m - 1;
  const int k_last = k0 + block_n - 1;
  if (q_last >= m.L || k_last >= m.L) return true;
  const bool primary_full = k_last <= q0 && k0 >= m.group_start(q_last);
  const bool wrap_full = q_last < m.wrap_rows && k0 >= m.wrap_lo;
  return !(primary_full || wrap_full);
}

}  // namespace longlora::attention::kernel
