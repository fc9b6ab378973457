// Comparing an S2 attention implementation with attention_reference: out, dq, dk, dv.
//
// Oracle: attention_reference in fp32 on the bf16/fp16 inputs upcast to fp32.
// Tolerance from the real limit: the implementation's max abs error against the oracle
// may be at most 3x the error plain libtorch makes at the input dtype
// (attention_reference run in bf16/fp16) against the same oracle, plus a small atol.
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <ostream>
#include <sstream>
#include <string>

#include "longlora/attention/attention.h"
#include "test_util.h"

namespace s2test {

namespace la = longlora::attention;

struct Result {
  torch::Tensor out, dq, dk, dv;
};

// One problem: q (B, H, L, D), k and v (B, Hkv, L, D), the mode and group G, the dtype.
struct S2Case {
  int64_t B, H, Hkv, L, D, G;
  la::Mode mode;
  torch::ScalarType dtype;
};

inline std::string case_name(const S2Case& c) {
  std::ostringstream s;
  s << la::to_string(c.mode) << "_" << (c.dtype == torch::kBFloat16 ? "bf16" : "fp16") << "_B" << c.B
    << "_H" << c.H << "_Hkv" << c.Hkv << "_L" << c.L << "_D" << c.D << "_G" << c.G;
  return s.str();
}

// gtest (and ctest's test names) print the case readably instead of as raw bytes.
inline void PrintTo(const S2Case& c, std::ostream* os) { *os << case_name(c); }

struct Inputs {
  torch::Tensor q, k, v, dout;
};

// Random inputs of the case on `device`. Strided: made (B, L, H, D) and transposed, as a
// model's projections give them, so the (B, H, L, D) views are not contiguous.
inline Inputs random_inputs(const S2Case& c, torch::Device device, bool strided = false,
                            uint64_t seed = 1234) {
  torch::manual_seed(seed);
  const auto o = torch::TensorOptions().dtype(c.dtype).device(device);
  auto make = [&](int64_t heads) {
    return strided ? torch::randn({c.B, c.L, heads, c.D}, o).transpose(1, 2)
                   : torch::randn({c.B, heads, c.L, c.D}, o);
  };
  Inputs in;
  in.q = make(c.H);
  in.k = make(c.Hkv);
  in.v = make(c.Hkv);
  in.dout = make(c.H);
  return in;
}

using AttnFn = torch::Tensor (*)(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                 la::Mode, int64_t);

// out and the gradients of <out, dout> with respect to q, k, v.
inline Result run(AttnFn fn, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                  const torch::Tensor& dout, la::Mode mode, int64_t G) {
  auto qq = q.detach().clone().requires_grad_(true);
  auto kk = k.detach().clone().requires_grad_(true);
  auto vv = v.detach().clone().requires_grad_(true);
  auto out = fn(qq, kk, vv, mode, G);
  auto g = torch::autograd::grad({out}, {qq, kk, vv}, {dout});
  return {out.detach(), g[0], g[1], g[2]};
}

// `got` (the implementation under test on q, k, v, dout) against the fp32 oracle.
inline void expect_matches_reference(const std::string& name, const torch::Tensor& q,
                                     const torch::Tensor& k, const torch::Tensor& v,
                                     const torch::Tensor& dout, la::Mode mode, int64_t G,
                                     const Result& got) {
  auto f32 = [](const torch::Tensor& t) { return t.to(torch::kFloat32); };
  const Result ref = run(&la::attention_reference, f32(q), f32(k), f32(v), f32(dout), mode, G);
  const Result low = run(&la::attention_reference, q, k, v, dout, mode, G);

  ASSERT_EQ(got.out.sizes(), q.sizes());
  ASSERT_EQ(got.dq.sizes(), q.sizes());
  ASSERT_EQ(got.dk.sizes(), k.sizes());
  ASSERT_EQ(got.dv.sizes(), v.sizes());
  ASSERT_EQ(got.out.scalar_type(), q.scalar_type());

  struct Field {
    const char* name;
    const torch::Tensor &ref, &low, &got;
  };
  const Field fields[] = {{"out", ref.out, low.out, got.out},
                          {"dq", ref.dq, low.dq, got.dq},
                          {"dk", ref.dk, low.dk, got.dk},
                          {"dv", ref.dv, low.dv, got.dv}};
  for (const Field& f : fields) {
    const double ref_max = f.ref.abs().max().item<double>();
    const double err_low = testutil::max_abs_diff(f.low, f.ref);
    const double err_got = testutil::max_abs_diff(f.got, f.ref);
    const double tol = 3.0 * err_low + 1e-3 * ref_max + 1e-5;
    EXPECT_TRUE(torch::isfinite(f.got).all().item<bool>()) << name << " " << f.name
                                                           << ": non-finite values";
    EXPECT_LE(err_got, tol) << name << " " << f.name << ": kernel max abs diff " << err_got
                            << ", libtorch " << torch::toString(q.scalar_type())
                            << " max abs diff " << err_low << ", tol " << tol << ", |ref| max "
                            << ref_max;
  }
}

}  // namespace s2test
