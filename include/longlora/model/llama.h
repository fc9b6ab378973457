// LLaMA in libtorch, modules registered under the Hugging Face names so that
// named_parameters() keys are exactly the checkpoint's keys:
//   model.embed_tokens.weight, model.layers.N.{input_layernorm,post_attention_layernorm}.weight,
//   model.layers.N.self_attn.{q,k,v,o}_proj.weight (+ .lora_A/.lora_B.weight),
//   model.layers.N.mlp.{gate,up,down}_proj.weight, model.norm.weight, lm_head.weight.
// Weights keep their stored dtype; activations run in `compute_dtype`.
#pragma once

#include <torch/torch.h>

#include <vector>

#include "longlora/attention/attention.h"
#include "longlora/io/hf_config.h"
#include "longlora/lora/lora.h"

namespace longlora::model {

// HF's RoPE tables for positions [offset, offset + L) / rope_factor: cos, sin (L, head_dim), fp32.
std::pair<torch::Tensor, torch::Tensor> rope_tables(const io::ModelConfig& c, int64_t offset,
                                                    int64_t L, torch::Device device);

// Per-layer keys and values of the tokens seen so far (B, Hkv, T, D), for generation.
struct KVCache {
  std::vector<torch::Tensor> k, v;
  int64_t length = 0;
};

struct ForwardOptions {
  attention::Options attn;     // Full for evaluation; Segments/Roll with a group in training
  int64_t position_offset = 0; // first token's position (generation with a cache)
  KVCache* cache = nullptr;    // full attention only
  bool checkpoint_layers = false;  // recompute each decoder layer in backward
  // Checkpointed layers keep their saved input in pinned host memory (CUDA only).
  bool offload_layers = false;
  // Tokens per chunk of the MLP block where no autograd graph is kept (forward under
  // no-grad, and the recompute of a checkpointed layer, whose MLP backward runs chunk
  // by chunk); 0 = whole sequence. Per-token ops, so chunking is exact. The default
  // also bounds evaluation and prefill at long contexts.
  int64_t mlp_chunk = 8192;
};

struct EmbeddingImpl : torch::nn::Module {
  EmbeddingImpl() { weight = register_parameter("weight", torch::empty({0}), false); }
  torch::Tensor forward(const torch::Tensor& ids);
  torch::Tensor weight;
};
TORCH_MODULE(Embedding);

struct RMSNormImpl : torch::nn::Module {
  explicit RMSNormImpl(double eps) : eps(eps) {
    weight = register_parameter("weight", torch::empty({0}), false);
  }
  torch::Tensor forward(const torch::Tensor& x);
  double eps;
  torch::Tensor weight;
};
TORCH_MODULE(RMSNorm);

struct AttentionImpl : torch::nn::Module {
  explicit AttentionImpl(const io::ModelConfig& c);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const ForwardOptions& opt, int64_t layer);
  io::ModelConfig cfg;
  lora::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
};
TORCH_MODULE(Attention);

struct MLPImpl : torch::nn::Module {
  explicit MLPImpl(const io::ModelConfig& c);
  torch::Tensor forward(const torch::Tensor& x);
  // forward() for a recompute that only back-propagates: down_proj's frozen product
  // is skipped (see lora::Linear::forward_for_backward).
  torch::Tensor forward_for_backward(const torch::Tensor& x);
  lora::Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(MLP);

struct DecoderLayerImpl : torch::nn::Module {
  explicit DecoderLayerImpl(const io::ModelConfig& c);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const ForwardOptions& opt, int64_t layer);
  // The two residual halves of forward: h = x + attn(norm(x)); out = h + mlp(norm(h)).
  torch::Tensor attn_residual(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                              const ForwardOptions& opt, int64_t layer);
  torch::Tensor mlp_branch(const torch::Tensor& h) { return mlp(post_attention_layernorm(h)); }
  torch::Tensor mlp_branch_for_backward(const torch::Tensor& h) {
    return mlp->forward_for_backward(post_attention_layernorm(h));
  }
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  Attention self_attn{nullptr};
  MLP mlp{nullptr};
};
TORCH_MODULE(DecoderLayer);

struct LlamaModelImpl : torch::nn::Module {
  explicit LlamaModelImpl(const io::ModelConfig& c);
  Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  std::vector<DecoderLayer> layer_list;
  RMSNorm norm{nullptr};
};
TORCH_MODULE(LlamaModel);

struct LlamaForCausalLMImpl : torch::nn::Module {
  explicit LlamaForCausalLMImpl(const io::ModelConfig& c);

  // Final normalized hidden states (B, L, hidden) in compute dtype.
  torch::Tensor hidden(const torch::Tensor& ids, const ForwardOptions& opt);
  // Logits (B, L, vocab) in fp32.
  torch::Tensor logits(const torch::Tensor& hidden_states);
  torch::Tensor forward(const torch::Tensor& ids, const ForwardOptions& opt) {
    return logits(hidden(ids, opt));
  }
  // The lm_head weight (tied to the embedding when the config says so).
  torch::Tensor head_weight() const;
  // A tied model gets an lm_head of its own, a frozen copy of the embedding (an adapter
  // then replaces one of the two); cfg.tie_word_embeddings becomes false.
  void untie_embeddings();

  io::ModelConfig cfg;
  torch::ScalarType compute_dtype = torch::kFloat32;
  LlamaModel model{nullptr};
  lora::Linear lm_head{nullptr};
};
TORCH_MODULE(LlamaForCausalLM);

// Sum of -log p(target) over all positions and the count of counted targets
// (targets < 0 are ignored), computing the lm_head and softmax in chunks of
// `chunk` tokens so that no (L, vocab) fp32 tensor is ever whole; differentiable,
// each chunk's logits are recomputed in backward.
std::pair<torch::Tensor, int64_t> chunked_nll(LlamaForCausalLMImpl& m, const torch::Tensor& hidden,
                                              const torch::Tensor& targets, int64_t chunk = 1024);

}  // namespace longlora::model
