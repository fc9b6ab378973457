// Building a LlamaForCausalLM from a Hugging Face checkpoint (or random weights
// from a config.json alone), and applying peft adapters.
#pragma once

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "longlora/io/adapter.h"
#include "longlora/io/safetensors.h"
#include "longlora/model/llama.h"

namespace longlora::model {

struct LoadOptions {
  torch::Device device = torch::kCPU;
  torch::ScalarType compute_dtype = torch::kFloat32;
  std::optional<double> rope_factor;  // overrides config.json
  bool random_init = false;           // weights from a seeded normal(0, 0.02), no safetensors
  uint64_t seed = 0;
  // Frozen weights are cast to this dtype on load when set (random init: the dtype
  // to create them in). Unset: the stored dtype (bf16 checkpoints stay bf16).
  std::optional<torch::ScalarType> weight_dtype;
  // dir's weights opened already (io::open_checkpoint(dir)), so that a caller that reads
  // them again (export) reads a pickled checkpoint once. Unset: opened here.
  std::shared_ptr<io::SafetensorsCheckpoint> checkpoint;
};

// `dir` holds config.json and the weights (model.safetensors, pytorch_model.bin, or
// their shards' index). Every tensor the model needs must be present with the right
// shape; unexpected ones are refused.
LlamaForCausalLM load_model(const std::string& dir, const LoadOptions& opt);
// What eval and generate do: the model on `device` ("auto" | "cpu" | "cuda") in
// `dtype` ("auto" | "fp32" | "bf16" | "fp16"), RoPE factor overridden when > 0,
// with the peft adapter (or training checkpoint) `adapter` applied when not empty.
LlamaForCausalLM load_for_inference(const std::string& dir, const std::string& adapter,
                                    const std::string& device, const std::string& dtype,
                                    double rope_factor);
// The parameters of the LLaMA `c` describes: embedding, layers, final norm, and
// lm_head unless tied (LoRA not counted).
double parameter_count(const io::ModelConfig& c);
// An Error naming `source` (the config.json) when the weights alone, in `dtype`, take
// more than all of the device's memory: said at once, not after minutes of loading
// (a 70B model in bf16 on one 80 GB GPU). load_model checks a checkpoint's own sizes
// on a GPU.
void check_weights_fit(const io::ModelConfig& c, const torch::Device& device, torch::ScalarType dtype,
                       const std::string& source);

// Random weights from a config.json (for smoke tests and benchmarks).
// `source` names the config in check_weights_fit's error.
LlamaForCausalLM random_model(const io::ModelConfig& cfg, const LoadOptions& opt,
                              const std::string& source = "config.json");

// Whether a module (full name, "model.layers.0.self_attn.q_proj") is one peft puts
// LoRA on for target_modules `targets`: the name is a target or ends with "." + target.
bool is_lora_target(const std::string& module, const std::string& target);
bool is_lora_target(const std::string& module, const std::vector<std::string>& targets);
// Adds LoRA (rank, alpha, dropout) to every Linear that is_lora_target names; an Error
// for a target that names none.
// `field` starts that error ("lora.targets"; none when empty).
void add_lora(LlamaForCausalLMImpl& m, const lora::LoraSpec& spec, const std::string& field = "lora.targets");

// Applies a peft adapter directory: LoRA on its targets + its modules_to_save.
// Returns the adapter's description (what it set).
io::AdapterConfig apply_adapter(LlamaForCausalLMImpl& m, const std::string& dir);

// Whether a parameter name belongs to a module listed in `modules` (peft's
// modules_to_save / LongLoRA's "embed,norm" substring rule is in train/).
// A training checkpoint of ours: a directory with run_config.json or COMPLETE, or a
// trainer_state.json with our format_version (a peft adapter directory has neither;
// a Hugging Face Trainer checkpoint has a trainer_state.json of its own).
bool is_training_checkpoint(const std::string& dir);
// The linear RoPE factor a training checkpoint was trained with (its
// trainer_state.json's rope_factor, a number >= 1), if it records one; an Error when
// the checkpoint is not COMPLETE or the factor is not such a number. nullopt for a
// directory that is not a training checkpoint.
std::optional<double> trained_rope_factor(const std::string& dir);

bool is_module_to_save(const std::string& param_name, const std::vector<std::string>& modules);

// A fingerprint of a model's weights: 16 evenly spaced entries of every parameter, in
// the model's order, and their two sums (values, magnitudes). Cheap, the same across
// devices and the fp32/bf16/fp16 copies of one checkpoint within rounding. A training
// checkpoint records its base's (trainer_state.json: base_entries and base_sample, the
// sums; checkpoints before base_entries have the sums alone).
struct BaseSample {
  std::vector<double> sums;                  // (sum, sum of magnitudes) per parameter
  std::vector<std::vector<double>> entries;  // the entries per parameter
  bool empty() const { return sums.empty() && entries.empty(); }
};
BaseSample base_weight_sample(const LlamaForCausalLMImpl& m);
// A model of `cfg`'s parameter names, in their order, at width 4: the names depend on
// the layer count and tied embeddings, not on the widths (random weights, tiny).
LlamaForCausalLM stand_in_model(const io::ModelConfig& cfg);
// The same from weight files, without building the model: `tensor` gives each
// parameter's weights by name (a view of the file).
BaseSample base_weight_sample(const io::ModelConfig& cfg, const std::function<torch::Tensor(const std::string&)>& tensor);
// Whether `now` is of the weights `recorded` sampled. Entry by entry where both have
// them: each within 2^-7 of itself (one bf16 step: a copy rounded twice, fp16 then
// bf16, lands a step from one rounded once) plus 2^-10 of its parameter's mean
// magnitude (fp16's small values); a fine-tune or a merged adapter moving entries by
// 1% is seen. With the sums alone: each within 1% of the magnitudes' sum,
// which only other models pass outside of.
bool same_base(const BaseSample& recorded, const BaseSample& now);
// trainer_state.json's base_sample and base_entries (`ts`, read from `file`); empty
// where it records neither. An Error naming the field for malformed ones.
BaseSample parse_base_sample(const nlohmann::json& ts, const std::string& file);
nlohmann::json base_sample_json(const BaseSample& s);  // the two fields, as recorded
// The base sample a training checkpoint recorded; nullopt for a peft adapter or a
// checkpoint saved before it was recorded.
std::optional<BaseSample> recorded_base_sample(const std::string& adapter);
// Warns when `recorded` (an adapter's) is not of `now`, `base`'s: its LoRA goes on
// weights it did not train on (another model, or one with the adapter merged already).
void warn_if_other_base(const std::string& adapter, const std::string& base, const BaseSample& recorded,
                        const BaseSample& now);

// For a base that ties its embeddings: whether, loaded as peft loads it, the adapter
// gives embed_tokens and lm_head matrices of their own. peft wraps each modules_to_save
// entry in a copy of its module (ensure_weight_tying is false, the only value taken),
// so an embed_tokens or lm_head saved that way leaves the other layer on the base's
// matrix. Saved embedding layers (not in modules_to_save) load into the one matrix, and
// an adapter that saves both layers equal keeps them one.
bool unties_embeddings(const io::SafetensorsFile& adapter, const io::AdapterConfig& cfg);

// Why a forward pass gave non-finite values, for a one-line error: "the model's NAME
// holds non-finite values" for the first such parameter, or, with every weight
// finite, a hint at the compute dtype's range.
std::string explain_non_finite(const LlamaForCausalLMImpl& m);

}  // namespace longlora::model
