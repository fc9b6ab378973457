// peft adapters: adapter_config.json + adapter_model.safetensors.
// Keys: base_model.model.<param name>, LoRA as <module>.lora_A.weight / lora_B.weight,
// modules_to_save (and peft's saved embedding layers) as full tensors under their own names.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "longlora/io/safetensors.h"

namespace longlora::io {

struct AdapterConfig {
  int64_t r = 8;
  double lora_alpha = 16;
  double lora_dropout = 0.0;
  bool use_rslora = false;
  std::vector<std::string> target_modules;
  std::vector<std::string> modules_to_save;
  std::string base_model_name_or_path;
  double scale() const;
};

inline const char* kPeftPrefix = "base_model.model.";

AdapterConfig load_adapter_config(const std::string& path);  // adapter_config.json
nlohmann::json adapter_config_to_json(const AdapterConfig& c);

// peft's save_pretrained(save_embedding_layers=True, or "auto" on a resized vocabulary)
// stores the whole embed_tokens and lm_head weights without listing them in
// modules_to_save, and its load puts them into the base in place of its weights.
// Whether the base parameter `param` ("lm_head.weight") is one of those two.
bool is_embedding_layer(const std::string& param);

// Adds the modules_to_save entry of a base weight ("model.layers.0.input_layernorm.weight"):
// its module's last name ("input_layernorm"), as peft names them, once.
void add_module_to_save(AdapterConfig& c, const std::string& param);

// For a base with tie_word_embeddings (one matrix for both layers) and an adapter that
// keeps them one (model::unties_embeddings is false): the key of the adapter tensor
// that becomes that matrix, "" when the adapter saved neither. peft saves both as
// copies; two that differ are an error (peft would keep lm_head's).
std::string tied_embedding_key(const SafetensorsFile& adapter);

// Whether the adapter saves both embed_tokens and lm_head, with the same dtype, shape
// and bytes (peft's two copies of a tied base's one matrix).
bool saves_equal_embeddings(const SafetensorsFile& adapter);

// The error for a saved embed_tokens / lm_head whose rows differ from the base's (an
// adapter of a resized vocabulary); "" when `param` is not one or the rows agree.
std::string vocabulary_mismatch(const std::string& param, const std::vector<int64_t>& got,
                                const std::vector<int64_t>& want);

}  // namespace longlora::io
