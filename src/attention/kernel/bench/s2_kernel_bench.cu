// s2-kernel-bench: the S2 kernels alone, without LibTorch, for fast iteration on a GPU
// machine (build it here, carry the binary; nothing else to build there).
//
// For the forward and the backward it runs the mma.sync kernels' default tiles
// (S2FwdConfig, S2BwdConfig: "mma") and a second configuration (the alternative tiles of
// s2_traits.cuh, or with --fwd-wgmma / --fwd-pipe / --bwd-wgmma / --bwd-pipe / --bwd-2d
// the other kernels, --bwd-bulk with dQ's bulk adds) on the same random bf16 inputs, checks that every output element was
// written (outputs are poisoned with NaN first) and that the two configurations agree,
// then times each (median of --iters calls, CUDA events). The configurations share
// the index rules but not the tiling or the fragment paths, so their agreement catches
// tiling bugs; the oracle for both is attention_reference, in tests/test_s2_kernel.cpp.
//
//   s2-kernel-bench --seq-len 32768 --heads 32 --kv-heads 32 --head-dim 128 --mode segments
//   s2-kernel-bench ... --fwd-wgmma --bwd-pipe    (H100/H200: the kernels the dispatch uses)
//   s2-kernel-bench ... --all-wgmma               (H100/H200: every wgmma variant, one table)
#include <CLI/CLI.hpp>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../s2_launch.cuh"

namespace kn = longlora::attention::kernel;
using bf16 = __nv_bfloat16;

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// Deterministic values in [-1.7, 1.7): a hash of the index, no curand needed.
__global__ void fill_kernel(bf16* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    p[i] = __float2bfloat16(((x & 0xffffffu) / 16777216.f - 0.5f) * 3.4f);
  }
}

// out[0] = max |a - b| (NaN counts as +inf), out[1] = max |b|.
__global__ void diff_kernel(const bf16* a, const bf16* b, int64_t n, float* out) {
  float d = 0.f, m = 0.f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float x = __bfloat162float(a[i]), y = __bfloat162float(b[i]);
    const float e = fabsf(x - y);
    d = fmaxf(d, e == e ? e : INFINITY);
    m = fmaxf(m, fabsf(y));
  }
  atomicMax(reinterpret_cast<int*>(out), __float_as_int(d));  // non-negative floats
  atomicMax(reinterpret_cast<int*>(out) + 1, __float_as_int(m));
}

struct Buf {
  bf16* p = nullptr;
  int64_t n = 0;
  explicit Buf(int64_t n_) : n(n_) { check(cudaMalloc(&p, n * sizeof(bf16)), "cudaMalloc"); }
  ~Buf() { cudaFree(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

double median_ms(const std::function<void()>& f, int iters) {
  for (int i = 0; i < 3; ++i) f();
  cudaEvent_t a, b;
  check(cudaEventCreate(&a), "cudaEventCreate");
  check(cudaEventCreate(&b), "cudaEventCreate");
  std::vector<float> ts;
  for (int i = 0; i < iters; ++i) {
    check(cudaEventRecord(a), "cudaEventRecord");
    f();
    check(cudaEventRecord(b), "cudaEventRecord");
    check(cudaEventSynchronize(b), "cudaEventSynchronize");
    float ms = 0.f;
    check(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
    ts.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

struct Opts {
  int B = 1, H = 32, Hkv = 32, L = 32768, D = 128, iters = 10;
  double ratio = 0.25;
  std::string mode = "segments";
  bool bwd_2d = false;     // the alternative backward is the 2-D-tiled kernel
  bool fwd_wgmma = false;  // the alternative forward is the wgmma kernel (sm_90a)
  bool fwd_pipe = false;   // ... the wgmma kernel pipelined within each warpgroup
  bool fwd_stagger = false;  // ... the wgmma kernel with its warpgroups taking turns
  bool bwd_wgmma = false;  // the alternative backward is the wgmma kernel (sm_90a, D = 128)
  bool bwd_pipe = false;   // ... with its elementwise work overlapped
  bool bwd_bulk = false;   // with --bwd-wgmma or --bwd-pipe: dQ by bulk adds (kBulkDq)
  bool all_wgmma = false;  // every wgmma configuration, in one run (sm_90a, D = 128)
};

// A forward and a backward kernel, timed and compared together.
using FwdFn = std::function<void(const kn::S2FwdParams&)>;
using BwdFn = std::function<void(const kn::S2BwdParams&)>;
struct Config {
  std::string name;
  FwdFn fwd;
  BwdFn bwd;
};
template <typename Traits>
FwdFn fwd_with() {
  return [](const kn::S2FwdParams& f) { kn::launch_s2_fwd<Traits>(f, nullptr); };
}
template <typename Traits>
BwdFn bwd_with() {
  return [](const kn::S2BwdParams& b) { kn::launch_s2_bwd<Traits>(b, nullptr); };
}
template <typename Fwd, typename Bwd>
Config config(std::string name) {
  return {std::move(name), fwd_with<Fwd>(), bwd_with<Bwd>()};
}

// The configurations to run: first the mma.sync defaults (the baseline every other is
// compared with), then the one the flags name, or with --all-wgmma every wgmma one.
template <int D>
std::vector<Config> configs(const Opts& o) {
  using kn::S2BwdConfig, kn::S2FwdConfig;
  std::vector<Config> cs{config<S2FwdConfig<bf16, D>, S2BwdConfig<bf16, D>>("mma")};
  if constexpr (D == 128) {
    using namespace kn;
    if (o.all_wgmma) {
      cs.push_back(config<S2FwdWgmmaTraits<bf16, D>, S2BwdWgmmaTraits<bf16, D>>("wgmma/wgmma"));
      cs.push_back(config<S2FwdWgmmaTraits<bf16, D>, S2BwdWgmmaPipeTraits<bf16, D>>("wgmma/pipe"));  // the default
      cs.push_back(config<S2FwdWgmmaPipeTraits<bf16, D>, S2BwdWgmmaPipeTraits<bf16, D>>("pipe/pipe"));
      cs.push_back(config<S2FwdWgmmaTraits<bf16, D>, S2BwdWgmmaBulkTraits<bf16, D>>("wgmma/wgmma+bulk"));
      cs.push_back(config<S2FwdWgmmaPipeTraits<bf16, D>, S2BwdWgmmaPipeBulkTraits<bf16, D>>("pipe/pipe+bulk"));
      cs.push_back(config<S2FwdWgmmaStaggerTraits<bf16, D>, S2BwdWgmmaPipeTraits<bf16, D>>("stagger/pipe"));
      cs.push_back(config<S2FwdWgmmaStaggerTraits<bf16, D>, S2BwdWgmmaPipeRowsTraits<bf16, D>>("stagger/pipe+rows"));
      return cs;
    }
  }
  // The second configuration: a forward and a backward from the flags (the
  // alternative tiles where none is named).
  Config c = config<kn::S2FwdAltConfig<bf16, D>, kn::S2BwdAltConfig<bf16, D>>("");
  std::string fname = "alt", bname = "alt";
  if (o.fwd_wgmma) {
    c.fwd = fwd_with<kn::S2FwdWgmmaTraits<bf16, D>>();
    fname = "wgmma";
  }
  if (o.fwd_pipe) {
    c.fwd = fwd_with<kn::S2FwdWgmmaPipeTraits<bf16, D>>();
    fname = "pipe";
  }
  if (o.fwd_stagger) {
    c.fwd = fwd_with<kn::S2FwdWgmmaStaggerTraits<bf16, D>>();
    fname = "stagger";
  }
  if (o.bwd_2d) {
    c.bwd = bwd_with<kn::S2Bwd2DTraits<bf16, D>>();
    bname = "2d";
  }
  if constexpr (D == 128) {
    using namespace kn;
    if (o.bwd_wgmma) {
      c.bwd = o.bwd_bulk ? bwd_with<S2BwdWgmmaBulkTraits<bf16, D>>() : bwd_with<S2BwdWgmmaTraits<bf16, D>>();
      bname = "wgmma";
    }
    if (o.bwd_pipe) {
      c.bwd = o.bwd_bulk ? bwd_with<S2BwdWgmmaPipeBulkTraits<bf16, D>>() : bwd_with<S2BwdWgmmaPipeTraits<bf16, D>>();
      bname = "pipe";
    }
  }
  c.name = fname + "/" + bname + (o.bwd_bulk ? "+bulk" : "");
  cs.push_back(std::move(c));
  return cs;
}

template <int D>
int run(const Opts& o) {
  const kn::S2Mode mode = o.mode == "full" ? kn::S2Mode::Full
                          : o.mode == "roll" ? kn::S2Mode::Roll : kn::S2Mode::Segments;
  const int G = mode == kn::S2Mode::Full ? o.L : static_cast<int>(o.L * o.ratio);
  if (o.H % o.Hkv != 0) throw std::runtime_error("bad shape: H must be a multiple of Hkv");
  if (mode != kn::S2Mode::Full && (G < 2 || G % 2 != 0 || o.L % G != 0 || o.H % 2 != 0))
    throw std::runtime_error("bad shape: S2 needs L % G == 0 with G = L * ratio even, and H even");

  // The flags first, then the device: a bad combination is reported as such anywhere.
  const bool second_flags =
      o.fwd_wgmma || o.fwd_pipe || o.fwd_stagger || o.bwd_wgmma || o.bwd_pipe || o.bwd_2d || o.bwd_bulk;
  if (o.all_wgmma && second_flags) throw std::runtime_error("--all-wgmma runs every wgmma configuration: no other kernel flag");
  if (o.bwd_wgmma + o.bwd_pipe + o.bwd_2d > 1) throw std::runtime_error("--bwd-wgmma, --bwd-pipe, --bwd-2d: one backward at a time");
  if (o.fwd_wgmma + o.fwd_pipe + o.fwd_stagger > 1)
    throw std::runtime_error("--fwd-wgmma, --fwd-pipe, --fwd-stagger: one forward at a time");
  if ((o.bwd_wgmma || o.bwd_pipe || o.all_wgmma) && D != 128)
    throw std::runtime_error("--bwd-wgmma, --bwd-pipe, --all-wgmma: head dim 128 only");
  if (o.bwd_bulk && !o.bwd_wgmma && !o.bwd_pipe) throw std::runtime_error("--bwd-bulk goes with --bwd-wgmma or --bwd-pipe");
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  if ((o.fwd_wgmma || o.fwd_pipe || o.fwd_stagger || o.bwd_wgmma || o.bwd_pipe || o.all_wgmma) &&
      (prop.major != 9 || prop.minor != 0))
    throw std::runtime_error("--fwd-wgmma, --fwd-pipe, --fwd-stagger, --bwd-wgmma, --bwd-pipe and --all-wgmma need an sm_90 GPU (and a build with 9.0a)");
  const std::vector<Config> cs = configs<D>(o);
  const int nc = static_cast<int>(cs.size());

  const int64_t nq = int64_t{o.B} * o.H * o.L * D, nk = int64_t{o.B} * o.Hkv * o.L * D;
  const int64_t nr = int64_t{o.B} * o.H * o.L;
  Buf q(nq), k(nk), v(nk), dout(nq);
  std::vector<std::unique_ptr<Buf>> out, dq, dk, dv;  // one each per configuration
  for (int c = 0; c < nc; ++c) {
    out.push_back(std::make_unique<Buf>(nq));
    dq.push_back(std::make_unique<Buf>(nq));
    dk.push_back(std::make_unique<Buf>(nk));
    dv.push_back(std::make_unique<Buf>(nk));
  }
  std::vector<float*> lse(nc);
  float *dq_accum, *delta, *scratch;
  for (auto& l : lse) check(cudaMalloc(&l, nr * sizeof(float)), "cudaMalloc");
  check(cudaMalloc(&dq_accum, nq * sizeof(float)), "cudaMalloc");
  check(cudaMalloc(&delta, nr * sizeof(float)), "cudaMalloc");
  check(cudaMalloc(&scratch, 2 * sizeof(float)), "cudaMalloc");
  fill_kernel<<<1024, 256>>>(q.p, nq, 1);
  fill_kernel<<<1024, 256>>>(k.p, nk, 2);
  fill_kernel<<<1024, 256>>>(v.p, nk, 3);
  fill_kernel<<<1024, 256>>>(dout.p, nq, 4);

  kn::S2BwdParams p;
  p.q = q.p; p.k = k.p; p.v = v.p; p.dout = dout.p;
  p.B = o.B; p.H = o.H; p.Hkv = o.Hkv; p.L = o.L; p.D = D;
  p.q_stride = {int64_t{o.H} * o.L * D, int64_t{o.L} * D, D};
  p.k_stride = {int64_t{o.Hkv} * o.L * D, int64_t{o.L} * D, D};
  p.v_stride = p.k_stride; p.dk_stride = p.k_stride; p.dv_stride = p.k_stride;
  p.o_stride = p.q_stride; p.dout_stride = p.q_stride; p.dq_stride = p.q_stride;
  p.group = G; p.mode = mode; p.softmax_scale = 1.f / std::sqrt(static_cast<float>(D));
  p.dtype = kn::S2Dtype::BF16; p.dq_accum = dq_accum; p.delta = delta;

  // Exact work: visible (query, key) pairs from the kernels' own interval rule.
  double pairs = 0;
  for (int h = 0; h < o.H; ++h) {
    const auto m = kn::S2HeadMask::make(o.L, G, mode, h, o.H);
    for (int i = 0; i < o.L; ++i) {
      const kn::S2Bounds r = m.row_keys(i);
      pairs += std::max(0, r.hi - r.lo + 1) + std::max(0, r.whi - r.wlo + 1);
    }
  }
  const double fwd_flop = 4.0 * D * pairs * o.B;

  std::printf("# %s  B=%d H=%d Hkv=%d L=%d D=%d G=%d mode=%s bf16, median of %d\n", prop.name,
              o.B, o.H, o.Hkv, o.L, D, G, o.mode.c_str(), o.iters);
  auto fwd = [&](int c) {
    kn::S2FwdParams f = p;
    f.o = out[c]->p; f.lse = lse[c];
    cs[c].fwd(f);
  };
  auto bwd = [&](int c) {  // every backward from the baseline's forward
    kn::S2BwdParams b = p;
    b.o = out[0]->p; b.lse = lse[0]; b.dq = dq[c]->p; b.dk = dk[c]->p; b.dv = dv[c]->p;
    check(cudaMemsetAsync(dq_accum, 0, nq * sizeof(float)), "cudaMemsetAsync");
    cs[c].bwd(b);
  };
  auto diff = [&](const Buf& a, const Buf& b) {
    check(cudaMemset(scratch, 0, 2 * sizeof(float)), "cudaMemset");
    diff_kernel<<<1024, 256>>>(a.p, b.p, a.n, scratch);
    float r[2];
    check(cudaMemcpy(r, scratch, sizeof r, cudaMemcpyDeviceToHost), "cudaMemcpy");
    return std::pair<float, float>{r[0], r[1]};
  };
  for (int c = 0; c < nc; ++c) {  // poison, run once, check everything was written
    for (Buf* b : {out[c].get(), dq[c].get(), dk[c].get(), dv[c].get()})
      check(cudaMemset(b->p, 0xff, b->n * sizeof(bf16)), "cudaMemset");
    fwd(c);
    bwd(c);
  }
  check(cudaDeviceSynchronize(), "first run");
  int bad = 0;
  const char* names[] = {"o", "dq", "dk", "dv"};
  for (int c = 1; c < nc; ++c) {
    std::printf("%-18s %-4s %-14s %-14s\n", cs[c].name.c_str(), "", "max |it - mma|", "max |mma|");
    const Buf* mine[4] = {out[c].get(), dq[c].get(), dk[c].get(), dv[c].get()};
    const Buf* base[4] = {out[0].get(), dq[0].get(), dk[0].get(), dv[0].get()};
    for (int f = 0; f < 4; ++f) {
      const auto [d, m] = diff(*mine[f], *base[f]);
      const auto [d0, m0] = diff(*base[f], *base[f]);  // NaN in the baseline -> inf
      // bf16 outputs of two summation orders differ by a few ulps of the largest value.
      const bool ok = std::isfinite(d0) && d <= 0.02f * m + 1e-3f;
      bad += !ok;
      std::printf("%-18s %-4s %-14.4g %-14.4g %s\n", "", names[f], d, m, ok ? "ok" : "MISMATCH or unwritten");
    }
  }
  std::printf("%-18s %10s %9s %10s %9s\n", "kernels", "fwd ms", "TFLOP/s", "bwd ms", "TFLOP/s");
  for (int c = 0; c < nc; ++c) {
    const double tf = median_ms([&] { fwd(c); }, o.iters);
    const double tb = median_ms([&] { bwd(c); }, o.iters);
    std::printf("%-18s %10.3f %9.1f %10.3f %9.1f\n", cs[c].name.c_str(), tf, fwd_flop / tf / 1e9, tb,
                2.5 * fwd_flop / tb / 1e9);
  }
  for (auto& l : lse) cudaFree(l);
  cudaFree(dq_accum);
  cudaFree(delta);
  cudaFree(scratch);
  return bad;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"S2 kernels alone: default vs alternative tiles, agreement and timings"};
  Opts o;
  app.add_option("--batch", o.B)->check(CLI::PositiveNumber);
  app.add_option("--heads", o.H)->check(CLI::PositiveNumber);
  app.add_option("--kv-heads", o.Hkv)->check(CLI::PositiveNumber);
  app.add_option("--seq-len", o.L)->check(CLI::PositiveNumber);
  app.add_option("--head-dim", o.D)->check(CLI::IsMember({64, 128}));
  app.add_option("--mode", o.mode)->check(CLI::IsMember({"full", "segments", "roll"}));
  app.add_option("--ratio", o.ratio, "group size / sequence length")->check(CLI::Range(0.0, 1.0));
  app.add_option("--iters", o.iters)->check(CLI::PositiveNumber);
  app.add_flag("--fwd-wgmma", o.fwd_wgmma,
               "second configuration's forward: the wgmma kernel (s2_fwd_wgmma_kernel.cuh)");
  app.add_flag("--fwd-pipe", o.fwd_pipe,
               "second configuration's forward: the wgmma kernel pipelined within each warpgroup "
               "(s2_fwd_wgmma_kernel.cuh, kPipelined)");
  app.add_flag("--fwd-stagger", o.fwd_stagger,
               "second configuration's forward: the wgmma kernel whose warpgroups take turns at the "
               "tensor cores (s2_fwd_wgmma_kernel.cuh, kStagger)");
  app.add_flag("--bwd-wgmma", o.bwd_wgmma,
               "second configuration's backward: the wgmma kernel (s2_bwd_wgmma_kernel.cuh)");
  app.add_flag("--bwd-pipe", o.bwd_pipe,
               "second configuration's backward: the wgmma kernel with its elementwise work overlapped "
               "(s2_bwd_wgmma_kernel.cuh, kPipelined)");
  app.add_flag("--bwd-bulk", o.bwd_bulk,
               "with --bwd-wgmma or --bwd-pipe: dQ added to its fp32 accumulator by bulk copies "
               "(cp.reduce.async.bulk, kBulkDq) instead of atomics");
  app.add_flag("--all-wgmma", o.all_wgmma,
               "instead of one second configuration, every wgmma one (unpipelined, pipelined, bulk dQ, "
               "staggered forward, and the dispatch's default: stagger/pipe+rows) against the mma.sync baseline, "
               "in one run on the same inputs");
  app.add_flag("--bwd-2d", o.bwd_2d,
               "second configuration's backward: the 2-D-tiled kernel (s2_bwd2d_kernel.cuh), "
               "not the alternative tiles'");
  CLI11_PARSE(app, argc, argv);
  try {
    const int bad = o.D == 64 ? run<64>(o) : run<128>(o);
    return bad == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "s2-kernel-bench: %s\n", e.what());
    return 2;
  }
}
