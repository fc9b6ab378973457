#include "longlora/train/config.h"

#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <nlohmann/json.hpp>
#include <sstream>

#include "longlora/common/error.h"
#include "longlora/common/json_file.h"
#include "longlora/common/strings.h"
#include "longlora/io/hf_config.h"

using nlohmann::json;

namespace longlora::train {
namespace {

// One key of the schema: how to read it (with validation), write it, document it.
struct Field {
  std::string path, type, doc;
  std::function<void(RunConfig&, const json&, const std::string& where)> set;
  std::function<json(const RunConfig&)> get;
};

[[noreturn]] void bad(const std::string& where, const std::string& expected, const json& v) {
  throw Error(where + ": expected " + expected + ", got " + json_brief(v));
}

template <class T>
using Ref = std::function<T&(RunConfig&)>;

Field str(std::string path, Ref<std::string> ref, std::string doc,
          std::vector<std::string> choices = {}) {
  std::string type = "string";
  if (!choices.empty()) {
    type.clear();
    for (auto& c : choices) type += (type.empty() ? "" : " | ") + c;
  }
  return {path, type, doc,
          [ref, choices, type](RunConfig& c, const json& v, const std::string& w) {
            if (!v.is_string()) bad(w, choices.empty() ? "a string" : "one of " + type, v);
            auto s = v.get<std::string>();
            // A NUL would cut the path the OS sees short of the one we check (a data
            // file "x.jsonl\0.txt" was read as text); invalid UTF-8 (from --set) cannot
            // be written into run_config.json, which would fail the first save.
            if (s.find('\0') != std::string::npos) throw Error(w + ": holds a NUL byte");
            if (const size_t i = invalid_utf8_at(s); i != std::string::npos)
              throw Error(w + ": not valid UTF-8 at byte " + std::to_string(i) +
                          " (run_config.json is JSON and holds only UTF-8: rename the file or directory)");
            if (!choices.empty() && std::find(choices.begin(), choices.end(), s) == choices.end())
              bad(w, "one of " + type, v);
            ref(c) = s;
          },
          [ref](const RunConfig& c) { return json(ref(const_cast<RunConfig&>(c))); }};
}

Field integer(std::string path, Ref<int64_t> ref, int64_t lo, std::string doc,
              int64_t hi = std::numeric_limits<int64_t>::max()) {
  const std::string type = hi == std::numeric_limits<int64_t>::max()
                               ? "integer >= " + std::to_string(lo)
                               : "integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  return {path, type, doc,
          [ref, lo, hi, type](RunConfig& c, const json& v, const std::string& w) {
            // An unsigned above INT64_MAX would wrap to a negative value.
            if (!v.is_number_integer() ||
                (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) ||
                v.get<int64_t>() < lo || v.get<int64_t>() > hi)
              bad(w, "an " + type, v);
            ref(c) = v.get<int64_t>();
          },
          [ref](const RunConfig& c) { return json(ref(const_cast<RunConfig&>(c))); }};
}

Field number(std::string path, Ref<double> ref, double lo, double hi, bool lo_open,
             std::string doc) {
  std::ostringstream range;
  range << "number in " << (lo_open ? "(" : "[") << lo << ", " << hi << "]";
  const std::string type = range.str();
  return {path, type, doc,
          [ref, lo, hi, lo_open, type](RunConfig& c, const json& v, const std::string& w) {
            if (!v.is_number()) bad(w, "a " + type, v);
            const double x = v.get<double>();
            if (x < lo || x > hi || (lo_open && x == lo)) bad(w, "a " + type, v);
            ref(c) = x;
          },
          [ref](const RunConfig& c) { return json(ref(const_cast<RunConfig&>(c))); }};
}

// 0 (for a value chosen elsewhere) or a number in [lo, hi].
Field zero_or_number(std::string path, Ref<double> ref, double lo, double hi, std::string doc) {
  std::ostringstream range;
  range << "0 or a number in [" << lo << ", " << hi << "]";
  const std::string type = range.str();
  return {path, type, doc,
          [ref, lo, hi, type](RunConfig& c, const json& v, const std::string& w) {
            const double x = v.is_number() ? v.get<double>() : -1;
            if (!(x == 0 || (x >= lo && x <= hi))) bad(w, type, v);
            ref(c) = x;
          },
          [ref](const RunConfig& c) { return json(ref(const_cast<RunConfig&>(c))); }};
}

Field boolean(std::string path, Ref<bool> ref, std::string doc) {
  return {path, "boolean", doc,
          [ref](RunConfig& c, const json& v, const std::string& w) {
            if (!v.is_boolean()) bad(w, "true or false", v);
            ref(c) = v.get<bool>();
          },
          [ref](const RunConfig& c) { return json(ref(const_cast<RunConfig&>(c))); }};
}

const std::vector<Field>& schema() {
  static const std::vector<Field> fields = [] {
    std::vector<Field> f;
    f.push_back(str("model.path", [](RunConfig& c) -> auto& { return c.model.path; },
                    "Hugging Face checkpoint directory (config.json, tokenizer.model, and the weights as "
                    "transformers looks for them: model.safetensors, the shards model.safetensors.index.json "
                    "lists, pytorch_model.bin, or the shards pytorch_model.bin.index.json lists; safetensors "
                    "are mapped, `.bin` pickles read whole into memory while loading)"));
    f.push_back(str("model.init", [](RunConfig& c) -> auto& { return c.model.init; },
                    "`random`: weights drawn from model.config alone (smoke tests, benchmarks)",
                    {"pretrained", "random"}));
    f.push_back(str("model.config", [](RunConfig& c) -> auto& { return c.model.config; },
                    "config.json used with init=random (default: model.path/config.json)"));
    f.push_back(str("model.dtype", [](RunConfig& c) -> auto& { return c.model.dtype; },
                    "compute dtype; auto = bf16 on GPU, fp32 on CPU",
                    {"auto", "fp32", "bf16", "fp16"}));
    // Below 1 a factor would stretch positions, and no reader of the checkpoint (eval,
    // export, Hugging Face) takes such a factor: refused here, not after the training.
    f.push_back(zero_or_number("model.rope_factor", [](RunConfig& c) -> auto& { return c.model.rope_factor; }, 1,
                               io::kMaxRopeFactor,
                               "linear position interpolation factor; 0 = the model's own (1 without rope_scaling), "
                               "raised to ceil(seq_len / max_position_embeddings) where seq_len needs more"));
    f.push_back(boolean("lora.enabled", [](RunConfig& c) -> auto& { return c.lora.enabled; },
                        "false = full fine-tuning (every parameter trains)"));
    // The upper bounds keep sizes computed from these far from int64 overflow (rank
    // 2^63 - 1 failed at the first allocation with "Storage size calculation overflowed").
    f.push_back(integer("lora.r", [](RunConfig& c) -> auto& { return c.lora.r; }, 1, "LoRA rank", 65536));
    // alpha / r scales in fp32: 1e300 passed here and failed at the first step.
    f.push_back(number("lora.alpha", [](RunConfig& c) -> auto& { return c.lora.alpha; }, 0, 1e30,
                       true, "LoRA alpha; the update is scaled by alpha / r"));
    f.push_back(number("lora.dropout", [](RunConfig& c) -> auto& { return c.lora.dropout; }, 0, 0.99,
                       false, "dropout on the LoRA path"));
    f.push_back({"lora.targets", "list of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj",
                 "layers that get LoRA adapters",
                 [](RunConfig& c, const json& v, const std::string& w) {
                   static const std::vector<std::string> ok{"q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"};
                   if (!v.is_array() || v.empty()) bad(w, "a non-empty list of layer names", v);
                   std::vector<std::string> out;
                   for (const auto& s : v) {
                     if (!s.is_string() || std::find(ok.begin(), ok.end(), s.get<std::string>()) == ok.end())
                       bad(w, "names among q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj", s);
                     if (std::find(out.begin(), out.end(), s.get<std::string>()) != out.end())
                       bad(w, "each layer name once", v);
                     out.push_back(s.get<std::string>());
                   }
                   c.lora.targets = out;
                 },
                 [](const RunConfig& c) { return json(c.lora.targets); }});
    f.push_back(str("trainable_params", [](RunConfig& c) -> auto& { return c.trainable_params; },
                    "comma-separated name substrings of extra trainable parameters (LongLoRA's \"embed,norm\")"));
    f.push_back(boolean("attention.s2", [](RunConfig& c) -> auto& { return c.attention.s2; },
                        "S2-Attn in training (false: full attention)"));
    f.push_back(number("attention.group_ratio", [](RunConfig& c) -> auto& { return c.attention.group_ratio; },
                       0, 1, true, "S2 group size as a fraction of seq_len (1/4 in LongLoRA)"));
    f.push_back(str("attention.shift_mode", [](RunConfig& c) -> auto& { return c.attention.shift_mode; },
                    "how the shifted half of the heads is grouped", {"segments", "roll"}));
    f.push_back(str("attention.backend", [](RunConfig& c) -> auto& { return c.attention.backend; },
                    "auto = sdpa (fused flash) on GPU, reference on CPU; kernel = our S2 CUDA kernel", {"auto", "kernel", "sdpa", "reference"}));
    f.push_back(str("data.train", [](RunConfig& c) -> auto& { return c.data.train; },
                    "training data: .bin (uint16 ids), .txt/.jsonl text, .json/.jsonl instruction records"));
    f.push_back(str("data.format", [](RunConfig& c) -> auto& { return c.data.format; },
                    "auto: .bin = tokens, .txt = text, .json = sft, .jsonl = text or sft by its fields; "
                    "tokens reads .bin, text .txt/.jsonl, sft .json/.jsonl",
                    {"auto", "tokens", "text", "sft"}));
    f.push_back(str("data.sft_prompt", [](RunConfig& c) -> auto& { return c.data.sft_prompt; },
                    "instruction records: `alpaca` puts them in the Alpaca template (LongLoRA's first "
                    "script); `none` takes the instruction as it is, then the output (LongLoRA's "
                    "`supervised-fine-tune.py` since Nov 2023; a record with an `input` is refused)",
                    {"alpaca", "none"}));
    f.push_back(integer("data.seq_len", [](RunConfig& c) -> auto& { return c.data.seq_len; }, 2,
                        "training context length in tokens"));
    f.push_back(boolean("data.shuffle", [](RunConfig& c) -> auto& { return c.data.shuffle; },
                        "shuffle rows each epoch (deterministic from train.seed)"));
    f.push_back(str("data.eval", [](RunConfig& c) -> auto& { return c.data.eval; },
                    "optional held-out data evaluated (full attention) at every save"));
    f.push_back(str("train.optimizer", [](RunConfig& c) -> auto& { return c.train.optimizer; },
                    "optimizer", {"adamw"}));
    f.push_back(number("train.lr", [](RunConfig& c) -> auto& { return c.train.lr; }, 0, 10, true,
                       "peak learning rate"));
    f.push_back(number("train.weight_decay", [](RunConfig& c) -> auto& { return c.train.weight_decay; },
                       0, 10, false, "AdamW weight decay, applied to matrices only"));
    f.push_back({"train.betas", "[beta1, beta2] each in [0, 1)", "AdamW betas",
                 [](RunConfig& c, const json& v, const std::string& w) {
                   if (!v.is_array() || v.size() != 2 || !v[0].is_number() || !v[1].is_number())
                     bad(w, "[beta1, beta2]", v);
                   for (const auto& b : v)
                     if (b.get<double>() < 0 || b.get<double>() >= 1) bad(w, "betas in [0, 1)", v);
                   c.train.betas = {v[0].get<double>(), v[1].get<double>()};
                 },
                 [](const RunConfig& c) { return json(c.train.betas); }});
    // Below fp32's range eps is 0, and a parameter without gradient got 0 / 0 = NaN
    // in its first update.
    f.push_back(number("train.eps", [](RunConfig& c) -> auto& { return c.train.eps; }, 1e-30, 1, false,
                       "AdamW epsilon (smaller is 0 in fp32, and 0 / 0 a NaN update)"));
    f.push_back(integer("train.warmup_steps", [](RunConfig& c) -> auto& { return c.train.warmup_steps; },
                        0, "linear warmup steps"));
    f.push_back(str("train.scheduler", [](RunConfig& c) -> auto& { return c.train.scheduler; },
                    "learning-rate schedule after warmup", {"constant_with_warmup", "cosine", "linear"}));
    f.push_back(integer("train.max_steps", [](RunConfig& c) -> auto& { return c.train.max_steps; }, 1,
                        "optimizer steps"));
    f.push_back(integer("train.micro_batch_size", [](RunConfig& c) -> auto& { return c.train.micro_batch_size; },
                        1, "rows per forward pass", 65536));
    f.push_back(integer("train.grad_accum", [](RunConfig& c) -> auto& { return c.train.grad_accum; }, 1,
                        "micro-batches per optimizer step (each gathered just before its forward)", 65536));
    f.push_back(number("train.max_grad_norm", [](RunConfig& c) -> auto& { return c.train.max_grad_norm; },
                       0, 1e9, false, "gradient-norm clipping; 0 disables"));
    f.push_back(integer("train.seed", [](RunConfig& c) -> auto& { return c.train.seed; }, 0,
                        "seed of LoRA init, shuffling and dropout"));
    f.push_back(boolean("train.activation_checkpointing",
                        [](RunConfig& c) -> auto& { return c.train.activation_checkpointing; },
                        "recompute each decoder layer in backward"));
    f.push_back(boolean("train.offload_activations",
                        [](RunConfig& c) -> auto& { return c.train.offload_activations; },
                        "keep checkpointed layer inputs in pinned host memory (CUDA; for the longest contexts)"));
    f.push_back(integer("train.mlp_chunk", [](RunConfig& c) -> auto& { return c.train.mlp_chunk; }, 0,
                        "tokens per MLP chunk in recompute and no-grad forward (0 = whole sequence); the same "
                        "gradients, except that with LoRA dropout on two or more MLP layers the chunks draw the "
                        "dropout masks in another order (another random draw, as a different seed would give)"));
    f.push_back(integer("train.max_bad_steps", [](RunConfig& c) -> auto& { return c.train.max_bad_steps; },
                        1, "consecutive non-finite steps skipped before the run stops (exit 3), saving a checkpoint "
                        "of the state after the last finite step and removing none. A run whose every step was "
                        "skipped exits 3 too, and an update that makes the weights non-finite stops the run at "
                        "once (exit 3, nothing saved)"));
    // Below 1 a fixed scale shrinks the gradients: fp16 would lose more of them, not fewer.
    f.push_back(zero_or_number("train.loss_scale", [](RunConfig& c) -> auto& { return c.train.loss_scale; }, 1, 1e30,
                               "loss scale; 0 = dynamic with `model.dtype` fp16 (as torch's GradScaler: halved, and the "
                               "update skipped, at a gradient overflow, which is not a bad step unless the scale is "
                               "already 1 and, as in HF's Trainer, does not advance the learning-rate schedule; doubled "
                               "after `train.loss_scale_window` finite steps; kept in the checkpoint), none with fp32 or "
                               "bf16; > 0 = that fixed scale. Unscaled, fp16 gradients below 6e-8 are lost: a long "
                               "context's per-token share of the loss makes many of them that small"));
    f.push_back(number("train.initial_loss_scale",
                       [](RunConfig& c) -> auto& { return c.train.initial_loss_scale; }, 1, 1e30, false,
                       "the dynamic loss scale's start"));
    f.push_back(integer("train.loss_scale_window",
                        [](RunConfig& c) -> auto& { return c.train.loss_scale_window; }, 1,
                        "finite steps in a row before the dynamic loss scale doubles"));
    f.push_back(integer("train.loss_chunk", [](RunConfig& c) -> auto& { return c.train.loss_chunk; }, 1,
                        "tokens per chunk of the cross-entropy (no whole L x vocab logits)"));
    f.push_back(str("output.dir", [](RunConfig& c) -> auto& { return c.output.dir; },
                    "run directory: checkpoints, metrics.jsonl"));
    f.push_back(integer("output.save_steps", [](RunConfig& c) -> auto& { return c.output.save_steps; }, 1,
                        "checkpoint every N steps (and at the end)"));
    f.push_back(integer("output.keep_last", [](RunConfig& c) -> auto& { return c.output.keep_last; }, 1,
                        "checkpoints kept"));
    f.push_back(integer("output.log_steps", [](RunConfig& c) -> auto& { return c.output.log_steps; }, 1,
                        "progress line and metrics.jsonl record every N steps, and at every save and stop"));
    f.push_back(str("device", [](RunConfig& c) -> auto& { return c.device; },
                    "auto = CUDA when present", {"auto", "cpu", "cuda"}));
    return f;
  }();
  return fields;
}

const Field* find_field(const std::string& path) {
  for (const auto& f : schema())
    if (f.path == path) return &f;
  return nullptr;
}

bool is_section(const std::string& path) {
  for (const auto& f : schema())
    if (f.path.rfind(path + ".", 0) == 0) return true;
  return false;
}

// `seen`: the keys set so far, so that one given twice, once dotted ("model.path" at
// the top) and once nested, is an error as a key twice in one object is.
void walk(RunConfig& c, const json& j, const std::string& prefix, const std::string& source,
          std::set<std::string>& seen) {
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string path = prefix.empty() ? it.key() : prefix + "." + it.key();
    if (const Field* f = find_field(path)) {
      if (!seen.insert(path).second) throw Error(source + ": " + path + ": appears twice");
      f->set(c, it.value(), source + ": " + path);
    } else if (is_section(path)) {
      if (!it.value().is_object()) bad(source + ": " + path, "an object", it.value());
      walk(c, it.value(), path, source, seen);
    } else {
      throw Error(source + ": " + path + ": unknown key");
    }
  }
}

}  // namespace

RunConfig parse_run_config(const json& j, const std::string& source) {
  if (!j.is_object()) throw Error(source + ": expected a JSON object");
  RunConfig c;
  std::set<std::string> seen;
  walk(c, j, "", source, seen);
  return c;
}

RunConfig load_run_config(const std::string& path) {
  return parse_run_config(read_json_file(path, /*reject_duplicate_keys=*/true), path);
}

std::string ConfigOrigin::at(const std::string& key) const {
  if (std::find(overridden.begin(), overridden.end(), key) != overridden.end()) return "--set " + key;
  return file + ": " + key;
}

std::string apply_override(RunConfig& c, const std::string& a) {
  const auto eq = a.find('=');
  if (eq == std::string::npos || eq == 0)
    throw Error("--set " + a + ": expected key.path=value");
  const std::string key = a.substr(0, eq), raw = a.substr(eq + 1);
  const Field* f = find_field(key);
  if (!f) throw Error("--set " + key + ": unknown key");
  json v;
  try {
    v = json::parse(raw, json_depth_limit<json>("--set " + key));
  } catch (const json::exception&) {
    v = raw;  // bare words are strings
  }
  f->set(c, v, "--set " + key);
  return key;
}

json to_json(const RunConfig& c) {
  json j = json::object();
  for (const auto& f : schema()) j[json::json_pointer("/" + [&] {
    std::string p = f.path;
    std::replace(p.begin(), p.end(), '.', '/');
    return p;
  }())] = f.get(c);
  return j;
}

std::string model_config_path(const RunConfig& c) {
  return !c.model.config.empty() ? c.model.config : (std::filesystem::path(c.model.path) / "config.json").string();
}

std::vector<std::string> trainable_entries(const std::string& trainable_params) {
  std::vector<std::string> out;
  std::stringstream ss(trainable_params);
  for (std::string t; std::getline(ss, t, ',');) {
    t.erase(0, t.find_first_not_of(" \t"));
    t.erase(t.find_last_not_of(" \t") + 1);
    if (!t.empty()) out.push_back(t);
  }
  return out;
}

std::string config_reference() {
  RunConfig d;
  std::ostringstream o;
  o << "| key | type | default | meaning |\n|---|---|---|---|\n";
  // A bare "|" between choices would start a new cell in a Markdown table.
  auto cell = [](std::string s) {
    for (size_t i = 0; (i = s.find('|', i)) != std::string::npos; i += 2) s.insert(i, "\\");
    return s;
  };
  for (const auto& f : schema())
    o << "| `" << f.path << "` | " << cell(f.type) << " | `" << f.get(d).dump() << "` | " << cell(f.doc) << " |\n";
  return o.str();
}

}  // namespace longlora::train
