// LoRA linear layer, named as Hugging Face and peft name things:
//   <name>.weight           frozen base weight (out, in), stored dtype
//   <name>.lora_A.weight    (r, in)   Kaiming-uniform(a=sqrt(5)) as peft
//   <name>.lora_B.weight    (out, r)  zero: at step 0 the model is the base model
// y = x W^T + scale * (dropout(x) A^T) B^T, scale = alpha / r. LoRA is applied as
// (x A^T) B^T, never as a merged copy of W.
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "longlora/lora/spec.h"

namespace longlora::lora {

// Holds one parameter called `weight` so state-dict keys read "lora_A.weight".
struct FactorImpl : torch::nn::Module {
  torch::Tensor weight;
  explicit FactorImpl(torch::Tensor w) { weight = register_parameter("weight", std::move(w)); }
};
TORCH_MODULE(Factor);

struct LinearImpl : torch::nn::Module {
  LinearImpl(int64_t in_features, int64_t out_features);
  // Adds lora_A/lora_B (fp32 master weights), A Kaiming-uniform and B zero.
  void add_lora(int64_t r, double alpha, double dropout);
  bool has_lora() const { return !lora_A.is_empty(); }
  torch::Tensor forward(const torch::Tensor& x);
  // For a recompute that only back-propagates through the output: the same graph and
  // gradients as forward(), but the value leaves out the frozen product x W^T (it is
  // the LoRA term alone, or zeros), so that GEMM is never run. Equals forward() when
  // the weight is trainable.
  torch::Tensor forward_for_backward(const torch::Tensor& x);
  // y + the LoRA term of x (y itself without LoRA): forward()'s and
  // forward_for_backward()'s shared second half, one dropout draw each.
  torch::Tensor plus_lora(const torch::Tensor& y, const torch::Tensor& x);

  int64_t in_features, out_features;
  torch::Tensor weight;  // filled by the loader or random init
  Factor lora_A{nullptr}, lora_B{nullptr};
  double scale = 0.0, dropout = 0.0;
};
TORCH_MODULE(Linear);

}  // namespace longlora::lora
