#include "longlora/train/bench.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>

#include "longlora/common/device.h"
#include "longlora/common/error.h"
#include "longlora/io/hf_config.h"
#include "longlora/train/profile.h"
#include "longlora/train/setup.h"

#ifdef LONGLORA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace longlora::train {
namespace {

void sync(const torch::Device& d) {
#ifdef LONGLORA_WITH_CUDA
  if (d.is_cuda()) at::cuda::getCurrentCUDAStream().synchronize();
#endif
}

std::string device_name(const torch::Device& d) {
#ifdef LONGLORA_WITH_CUDA
  if (d.is_cuda()) return at::cuda::getDeviceProperties(d.index())->name;
#endif
  return "CPU (" + std::to_string(at::get_num_threads()) + " threads)";
}

// Dense bf16 peak of known GPUs, for MFU; 0 when unknown.
double peak_tflops(const std::string& name) {
  if (name.find("H100") != std::string::npos || name.find("H200") != std::string::npos) return 989.0;
  if (name.find("A100") != std::string::npos) return 312.0;
  return 0.0;
}


// Mean milliseconds of f over `reps` calls after `warmup` untimed ones (the first
// flash-attention call loads its kernels: untimed, it once made the isolated
// attention time exceed the whole step on an H200).
template <class F>
double time_ms(const torch::Device& d, int warmup, int reps, F f) {
  for (int i = 0; i < warmup; ++i) f();
  sync(d);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) f();
  sync(d);
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / reps;
}

}  // namespace

int run_train_bench(const TrainBenchOptions& o) {
  RunConfig c;
  c.model.init = "random";
  c.model.config = o.shape;
  c.data.seq_len = o.seq_len;
  c.train.grad_accum = 1;
  c.train.micro_batch_size = 1;  // a --set may raise it
  c.train.max_steps = o.warmup + o.steps;
  c.device = o.device;
  for (const auto& s : o.overrides) {
    const std::string key = apply_override(c, s);
    // What bench's own flags set: an override would time another model or length
    // than the report names (or, data.*, nothing at all).
    if (key.rfind("data.", 0) == 0 && key != "data.seq_len")
      throw Error("bench --set " + key + ": bench trains on random tokens and reads no data");
    for (const char* own : {"model.path", "model.init", "model.config", "data.seq_len", "device"})
      if (key == own)
        throw Error("bench --set " + key + ": set by bench's flags (--shape, --seq-len, --device); not a --set key here");
  }
  resolve_rope_factor(c, io::load_model_config(o.shape), "--seq-len");  // named as bench's flag
  Session s = make_session(c, /*with_data=*/false);
  auto& m = *s.model;
  const auto& mc = m.cfg;
  const int64_t L = o.seq_len, H = mc.num_attention_heads, Hkv = mc.num_key_value_heads, D = mc.head_dim;
  const int64_t B = c.train.micro_batch_size;

  auto ids = torch::randint(0, mc.vocab_size, {B, L}, torch::dtype(torch::kInt64).device(s.device));
  auto targets = torch::cat({ids.slice(1, 1, L), torch::full({B, 1}, -1, ids.options())}, 1);
  m.train();
  std::vector<torch::Tensor> params;
  for (auto& [n, p] : s.trainable) params.push_back(p);
  auto step = [&] {
    s.optimizer->zero_grad();
    auto h = m.hidden(ids, s.train_forward);
    auto [sum, n] = model::chunked_nll(m, h, targets, c.train.loss_chunk);
    (sum / static_cast<double>(n)).backward();
    torch::nn::utils::clip_grad_norm_(params, c.train.max_grad_norm);
    s.optimizer->step();
  };
  const double step_ms = time_ms(s.device, o.warmup, o.steps, step);
  // Read before the isolated timings below, whose tensors (an L x 34k product at 256k)
  // are not the training step's.
  const double mem = peak_memory_gib(s.device), mem_allocated = peak_allocated_gib(s.device);

  // Breakdown from isolated timings of the same shapes (per layer x layers).
  auto opts = torch::dtype(s.dtype).device(s.device);
  auto q = torch::randn({B, H, L, D}, opts).requires_grad_(true);
  auto k = torch::randn({B, Hkv, L, D}, opts).requires_grad_(true);
  auto v = torch::randn({B, Hkv, L, D}, opts).requires_grad_(true);
  const double recompute = c.train.activation_checkpointing ? 1.0 : 0.0;
  const double attn_fwd = time_ms(s.device, 1, 2, [&] {
    torch::NoGradGuard ng;
    attention::attention(q, k, v, s.train_forward.attn);
  });
  const double attn_fb = time_ms(s.device, 1, 2, [&] {
    attention::attention(q, k, v, s.train_forward.attn).sum().backward();
  });
  const double attn_ms = (attn_fb + recompute * attn_fwd) * mc.num_hidden_layers;
  // Linear cost is linear in L: timed on at most 32k rows and scaled, so the isolated
  // products stay small next to the step's memory at 256k.
  const int64_t Lc = std::min<int64_t>(L, 32768);
  auto x = torch::randn({Lc, mc.hidden_size}, opts);
  auto w_in = torch::randn({mc.hidden_size, (H + 2 * Hkv) * D + 2 * mc.intermediate_size}, opts);
  auto w_out = torch::randn({H * D + mc.intermediate_size, mc.hidden_size}, opts);
  auto y = torch::randn({Lc, H * D + mc.intermediate_size}, opts);
  // Frozen weights: forward, recompute and one backward matmul (dX; no dW, the LoRA
  // factors' grads are small) per weight.
  const double lin_once = time_ms(s.device, 1, 2, [&] {
    torch::NoGradGuard ng;
    x.matmul(w_in);
    y.matmul(w_out);
  });
  const double linear_ms = lin_once * (static_cast<double>(B * L) / Lc) * (2.0 + recompute) * mc.num_hidden_layers;

  // Model FLOPs: matmul params (6 per token: fwd + bwd) + attention over visible pairs.
  const double per_layer_w = mc.hidden_size * ((H + 2 * Hkv) * D) + H * D * mc.hidden_size +
                             3.0 * mc.hidden_size * mc.intermediate_size;
  // Per head: in segments mode the shifted half sees fewer pairs (its end segments are half groups).
  const auto& attn = s.train_forward.attn;
  const int64_t G = c.attention.s2 ? attn.group : L;
  const attention::Mode mode = c.attention.s2 ? attn.mode : attention::Mode::Full;
  double pairs = 0;  // summed over the heads
  for (int64_t h = 0; h < H; ++h) pairs += static_cast<double>(attention::visible_pairs(L, G, mode, h >= H / 2));
  const double flops = 6.0 * L * (per_layer_w * mc.num_hidden_layers + mc.hidden_size * mc.vocab_size) +
                       mc.num_hidden_layers * 4.0 * 3.0 * D * pairs;
  const std::string dev = device_name(s.device);
  // Counted on the batch the step ran, not from the config that asked for it.
  const int64_t step_tokens = ids.numel();
  const double tps = step_tokens / (step_ms / 1000.0);
  const double tflops = ids.size(0) * flops / (step_ms / 1000.0) / 1e12;
  const double peak = peak_tflops(dev);
  nlohmann::json j = {{"device", dev},
                      {"shape", o.shape},
                      {"seq_len", L},
                      {"micro_batch_size", B},
                      {"tokens_per_step", step_tokens},
                      {"dtype", dtype_string(s.dtype)},
                      {"attention_backend", attention::to_string(attention::resolve_backend(
                                                s.train_forward.attn.backend, s.device.is_cuda()))},
                      {"tokens_per_s", tps},
                      {"step_ms", step_ms},
                      {"model_tflops", tflops},
                      {"mfu", peak > 0 ? nlohmann::json(tflops / peak) : nlohmann::json(nullptr)},
                      {"peak_mem_gib", mem},
                      {"peak_allocated_gib", mem_allocated},
                      {"activation_checkpointing", c.train.activation_checkpointing},
                      {"offload_activations", c.train.offload_activations},
                      {"mlp_chunk", c.train.mlp_chunk},
                      {"breakdown_ms", {{"attention", attn_ms}, {"linear", linear_ms},
                                        {"rest", std::max(0.0, step_ms - attn_ms - linear_ms)}}}};
  if (o.json) {
    std::cout << j.dump() << std::endl;
  } else {
    std::cout << "device " << dev << ", shape " << o.shape << ", seq_len " << L << ", batch " << B << ", " << dtype_string(s.dtype)
              << "\n  " << tps << " tokens/s, step " << step_ms << " ms, " << tflops << " model TFLOP/s"
              << (peak > 0 ? ", MFU " + std::to_string(100.0 * tflops / peak) + " %" : std::string(", MFU n/a"))
              << ", peak memory " << mem << " GiB\n  breakdown (isolated timings): attention " << attn_ms
              << " ms, linear layers " << linear_ms << " ms, rest " << std::max(0.0, step_ms - attn_ms - linear_ms)
              << " ms" << std::endl;
  }
  if (o.profile > 0) {
    const auto tables = profile_tables([&] { step(); sync(s.device); }, o.profile, s.device.is_cuda());
    (o.json ? std::cerr : std::cout) << tables << std::flush;
  }
  return 0;
}

}  // namespace longlora::train
