#include "longlora/model/llama.h"

#include "longlora/model/fused.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <unordered_map>

#ifdef LONGLORA_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace longlora::model {

using torch::indexing::Slice;

std::pair<torch::Tensor, torch::Tensor> rope_tables(const io::ModelConfig& c, int64_t offset,
                                                    int64_t L, torch::Device device) {
  auto f32 = torch::dtype(torch::kFloat32).device(device);
  const int64_t D = c.head_dim;
  // As transformers computes it: fp32 inv_freq; linear interpolation divides it by the factor.
  auto exponent = torch::arange(0, D, 2, torch::dtype(torch::kInt64).device(device)).to(torch::kFloat32) /
                  static_cast<double>(D);
  auto inv_freq = 1.0 / torch::pow(torch::scalar_tensor(c.rope_theta, f32), exponent);
  if (c.rope_factor != 1.0) inv_freq = inv_freq / c.rope_factor;
  auto pos = torch::arange(offset, offset + L, torch::dtype(torch::kInt64).device(device)).to(torch::kFloat32);
  auto freqs = torch::outer(pos, inv_freq);
  auto emb = torch::cat({freqs, freqs}, -1);
  return {emb.cos(), emb.sin()};
}

namespace {

torch::Tensor rotate_half(const torch::Tensor& x) {
  const int64_t h = x.size(-1) / 2;
  return torch::cat({-x.index({"...", Slice(h, torch::indexing::None)}), x.index({"...", Slice(0, h)})}, -1);
}

// x * cos + rotate_half(x) * sin: the fused kernel where it fits, LibTorch ops otherwise.
torch::Tensor rope_forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  if (fused::rope_fits(x)) return fused::rope(x, cos, sin, /*backward=*/false);
  return x * cos + rotate_half(x) * sin;
}

// Rotary embedding as an autograd function that saves only the (L, D) tables: the
// generic graph kept x and rotate_half(x) for q and k, 4 activation-sized tensors
// per layer. rotate_half is orthogonal with inverse -rotate_half, so
// d/dx = g * cos - rotate_half(g * sin).
struct Rope : torch::autograd::Function<Rope> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& cos, const torch::Tensor& sin) {
    ctx->save_for_backward({cos, sin});
    return rope_forward(x, cos, sin);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list g) {
    auto s = ctx->get_saved_variables();
    if (fused::rope_fits(g[0])) return {fused::rope(g[0], s[0], s[1], /*backward=*/true), torch::Tensor(), torch::Tensor()};
    return {g[0] * s[0] - rotate_half(g[0] * s[1]), torch::Tensor(), torch::Tensor()};
  }
};

torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  if (!torch::GradMode::is_enabled() || !x.requires_grad()) return rope_forward(x, cos, sin);
  return Rope::apply(x, cos, sin);
}

// RMSNorm as transformers computes it (fp32 statistics, cast back, then the weight):
// the output and the fp32 1/rms (one pass in the fused kernel where it fits: one per
// row; else LibTorch ops: (..., 1)).
struct RmsNormOut {
  torch::Tensor y, rstd;
  bool fused;
};

RmsNormOut rms_norm_values(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  if (fused::rms_norm_fits(x)) {
    auto [y, rstd] = fused::rms_norm_forward(x, w, eps);
    return {y, rstd, true};
  }
  auto xf = x.to(torch::kFloat32);
  auto r = torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return {w.to(x.scalar_type()) * (xf * r).to(x.scalar_type()), r, false};
}

// RMSNorm as an autograd function that saves the input and the fp32 1/rms per token
// instead of the fp32 copies the generic graph keeps (3 activation-sized fp32 tensors).
struct RmsNormFn : torch::autograd::Function<RmsNormFn> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& w, double eps) {
    auto out = rms_norm_values(x, w, eps);
    ctx->save_for_backward({x, w, out.rstd});
    if (out.fused) ctx->saved_data["fused"] = true;
    return out.y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad) {
    auto s = ctx->get_saved_variables();
    const auto &x = s[0], &w = s[1], &r = s[2];
    const auto& g = grad[0];
    if (ctx->saved_data.count("fused")) {
      auto [gx, gw] = fused::rms_norm_backward(g, x, w, r, w.requires_grad());
      return {gx, gw.defined() ? gw.to(w.scalar_type()) : gw, torch::Tensor()};
    }
    auto xhat = x.to(torch::kFloat32) * r;
    torch::Tensor gw;
    if (w.requires_grad()) {
      auto prod = g.to(torch::kFloat32) * xhat.to(x.scalar_type()).to(torch::kFloat32);
      gw = prod.reshape({-1, prod.size(-1)}).sum(0).to(w.scalar_type());
    }
    auto gh = (g * w.to(g.scalar_type())).to(torch::kFloat32);
    auto gx = r * (gh - xhat * (gh * xhat).mean(-1, /*keepdim=*/true));
    return {gx.to(x.scalar_type()), gw, torch::Tensor()};
  }
};

// silu(a) * b saving only a and b (autograd kept silu(a) too), one fused pass each way.
struct SwiGluFn : torch::autograd::Function<SwiGluFn> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& a,
                               const torch::Tensor& b) {
    ctx->save_for_backward({a, b});
    return fused::swiglu_forward(a, b);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list g) {
    auto s = ctx->get_saved_variables();
    auto [da, db] = fused::swiglu_backward(g[0], s[0], s[1]);
    return {da, db};
  }
};

torch::Tensor swiglu(const torch::Tensor& a, const torch::Tensor& b) {
  if (!fused::swiglu_fits(a) || a.sizes() != b.sizes()) return torch::silu(a) * b;
  if (torch::GradMode::is_enabled() && (a.requires_grad() || b.requires_grad())) return SwiGluFn::apply(a, b);
  return fused::swiglu_forward(a, b);
}

// Full attention of n new queries against T cached + n new keys (generation).
torch::Tensor cached_attention(const torch::Tensor& q, torch::Tensor k, torch::Tensor v) {
  const int64_t H = q.size(1), Hkv = k.size(1), n = q.size(2), T = k.size(2);
  if (H != Hkv) {
    k = k.repeat_interleave(H / Hkv, 1);
    v = v.repeat_interleave(H / Hkv, 1);
  }
  auto scores = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(q.size(-1)));
  if (n > 1) {  // query i (absolute T - n + i) sees keys j <= T - n + i
    auto mask = torch::ones({n, T}, torch::dtype(torch::kBool).device(q.device())).triu(T - n + 1);
    scores = scores.masked_fill(mask, -std::numeric_limits<float>::infinity());
  }
  return torch::matmul(torch::softmax(scores.to(torch::kFloat32), -1).to(q.scalar_type()), v);
}

}  // namespace

torch::Tensor EmbeddingImpl::forward(const torch::Tensor& ids) { return torch::embedding(weight, ids); }

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  if (torch::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad()))
    return RmsNormFn::apply(x, weight, eps);
  return rms_norm_values(x, weight, eps).y;
}

AttentionImpl::AttentionImpl(const io::ModelConfig& c) : cfg(c) {
  const int64_t hd = c.head_dim;
  q_proj = register_module("q_proj", lora::Linear(c.hidden_size, c.num_attention_heads * hd));
  k_proj = register_module("k_proj", lora::Linear(c.hidden_size, c.num_key_value_heads * hd));
  v_proj = register_module("v_proj", lora::Linear(c.hidden_size, c.num_key_value_heads * hd));
  o_proj = register_module("o_proj", lora::Linear(c.num_attention_heads * hd, c.hidden_size));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& cos,
                                     const torch::Tensor& sin, const ForwardOptions& opt,
                                     int64_t layer) {
  const int64_t B = x.size(0), L = x.size(1), H = cfg.num_attention_heads,
                Hkv = cfg.num_key_value_heads, D = cfg.head_dim;
  auto q = q_proj(x).view({B, L, H, D}).transpose(1, 2);
  auto k = k_proj(x).view({B, L, Hkv, D}).transpose(1, 2);
  auto v = v_proj(x).view({B, L, Hkv, D}).transpose(1, 2);
  q = apply_rope(q, cos, sin);
  k = apply_rope(k, cos, sin);
  torch::Tensor o;
  if (opt.cache) {
    auto& ck = opt.cache->k[layer];
    auto& cv = opt.cache->v[layer];
    const bool prefill = !ck.defined();
    ck = prefill ? k : torch::cat({ck, k}, 2);
    cv = prefill ? v : torch::cat({cv, v}, 2);
    if (prefill) {
      // The first chunk of the prompt (on a GPU generate feeds the whole prompt as one):
      // full causal attention through the dispatch (the fused flash kernel on a GPU),
      // never the L x L scores of cached_attention (128 GiB in fp32 for a 32k passkey
      // prompt of a 7B).
      attention::Options full = opt.attn;
      full.mode = attention::Mode::Full;
      o = attention::attention(q, k, v, full);
    } else {
      o = cached_attention(q, ck, cv);
    }
  } else {
    o = attention::attention(q, k, v, opt.attn);
  }
  return o_proj(o.transpose(1, 2).reshape({B, L, H * D}));
}

MLPImpl::MLPImpl(const io::ModelConfig& c) {
  gate_proj = register_module("gate_proj", lora::Linear(c.hidden_size, c.intermediate_size));
  up_proj = register_module("up_proj", lora::Linear(c.hidden_size, c.intermediate_size));
  down_proj = register_module("down_proj", lora::Linear(c.intermediate_size, c.hidden_size));
}

torch::Tensor MLPImpl::forward(const torch::Tensor& x) {
  return down_proj(swiglu(gate_proj(x), up_proj(x)));
}

torch::Tensor MLPImpl::forward_for_backward(const torch::Tensor& x) {
  return down_proj->forward_for_backward(swiglu(gate_proj(x), up_proj(x)));
}

DecoderLayerImpl::DecoderLayerImpl(const io::ModelConfig& c) {
  self_attn = register_module("self_attn", Attention(c));
  mlp = register_module("mlp", MLP(c));
  input_layernorm = register_module("input_layernorm", RMSNorm(c.rms_norm_eps));
  post_attention_layernorm = register_module("post_attention_layernorm", RMSNorm(c.rms_norm_eps));
}

torch::Tensor DecoderLayerImpl::attn_residual(const torch::Tensor& x, const torch::Tensor& cos,
                                              const torch::Tensor& sin, const ForwardOptions& opt,
                                              int64_t layer) {
  return x + self_attn(input_layernorm(x), cos, sin, opt, layer);
}

torch::Tensor DecoderLayerImpl::forward(const torch::Tensor& x, const torch::Tensor& cos,
                                        const torch::Tensor& sin, const ForwardOptions& opt,
                                        int64_t layer) {
  auto h = attn_residual(x, cos, sin, opt, layer);
  const int64_t L = h.size(1);
  if (torch::GradMode::is_enabled() || opt.mlp_chunk <= 0 || opt.mlp_chunk >= L)
    return h + mlp_branch(h);
  // No graph is kept: only one chunk's (chunk x intermediate) tensors are alive.
  auto out = torch::empty_like(h);
  for (int64_t s = 0; s < L; s += opt.mlp_chunk) {
    const int64_t n = std::min(opt.mlp_chunk, L - s);
    auto hc = h.narrow(1, s, n);
    out.narrow(1, s, n).copy_(hc + mlp_branch(hc));
  }
  return out;
}

LlamaModelImpl::LlamaModelImpl(const io::ModelConfig& c) {
  embed_tokens = register_module("embed_tokens", Embedding());
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    layer_list.push_back(DecoderLayer(c));
    layers->push_back(layer_list.back());
  }
  norm = register_module("norm", RMSNorm(c.rms_norm_eps));
}

LlamaForCausalLMImpl::LlamaForCausalLMImpl(const io::ModelConfig& c) : cfg(c) {
  model = register_module("model", LlamaModel(c));
  if (!c.tie_word_embeddings)
    lm_head = register_module("lm_head", lora::Linear(c.hidden_size, c.vocab_size));
}

torch::Tensor LlamaForCausalLMImpl::head_weight() const {
  return cfg.tie_word_embeddings ? model->embed_tokens->weight : lm_head->weight;
}

void LlamaForCausalLMImpl::untie_embeddings() {
  if (!cfg.tie_word_embeddings) return;
  torch::NoGradGuard ng;
  const auto& w = model->embed_tokens->weight;
  lm_head = register_module("lm_head", lora::Linear(cfg.hidden_size, cfg.vocab_size));
  lm_head->weight.set_data(w.detach().clone());
  lm_head->weight.set_requires_grad(false);
  cfg.tie_word_embeddings = false;
}

namespace {

#ifdef LONGLORA_WITH_CUDA
// Device-to-host copies of offloaded layer inputs run here, beside the compute.
c10::cuda::CUDAStream offload_stream() {
  static c10::cuda::CUDAStream s = c10::cuda::getStreamFromPool();
  return s;
}
#endif

// x in pinned host memory, copied on the side stream once x is ready; x's memory is
// not reused before the copy has read it (record_stream).
torch::Tensor offload_to_host(const torch::Tensor& x) {
#ifdef LONGLORA_WITH_CUDA
  auto host = torch::empty(x.sizes(), x.options().device(torch::kCPU).pinned_memory(true));
  auto side = offload_stream();
  at::cuda::CUDAEvent ready;
  ready.record(c10::cuda::getCurrentCUDAStream(x.device().index()));
  ready.block(side);
  {
    c10::cuda::CUDAStreamGuard guard(side);
    host.copy_(x, /*non_blocking=*/true);
  }
  x.record_stream(side);
  return host;
#else
  return x;
#endif
}

// The saved input back on `device`, after the side stream's copies are done.
torch::Tensor fetch_from_host(const torch::Tensor& host, const torch::Device& device) {
#ifdef LONGLORA_WITH_CUDA
  at::cuda::CUDAEvent copied;
  copied.record(offload_stream());
  copied.block(c10::cuda::getCurrentCUDAStream(device.index()));
  return host.to(device, /*non_blocking=*/true);
#else
  return host.to(device);
#endif
}

#ifdef LONGLORA_WITH_CUDA
// Prefetch of offloaded layer inputs: the backward of layer i starts the copy of layer
// i-1's input to the GPU on the side stream, so it overlaps layer i's backward instead
// of stalling the compute stream (at 32k it was 32 x 5 ms per step). Entries are keyed
// by layer index and used only when they hold the very host tensor a backward needs.
struct Prefetch {
  std::mutex m;
  std::unordered_map<int64_t, torch::Tensor> offloaded;  // index -> host copy, until its backward
  struct InFlight {
    torch::Tensor host, device;
    std::shared_ptr<at::cuda::CUDAEvent> done;
  };
  std::unordered_map<int64_t, InFlight> in_flight;
};

Prefetch& prefetch() {
  static Prefetch p;
  return p;
}

void remember_offloaded(int64_t index, const torch::Tensor& host) {
  std::lock_guard<std::mutex> lock(prefetch().m);
  prefetch().offloaded[index] = host;
}

// Layer `index`'s input on the GPU: the prefetched copy when there is one, else copied now;
// then starts the copy of layer index-1's input.
torch::Tensor take_offloaded(int64_t index, const torch::Tensor& host, const torch::Device& device) {
  auto& p = prefetch();
  std::lock_guard<std::mutex> lock(p.m);
  auto current = c10::cuda::getCurrentCUDAStream(device.index());
  torch::Tensor x;
  auto it = p.in_flight.find(index);
  if (it != p.in_flight.end() && it->second.host.is_same(host)) {
    it->second.done->block(current);
    x = it->second.device;
    x.record_stream(current);  // allocated on the side stream, used on this one
  } else {
    x = fetch_from_host(host, device);
  }
  if (it != p.in_flight.end()) p.in_flight.erase(it);
  p.offloaded.erase(index);
  auto prev = p.offloaded.find(index - 1);
  if (prev != p.offloaded.end()) {
    Prefetch::InFlight f;
    f.host = prev->second;
    {
      c10::cuda::CUDAStreamGuard guard(offload_stream());  // after the offload copy on the same stream
      f.device = f.host.to(device, /*non_blocking=*/true);
      f.done = std::make_shared<at::cuda::CUDAEvent>();
      f.done->record(offload_stream());
    }
    p.in_flight[index - 1] = std::move(f);
    p.offloaded.erase(prev);
  }
  return x;
}
#endif

// Activation checkpointing of one decoder layer: forward without keeping the
// layer's activations, backward recomputes them from the saved input (with the
// RNG state of the forward, so dropout masks match) and runs the layer's
// backward, which accumulates parameter grads directly. `anchor` requires grad so
// the backward runs even when the input does not need a grad (frozen embedding).
struct CheckpointedLayer : torch::autograd::Function<CheckpointedLayer> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor x,
                               torch::Tensor cos, torch::Tensor sin, torch::Tensor anchor,
                               DecoderLayerImpl* layer, ForwardOptions opt, int64_t index) {
    const bool offload = opt.offload_layers && x.is_cuda();
    if (offload) {
      ctx->save_for_backward({cos, sin});
      auto host = offload_to_host(x);
#ifdef LONGLORA_WITH_CUDA
      remember_offloaded(index, host);
#endif
      ctx->saved_data["host_x"] = host;
      ctx->saved_data["device"] = static_cast<int64_t>(x.device().index());
    } else {
      ctx->save_for_backward({cos, sin, x});
    }
    ctx->saved_data["mlp_chunk"] = opt.mlp_chunk;
    ctx->saved_data["layer"] = reinterpret_cast<int64_t>(layer);
    ctx->saved_data["index"] = index;
    ctx->saved_data["mode"] = static_cast<int64_t>(opt.attn.mode);
    ctx->saved_data["group"] = opt.attn.group;
    ctx->saved_data["backend"] = static_cast<int64_t>(opt.attn.backend);
    ctx->saved_data["offset"] = opt.position_offset;
    ctx->saved_data["cpu_rng"] = at::detail::getDefaultCPUGenerator().get_state();
    if (x.is_cuda())
      ctx->saved_data["cuda_rng"] = at::globalContext().defaultGenerator(x.device()).get_state();
    return layer->forward(x, cos, sin, opt, index);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    torch::Tensor x;
    if (ctx->saved_data.count("host_x")) {
      const auto dev = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(ctx->saved_data["device"].toInt()));
#ifdef LONGLORA_WITH_CUDA
      x = take_offloaded(ctx->saved_data["index"].toInt(), ctx->saved_data["host_x"].toTensor(), dev);
#else
      x = fetch_from_host(ctx->saved_data["host_x"].toTensor(), dev);
#endif
    } else {
      x = saved[2].detach();
    }
    x.requires_grad_(true);
    auto* layer = reinterpret_cast<DecoderLayerImpl*>(ctx->saved_data["layer"].toInt());
    ForwardOptions opt;
    opt.attn.mode = static_cast<attention::Mode>(ctx->saved_data["mode"].toInt());
    opt.attn.group = ctx->saved_data["group"].toInt();
    opt.attn.backend = static_cast<attention::Backend>(ctx->saved_data["backend"].toInt());
    opt.position_offset = ctx->saved_data["offset"].toInt();
    const int64_t chunk = ctx->saved_data["mlp_chunk"].toInt();

    auto cpu_gen = at::detail::getDefaultCPUGenerator();
    auto cpu_now = cpu_gen.get_state();
    cpu_gen.set_state(ctx->saved_data["cpu_rng"].toTensor());
    torch::Tensor cuda_now;
    if (x.is_cuda()) {
      at::Generator g = at::globalContext().defaultGenerator(x.device());
      cuda_now = g.get_state();
      g.set_state(ctx->saved_data["cuda_rng"].toTensor());
    }
    {
      torch::AutoGradMode enable(true);
      const int64_t index = ctx->saved_data["index"].toInt();
      const auto& g = grad_out[0];
      const int64_t L = x.size(1);
      const int64_t step = chunk <= 0 || chunk >= L ? L : chunk;
      // out = h + mlp(norm(h)): the MLP half recomputed and back-propagated chunk by
      // chunk into dh (so no whole-sequence intermediate-size activation exists when
      // chunked), then the attention half with dh. The layer's output value is never
      // needed, so down_proj's frozen forward GEMM is skipped: a fifth of the
      // recompute's matrix work at LLaMA-2 shapes, 7% of the step's.
      auto h = layer->attn_residual(x, saved[0], saved[1], opt, index);
      auto dh = g.clone();
      for (int64_t s = 0; s < L; s += step) {
        const int64_t n = std::min(step, L - s);
        auto hc = h.narrow(1, s, n).detach().requires_grad_(true);
        torch::autograd::backward({layer->mlp_branch_for_backward(hc)}, {g.narrow(1, s, n)});
        dh.narrow(1, s, n).add_(hc.grad());
      }
      torch::autograd::backward({h}, {dh});
    }
    cpu_gen.set_state(cpu_now);
    if (x.is_cuda()) {
      at::Generator g = at::globalContext().defaultGenerator(x.device());
      g.set_state(cuda_now);
    }
    return {x.grad(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(),
            torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor LlamaForCausalLMImpl::hidden(const torch::Tensor& ids, const ForwardOptions& opt) {
  const int64_t L = ids.size(1);
  auto x = model->embed_tokens(ids).to(compute_dtype);
  auto [cos, sin] = rope_tables(cfg, opt.position_offset, L, ids.device());
  cos = cos.to(compute_dtype);
  sin = sin.to(compute_dtype);
  if (opt.cache && opt.cache->k.empty()) {
    opt.cache->k.resize(cfg.num_hidden_layers);
    opt.cache->v.resize(cfg.num_hidden_layers);
  }
  const bool ckpt = opt.checkpoint_layers && torch::GradMode::is_enabled() && !opt.cache;
  torch::Tensor anchor;
  if (ckpt) anchor = torch::zeros({}, torch::requires_grad());
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) {
    auto& layer = model->layer_list[i];
    x = ckpt ? CheckpointedLayer::apply(x, cos, sin, anchor, layer.get(), opt, i)
             : layer->forward(x, cos, sin, opt, i);
  }
  if (opt.cache) opt.cache->length += L;
  return model->norm(x);
}

torch::Tensor LlamaForCausalLMImpl::logits(const torch::Tensor& h) {
  auto w = head_weight();
  return torch::matmul(h, w.to(h.scalar_type()).t()).to(torch::kFloat32);
}

namespace {

// Sum of NLL over one chunk; backward recomputes the chunk's logits.
struct ChunkNLL : torch::autograd::Function<ChunkNLL> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor h,
                               torch::Tensor w, torch::Tensor targets) {
    auto logits = torch::matmul(h, w.to(h.scalar_type()).t()).to(torch::kFloat32);  // (N, V)
    auto lse = torch::logsumexp(logits, -1);
    auto valid = targets.ge(0);
    auto picked = logits.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1);
    auto nll = ((lse - picked) * valid.to(torch::kFloat32)).sum();
    ctx->save_for_backward({h, w, targets, lse});
    return nll;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto s = ctx->get_saved_variables();
    auto h = s[0], w = s[1], targets = s[2], lse = s[3];
    auto wc = w.to(h.scalar_type());
    auto logits = torch::matmul(h, wc.t()).to(torch::kFloat32);
    auto p = torch::exp(logits - lse.unsqueeze(1));  // softmax
    auto valid = targets.ge(0);
    p.scatter_add_(1, targets.clamp_min(0).unsqueeze(1),
                   -valid.to(torch::kFloat32).unsqueeze(1));
    p = p * (valid.to(torch::kFloat32) * grad_out[0]).unsqueeze(1);  // (N, V) dlogits
    torch::Tensor gh, gw;
    if (h.requires_grad()) gh = torch::matmul(p.to(h.scalar_type()), wc);
    if (w.requires_grad()) gw = torch::matmul(p.t(), h.to(torch::kFloat32)).to(w.scalar_type());
    return {gh, gw, torch::Tensor()};
  }
};

}  // namespace

std::pair<torch::Tensor, int64_t> chunked_nll(LlamaForCausalLMImpl& m, const torch::Tensor& hidden,
                                              const torch::Tensor& targets, int64_t chunk) {
  auto h = hidden.reshape({-1, hidden.size(-1)});
  auto t = targets.reshape({-1});
  const int64_t N = h.size(0);
  auto w = m.head_weight();
  torch::Tensor total;
  for (int64_t s = 0; s < N; s += chunk) {
    const int64_t e = std::min(N, s + chunk);
    auto part = ChunkNLL::apply(h.slice(0, s, e), w, t.slice(0, s, e));
    total = total.defined() ? total + part : part;
  }
  return {total, t.ge(0).sum().item<int64_t>()};
}

}  // namespace longlora::model
