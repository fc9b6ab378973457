// config.json of the LLaMA family, both ways real checkpoints write RoPE:
// transformers 4 ("rope_theta" + "rope_scaling": null | {"type": "linear", "factor": F})
// and transformers 5 ("rope_parameters": {"rope_type", "factor", "rope_theta"}).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace longlora::io {

// "PATH: is a directory, a file is expected" when it is one (an ifstream opens a
// directory and fails later with a message that names no path).
void check_not_directory(const std::string& path);

// Typed reads of one JSON object's fields, for the Hugging Face json files we read
// (config.json, adapter_config.json, trainer_state.json): a wrong type is one line
// "SOURCE: FIELD: expected T, got V", never nlohmann's message without file or field.
// An absent field and a null one both read as not given (std::nullopt).
class JsonFields {
 public:
  // `obj` must be a JSON object ("SOURCE[: PREFIX]: expected a JSON object" if not);
  // `prefix` names a nested object in messages ("rope_scaling").
  JsonFields(const nlohmann::json& obj, std::string source, std::string prefix = "");
  bool given(const std::string& key) const;  // present and not null
  std::optional<bool> boolean(const std::string& key) const;
  std::optional<int64_t> integer(const std::string& key) const;
  std::optional<double> number(const std::string& key) const;  // finite
  std::optional<std::string> string(const std::string& key) const;
  std::optional<std::vector<std::string>> strings(const std::string& key) const;
  std::optional<JsonFields> object(const std::string& key) const;
  const nlohmann::json& at(const std::string& key) const;  // given(key) must hold
  std::string field(const std::string& key) const;        // "PREFIX.KEY" for messages
  const std::string& source() const { return src_; }
  [[noreturn]] void fail(const std::string& key, const std::string& message) const;
  // "expected WHAT, got <the value as JSON>"
  [[noreturn]] void expected(const std::string& key, const std::string& what) const;

 private:
  const nlohmann::json* j_;
  std::string src_, prefix_;
};

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
  std::string torch_dtype = "float32";
};

// Parses and validates; `source` names the file in error messages.
ModelConfig parse_model_config(const nlohmann::json& j, const std::string& source);
ModelConfig load_model_config(const std::string& path);  // a config.json file

// Writes back in the transformers-4 form LLaMA-2 checkpoints use, with the
// linear rope_scaling a loader needs for the extended context.
nlohmann::json model_config_to_json(const ModelConfig& c);

}  // namespace longlora::io
