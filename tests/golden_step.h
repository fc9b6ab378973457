// One training step of the golden tiny model (base + golden peft adapter, LoRA +
// embed/norm trainable, as LongLoRA) on the golden input_ids, shared by the CPU and
// GPU training tests: the loss as transformers computes it (labels = input_ids,
// shifted inside the model) and the trainable parameters' gradients.
#pragma once

#include <map>
#include <optional>
#include <string>

#include "longlora/model/loader.h"
#include "longlora/train/setup.h"
#include "test_util.h"

namespace testutil {

struct StepOptions {
  bool checkpointing = false;
  int64_t mlp_chunk = 0;
  bool offload = false;
  torch::Device device = torch::kCPU;
  // Compute and frozen-weight dtype; unset: the checkpoint's fp32.
  std::optional<torch::ScalarType> dtype;
};

inline double golden_step(longlora::attention::Mode mode, const StepOptions& so,
                          std::map<std::string, torch::Tensor>* grads) {
  using namespace longlora;
  auto g = load(golden("tiny-llama/golden.safetensors"));
  model::LoadOptions lo;
  lo.device = so.device;
  if (so.dtype) {
    lo.compute_dtype = *so.dtype;
    lo.weight_dtype = *so.dtype;
  }
  auto m = model::load_model(golden("tiny-llama/model"), lo);
  model::apply_adapter(*m, golden("tiny-llama/adapter"));
  train::RunConfig rc;  // LoRA + "embed,norm" trainable, as LongLoRA
  auto trainable = train::select_trainable(*m, rc);
  model::ForwardOptions opt;
  opt.attn.mode = mode;
  opt.attn.group = 32;
  opt.checkpoint_layers = so.checkpointing;
  opt.mlp_chunk = so.mlp_chunk;
  opt.offload_layers = so.offload;
  auto ids = g["input_ids"].to(so.device);
  auto targets = torch::cat({ids.slice(1, 1, 128), torch::full({1, 1}, -1, ids.options())}, 1);
  m->train();
  auto [sum, n] = model::chunked_nll(*m, m->hidden(ids, opt), targets, 50);
  auto loss = sum / static_cast<double>(n);
  loss.backward();
  if (grads)
    for (auto& [name, p] : trainable) (*grads)[name] = p.grad().cpu();
  return loss.item<double>();
}

}  // namespace testutil
