#include "longlora/io/hf_config.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "longlora/common/error.h"
#include "longlora/common/json_file.h"

using nlohmann::json;

namespace longlora::io {
namespace {

int64_t get_int(const json& j, const std::string& key, const std::string& src, bool required,
                int64_t def, int64_t min_value = 1) {
  if (!j.contains(key) || j[key].is_null()) {
    if (required) fail(src, key, "missing (expected an integer)");
    return def;
  }
  if (!j[key].is_number_integer()) fail(src, key, "expected an integer, got " + j[key].dump());
  const int64_t v = j[key].get<int64_t>();
  if (v < min_value) fail(src, key, "must be >= " + std::to_string(min_value));
  return v;
}

double get_num(const json& j, const std::string& key, const std::string& src, double def) {
  if (!j.contains(key) || j[key].is_null()) return def;
  if (!j[key].is_number()) fail(src, key, "expected a number, got " + j[key].dump());
  return j[key].get<double>();
}

double parse_factor(const json& r, const std::string& field, const std::string& src) {
  if (!r.contains("factor") || !r["factor"].is_number())
    fail(src, field + ".factor", "linear RoPE scaling needs a numeric factor");
  const double f = r["factor"].get<double>();
  if (!(f >= 1.0)) fail(src, field + ".factor", "must be >= 1");
  return f;
}

}  // namespace

ModelConfig parse_model_config(const json& j, const std::string& src) {
  if (!j.is_object()) fail(src, "", "expected a JSON object");
  if (j.contains("model_type") && j["model_type"] != "llama")
    fail(src, "model_type", "only 'llama' is supported, got " + j["model_type"].dump());
  if (j.contains("attention_bias") && j["attention_bias"].is_boolean() &&
      j["attention_bias"].get<bool>())
    fail(src, "attention_bias", "true is not supported (LLaMA has no attention bias)");
  if (j.contains("mlp_bias") && j["mlp_bias"].is_boolean() && j["mlp_bias"].get<bool>())
    fail(src, "mlp_bias", "true is not supported");
  if (j.contains("hidden_act") && j["hidden_act"] != "silu")
    fail(src, "hidden_act", "only 'silu' is supported, got " + j["hidden_act"].dump());
  if (j.contains("pretraining_tp") && j["pretraining_tp"].is_number_integer() &&
      j["pretraining_tp"].get<int64_t>() != 1)
    fail(src, "pretraining_tp", "only 1 is supported");

  ModelConfig c;
  c.hidden_size = get_int(j, "hidden_size", src, true, 0);
  c.intermediate_size = get_int(j, "intermediate_size", src, true, 0);
  c.num_hidden_layers = get_int(j, "num_hidden_layers", src, true, 0);
  c.num_attention_heads = get_int(j, "num_attention_heads", src, true, 0);
  c.num_key_value_heads =
      get_int(j, "num_key_value_heads", src, false, c.num_attention_heads);
  c.vocab_size = get_int(j, "vocab_size", src, true, 0);
  c.max_position_embeddings = get_int(j, "max_position_embeddings", src, false, 2048);
  if (c.hidden_size % c.num_attention_heads != 0 && !j.contains("head_dim"))
    fail(src, "hidden_size", "not divisible by num_attention_heads and no head_dim given");
  c.head_dim = get_int(j, "head_dim", src, false, c.hidden_size / c.num_attention_heads);
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    fail(src, "num_key_value_heads", "must divide num_attention_heads");
  c.rms_norm_eps = get_num(j, "rms_norm_eps", src, 1e-6);
  if (!(c.rms_norm_eps > 0)) fail(src, "rms_norm_eps", "must be > 0");
  c.initializer_range = get_num(j, "initializer_range", src, 0.02);
  if (!(c.initializer_range > 0)) fail(src, "initializer_range", "must be > 0");
  c.tie_word_embeddings = j.value("tie_word_embeddings", false);
  c.bos_token_id = get_int(j, "bos_token_id", src, false, 1, 0);
  if (j.contains("eos_token_id") && j["eos_token_id"].is_array()) {
    if (j["eos_token_id"].empty()) fail(src, "eos_token_id", "empty list");
    c.eos_token_id = j["eos_token_id"][0].get<int64_t>();
  } else {
    c.eos_token_id = get_int(j, "eos_token_id", src, false, 2, 0);
  }
  if (j.contains("torch_dtype") && j["torch_dtype"].is_string())
    c.torch_dtype = j["torch_dtype"].get<std::string>();
  else if (j.contains("dtype") && j["dtype"].is_string())
    c.torch_dtype = j["dtype"].get<std::string>();

  // RoPE, transformers 5 form first, then 4.
  c.rope_theta = get_num(j, "rope_theta", src, 10000.0);
  if (j.contains("rope_parameters") && !j["rope_parameters"].is_null()) {
    const json& r = j["rope_parameters"];
    if (!r.is_object()) fail(src, "rope_parameters", "expected an object");
    const std::string type = r.value("rope_type", std::string("default"));
    if (r.contains("rope_theta")) c.rope_theta = get_num(r, "rope_theta", src, c.rope_theta);
    if (type == "linear")
      c.rope_factor = parse_factor(r, "rope_parameters", src);
    else if (type != "default")
      fail(src, "rope_parameters.rope_type",
           "'" + type + "' is not implemented (supported: default, linear)");
  } else if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
    const json& r = j["rope_scaling"];
    if (!r.is_object()) fail(src, "rope_scaling", "expected an object or null");
    std::string type = r.value("type", r.value("rope_type", std::string("")));
    if (type == "linear")
      c.rope_factor = parse_factor(r, "rope_scaling", src);
    else if (type != "default")
      fail(src, "rope_scaling.type", "'" + type + "' is not implemented (supported: linear)");
  }
  if (!(c.rope_theta > 0)) fail(src, "rope_theta", "must be > 0");
  return c;
}

ModelConfig load_model_config(const std::string& path) {
  return parse_model_config(read_json_file(path), path);
}

json model_config_to_json(const ModelConfig& c) {
  json j = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"hidden_act", "silu"},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"head_dim", c.head_dim},
      {"vocab_size", c.vocab_size},
      {"max_position_embeddings", c.max_position_embeddings},
      {"rms_norm_eps", c.rms_norm_eps},
      {"initializer_range", c.initializer_range},
      {"rope_theta", c.rope_theta},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"bos_token_id", c.bos_token_id},
      {"eos_token_id", c.eos_token_id},
      {"attention_bias", false},
      {"mlp_bias", false},
      {"pretraining_tp", 1},
      {"torch_dtype", c.torch_dtype},
  };
  if (c.rope_factor != 1.0)
    j["rope_scaling"] = {{"type", "linear"}, {"rope_type", "linear"}, {"factor", c.rope_factor}};
  else
    j["rope_scaling"] = nullptr;
  return j;
}

}  // namespace longlora::io
