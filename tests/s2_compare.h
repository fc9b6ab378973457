// Comparing an S2 attention implementation with attention_reference: out, dq, dk, dv.
//
// Oracle: attention_reference in fp32 on the bf16/fp16 inputs upcast to fp32.
// Tolerance from the real limit: the implementation's max abs error against the oracle
// may be at most 3x the error plain libtorch makes at the input dtype
// (attention_reference run in bf16/fp16) against the same oracle, plus a small atol.
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

#include "longlora/attention/attention.h"

namespace s2test {

namespace la = longlora::attention;

struct Result {
  torch::Tensor out, dq, dk, dv;
};

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

inline double max_abs(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat32).cpu() - b.to(torch::kFloat32).cpu()).abs().max().item<double>();
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
    const double err_low = max_abs(f.low, f.ref);
    const double err_got = max_abs(f.got, f.ref);
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
