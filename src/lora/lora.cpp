#include "longlora/lora/lora.h"

#include <cmath>

namespace longlora::lora {

namespace {

// y = x W^T for autograd only: backward gives g W, forward computes nothing (a zero
// view of the output's shape). W is frozen.
struct FrozenProductGrad : torch::autograd::Function<FrozenProductGrad> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& w) {
    ctx->save_for_backward({w});
    auto sizes = x.sizes().vec();
    sizes.back() = w.size(0);
    return torch::zeros({}, x.options()).expand(sizes);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list g) {
    auto w = ctx->get_saved_variables()[0];
    return {torch::matmul(g[0], w.to(g[0].scalar_type())), torch::Tensor()};
  }
};

}  // namespace

LinearImpl::LinearImpl(int64_t in, int64_t out) : in_features(in), out_features(out) {
  weight = register_parameter("weight", torch::empty({0}), /*requires_grad=*/false);
}

void LinearImpl::add_lora(int64_t r, double alpha, double drop) {
  auto opts = torch::dtype(torch::kFloat32).device(weight.device());
  // peft: nn.init.kaiming_uniform_(A, a=sqrt(5)) -> bound = 1/sqrt(fan_in). Drawn on
  // the CPU generator whatever the device, so a run starts from the same adapter on
  // the CPU and on a GPU (the GPU-vs-CPU loss-curve test relies on it).
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
  auto a = torch::empty({r, in_features}, torch::kFloat32).uniform_(-bound, bound).to(weight.device());
  lora_A = register_module("lora_A", Factor(a));
  lora_B = register_module("lora_B", Factor(torch::zeros({out_features, r}, opts)));
  scale = alpha / static_cast<double>(r);
  dropout = drop;
}

torch::Tensor LinearImpl::forward(const torch::Tensor& x) {
  const auto dt = x.scalar_type();
  return plus_lora(torch::matmul(x, (weight.scalar_type() == dt ? weight : weight.to(dt)).t()), x);
}

torch::Tensor LinearImpl::forward_for_backward(const torch::Tensor& x) {
  if (weight.requires_grad() || !torch::GradMode::is_enabled()) return forward(x);
  return plus_lora(FrozenProductGrad::apply(x, weight), x);
}

torch::Tensor LinearImpl::plus_lora(const torch::Tensor& y, const torch::Tensor& x) {
  if (lora_A.is_empty()) return y;
  const auto dt = x.scalar_type();
  auto h = dropout > 0 ? torch::dropout(x, dropout, is_training()) : x;
  // Master weights are fp32; the cast is part of the graph so grads reach them in fp32.
  h = torch::matmul(h, lora_A->weight.to(dt).t());
  // y + scale * h B^T as one GEMM that accumulates into y: no activation-sized
  // h B^T and scaled copy, forward or backward.
  const auto sizes = y.sizes().vec();
  return torch::addmm(y.reshape({-1, out_features}), h.reshape({-1, h.size(-1)}), lora_B->weight.to(dt).t(),
                      /*beta=*/1.0, /*alpha=*/scale)
      .view(sizes);
}

}  // namespace longlora::lora
