// The model's one attention function, and its backends.
//
// q (B, H, L, D), k and v (B, Hkv, L, D); H % Hkv == 0 (grouped-query: query head h
// reads kv head h / (H / Hkv)); softmax scale 1/sqrt(D); causal.
//
// Modes (G = group size):
//   Full      plain causal attention over the whole sequence (evaluation, G = L).
//   Segments  heads [0, H/2): causal inside [0,G), [G,2G), ...
//             heads [H/2, H): causal inside [0,G/2), [G/2,3G/2), ..., [L-G/2, L)
//             (LongLoRA's flash-attention path; no token sees a later one).
//   Roll      heads [0, H/2) as above; heads [H/2, H): roll the sequence by -G/2,
//             causal inside groups of G, roll back (the paper's Algorithm 1: the last
//             group wraps around to the sequence's first G/2 tokens).
//   G == L (ratio 1) is plain full causal attention in every mode.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>

namespace longlora::attention {

enum class Mode { Full, Segments, Roll };
enum class Backend { Auto, Reference, Sdpa, Kernel };

Mode parse_mode(const std::string& s);        // "full" | "segments" | "roll"
Backend parse_backend(const std::string& s);  // "auto" | "reference" | "sdpa" | "kernel"
std::string to_string(Mode m);
std::string to_string(Backend b);

// Checks the S2 shape rules and returns G. Full mode returns L.
// Throws longlora::Error for L % G != 0, odd G, odd H (non-Full modes); its messages
// start with `group_field` (group size errors) or `heads_field` (head counts), which
// a run names with where its keys were set.
int64_t check_s2_shape(int64_t H, int64_t Hkv, int64_t L, int64_t group, Mode mode,
                       const std::string& group_field = "attention.group_ratio",
                       const std::string& heads_field = "attention");

// Visible (query, key) pairs of one head (the causal diagonal included): what the
// benchmarks count as work. `shifted`: a head of the second half.
int64_t visible_pairs(int64_t L, int64_t G, Mode mode, bool shifted);

struct Options {
  Mode mode = Mode::Full;
  int64_t group = 0;  // tokens per group; ignored in Full mode
  Backend backend = Backend::Auto;
};

// Dispatch: Auto picks Sdpa for CUDA tensors (LibTorch's fused flash kernel under the
// same grouping: 16.6 ms against our kernel's 60.6 ms, 32k, H200, docs/benchmarks.md)
// and Reference on the CPU; Kernel only when asked for.
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k,
                        const torch::Tensor& v, const Options& opt);
// The backend Auto stands for on a device (what attention() runs).
Backend resolve_backend(Backend b, bool cuda);

// Built from libtorch ops, autograd through them; the oracle for the others.
torch::Tensor attention_reference(const torch::Tensor& q, const torch::Tensor& k,
                                  const torch::Tensor& v, Mode mode, int64_t group);

// Same grouping/shift around at::scaled_dot_product_attention (baseline).
torch::Tensor attention_sdpa(const torch::Tensor& q, const torch::Tensor& k,
                             const torch::Tensor& v, Mode mode, int64_t group);

// The custom CUDA kernel (torch::autograd::Function). Throws where not built.
bool kernel_compiled();
torch::Tensor attention_kernel(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, Mode mode, int64_t group);

}  // namespace longlora::attention
