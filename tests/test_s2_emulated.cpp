// The S2 kernels' device code, unchanged, on the CPU emulation of the CUDA execution
// model (src/attention/kernel/s2_emulate.h), against attention_reference: out, dq, dk,
// dv for every mode, both dtypes, both head dims, MHA and GQA, the mma.sync kernels'
// default and alternative tiles, the 2-D-tiled backward (s2_bwd2d_kernel.cuh) and the
// Hopper kernels on wgmma (s2_fwd_wgmma_kernel.cuh with its pipelined variant,
// s2_bwd_wgmma_kernel.cuh). Runs in CI without a GPU; the kernels on a GPU (on
// H100/H200 the wgmma ones, which the dispatch picks there): test_s2_kernel.cpp.
//
// The kernel headers are compiled here as host C++ inside a renamed top-level
// namespace (longlora -> longlora_s2emu), so that their emulated instantiations never
// collide with the nvcc-built kernels the rest of the binary links.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "longlora/attention/attention.h"
#include "s2_compare.h"

#ifdef LONGLORA_WITH_CUDA  // the kernels need the CUDA headers (cuda_bf16.h), not a GPU

#define LONGLORA_S2_EMULATE 1
#define longlora longlora_s2emu
#include "../src/attention/kernel/s2_emulate.h"
// s2_emulate.h must come first: it defines the built-ins the kernels use.
#include "../src/attention/kernel/s2_bwd_wgmma_kernel.cuh"  // s2_bwd_main_kernel
#include "../src/attention/kernel/s2_bwd2d_kernel.cuh"
#include "../src/attention/kernel/s2_bwd_kernel.cuh"
#include "../src/attention/kernel/s2_fwd_kernel.cuh"
#include "../src/attention/kernel/s2_fwd_wgmma_kernel.cuh"  // s2_fwd_main_kernel
#undef longlora
#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim

namespace {

namespace la = longlora::attention;
namespace ek = longlora_s2emu::attention::kernel;

int ceil_div(int a, int b) { return (a + b - 1) / b; }

ek::S2Strides strides_of(const torch::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// The launch sequence of s2_launch.cuh (forward; backward: delta, main, convert), each
// kernel on the emulation.
template <typename T, int D, typename Fwd, typename Bwd>
void run_kernels(ek::S2BwdParams& p) {
  ek::emu::launch({static_cast<unsigned>(ceil_div(p.L, Fwd::kBlockM)), static_cast<unsigned>(p.H),
                   static_cast<unsigned>(p.B)},
                  Fwd::kThreads, [&] { ek::s2_fwd_main_kernel<Fwd>()(p); });
  const int64_t rows = static_cast<int64_t>(p.B) * p.H * p.L;
  ek::emu::launch({static_cast<unsigned>(ceil_div(static_cast<int>(rows * (D / 8)), 256)), 1, 1}, 256,
                  [&] { ek::s2_bwd_delta_kernel<T, D>(p); });
  ek::emu::launch({static_cast<unsigned>(ceil_div(p.L, Bwd::kBlockN)), static_cast<unsigned>(p.Hkv),
                   static_cast<unsigned>(p.B)},
                  Bwd::kThreads, [&] { ek::s2_bwd_main_kernel<Bwd>()(p); });
  ek::emu::launch({static_cast<unsigned>(ceil_div(static_cast<int>(rows * (D / 8)), 256)), 1, 1}, 256,
                  [&] { ek::s2_bwd_convert_kernel<T, D>(p); });
}

// The tile configurations the dispatch (s2_fwd.cu, s2_bwd.cu) can choose.
enum class Tiles { Default, Alt, Bwd2D, FwdWgmma, Wgmma, FwdPipe, Pipe, Bulk, PipeBulk, Stagger, Rows };

template <typename T, int D>
void dispatch(ek::S2BwdParams& p, Tiles tiles) {
  switch (tiles) {
    case Tiles::Default: run_kernels<T, D, ek::S2FwdConfig<T, D>, ek::S2BwdConfig<T, D>>(p); return;
    case Tiles::Alt: run_kernels<T, D, ek::S2FwdAltConfig<T, D>, ek::S2BwdAltConfig<T, D>>(p); return;
    case Tiles::Bwd2D: run_kernels<T, D, ek::S2FwdConfig<T, D>, ek::S2Bwd2DTraits<T, D>>(p); return;
    case Tiles::FwdWgmma: run_kernels<T, D, ek::S2FwdWgmmaTraits<T, D>, ek::S2BwdConfig<T, D>>(p); return;
    case Tiles::FwdPipe: run_kernels<T, D, ek::S2FwdWgmmaPipeTraits<T, D>, ek::S2BwdConfig<T, D>>(p); return;
    case Tiles::Wgmma:  // both passes on wgmma; the backward has D = 128 only
      if constexpr (D == 128) {
        run_kernels<T, D, ek::S2FwdWgmmaTraits<T, D>, ek::S2BwdWgmmaTraits<T, D>>(p);
        return;
      }
      throw std::invalid_argument("the wgmma backward has D = 128 only");
    case Tiles::Pipe:  // both wgmma kernels pipelined
      if constexpr (D == 128) {
        run_kernels<T, D, ek::S2FwdWgmmaPipeTraits<T, D>, ek::S2BwdWgmmaPipeTraits<T, D>>(p);
        return;
      }
      throw std::invalid_argument("the wgmma backward has D = 128 only");
    case Tiles::Bulk:  // the wgmma backward with dQ's bulk adds
      if constexpr (D == 128) {
        run_kernels<T, D, ek::S2FwdWgmmaTraits<T, D>, ek::S2BwdWgmmaBulkTraits<T, D>>(p);
        return;
      }
      throw std::invalid_argument("the wgmma backward has D = 128 only");
    case Tiles::PipeBulk:  // ... pipelined too
      if constexpr (D == 128) {
        run_kernels<T, D, ek::S2FwdWgmmaPipeTraits<T, D>, ek::S2BwdWgmmaPipeBulkTraits<T, D>>(p);
        return;
      }
      throw std::invalid_argument("the wgmma backward has D = 128 only");
    case Tiles::Rows:  // the pipelined wgmma backward adding dQ a row segment at a time
      if constexpr (D == 128) {
        run_kernels<T, D, ek::S2FwdWgmmaStaggerTraits<T, D>, ek::S2BwdWgmmaPipeRowsTraits<T, D>>(p);
        return;
      }
      throw std::invalid_argument("the wgmma backward has D = 128 only");
    case Tiles::Stagger:  // the staggered wgmma forward; at D = 128 the pipelined wgmma backward
      if constexpr (D == 128) {
        run_kernels<T, D, ek::S2FwdWgmmaStaggerTraits<T, D>, ek::S2BwdWgmmaPipeTraits<T, D>>(p);
      } else {
        run_kernels<T, D, ek::S2FwdWgmmaStaggerTraits<T, D>, ek::S2BwdConfig<T, D>>(p);
      }
      return;
  }
}

// The emulated kernels' out and gradients; outputs start as NaN, so an element a kernel
// never writes fails the comparison.
s2test::Result run_emulated(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                            const torch::Tensor& dout, la::Mode mode, int64_t group, Tiles tiles) {
  const int64_t G = la::check_s2_shape(q.size(1), k.size(1), q.size(2), group, mode);
  const auto nan = [](const torch::Tensor& like, torch::ScalarType t) {
    return torch::full(like.sizes(), std::numeric_limits<float>::quiet_NaN(), like.options().dtype(t));
  };
  auto o = nan(q, q.scalar_type()), dq = nan(q, q.scalar_type());
  auto dk = nan(k, k.scalar_type()), dv = nan(v, v.scalar_type());
  auto lse = torch::full({q.size(0), q.size(1), q.size(2)}, std::numeric_limits<float>::quiet_NaN(),
                         q.options().dtype(torch::kFloat32));
  auto delta = lse.clone();
  auto dq_accum = torch::zeros(q.sizes(), q.options().dtype(torch::kFloat32));

  ek::S2BwdParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.B = static_cast<int>(q.size(0));
  p.H = static_cast<int>(q.size(1));
  p.Hkv = static_cast<int>(k.size(1));
  p.L = static_cast<int>(q.size(2));
  p.D = static_cast<int>(q.size(3));
  p.q_stride = strides_of(q);
  p.k_stride = strides_of(k);
  p.v_stride = strides_of(v);
  p.o_stride = strides_of(o);
  p.group = static_cast<int>(G);
  p.mode = mode == la::Mode::Full ? ek::S2Mode::Full
                                  : (mode == la::Mode::Segments ? ek::S2Mode::Segments : ek::S2Mode::Roll);
  p.softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.D)));
  const bool bf16 = q.scalar_type() == torch::kBFloat16;
  p.dtype = bf16 ? ek::S2Dtype::BF16 : ek::S2Dtype::FP16;
  p.dout = dout.data_ptr();
  p.dout_stride = strides_of(dout);
  p.dq = dq.data_ptr();
  p.dq_stride = strides_of(dq);
  p.dk = dk.data_ptr();
  p.dk_stride = strides_of(dk);
  p.dv = dv.data_ptr();
  p.dv_stride = strides_of(dv);
  p.dq_accum = dq_accum.data_ptr<float>();
  p.delta = delta.data_ptr<float>();

  if (bf16 && p.D == 64) dispatch<__nv_bfloat16, 64>(p, tiles);
  else if (bf16) dispatch<__nv_bfloat16, 128>(p, tiles);
  else if (p.D == 64) dispatch<__half, 64>(p, tiles);
  else dispatch<__half, 128>(p, tiles);
  return {o, dq, dk, dv};
}

// The emulated primitives against their definitions, before any kernel uses them.
TEST(S2Emulator, ShuffleAnyAndBarriers) {
  std::vector<float> out(64);
  std::vector<int> any_out(64);
  namespace emu = ek::emu;
  emu::launch({2, 1, 1}, 64, [&] {
    const int tid = static_cast<int>(emu::fiber().tid.x), block = static_cast<int>(emu::cta()->block_idx.x);
    float acc = static_cast<float>(tid + 64 * block);
    for (int off = 4; off > 0; off >>= 1) acc += emu::shfl_xor(acc, off);
    if (block == 1) out[tid] = acc;  // the sum over the 8 lanes tid ^ {0..7}
    any_out[tid] = emu::any(tid == 40);
    emu::syncthreads();
  });
  for (int t = 0; t < 64; ++t) {
    const int base = 64 + (t & ~7);
    EXPECT_EQ(out[t], 8 * base + 28) << t;
    EXPECT_EQ(any_out[t], t >= 32 ? 1 : 0) << t;
  }
}

// A barrier that not every thread reaches is reported, not waited on for ever.
TEST(S2Emulator, BarrierMissedByAWarpIsADeadlockError) {
  namespace emu = ek::emu;
  try {
    emu::launch({1, 1, 1}, 64, [] {
      if (emu::fiber().tid.x < 32) emu::syncthreads();
    });
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("deadlock"), std::string::npos) << e.what();
  }
  // The emulation is usable again afterwards.
  int n = 0;
  emu::launch({1, 1, 1}, 32, [&] { ++n; });
  EXPECT_EQ(n, 32);
}

// A wgmma reads its operands when the wait that retires it runs, the latest the
// hardware may: shared memory changed between issue and wait shows in the product, as
// it may on a GPU. (All-equal tiles, so the swizzled layout does not matter here.)
TEST(S2Emulator, WgmmaReadsItsOperandsAtTheWait) {
  namespace emu = ek::emu;
  using bf16 = __nv_bfloat16;
  constexpr int kTile = 64 * 64;  // 64 rows x 64 elements: one 8 KB swizzle block column
  auto fill = [](int offset, float v) {
    auto* e = reinterpret_cast<bf16*>(ek::s2_smem) + offset;
    for (int i = 0; i < kTile; ++i) e[i] = __float2bfloat16(v);
  };
  std::vector<float> before(128), after(128);
  emu::launch({1, 1, 1}, 128, [&] {
    const int tid = static_cast<int>(emu::fiber().tid.x);
    if (tid == 0) {
      fill(0, 1.f);      // A: 64 x 16 of ones
      fill(kTile, 1.f);  // B: 16 x 64 of ones
    }
    emu::syncthreads();
    const auto* a = reinterpret_cast<const bf16*>(ek::s2_smem);
    float d[32];
    ek::wgmma_fence();
    ek::wgmma_ss<bf16, 64>(d, ek::wgmma_desc(a, 16, 1024), ek::wgmma_desc(a + kTile, 16, 1024), 0);
    ek::wgmma_commit();
    emu::syncthreads();
    if (tid == 0) fill(kTile, 2.f);  // B changes after the issue, before the wait
    emu::syncthreads();
    ek::wgmma_wait<0>();
    before[tid] = d[0];
    after[tid] = d[31];
  });
  for (int t = 0; t < 128; ++t) {
    EXPECT_EQ(before[t], 32.f) << t;  // 16 products of 1 x 2, not 1 x 1
    EXPECT_EQ(after[t], 32.f) << t;
  }
}

// A wgmma never retired by a wait is a kernel error the emulation reports.
TEST(S2Emulator, WgmmaNeverWaitedForIsAnError) {
  namespace emu = ek::emu;
  using bf16 = __nv_bfloat16;
  try {
    emu::launch({1, 1, 1}, 128, [] {
      const auto* a = reinterpret_cast<const bf16*>(ek::s2_smem);
      float d[32];
      ek::wgmma_ss<bf16, 64>(d, ek::wgmma_desc(a, 16, 1024), ek::wgmma_desc(a, 16, 1024), 0);
      ek::wgmma_commit();
    });
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("never committed and waited for"), std::string::npos) << e.what();
  }
}

// A bulk add (cp.reduce.async.bulk) adds its shared-memory source to global memory by
// the wait that retires it; a source changed between issue and wait (a race the GPU
// may or may not show) fails the launch, and so does a bulk add never waited for.
TEST(S2Emulator, BulkAddsAddAndCatchAChangedSource) {
  namespace emu = ek::emu;
  auto* src = reinterpret_cast<float*>(ek::s2_smem);
  alignas(16) float dst[8] = {1, 1, 1, 1, 1, 1, 1, 1};
  auto run = [&](bool change, bool wait) {
    emu::launch({1, 1, 1}, 32, [&] {
      if (emu::fiber().tid.x == 0) {
        for (int i = 0; i < 8; ++i) src[i] = static_cast<float>(i);
        ek::bulk_reduce_add_f32(dst, src, 32);
        ek::bulk_commit();
        if (change) src[3] = 100.f;
        if (wait) ek::bulk_wait_read<0>();
      }
    });
  };
  run(false, true);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(dst[i], 1.f + i) << i;
  auto error_of = [&](bool change, bool wait) {
    try {
      run(change, wait);
    } catch (const std::runtime_error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(error_of(true, true).find("source changed between issue and wait"), std::string::npos)
      << error_of(true, true);
  EXPECT_NE(error_of(false, false).find("bulk copies it never committed and waited for"), std::string::npos)
      << error_of(false, false);
  // Any exception a kernel thread throws (here at the issue: a source outside shared
  // memory) comes out of launch(), instead of ending the process from inside a fiber.
  try {
    emu::launch({1, 1, 1}, 32, [&] { ek::bulk_reduce_add_f32(dst, dst, 32); });
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("not a shared-memory address"), std::string::npos) << e.what();
  }
}

// Views whose strides are not (B, H, L, D)-contiguous, as a model's projections give
// them: the kernels read them in place.
TEST(S2EmulatedViews, StridedInputsMatchTheReference) {
  const s2test::S2Case c{2, 4, 2, 128, 64, 32, la::Mode::Roll, torch::kBFloat16};
  const auto in = s2test::random_inputs(c, torch::kCPU, /*strided=*/true, /*seed=*/7);
  ASSERT_FALSE(in.q.is_contiguous());
  s2test::expect_matches_reference("strided_views", in.q, in.k, in.v, in.dout, c.mode, c.G,
                                   run_emulated(in.q, in.k, in.v, in.dout, c.mode, c.G, Tiles::Default));
  s2test::expect_matches_reference("strided_views_fwdwgmma", in.q, in.k, in.v, in.dout, c.mode, c.G,
                                   run_emulated(in.q, in.k, in.v, in.dout, c.mode, c.G, Tiles::FwdWgmma));
  const s2test::S2Case c128{2, 4, 2, 128, 128, 32, la::Mode::Roll, torch::kBFloat16};
  const auto in128 = s2test::random_inputs(c128, torch::kCPU, /*strided=*/true, /*seed=*/8);
  s2test::expect_matches_reference("strided_views_wgmma", in128.q, in128.k, in128.v, in128.dout, c128.mode,
                                   c128.G, run_emulated(in128.q, in128.k, in128.v, in128.dout, c128.mode,
                                                        c128.G, Tiles::Wgmma));
}

struct EmuCase {
  s2test::S2Case shape;
  Tiles tiles;
};

std::string case_name(const EmuCase& c) {
  return s2test::case_name(c.shape) +
         (c.tiles == Tiles::Alt     ? "_alt"
          : c.tiles == Tiles::Bwd2D  ? "_bwd2d"
          : c.tiles == Tiles::FwdWgmma ? "_fwdwgmma"
          : c.tiles == Tiles::Wgmma    ? "_wgmma"
          : c.tiles == Tiles::FwdPipe  ? "_fwdpipe"
          : c.tiles == Tiles::Pipe     ? "_pipe"
          : c.tiles == Tiles::Bulk     ? "_bulkdq"
          : c.tiles == Tiles::PipeBulk ? "_pipebulkdq"
          : c.tiles == Tiles::Stagger  ? "_stagger"
          : c.tiles == Tiles::Rows     ? "_rowdq"
                                     : "");
}
void PrintTo(const EmuCase& c, std::ostream* os) { *os << case_name(c); }

class S2Emulated : public ::testing::TestWithParam<EmuCase> {};

TEST_P(S2Emulated, OutAndGradsMatchTheReference) {
  const EmuCase c = GetParam();
  const auto& s = c.shape;
  const auto in = s2test::random_inputs(s, torch::kCPU);
  s2test::expect_matches_reference(case_name(c), in.q, in.k, in.v, in.dout, s.mode, s.G,
                                   run_emulated(in.q, in.k, in.v, in.dout, s.mode, s.G, c.tiles));
}

// Small enough for the emulation (each warp primitive costs a round over every thread
// of a CTA): every mode x dtype x head dim once, GQA, ragged lengths and groups that
// are not multiples of the tiles, several query tiles and key blocks per group, both
// tile configurations.
std::vector<EmuCase> emu_cases() {
  using M = la::Mode;
  const auto bf16 = torch::kBFloat16, fp16 = torch::kHalf;
  std::vector<EmuCase> cs;
  for (Tiles tl : {Tiles::Default, Tiles::Bwd2D}) {
    for (M m : {M::Full, M::Segments, M::Roll})
      for (int64_t D : {64, 128}) cs.push_back({{1, 2, 2, 64, D, 16, m, D == 64 ? bf16 : fp16}, tl});
    cs.push_back({{2, 4, 2, 256, 128, 64, M::Segments, bf16}, tl});
    cs.push_back({{1, 4, 1, 256, 64, 128, M::Roll, fp16}, tl});
    cs.push_back({{1, 2, 1, 96, 64, 32, M::Roll, bf16}, tl});
    cs.push_back({{1, 2, 2, 160, 128, 40, M::Segments, bf16}, tl});
  }
  cs.push_back({{1, 2, 2, 192, 128, 96, M::Roll, bf16}, Tiles::Alt});
  cs.push_back({{1, 2, 1, 256, 64, 64, M::Segments, fp16}, Tiles::Alt});
  cs.push_back({{1, 2, 2, 384, 128, 192, M::Roll, bf16}, Tiles::Bwd2D});  // several key blocks per group
  // Three query heads per kv head; a length that is no multiple of 16 (Full mode).
  for (Tiles tl : {Tiles::Default, Tiles::Bwd2D}) {
    cs.push_back({{1, 6, 2, 128, 64, 32, M::Segments, bf16}, tl});
    cs.push_back({{1, 2, 1, 100, 128, 0, M::Full, fp16}, tl});
  }
  // The wgmma kernels (forward at D = 64 and 128; the backward at 128): one 128 x 128
  // tile holding several groups; several key tiles (both stages, Roll's wrap, GQA);
  // ragged lengths and groups.
  for (M m : {M::Full, M::Segments, M::Roll}) {
    cs.push_back({{1, 2, 2, 64, 64, 16, m, fp16}, Tiles::FwdWgmma});
    cs.push_back({{1, 2, 2, 64, 128, 16, m, bf16}, Tiles::Wgmma});
  }
  cs.push_back({{1, 2, 1, 512, 128, 0, M::Full, bf16}, Tiles::Wgmma});
  cs.push_back({{1, 4, 2, 384, 64, 192, M::Roll, fp16}, Tiles::FwdWgmma});
  cs.push_back({{1, 4, 2, 384, 128, 192, M::Roll, fp16}, Tiles::Wgmma});
  cs.push_back({{1, 2, 2, 160, 128, 40, M::Segments, bf16}, Tiles::Wgmma});
  cs.push_back({{1, 6, 2, 300, 128, 100, M::Segments, fp16}, Tiles::Wgmma});
  // The pipelined wgmma forward: one key tile (only the P V after the loop), and walks
  // of up to five tiles, which cycle K's two stages and V's three (Roll's wrap, GQA).
  // The pipelined wgmma backward with it (D = 128): masked steps, several query heads per
  // kv head, both stages.
  cs.push_back({{1, 2, 2, 64, 128, 16, M::Segments, bf16}, Tiles::Pipe});
  cs.push_back({{1, 2, 1, 640, 64, 0, M::Full, bf16}, Tiles::FwdPipe});
  cs.push_back({{1, 4, 2, 384, 64, 192, M::Roll, fp16}, Tiles::FwdPipe});
  cs.push_back({{1, 4, 2, 384, 128, 192, M::Roll, fp16}, Tiles::Pipe});
  cs.push_back({{1, 6, 2, 300, 128, 100, M::Segments, fp16}, Tiles::Pipe});
  // dQ by bulk adds (D = 128): one step per CTA; many steps per CTA, so that the staged
  // rows are rewritten while earlier adds may still read them; a ragged last query tile
  // (rows past L not added).
  cs.push_back({{1, 2, 2, 64, 128, 16, M::Segments, bf16}, Tiles::Bulk});
  cs.push_back({{1, 4, 2, 384, 128, 192, M::Roll, fp16}, Tiles::Bulk});
  cs.push_back({{1, 6, 2, 300, 128, 100, M::Segments, fp16}, Tiles::PipeBulk});
  cs.push_back({{1, 2, 1, 512, 128, 0, M::Full, bf16}, Tiles::PipeBulk});
  // The staggered forward (warpgroups taking turns at a named barrier): one tile and
  // several, Roll's wrap, GQA, ragged lengths; with the pipelined backward at D = 128.
  cs.push_back({{1, 2, 2, 64, 128, 16, M::Segments, bf16}, Tiles::Stagger});
  cs.push_back({{1, 4, 2, 384, 64, 192, M::Roll, fp16}, Tiles::Stagger});
  cs.push_back({{1, 6, 2, 300, 128, 100, M::Segments, fp16}, Tiles::Stagger});
  cs.push_back({{1, 2, 1, 512, 128, 0, M::Full, bf16}, Tiles::Stagger});
  // dQ a row segment at a time, each step's rows added in the next step (D = 128): one
  // step per CTA (added after the loop), many steps (each warp's rows rewritten after
  // the next step read them), a ragged last query tile.
  cs.push_back({{1, 2, 2, 64, 128, 16, M::Segments, bf16}, Tiles::Rows});
  cs.push_back({{1, 6, 2, 300, 128, 100, M::Segments, fp16}, Tiles::Rows});
  cs.push_back({{1, 4, 2, 384, 128, 192, M::Roll, bf16}, Tiles::Rows});
  return cs;
}

INSTANTIATE_TEST_SUITE_P(S2Emulated, S2Emulated, ::testing::ValuesIn(emu_cases()),
                         [](const ::testing::TestParamInfo<EmuCase>& info) { return case_name(info.param); });

}  // namespace

#else
// Said, not silent: a build without the CUDA toolkit runs none of the kernel checks.
TEST(S2Emulated, NotBuilt) {
  GTEST_SKIP() << "built without CUDA (LONGLORA_WITH_CUDA off): the kernels' CPU emulation is not compiled";
}
#endif  // LONGLORA_WITH_CUDA
