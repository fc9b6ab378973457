#include "longlora/train/setup.h"

#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>
#include <sstream>

#include "longlora/common/device.h"
#include "longlora/common/error.h"
#include "longlora/common/fs.h"
#include "longlora/data/tokens.h"
#include "longlora/eval/perplexity.h"
#include "longlora/model/loader.h"

namespace fs = std::filesystem;

namespace longlora::train {

double resolve_rope_factor(const RunConfig& c, const io::ModelConfig& m, const std::string& seq_len_field) {
  if (c.model.rope_factor > 0) return c.model.rope_factor;
  // Never below the model's own factor: a model extended before (rope_scaling x8 over
  // 4096 positions) trained at 16k would otherwise drop to x4 and lose its context.
  if (c.data.seq_len > m.max_position_embeddings * m.rope_factor) {
    const double f = std::ceil(static_cast<double>(c.data.seq_len) / static_cast<double>(m.max_position_embeddings));
    // The same limit as model.rope_factor's own range (past it, bench timed a model no
    // config accepts, "rope factor 244141", or ran out of memory).
    if (f > 1024)
      throw Error(seq_len_field + ": " + std::to_string(c.data.seq_len) + " needs a RoPE factor of " +
                  std::to_string(static_cast<int64_t>(f)) + " over max_position_embeddings " +
                  std::to_string(m.max_position_embeddings) + ", past the limit of 1024: at most " +
                  std::to_string(1024 * m.max_position_embeddings));
    return f;
  }
  return m.rope_factor;
}

NamedTensors select_trainable(model::LlamaForCausalLMImpl& m, const RunConfig& c, const std::string& field) {
  const std::vector<std::string> subs = trainable_entries(c.trainable_params);
  NamedTensors out;
  torch::NoGradGuard ng;
  // An entry that names nothing (a typo: "nrom") would train less than asked, silently.
  for (const auto& s : subs) {
    bool hit = false;
    for (const auto& item : m.named_parameters()) hit = hit || item.key().find(s) != std::string::npos;
    if (!hit) throw Error(field + ": \"" + s + "\" is in no parameter name of the model");
  }
  for (auto& item : m.named_parameters()) {
    const std::string& n = item.key();
    auto& p = item.value();
    bool train = !c.lora.enabled || n.find(".lora_A.") != std::string::npos ||
                 n.find(".lora_B.") != std::string::npos;
    for (const auto& s : subs) train = train || n.find(s) != std::string::npos;
    if (train) {
      // fp32 master weights in memory we own (base weights may be a read-only mapping).
      p.set_data(p.to(torch::kFloat32, /*non_blocking=*/false, /*copy=*/true));
      p.requires_grad_(true);
      out.emplace_back(n, p);
    } else {
      p.requires_grad_(false);
    }
  }
  return out;
}

std::string s2_group_where(const RunConfig& c, const ConfigOrigin& o) {
  return fmt::format("{} {} with {} {}", o.at("attention.group_ratio"), c.attention.group_ratio, o.at("data.seq_len"),
                     c.data.seq_len);
}

void preflight(const RunConfig& c, const ConfigOrigin& o) {
  const std::string cfg_path = model_config_path(c);
  const auto mcfg = io::load_model_config(cfg_path);
  resolve_rope_factor(c, mcfg, o.at("data.seq_len"));
  // The weights as they will sit on the device: random ones in the compute dtype; on a
  // GPU a checkpoint's as stored (config.json's torch_dtype; loading checks the real
  // sizes). On the CPU a checkpoint stays mapped where it can.
  const auto device = pick_device(c.device);
  const auto dtype = pick_dtype(c.model.dtype, device);
  if (c.model.init == "random")
    model::check_weights_fit(mcfg, device, dtype, cfg_path);
  else if (device.is_cuda())
    model::check_weights_fit(mcfg, device,
                             mcfg.torch_dtype == "float32"   ? torch::kFloat32
                             : mcfg.torch_dtype == "float16" ? torch::kFloat16
                                                             : torch::kBFloat16,
                             cfg_path);
  if (c.attention.s2)  // the group's two keys named as set, the heads as config.json has them
    attention::check_s2_shape(mcfg.num_attention_heads, mcfg.num_key_value_heads, c.data.seq_len,
                              std::llround(c.data.seq_len * c.attention.group_ratio),
                              attention::parse_mode(c.attention.shift_mode), s2_group_where(c, o),
                              cfg_path + ": attention");
  // Parameter names depend on LoRA's targets too, not on the rank: rank 1 will do.
  {
    auto stand_in = model::stand_in_model(mcfg);
    if (c.lora.enabled) {
      auto spec = c.lora;
      spec.r = 1;
      model::add_lora(*stand_in, spec);
    }
    select_trainable(*stand_in, c, o.at("trainable_params"));
  }
  const auto tok_path = c.model.path.empty() ? fs::path() : fs::path(c.model.path) / "tokenizer.model";
  const bool has_tok = !tok_path.empty() && fs::exists(tok_path);
  const std::string reader = data::data_reader(c.data.train, c.data.format);
  data::check_data_head(c.data.train, reader, c.data.sft_prompt, c.data.seq_len);
  if (has_tok) {
    data::Tokenizer tok(tok_path.string());
    tok.check_fits(mcfg.vocab_size, cfg_path);
    // Text and instruction rows start with BOS and end with EOS.
    if (reader != "tokens") (void)tok.bos_id(), (void)tok.eos_id();
  } else if (reader != "tokens") {
    fail(c.data.train, "", reader + " data needs the model's tokenizer.model" +
                               (c.model.path.empty() ? std::string(" (model.path names no directory)")
                                                     : " (none in " + c.model.path + ")"));
  }
  // data.eval's format, now: it was first read after the model, and an unknown
  // extension failed then without naming the key. The eval reads by extension (a
  // .jsonl's "text" fields, whatever else its records hold: an Alpaca export has
  // instruction fields and a "text").
  if (!c.data.eval.empty()) {
    std::string eval_reader;
    try {
      check_regular_file(c.data.eval);
      if (fs::path(c.data.eval).extension() == ".json")
        fail(c.data.eval, "",
             "instruction records (.json), which the eval does not score: it takes tokens (.bin) or text (.txt, or "
             ".jsonl with a \"text\" field)");
      eval_reader = data::token_stream_reader(c.data.eval);
      (void)data::check_token_stream_head(c.data.eval);
    } catch (const Error& e) {
      throw Error(o.at("data.eval") + ": " + e.what());
    }
    if (eval_reader != "tokens" && !has_tok)
      throw Error(o.at("data.eval") + ": " + c.data.eval + ": text needs the model's tokenizer.model");
    std::error_code ec;
    if (fs::equivalent(c.data.eval, c.data.train, ec))
      spdlog::warn("{}: the training data itself: its eval loss measures fit to the training rows, not held-out text",
                   o.at("data.eval"));
  }
}

Session make_session(const RunConfig& c, bool with_data) {
  Session s;
  s.device = pick_device(c.device);
  s.dtype = pick_dtype(c.model.dtype, s.device);
  torch::manual_seed(static_cast<uint64_t>(c.train.seed));

  const std::string cfg_path = model_config_path(c);
  auto mcfg = io::load_model_config(cfg_path);
  model::LoadOptions lo;
  lo.device = s.device;
  lo.compute_dtype = s.dtype;
  lo.rope_factor = resolve_rope_factor(c, mcfg);
  lo.seed = static_cast<uint64_t>(c.train.seed);
  // On the CPU frozen weights are cast once to the compute dtype; on the GPU they
  // stay as stored (bf16) and random ones are made in the compute dtype.
  if (!s.device.is_cuda() || c.model.init == "random") lo.weight_dtype = s.dtype;
  if (c.model.init == "random") {
    mcfg.rope_factor = *lo.rope_factor;
    s.model = model::random_model(mcfg, lo, cfg_path);
  } else {
    s.model = model::load_model(c.model.path, lo);
    // A NaN in a frozen weight makes every step a skipped one; the run then ended
    // "done" with nothing trained. One pass over the weights, on their device.
    torch::NoGradGuard ng;
    for (const auto& p : s.model->named_parameters())
      if (!torch::isfinite(p.value()).all().item<bool>())
        fail(c.model.path, "tensor '" + p.key() + "'", "holds non-finite values (NaN or inf) as loaded");
  }
  auto& m = *s.model;
  s.base_sample = model::base_weight_sample(m);
  if (c.lora.enabled) {
    model::add_lora(m, c.lora);
  }
  s.trainable = select_trainable(m, c);
  int64_t n_train = 0, n_all = 0;
  for (auto& [n, p] : s.trainable) n_train += p.numel();
  for (auto& p : m.parameters()) n_all += p.numel();
  spdlog::info("model: {} layers, hidden {}, {} heads ({} kv), rope factor {}, {} on {}; trainable {:.2f}M of {:.2f}M parameters",
               m.cfg.num_hidden_layers, m.cfg.hidden_size, m.cfg.num_attention_heads,
               m.cfg.num_key_value_heads, m.cfg.rope_factor, dtype_string(s.dtype), s.device.str(),
               n_train / 1e6, n_all / 1e6);

  if (static_cast<double>(c.data.seq_len) > m.cfg.max_position_embeddings * m.cfg.rope_factor)
    spdlog::warn("data.seq_len {} is past the model's {} positions x RoPE factor {}: the positions beyond were "
                 "never trained (model.rope_factor 0 picks a factor that covers seq_len)",
                 c.data.seq_len, m.cfg.max_position_embeddings, m.cfg.rope_factor);

  // AdamW; weight decay on matrices only.
  std::vector<torch::Tensor> decay, no_decay;
  for (auto& [n, p] : s.trainable) (p.dim() >= 2 ? decay : no_decay).push_back(p);
  auto opts = [&](double wd) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(c.train.lr)
            .betas({c.train.betas[0], c.train.betas[1]})
            .eps(c.train.eps)
            .weight_decay(wd));
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  if (!decay.empty()) groups.emplace_back(decay, opts(c.train.weight_decay));
  if (!no_decay.empty()) groups.emplace_back(no_decay, opts(0.0));
  s.optimizer = std::make_unique<torch::optim::AdamW>(groups, torch::optim::AdamWOptions(c.train.lr));

  s.train_forward.checkpoint_layers = c.train.activation_checkpointing;
  s.train_forward.offload_layers = c.train.offload_activations;
  s.train_forward.mlp_chunk = c.train.mlp_chunk;
  s.train_forward.attn.backend = attention::parse_backend(c.attention.backend);
  if (c.attention.s2) {
    s.train_forward.attn.mode = attention::parse_mode(c.attention.shift_mode);
    s.train_forward.attn.group = std::llround(c.data.seq_len * c.attention.group_ratio);
    attention::check_s2_shape(m.cfg.num_attention_heads, m.cfg.num_key_value_heads, c.data.seq_len,
                              s.train_forward.attn.group, s.train_forward.attn.mode);
  }

  if (with_data) {
    const auto tok_path = fs::path(c.model.path) / "tokenizer.model";
    if (!c.model.path.empty() && fs::exists(tok_path))
      s.tokenizer = std::make_unique<data::Tokenizer>(tok_path.string());
    if (s.tokenizer) s.tokenizer->check_fits(m.cfg.vocab_size, cfg_path);
    s.data = std::make_unique<data::Dataset>(c.data.train, c.data.format, c.data.seq_len,
                                             s.tokenizer.get(), m.cfg.vocab_size, c.data.sft_prompt);
    spdlog::info("data: {} ({}), {} rows of {} tokens", c.data.train, s.data->kind(), s.data->size(),
                 c.data.seq_len);
    if (!c.data.eval.empty()) {
      const std::string source = "data.eval: " + c.data.eval;
      try {
        s.eval_data = std::make_unique<std::vector<int32_t>>(data::load_token_stream(c.data.eval, s.tokenizer.get()));
      } catch (const Error& e) {
        throw Error("data.eval: " + std::string(e.what()));  // which of the two files it is
      }
      // Checked now, not at the first save after hours of training.
      eval::check_windows(static_cast<int64_t>(s.eval_data->size()), c.data.seq_len, source);
      data::check_token_ids(*s.eval_data, m.cfg.vocab_size, source);
    }
  }
  return s;
}

}  // namespace longlora::train
