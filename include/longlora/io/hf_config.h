// config.json of the LLaMA family, both ways real checkpoints write RoPE:
// transformers 4 ("rope_theta" + "rope_scaling": null | {"type": "linear", "factor": F})
// and transformers 5 ("rope_parameters": {"rope_type", "factor", "rope_theta"}).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace longlora::io {

// The largest linear RoPE factor anything takes (config.json, run config, flags,
// checkpoints): 1024 x 4096 positions is past any context trained.
inline constexpr double kMaxRopeFactor = 1024;

struct ModelConfig {
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  double rope_factor = 1.0;  // linear position interpolation: positions / factor
  double initializer_range = 0.02;  // std of a random init's matrices (transformers' _init_weights)
  bool tie_word_embeddings = false;
  int64_t bos_token_id = 1;
  int64_t eos_token_id = 2;
  // Every end token of an eos_token_id list (transformers' generate stops at any of
  // them; LLaMA 3 Instruct ends its turns with the second); {eos_token_id} otherwise.
  std::vector<int64_t> eos_token_ids{2};
  std::string torch_dtype = "float32";
};

// Parses and validates; `source` names the file in error messages.
ModelConfig parse_model_config(const nlohmann::json& j, const std::string& source);
ModelConfig load_model_config(const std::string& path);  // a config.json file

// Writes back in the transformers-4 form LLaMA-2 checkpoints use, with the
// linear rope_scaling a loader needs for the extended context.
nlohmann::json model_config_to_json(const ModelConfig& c);

}  // namespace longlora::io
