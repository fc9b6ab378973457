#include "longlora/model/loader.h"

#include <cmath>
#include <filesystem>
#include <iomanip>
#include <optional>
#include <set>
#include <sstream>

#include "longlora/common/device.h"
#include "longlora/common/error.h"
#include "longlora/common/fs.h"
#include "longlora/common/json_file.h"
#include "longlora/common/strings.h"
#include "longlora/io/checksum.h"
#include "longlora/io/hf_config.h"

#include <spdlog/spdlog.h>
#include "longlora/io/tensors.h"

namespace fs = std::filesystem;

namespace longlora::model {
namespace {

std::string shape_str(c10::IntArrayRef s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

// A saved tensor (`key` in `file`) against the shape the model has for `param`.
void check_saved_shape(const std::string& file, const std::string& key, const std::string& param,
                       const std::vector<int64_t>& got, const std::vector<int64_t>& want) {
  if (const auto msg = io::vocabulary_mismatch(param, got, want); !msg.empty()) fail(file, "tensor '" + key + "'", msg);
  if (got != want)
    fail(file, "tensor '" + key + "'", "shape " + shape_str(got) + " but the model needs " + shape_str(want));
}

// The shape every base parameter must have, from the module that owns it.
std::map<std::string, std::vector<int64_t>> base_shapes(LlamaForCausalLMImpl& m) {
  std::map<std::string, std::vector<int64_t>> out;
  const auto& c = m.cfg;
  for (const auto& item : m.named_modules()) {
    const std::string& name = item.key();
    const auto& mod = item.value();
    const std::string w = name.empty() ? "weight" : name + ".weight";
    if (auto* l = dynamic_cast<lora::LinearImpl*>(mod.get()))
      out[w] = {l->out_features, l->in_features};
    else if (dynamic_cast<EmbeddingImpl*>(mod.get()))
      out[w] = {c.vocab_size, c.hidden_size};
    else if (dynamic_cast<RMSNormImpl*>(mod.get()))
      out[w] = {c.hidden_size};
  }
  return out;
}

// A handle to the parameter (set_data on it changes the module's parameter) in
// `params`, the model's named_parameters() taken once: taking them per parameter made
// building a model quadratic in its layers (a 2048-layer config took minutes).
torch::Tensor param_ref(const torch::OrderedDict<std::string, torch::Tensor>& params, const std::string& name) {
  const auto* p = params.find(name);
  TORCH_CHECK(p, "no parameter ", name);
  return *p;
}

}  // namespace

double parameter_count(const io::ModelConfig& c) {
  const double h = static_cast<double>(c.hidden_size), q = static_cast<double>(c.num_attention_heads * c.head_dim),
               kv = static_cast<double>(c.num_key_value_heads * c.head_dim),
               v = static_cast<double>(c.vocab_size);
  const double layer = h * q * 2 + h * kv * 2 + 3 * h * static_cast<double>(c.intermediate_size) + 2 * h;
  return v * h * (c.tie_word_embeddings ? 1 : 2) + static_cast<double>(c.num_hidden_layers) * layer + h;
}

namespace {
// `how`: "in bf16", "as stored".
void check_bytes_fit(double bytes, double params, const torch::Device& device, const std::string& how,
                     const std::string& source) {
  const double gib = bytes / double(1 << 30), have = device_memory_gib(device);
  if (gib <= have) return;
  std::ostringstream m;
  m << std::setprecision(3) << "the weights alone take " << gib << " GiB " << how << " (" << params / 1e9
    << "B parameters), more than the " << have << " GiB of " << device.str()
    << (device.is_cuda() ? ": training and evaluation run on one GPU; a larger one is needed" : "");
  fail(source, "", m.str());
}
}  // namespace

void check_weights_fit(const io::ModelConfig& c, const torch::Device& device, torch::ScalarType dtype,
                       const std::string& source) {
  const double n = parameter_count(c);
  check_bytes_fit(n * static_cast<double>(c10::elementSize(dtype)), n, device, "in " + dtype_string(dtype), source);
}

LlamaForCausalLM random_model(const io::ModelConfig& cfg, const LoadOptions& opt, const std::string& source) {
  check_weights_fit(cfg, opt.device, opt.weight_dtype.value_or(opt.compute_dtype), source);
  LlamaForCausalLM m(cfg);
  m->compute_dtype = opt.compute_dtype;
  const auto dt = opt.weight_dtype.value_or(opt.compute_dtype);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(opt.seed);
  // On a GPU the draw happens there: drawing a 7B model's 6.7e9 normals serially on
  // the host would hold `bench` up before its first step. A private copy of the device
  // generator keeps the global one as is.
  at::Generator dev_gen;
  if (opt.device.is_cuda()) {
    dev_gen = at::globalContext().defaultGenerator(opt.device).clone();
    dev_gen.set_current_seed(opt.seed);
  }
  const auto params = m->named_parameters();
  for (auto& [name, shape] : base_shapes(*m)) {
    auto p = param_ref(params, name);
    torch::Tensor t;
    if (shape.size() == 1) {
      t = torch::ones(shape, torch::dtype(dt).device(opt.device));
    } else if (opt.device.is_cuda()) {
      t = at::normal(0.0, cfg.initializer_range, shape, dev_gen, torch::dtype(torch::kFloat32).device(opt.device)).to(dt);
    } else {
      // Drawn on the CPU generator in fp32, one matrix at a time so peak host
      // memory is one matrix.
      t = at::normal(0.0, cfg.initializer_range, shape, gen, torch::dtype(torch::kFloat32)).to(opt.device, dt);
    }
    p.set_data(t);
  }
  return m;
}

namespace {

// The decoder layers config.json asks for must all be in the checkpoint. Checked on
// the tensor names before the model is built: a wrong num_hidden_layers (1000000)
// would otherwise allocate every layer first and run out of memory.
void check_layer_count(const io::SafetensorsCheckpoint& ckpt, const io::ModelConfig& cfg,
                       const std::string& cfg_path) {
  const std::string prefix = "model.layers.";
  std::set<int64_t> present;
  for (const auto& name : ckpt.names()) {
    if (name.rfind(prefix, 0) != 0) continue;
    const auto dot = name.find('.', prefix.size());
    const std::string idx = name.substr(prefix.size(), dot - prefix.size());
    if (idx.empty() || idx.size() > 18 || idx.find_first_not_of("0123456789") != std::string::npos)
      continue;  // not a layer index; the name check after the build refuses it
    present.insert(std::stoll(idx));
  }
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i)
    if (!present.count(i))
      fail(cfg_path, "num_hidden_layers",
           std::to_string(cfg.num_hidden_layers) + " but the checkpoint has no tensor of layer " +
               std::to_string(i) + " (model.layers." + std::to_string(i) + ".*)");
}

}  // namespace

LlamaForCausalLM load_model(const std::string& dir, const LoadOptions& opt) {
  const std::string cfg_path = (fs::path(dir) / "config.json").string();
  if (!fs::is_directory(dir)) fail(dir, "", "model directory not found");
  // An adapter (peft's, or a LoRA training checkpoint) given where the model goes said
  // only "config.json: cannot open".
  if (!fs::exists(cfg_path) && fs::exists(fs::path(dir) / "adapter_config.json"))
    fail(dir, "", "holds an adapter (adapter_config.json), not a model: give it as the adapter (--adapter) and its "
                  "base model as the model");
  auto cfg = io::load_model_config(cfg_path);
  if (opt.rope_factor) cfg.rope_factor = *opt.rope_factor;
  if (opt.random_init) return random_model(cfg, opt, cfg_path);
  io::verify_checkpoint_files(dir, false);  // a full fine-tuning checkpoint as the model

  auto ckpt = opt.checkpoint ? opt.checkpoint : io::open_checkpoint(dir);
  check_layer_count(*ckpt, cfg, cfg_path);
  // On a GPU the weights sit as stored (or cast to weight_dtype): their real size,
  // before any is copied there. On the CPU a checkpoint stored in the compute dtype
  // stays mapped, and the page cache can hold less than all of it.
  if (opt.device.is_cuda()) {
    double bytes = 0, params = 0;
    for (const auto& name : ckpt->names()) {
      if (io::is_stale_buffer(name)) continue;
      const auto& info = ckpt->get(name);
      const double n = static_cast<double>(info.numel());
      params += n;
      bytes += opt.weight_dtype ? n * static_cast<double>(c10::elementSize(*opt.weight_dtype))
                                : static_cast<double>(info.nbytes);
    }
    check_bytes_fit(bytes, params, opt.device,
                    opt.weight_dtype ? "in " + dtype_string(*opt.weight_dtype) : std::string("as stored"), cfg_path);
  }
  LlamaForCausalLM m(cfg);
  m->compute_dtype = opt.compute_dtype;
  auto shapes = base_shapes(*m);
  const auto params = m->named_parameters();
  for (auto& [name, shape] : shapes) {
    if (!ckpt->contains(name)) fail(dir, "tensor '" + name + "'", "missing from the checkpoint");
    const auto& info = ckpt->get(name);
    const std::string& file = ckpt->file_of(name).path();
    if (!io::is_float(info.dtype))
      fail(file, "tensor '" + name + "'",
           std::string("dtype ") + io::dtype_name(info.dtype) + " is not a float type");
    if (info.shape != shape)
      fail(file, "tensor '" + name + "'",
           "shape " + shape_str(info.shape) + " but config.json implies " + shape_str(shape));
    auto t = io::view_tensor(info, ckpt);
    if (opt.weight_dtype && t.scalar_type() != *opt.weight_dtype) t = t.to(*opt.weight_dtype);
    if (opt.device != torch::kCPU) t = t.to(opt.device);
    param_ref(params, name).set_data(t);
  }
  for (const auto& name : ckpt->names()) {
    if (shapes.count(name)) continue;
    if (io::is_stale_buffer(name)) continue;
    if (cfg.tie_word_embeddings && name == "lm_head.weight") continue;
    fail(ckpt->file_of(name).path(), "tensor '" + name + "'",
         "unexpected in a LLaMA checkpoint of this config");
  }
  return m;
}

bool is_training_checkpoint(const std::string& dir) {
  if (fs::exists(fs::path(dir) / "run_config.json") || fs::exists(fs::path(dir) / "COMPLETE")) return true;
  // Hugging Face Trainer's checkpoint-N folders (LongLoRA's scripts save peft adapters
  // in them) hold a trainer_state.json of their own, without our format_version: they
  // were refused as unfinished saves of ours.
  const fs::path ts = fs::path(dir) / "trainer_state.json";
  if (!fs::exists(ts)) return false;
  const nlohmann::json j = read_json_file(ts.string());
  return j.is_object() && j.contains("format_version");
}

std::optional<double> trained_rope_factor(const std::string& dir) {
  if (!is_training_checkpoint(dir)) return std::nullopt;  // a peft adapter directory
  // A checkpoint whose save was interrupted is not one.
  if (!fs::exists(fs::path(dir) / "COMPLETE"))
    fail(dir, "COMPLETE", "missing: not a complete training checkpoint (interrupted save?)");
  const std::string ts = (fs::path(dir) / "trainer_state.json").string();
  if (!fs::exists(ts)) return std::nullopt;
  const auto st = read_json_file(ts);
  const JsonFields f(st, ts);
  if (!st.contains("rope_factor")) return std::nullopt;  // older checkpoints: config.json's factor
  const auto& v = f.at("rope_factor");
  // A factor below 1 compresses nothing and 0 divides positions by zero (loss -nan).
  if (!v.is_number() || !(v.get<double>() >= 1.0) || v.get<double>() > io::kMaxRopeFactor)
    fail(ts, "rope_factor", "expected a number in [1, 1024], got " + json_brief(v));
  return v.get<double>();
}

LlamaForCausalLM load_for_inference(const std::string& dir, const std::string& adapter,
                                    const std::string& device, const std::string& dtype,
                                    double rope_factor) {
  LoadOptions lo;
  lo.device = pick_device(device);
  lo.compute_dtype = pick_dtype(dtype, lo.device);
  std::optional<double> trained;
  if (!adapter.empty() && fs::is_directory(adapter)) trained = trained_rope_factor(adapter);
  if (rope_factor > 0) {
    lo.rope_factor = rope_factor;
  } else if (trained) {
    // A training checkpoint knows the RoPE factor it was trained with; evaluating
    // its adapter at another factor would be silently wrong.
    lo.rope_factor = trained;
    spdlog::info("rope factor {} from {}", *lo.rope_factor, adapter);
  }
  auto m = load_model(dir, lo);
  if (!adapter.empty()) {
    // The base's sample before the adapter changes it; the warning once the adapter fits.
    const auto recorded = recorded_base_sample(adapter);
    const auto sample = recorded ? base_weight_sample(*m) : BaseSample{};
    apply_adapter(*m, adapter);
    if (recorded) warn_if_other_base(adapter, dir, *recorded, sample);
  }
  return m;
}

bool is_lora_target(const std::string& module, const std::string& target) {
  // peft's check_target_module_exists for a list: the full name, or its tail on a dot
  // boundary, so "q_proj" and "self_attn.q_proj" both name layers.N.self_attn.q_proj.
  return module == target || ends_with(module, "." + target);
}

bool is_lora_target(const std::string& module, const std::vector<std::string>& targets) {
  for (const auto& t : targets)
    if (is_lora_target(module, t)) return true;
  return false;
}

void add_lora(LlamaForCausalLMImpl& m, const lora::LoraSpec& spec, const std::string& field) {
  std::set<std::string> matched;
  for (const auto& item : m.named_modules()) {
    auto* l = dynamic_cast<lora::LinearImpl*>(item.value().get());
    if (!l) continue;
    const std::string& name = item.key();
    for (const auto& t : spec.targets)
      if (is_lora_target(name, t)) matched.insert(t);
    // Two targets may name one layer ("q_proj" and "self_attn.q_proj"): one LoRA, as in peft.
    if (is_lora_target(name, spec.targets)) {
      // A peft adapter may name it (lora.targets cannot): the logits are computed from
      // lm_head's weight alone (the chunked cross-entropy), so its LoRA was left out of
      // eval and generate, silently.
      if (name == "lm_head")
        throw Error("'lm_head' is a LoRA target, which is not supported (LoRA on the layers; a peft adapter "
                    "with it merges with export, and the merged model evaluates)");
      TORCH_CHECK(!l->has_lora(), "LoRA added twice to ", name);
      l->add_lora(spec.r, spec.alpha, spec.dropout);
    }
  }
  for (const auto& t : spec.targets)
    if (!matched.count(t)) throw Error((field.empty() ? "" : field + ": ") + "'" + t + "' matches no layer of the model");
}

bool is_module_to_save(const std::string& param, const std::vector<std::string>& modules) {
  // peft's _set_trainable: the module's full name in the PeftModel ends with a listed
  // name, with no dot boundary, so "norm" also covers input_layernorm and
  // post_attention_layernorm (and peft saves their weights).
  const auto dot = param.rfind('.');
  if (dot == std::string::npos) return false;
  const std::string mod = io::kPeftPrefix + param.substr(0, dot);
  for (const auto& m : modules)
    if (ends_with(mod, m)) return true;
  return false;
}

bool unties_embeddings(const io::SafetensorsFile& adapter, const io::AdapterConfig& cfg) {
  const std::string pre = io::kPeftPrefix, e = "model.embed_tokens.weight", h = "lm_head.weight";
  const bool has_e = adapter.contains(pre + e), has_h = adapter.contains(pre + h);
  const bool copied = (has_e && is_module_to_save(e, cfg.modules_to_save)) ||
                      (has_h && is_module_to_save(h, cfg.modules_to_save));
  return copied && !io::saves_equal_embeddings(adapter);
}

io::AdapterConfig apply_adapter(LlamaForCausalLMImpl& m, const std::string& dir) {
  const fs::path d(dir);
  if (!fs::is_directory(d)) fail(dir, "", "adapter directory not found");
  const std::string cfg_path = (d / "adapter_config.json").string();
  if (!fs::exists(cfg_path)) {
    // A full fine-tuning checkpoint is a whole model, not an adapter.
    if (fs::exists(d / "config.json") && io::has_weight_files(dir))
      fail(dir, "adapter_config.json",
           "missing: this is a full fine-tuning checkpoint, a whole model: pass it as --model, without --adapter");
    fail(dir, "adapter_config.json", "missing");
  }
  auto acfg = io::load_adapter_config(cfg_path);
  io::verify_checkpoint_files(dir, false);  // a training checkpoint's adapter
  auto file = io::open_adapter_weights(dir);
  const std::string st_path = file->path();

  // The rank the factors were saved with, before add_lora allocates r x width for
  // every target: an r of 2^40 asked for petabytes and failed naming no file. So r is
  // taken only as some factor confirms it (without any, r 2^40 still went to add_lora).
  bool has_factors = false;
  for (const auto& t : file->tensors()) {
    const bool a = t.name.find(".lora_A.") != std::string::npos, b = t.name.find(".lora_B.") != std::string::npos;
    has_factors = has_factors || a || b;
    if ((a || b) && (t.shape.size() != 2 || t.shape[a ? 0 : 1] != acfg.r))
      fail(st_path, "tensor '" + t.name + "'",
           "shape " + shape_str(t.shape) + " but r is " + std::to_string(acfg.r) + " in " + cfg_path + " (lora_" +
               (a ? "A is [r, in]" : "B is [out, r]") + ")");
  }
  if (!has_factors && !acfg.target_modules.empty())
    fail(st_path, "", "no LoRA factors (lora_A, lora_B), but " + cfg_path + " targets modules with them");
  lora::LoraSpec spec;
  spec.r = acfg.r;
  spec.alpha = acfg.lora_alpha;
  spec.dropout = acfg.lora_dropout;
  spec.targets = acfg.target_modules;
  try {
    add_lora(m, spec, "");
  } catch (const Error& e) {
    fail(cfg_path, "target_modules", e.what());
  }
  const std::string prefix = io::kPeftPrefix;
  const auto dev = m.head_weight().device();
  std::set<std::string> used;
  auto shapes = base_shapes(m);
  if (const auto tp = io::open_trainable_params(dir)) {
    // LongLoRA's scripts load_state_dict these into the base before PeftModel: base
    // weights, in their dtype, frozen; the adapter's own modules_to_save come after,
    // and so does an untying below (lm_head then copies this embedding, as peft's
    // wrapping of a tied model's embed_tokens leaves lm_head on the loaded matrix).
    torch::NoGradGuard ng;
    auto params = m.named_parameters();
    for (const auto& t : tp->tensors()) {
      // A tied base's lm_head.weight is its embedding (load_state_dict fills the one matrix).
      const std::string name =
          m.cfg.tie_word_embeddings && t.name == "lm_head.weight" ? "model.embed_tokens.weight" : t.name;
      auto* p = params.find(name);
      if (!p || !shapes.count(name))
        fail(tp->path(), "tensor '" + t.name + "'", "not a weight of the base model");
      check_saved_shape(tp->path(), t.name, name, t.shape, shapes.at(name));
      p->set_data(io::view_tensor(t, tp).to(p->device(), p->scalar_type(), false, /*copy=*/true));
    }
    spdlog::info("{}: {} base weights loaded before the adapter, as LongLoRA's scripts do", tp->path(),
                 tp->tensors().size());
  }
  if (m.cfg.tie_word_embeddings && unties_embeddings(*file, acfg)) {
    spdlog::info("{}: the adapter gives embed_tokens and lm_head matrices of their own (modules_to_save), as peft "
                 "loads it on a base that ties them",
                 st_path);
    m.untie_embeddings();
    shapes = base_shapes(m);
  }
  // A tied base's one matrix (the model has no lm_head parameter) takes the adapter's
  // embed_tokens or lm_head, whichever it saved.
  const std::string tied_key = m.cfg.tie_word_embeddings ? io::tied_embedding_key(*file) : "";
  if (!tied_key.empty()) used.insert({prefix + "model.embed_tokens.weight", prefix + "lm_head.weight"});
  for (auto& item : m.named_parameters()) {
    const std::string& name = item.key();
    const bool is_lora = name.find(".lora_A.") != std::string::npos ||
                         name.find(".lora_B.") != std::string::npos;
    const std::string key = !tied_key.empty() && name == "model.embed_tokens.weight" ? tied_key : prefix + name;
    if (!is_lora && !file->contains(key)) continue;
    if (is_lora && !file->contains(key)) fail(st_path, "tensor '" + key + "'", "missing");
    const bool saved_module = !is_lora && is_module_to_save(name, acfg.modules_to_save);
    const bool saved_embedding = !is_lora && !saved_module && io::is_embedding_layer(name);
    if (!is_lora && !saved_module && !saved_embedding)
      fail(st_path, "tensor '" + key + "'",
           "replaces a base weight but its module is not in modules_to_save");
    const auto& info = file->get(key);
    if (!io::is_float(info.dtype))
      fail(st_path, "tensor '" + key + "'", "dtype is not a float type");
    auto& p = item.value();
    check_saved_shape(st_path, key, name, info.shape, is_lora ? p.sizes().vec() : shapes.at(name));
    if (saved_embedding) {
      // As peft loads it: copied into the base weight, whose dtype it takes; still frozen.
      p.set_data(io::view_tensor(info, file).to(p.device(), p.scalar_type(), false, /*copy=*/true));
    } else {
      // LoRA factors and saved modules are trainable: fp32 masters, owned memory.
      p.set_data(io::view_tensor(info, file).to(dev, torch::kFloat32, false, /*copy=*/true));
    }
    used.insert(key);
  }
  for (const auto& t : file->tensors())
    if (!used.count(t.name))
      fail(st_path, "tensor '" + t.name + "'", "unexpected: not a LoRA factor or saved module of this model");
  for (auto& item : m.named_modules()) {
    if (auto* l = dynamic_cast<lora::LinearImpl*>(item.value().get()); l && l->has_lora())
      l->scale = acfg.scale();
  }
  return acfg;
}

std::string explain_non_finite(const LlamaForCausalLMImpl& m) {
  torch::NoGradGuard ng;
  for (const auto& p : m.named_parameters())
    if (!torch::isfinite(p.value()).all().item<bool>()) return "the model's " + p.key() + " holds non-finite values";
  if (m.compute_dtype == torch::kFloat16) return "every weight is finite (an fp16 overflow? --dtype bf16 or fp32)";
  // In fp32 or bf16 the activations overflowed: name the largest weight (a LoRA scale
  // lora_alpha / r of 1e38 merges to weights near 1e35, finite yet overflowing).
  std::string name;
  double most = 0;
  for (const auto& p : m.named_parameters())
    if (p.value().numel() > 0)
      if (const double a = p.value().abs().max().item<double>(); a > most) most = a, name = p.key();
  std::ostringstream s;
  s << "every weight is finite, yet the activations overflowed; the largest weight is " << name << " at " << most;
  for (const auto& item : m.named_modules())
    if (auto* l = dynamic_cast<lora::LinearImpl*>(item.value().get()); l && l->has_lora()) {
      s << " (LoRA scale lora_alpha / r: " << l->scale << ")";
      break;
    }
  return s.str();
}

namespace {

// 16 evenly spaced entries of `weight` (all of them when fewer) and their two sums.
void add_sample(BaseSample& out, const torch::Tensor& weight) {
  const auto flat = weight.detach().reshape(-1);
  const int64_t n = flat.numel();
  if (n == 0) return;
  const auto idx = torch::linspace(0, static_cast<double>(n - 1), std::min<int64_t>(n, 16),
                                   torch::dtype(torch::kFloat64).device(flat.device()))
                       .round()
                       .to(torch::kLong);
  const auto v = flat.index_select(0, idx).to(torch::kCPU, torch::kFloat64).contiguous();
  out.sums.push_back(v.sum().item<double>());
  out.sums.push_back(v.abs().sum().item<double>());
  out.entries.emplace_back(v.data_ptr<double>(), v.data_ptr<double>() + v.numel());
}

bool same_sums(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size() || a.size() % 2 != 0) return false;
  // Pairs (sum, sum of magnitudes). Rounding each entry to bf16 moves either sum by at
  // most 2^-8 of the magnitudes' sum, however the signed one cancels.
  for (size_t i = 0; i < a.size(); i += 2) {
    const double tol = 1e-2 * std::max(std::abs(a[i + 1]), std::abs(b[i + 1])) + 1e-12;
    if (std::abs(a[i] - b[i]) > tol || std::abs(a[i + 1] - b[i + 1]) > tol) return false;
  }
  return true;
}

bool same_entries(const std::vector<std::vector<double>>& a, const std::vector<std::vector<double>>& b) {
  if (a.size() != b.size()) return false;
  for (size_t p = 0; p < a.size(); ++p) {
    if (a[p].size() != b[p].size() || a[p].empty()) return false;
    double mean = 0;
    for (double x : a[p]) mean += std::abs(x);
    mean /= static_cast<double>(a[p].size());
    for (size_t i = 0; i < a[p].size(); ++i)
      if (!(std::abs(a[p][i] - b[p][i]) <= std::ldexp(std::max(std::abs(a[p][i]), std::abs(b[p][i])), -7) +
                                                std::ldexp(mean, -10) + 1e-30))
        return false;
  }
  return true;
}

}  // namespace

BaseSample base_weight_sample(const LlamaForCausalLMImpl& m) {
  torch::NoGradGuard ng;
  BaseSample out;
  for (const auto& item : m.named_parameters()) add_sample(out, item.value());
  return out;
}

LlamaForCausalLM stand_in_model(const io::ModelConfig& cfg) {
  io::ModelConfig t = cfg;
  t.hidden_size = 4;
  t.intermediate_size = 4;
  t.num_attention_heads = 2;
  t.num_key_value_heads = 2;
  t.head_dim = 2;
  t.vocab_size = 4;
  LoadOptions lo;
  lo.rope_factor = 1.0;
  return random_model(t, lo);
}

BaseSample base_weight_sample(const io::ModelConfig& cfg, const std::function<torch::Tensor(const std::string&)>& tensor) {
  const auto stand_in = stand_in_model(cfg);
  torch::NoGradGuard ng;
  BaseSample out;
  for (const auto& item : stand_in->named_parameters()) add_sample(out, tensor(item.key()));
  return out;
}

bool same_base(const BaseSample& recorded, const BaseSample& now) {
  if (!recorded.entries.empty()) return same_entries(recorded.entries, now.entries);
  return same_sums(recorded.sums, now.sums);
}

BaseSample parse_base_sample(const nlohmann::json& ts, const std::string& file) {
  const JsonFields f(ts, file);
  BaseSample s;
  auto numbers = [&](const nlohmann::json& v, const char* key, std::vector<double>& out) {
    if (!v.is_array()) f.expected(key, "a list of numbers");
    for (const auto& x : v) {
      if (!x.is_number()) f.expected(key, "a list of numbers");
      out.push_back(x.get<double>());
    }
  };
  if (ts.contains("base_sample")) numbers(ts["base_sample"], "base_sample", s.sums);  // absent before it was recorded
  if (ts.contains("base_entries")) {
    const auto& e = ts["base_entries"];
    if (!e.is_array()) f.expected("base_entries", "a list of lists of numbers");
    for (size_t i = 0; i < e.size(); ++i) {
      const auto& p = e[i];
      bool ok = p.is_array() && !p.empty() && p.size() <= 16;
      for (size_t k = 0; ok && k < p.size(); ++k) ok = p[k].is_number();
      if (!ok)
        f.fail("base_entries", "item " + std::to_string(i) + ": expected 1 to 16 numbers, got " + json_brief(p));
      s.entries.emplace_back();
      for (const auto& x : p) s.entries.back().push_back(x.get<double>());
    }
    // Two sums of each parameter's entries: a record whose counts disagree is damaged,
    // not a sample of other weights.
    if (ts.contains("base_sample") && s.sums.size() != 2 * s.entries.size())
      f.fail("base_entries", std::to_string(s.entries.size()) + " parameters, but base_sample has sums of " +
                                 std::to_string(s.sums.size() / 2));
  }
  return s;
}

nlohmann::json base_sample_json(const BaseSample& s) {
  return {{"base_sample", s.sums}, {"base_entries", s.entries}};
}

std::optional<BaseSample> recorded_base_sample(const std::string& adapter) {
  if (!is_training_checkpoint(adapter)) return std::nullopt;  // a peft adapter records none
  const std::string ts = (fs::path(adapter) / "trainer_state.json").string();
  if (!fs::exists(ts)) return std::nullopt;
  auto s = parse_base_sample(read_json_file(ts), ts);
  if (s.empty()) return std::nullopt;  // as a resume takes it: nothing recorded
  return s;
}

void warn_if_other_base(const std::string& adapter, const std::string& base, const BaseSample& recorded,
                        const BaseSample& now) {
  // Non-finite weights are not "other weights": the forward names them.
  for (double x : now.sums)
    if (!std::isfinite(x)) return;
  if (same_base(recorded, now)) return;
  // A run on drawn weights (model.init "random") has no base but those.
  const std::string rc = (fs::path(adapter) / "run_config.json").string();
  bool drawn = false;
  if (fs::exists(rc)) {
    const auto j = read_json_file(rc);
    drawn = j.contains("model") && j["model"].is_object() && j["model"].value("init", nlohmann::json("")) == "random";
  }
  spdlog::warn("{}/trainer_state.json: base_sample: the adapter was trained on {} {}'s: its LoRA is applied to "
               "weights it did not train on",
               adapter,
               drawn ? "drawn weights (model.init \"random\"), not on"
                     : "other base weights (another model, or one with this adapter merged already) than",
               base);
}

}  // namespace longlora::model
