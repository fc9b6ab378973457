// Everything a training run builds before its first step, in one place: the
// model (position interpolation, LoRA, what trains and in which precision), the
// optimizer and the data. Used by `train` and `bench`.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <vector>

#include "longlora/data/dataset.h"
#include "longlora/data/tokenizer.h"
#include "longlora/model/llama.h"
#include "longlora/train/checkpoint.h"
#include "longlora/train/config.h"

namespace longlora::train {

struct Session {
  torch::Device device = torch::kCPU;
  torch::ScalarType dtype = torch::kFloat32;
  model::LlamaForCausalLM model{nullptr};
  NamedTensors trainable;  // fp32 masters, in optimizer order
  std::unique_ptr<torch::optim::AdamW> optimizer;
  std::unique_ptr<data::Tokenizer> tokenizer;
  std::unique_ptr<data::Dataset> data;                  // null with `with_data` false
  std::unique_ptr<std::vector<int32_t>> eval_data;      // data.eval, if set
  model::ForwardOptions train_forward;                  // S2-Attn and checkpointing
  model::BaseSample base_sample;                        // base_weight_sample, before LoRA
};

// Linear RoPE factor for the run: model.rope_factor, or ceil(seq_len / max_pos)
// when seq_len exceeds the model's context (LongLoRA), else the config's own.
// `seq_len_field` names the sequence length in the error for a factor past 1024
// ("data.seq_len" in a run, "--seq-len" in bench).
double resolve_rope_factor(const RunConfig& c, const io::ModelConfig& m,
                           const std::string& seq_len_field = "data.seq_len");

// Marks parameters trainable (LoRA factors + names containing one of the
// trainable_params substrings; everything when LoRA is off), turns them into fp32
// masters, and returns them in a fixed order. `field` names trainable_params in the
// error for an entry that matches nothing.
NamedTensors select_trainable(model::LlamaForCausalLMImpl& m, const RunConfig& c,
                              const std::string& field = "trainable_params");

// What make_session would refuse, checked without the weights or the data rows: the
// model's config.json and tokenizer, the RoPE factor seq_len needs, the S2 shape, the
// trainable_params entries (on a stand-in model of the same layers), the data file's
// format. Run by `--dry-run` and before a run loads anything; errors name the key as
// `origin` says where it was set.
void preflight(const RunConfig& c, const ConfigOrigin& origin);
// "FILE: attention.group_ratio R with --set data.seq_len L": the S2 group's two keys
// and where each was set, for its errors.
std::string s2_group_where(const RunConfig& c, const ConfigOrigin& origin);

Session make_session(const RunConfig& c, bool with_data = true);

// LR of optimizer step `step` (0-based) under the configured schedule.
double lr_at(const TrainSection& t, int64_t step);

}  // namespace longlora::train
