#include "longlora/io/hf_config.h"

#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

#include "longlora/common/error.h"
#include "longlora/common/json_file.h"

using nlohmann::json;

namespace longlora::io {

// ---------------------------------------------------------------------------
// config.json

namespace {

// Sizes far past any LLaMA's (405B: hidden 16384, 126 layers, 128 heads) but small
// enough that products of two of them stay clear of int64 overflow: a config with
// 10^15 layers made random init grow memory without end, and one with a vocabulary of
// 2^62 failed inside LibTorch, naming no file.
constexpr int64_t kMaxSize = int64_t{1} << 24;

int64_t get_int(const JsonFields& f, const std::string& key, bool required, int64_t def,
                int64_t min_value = 1, int64_t max_value = kMaxSize) {
  const auto v = f.integer(key);
  if (!v) {
    if (required) f.fail(key, "missing (expected an integer)");
    return def;
  }
  if (*v < min_value) f.fail(key, "must be >= " + std::to_string(min_value));
  if (*v > max_value) f.fail(key, std::to_string(*v) + " is past the limit of " + std::to_string(max_value));
  return *v;
}

// The run config's limit on model.rope_factor, and eval's on --rope-factor.
double parse_factor(const JsonFields& r) {
  const auto f = r.number("factor");
  if (!f) r.fail("factor", "missing: linear RoPE scaling needs a numeric factor");
  if (!(*f >= 1.0) || *f > kMaxRopeFactor) r.fail("factor", "expected a number in [1, 1024], got " + json_brief(r.at("factor")));
  return *f;
}

// The RoPE type of a rope_scaling / rope_parameters object. transformers 4's
// LlamaConfig copies `type` over `rope_type`; transformers 5 reads `rope_type` first.
// When both are given and differ, the two versions build different models, so
// neither reading is safe.
std::string rope_type_of(const JsonFields& r, const std::string& fallback) {
  const auto type = r.string("type");
  const auto rope_type = r.string("rope_type");
  if (type && rope_type && *type != *rope_type)
    r.fail("rope_type", "'" + *rope_type + "' but type is '" + *type +
                            "' (transformers 4 follows type, 5 follows rope_type)");
  return rope_type ? *rope_type : type ? *type : fallback;
}

}  // namespace

ModelConfig parse_model_config(const json& j, const std::string& src) {
  const JsonFields f(j, src);
  if (auto t = f.string("model_type"); t && *t != "llama")
    f.fail("model_type", "only 'llama' is supported, got \"" + *t + "\"");
  if (f.boolean("attention_bias").value_or(false))
    f.fail("attention_bias", "true is not supported (LLaMA has no attention bias)");
  if (f.boolean("mlp_bias").value_or(false)) f.fail("mlp_bias", "true is not supported");
  if (auto a = f.string("hidden_act"); a && *a != "silu")
    f.fail("hidden_act", "only 'silu' is supported, got \"" + *a + "\"");
  if (auto tp = f.integer("pretraining_tp"); tp && *tp != 1)
    f.fail("pretraining_tp", "only 1 is supported");

  ModelConfig c;
  c.hidden_size = get_int(f, "hidden_size", true, 0);
  c.intermediate_size = get_int(f, "intermediate_size", true, 0);
  c.num_hidden_layers = get_int(f, "num_hidden_layers", true, 0, 1, int64_t{1} << 16);  // modules are built per layer
  c.num_attention_heads = get_int(f, "num_attention_heads", true, 0);
  c.num_key_value_heads = get_int(f, "num_key_value_heads", false, c.num_attention_heads);
  // Token ids are int32 here (and uint16 in LongLoRA's .bin files).
  c.vocab_size = get_int(f, "vocab_size", true, 0, 1, std::numeric_limits<int32_t>::max());
  c.max_position_embeddings = get_int(f, "max_position_embeddings", false, 2048, 1, int64_t{1} << 32);
  if (c.hidden_size % c.num_attention_heads != 0 && !f.given("head_dim"))
    f.fail("hidden_size", "not divisible by num_attention_heads and no head_dim given");
  c.head_dim = get_int(f, "head_dim", false, c.hidden_size / c.num_attention_heads);
  // RoPE rotates pairs of dimensions: an odd head_dim left a column its tables do not
  // cover (a width of 1 broadcast silently; 15 failed inside LibTorch).
  if (c.head_dim % 2 != 0)
    f.fail(f.given("head_dim") ? "head_dim" : "hidden_size",
           "gives a head_dim of " + std::to_string(c.head_dim) + ", odd: rotary embeddings need it even");
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    f.fail("num_key_value_heads", "must divide num_attention_heads");
  c.rms_norm_eps = f.number("rms_norm_eps").value_or(1e-6);
  // Past 1 the epsilon outweighs any normalized activation (1e300 zeroed every hidden state).
  if (!(c.rms_norm_eps > 0 && c.rms_norm_eps < 1))
    f.fail("rms_norm_eps", "expected a number in (0, 1), got " + json_brief(f.at("rms_norm_eps")));
  c.initializer_range = f.number("initializer_range").value_or(0.02);
  if (!(c.initializer_range > 0)) f.fail("initializer_range", "must be > 0");
  c.tie_word_embeddings = f.boolean("tie_word_embeddings").value_or(false);
  c.bos_token_id = get_int(f, "bos_token_id", false, 1, 0);
  if (f.given("eos_token_id") && f.at("eos_token_id").is_array()) {
    // Several end tokens (LLaMA 3 style): generation stops at any of them.
    const json& l = f.at("eos_token_id");
    if (l.empty()) f.fail("eos_token_id", "empty list");
    c.eos_token_ids.clear();
    for (const auto& e : l) {
      if (!e.is_number_integer() || e.get<int64_t>() < 0)
        f.expected("eos_token_id", "an integer >= 0 or a list of them");
      c.eos_token_ids.push_back(e.get<int64_t>());
    }
    c.eos_token_id = c.eos_token_ids[0];
  } else {
    c.eos_token_id = get_int(f, "eos_token_id", false, 2, 0);
    c.eos_token_ids = {c.eos_token_id};
  }
  // Decides the dtype of a merged export: an unknown name must not become fp32 silently.
  // dtype (transformers 5's name) wins over torch_dtype, as transformers 5 keeps it
  // when both are given; older versions know torch_dtype alone.
  for (const char* k : {"dtype", "torch_dtype"}) {
    const auto d = f.string(k);
    if (!d) continue;
    if (*d != "float32" && *d != "float16" && *d != "bfloat16" && *d != "auto")
      f.fail(k, "expected one of float32, float16, bfloat16, auto, got \"" + *d + "\"");
    c.torch_dtype = *d;
    break;
  }

  // RoPE: transformers 4 reads rope_scaling alone; 5 takes `rope_scaling or
  // rope_parameters`, so a rope_scaling that is not null or {} wins in both.
  c.rope_theta = f.number("rope_theta").value_or(10000.0);
  const auto scaling = f.object("rope_scaling");
  if (scaling && !f.at("rope_scaling").empty()) {
    const auto& r = scaling;
    if (auto t = r->number("rope_theta"); t && *t != c.rope_theta)
      r->fail("rope_theta", "differs from rope_theta (transformers 5 reads this one, 4 the other)");
    const std::string type = rope_type_of(*r, "");
    if (type == "linear")
      c.rope_factor = parse_factor(*r);
    else if (type.empty())
      r->fail("type", "missing (supported: linear)");
    else if (type != "default")
      r->fail("type", "'" + type + "' is not implemented (supported: linear)");
    // Both versions then ignore rope_parameters, its theta too: a transformers 5 config
    // given a rope_scaling by hand (LongLoRA's instructions), its theta only in
    // rope_parameters, would silently fall back to 10000.
    if (auto rp = f.object("rope_parameters"))
      if (auto t = rp->number("rope_theta"); t && *t != c.rope_theta)
        rp->fail("rope_theta", "differs from the rope_theta used (" + json(c.rope_theta).dump() +
                                   "): rope_scaling is given, and transformers 4 and 5 then ignore rope_parameters; "
                                   "put rope_theta at the top level");
  } else if (auto r = f.object("rope_parameters")) {
    const std::string type = rope_type_of(*r, "default");
    c.rope_theta = r->number("rope_theta").value_or(c.rope_theta);
    if (type == "linear")
      c.rope_factor = parse_factor(*r);
    else if (type != "default")
      r->fail("rope_type", "'" + type + "' is not implemented (supported: default, linear)");
  }
  // The inverse frequencies theta^(-2i/d) are computed in fp32: 1e-300 made them
  // infinite (every loss NaN), 1e308 did not fit.
  if (!(c.rope_theta >= 1 && c.rope_theta <= 1e30))
    f.fail("rope_theta", "expected a number in [1, 1e30], got " + json(c.rope_theta).dump());
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
      {"eos_token_id", c.eos_token_ids.size() > 1 ? json(c.eos_token_ids) : json(c.eos_token_id)},
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
