// Fused CUDA kernels for the decoder layer's elementwise work (RMSNorm, rotary
// embedding, SwiGLU), forward and backward. The model uses them for CUDA bf16/fp16
// tensors whose shapes fit (the *_fits checks) and LibTorch ops otherwise; the
// results agree up to the order of fp32 sums (tests/test_fused_ops.cpp).
// LONGLORA_FUSED_OPS=0 in the environment turns them off (for A/B timing).
#pragma once

#include <torch/torch.h>

#include <utility>

namespace longlora::model::fused {

// CUDA build, CUDA tensor, bf16 or fp16, and not turned off by the environment.
bool enabled(const torch::Tensor& x);
// Turns the fused path on or off for the whole process (tests compare both).
void set_enabled(bool on);
bool rms_norm_fits(const torch::Tensor& x);  // enabled, last dim a multiple of 8, <= 12288
bool rope_fits(const torch::Tensor& x);      // enabled, 4-D, head dim a multiple of 16
bool swiglu_fits(const torch::Tensor& a);    // enabled

// y = w * (x * rstd) rounded as transformers' LlamaRMSNorm; rstd (fp32, one per row).
// w in x's dtype.
std::pair<torch::Tensor, torch::Tensor> rms_norm_forward(const torch::Tensor& x, const torch::Tensor& w,
                                                         double eps);
// (grad of x, fp32 grad of w or undefined when !need_gw).
std::pair<torch::Tensor, torch::Tensor> rms_norm_backward(const torch::Tensor& g, const torch::Tensor& x,
                                                          const torch::Tensor& w, const torch::Tensor& rstd,
                                                          bool need_gw);
// x (B, H, L, D) * cos + rotate_half(x) * sin; with backward=true, x is the output's
// gradient and the result the input's. cos, sin (L, D) in x's dtype.
torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, bool backward);
// silu(a) * b, and its (da, db) from g.
torch::Tensor swiglu_forward(const torch::Tensor& a, const torch::Tensor& b);
std::pair<torch::Tensor, torch::Tensor> swiglu_backward(const torch::Tensor& g, const torch::Tensor& a,
                                                        const torch::Tensor& b);

}  // namespace longlora::model::fused
