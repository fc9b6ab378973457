// Training checkpoints: OUTPUT/checkpoint-STEP/ holds
//   adapter_config.json + adapter_model.safetensors  (peft format; LoRA and the
//                      trainable embed/norm as modules_to_save; `eval --adapter` and
//                      peft load it) -- or, for full fine-tuning, config.json +
//                      model.safetensors (a Hugging Face checkpoint);
//   optimizer.safetensors  AdamW moments and step counts by parameter name, RNG
//                      states (format 2; format 1 wrote state.pt, a LibTorch
//                      archive, which a resume still reads);
//   trainer_state.json format version, step, data cursor, counters;
//   run_config.json    the resolved run configuration;
//   COMPLETE           written last: a directory without it is not a checkpoint.
// Saves go to .tmp-checkpoint-STEP and are renamed into place, so a crash during
// a save never damages the previous checkpoint.
#pragma once

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "longlora/model/llama.h"
#include "longlora/model/loader.h"
#include "longlora/train/config.h"

namespace longlora::train {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

struct TrainerState {
  int64_t step = 0;
  int64_t cursor = 0;  // rows consumed
  int64_t bad_steps = 0;
  int64_t tokens_seen = 0;
  // The dynamic loss scale (0: none) and its finite steps since it last changed.
  double loss_scale = 0;
  int64_t loss_scale_good_steps = 0;
  // Steps skipped at a gradient overflow: the schedule does not count them, as HF's
  // Trainer steps its scheduler only when the optimizer ran.
  int64_t overflow_steps = 0;
  // What data.train held when saved (0: not recorded): the cursor counts its rows.
  int64_t data_rows = 0;
  int64_t data_bytes = 0;
  // A sample of the frozen base weights (base_weight_sample), so that a resume on
  // another base (a replaced model.path, or random init from another train.seed) is
  // refused. Empty: not recorded (checkpoints before it).
  model::BaseSample base_sample;
  // metrics.jsonl records a failed write (a full disk) lost: a resume from this
  // checkpoint appends them.
  std::vector<nlohmann::json> unlogged_metrics;
};


// peft adapter (LoRA + modules_to_save) of the trainable parameters. With a tied base
// (`tied_embeddings`) a trained embedding is also saved as lm_head: peft copies each
// module it saves, so with embed_tokens alone its lm_head would stay the base's matrix.
void save_adapter(const std::string& dir, const NamedTensors& trainable, const RunConfig& cfg,
                  bool tied_embeddings = false);

// A full fine-tuning checkpoint's config.json text: the run's model config.json with
// the RoPE factor and fp32 set, everything else as written. Read once at the start of
// a run, so that a save hours later does not depend on the base's file still being there.
std::string full_finetune_config(const RunConfig& cfg, double rope_factor);

// Writes a complete checkpoint; returns its directory. `model_config` is the
// config.json text of a full fine-tuning checkpoint (unused with LoRA).
std::string save_checkpoint(const std::string& output_dir, const model::LlamaForCausalLMImpl& m,
                            const NamedTensors& trainable, torch::optim::Optimizer& opt,
                            const TrainerState& st, const RunConfig& cfg, const std::string& model_config);

// The directories checkpoint-N with COMPLETE under output_dir, by step.
std::vector<std::pair<int64_t, std::string>> complete_checkpoints(const std::string& output_dir);
// Those without it (no save of ours, or one a prune was deleting), by step.
std::vector<std::pair<int64_t, std::string>> incomplete_checkpoints(const std::string& output_dir);

// Whether `name` is a save's folder name, checkpoint-N.
bool is_checkpoint_name(const std::string& name);

// Newest directory checkpoint-N with COMPLETE under output_dir, if any.
std::optional<std::string> latest_checkpoint(const std::string& output_dir);

// A complete checkpoint's trainer_state.json, each field checked (an Error naming
// the file and the field otherwise).
TrainerState read_trainer_state(const std::string& dir);

// Restores parameters, optimizer and RNG; refuses a checkpoint that does not fit
// `cfg` (other model shape, rank, targets, trainable set) saying what differs, and
// warns of every other config key that changed since. AdamW's betas, eps and weight
// decay are the config's, not the checkpoint's.
TrainerState load_checkpoint(const std::string& dir, const NamedTensors& trainable,
                             torch::optim::Optimizer& opt, const RunConfig& cfg,
                             const io::ModelConfig& model_cfg);

// Keeps the newest `keep` complete checkpoints and removes stale temporaries.
void prune_checkpoints(const std::string& output_dir, int64_t keep);

}  // namespace longlora::train
