// The run configuration: JSON mapped to typed structs. Defaults follow
// LongLoRA's recipe. Every key is declared once in a schema (config.cpp) that
// validates files and --set overrides alike and documents the key.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "longlora/lora/spec.h"

namespace longlora::train {

struct ModelSection {
  std::string path;               // HF checkpoint directory
  std::string init = "pretrained";  // pretrained | random
  std::string config;             // config.json for init=random (default: <path>/config.json)
  std::string dtype = "auto";     // compute dtype: auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
  double rope_factor = 0;         // 0: the model's own, or ceil(seq_len / max_position_embeddings)
                                  // where seq_len is past its context (resolve_rope_factor)
};

using LoraSection = lora::LoraSpec;

struct AttentionSection {
  bool s2 = true;                 // S2-Attn in training; evaluation is always full
  double group_ratio = 0.25;
  std::string shift_mode = "segments";  // segments | roll
  std::string backend = "auto";   // auto | kernel | sdpa | reference
};

struct DataSection {
  std::string train;              // .bin | .txt | .jsonl (text) | .json/.jsonl (instruction records)
  std::string format = "auto";    // auto | tokens | text | sft
  std::string sft_prompt = "alpaca";  // alpaca | none (instruction records)
  int64_t seq_len = 8192;
  bool shuffle = true;
  std::string eval;               // optional held-out data, scored after every save
};

struct TrainSection {
  std::string optimizer = "adamw";
  double lr = 2e-5;
  double weight_decay = 0.0;
  std::vector<double> betas{0.9, 0.999};
  double eps = 1e-8;
  int64_t warmup_steps = 20;
  std::string scheduler = "constant_with_warmup";  // constant_with_warmup | cosine | linear
  int64_t max_steps = 1000;
  int64_t micro_batch_size = 1;
  int64_t grad_accum = 8;
  double max_grad_norm = 1.0;
  int64_t seed = 42;
  bool activation_checkpointing = true;
  bool offload_activations = true;   // checkpointed layer inputs in pinned host memory (CUDA)
  int64_t mlp_chunk = 8192;          // tokens per MLP chunk where no graph is kept; 0 = whole
  int64_t max_bad_steps = 10;     // consecutive non-finite steps before stopping
  // Loss scaling: 0 = dynamic when model.dtype is fp16 (as torch's GradScaler), none
  // otherwise; > 0 = that fixed scale (1 = none).
  double loss_scale = 0;
  double initial_loss_scale = 65536;  // where the dynamic scale starts
  int64_t loss_scale_window = 2000;   // finite steps in a row before it doubles
  int64_t loss_chunk = 2048;      // tokens per chunk of the chunked cross-entropy
};

struct OutputSection {
  std::string dir = "runs/longlora";
  int64_t save_steps = 100;
  int64_t keep_last = 2;
  int64_t log_steps = 1;
};

struct RunConfig {
  ModelSection model;
  LoraSection lora;
  std::string trainable_params = "embed,norm";
  AttentionSection attention;
  DataSection data;
  TrainSection train;
  OutputSection output;
  std::string device = "auto";    // auto | cpu | cuda
};

// Reads and validates a config file (unknown key, wrong type or range: an Error
// naming the file, the key path and what was expected).
RunConfig load_run_config(const std::string& path);
RunConfig parse_run_config(const nlohmann::json& j, const std::string& source);
// key.path=value; value is JSON if it parses as JSON, a string otherwise. Returns
// the key.
std::string apply_override(RunConfig& c, const std::string& assignment);

// Where a key's value came from, for messages: "FILE: key", or "--set key" when an
// override gave it.
struct ConfigOrigin {
  std::string file;
  std::vector<std::string> overridden;
  std::string at(const std::string& key) const;
};
nlohmann::json to_json(const RunConfig& c);
// The model's config.json: model.config when given (a run from drawn weights), else
// model.path's.
std::string model_config_path(const RunConfig& c);
// trainable_params' entries: comma-separated, trimmed, empty ones dropped.
std::vector<std::string> trainable_entries(const std::string& trainable_params);
// Markdown table of every key: path, type, default, meaning (README reference).
std::string config_reference();

}  // namespace longlora::train
