#include <cmath>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <filesystem>
#include <iostream>

#include "longlora/cli/commands.h"
#include "longlora/common/device.h"
#include "longlora/common/error.h"
#include "longlora/data/tokenizer.h"
#include "longlora/data/tokens.h"
#include "longlora/eval/passkey.h"
#include "longlora/eval/perplexity.h"
#include "longlora/model/loader.h"

namespace fs = std::filesystem;

namespace longlora::cli {

namespace {

// --task passkey: LongLoRA's passkey retrieval (see eval/passkey.h).
int run_passkey(const EvalArgs& a, model::LlamaForCausalLMImpl& m) {
  const auto tok_path = (fs::path(a.model) / "tokenizer.model").string();
  if (!fs::exists(tok_path)) throw Error(tok_path + ": no tokenizer.model in the model directory");
  const data::Tokenizer tok(tok_path);
  tok.check_fits(m.cfg.vocab_size, (fs::path(a.model) / "config.json").string());
  eval::PasskeyOptions po;
  po.lengths = a.lengths;
  po.trials = a.trials;
  po.seed = a.seed;
  const auto r = eval::passkey_eval(m, tok, po);
  if (a.json) {
    nlohmann::json j = {{"task", "passkey"},
                        {"lengths", r.lengths},
                        {"accuracy", r.accuracy},
                        {"trials", r.trials},
                        {"prompt_tokens", r.prompt_tokens},
                        {"prompt_tokens_min", r.prompt_tokens_min},
                        {"prompt_tokens_max", r.prompt_tokens_max},
                        {"chars_per_token", r.chars_per_token},
                        {"seed", a.seed},
                        {"rope_factor", m.cfg.rope_factor}};
    std::cout << j.dump() << std::endl;
  } else {
    for (size_t i = 0; i < r.lengths.size(); ++i)
      std::cout << "passkey length " << r.lengths[i] << ": accuracy " << r.accuracy[i] << " ("
                << static_cast<int64_t>(r.accuracy[i] * static_cast<double>(r.trials) + 0.5) << "/"
                << r.trials << " trials, prompts of " << r.prompt_tokens_min[i] << "-" << r.prompt_tokens_max[i]
                << " tokens (mean " << r.prompt_tokens[i] << "), rope factor "
                << m.cfg.rope_factor << ")" << std::endl;
  }
  return 0;
}

}  // namespace

int run_eval(const EvalArgs& a) {
  // Checked here rather than by CLI11 so that each is one line on stderr.
  if (a.model.empty()) throw Error("eval: --model DIR is required");
  if (a.task != "perplexity" && a.task != "passkey")
    throw Error("eval: --task must be perplexity or passkey, got '" + a.task + "'");
  // A flag of the other task would be ignored: a run that is not the one asked for.
  const std::vector<std::string> perplexity_only{"--data", "--seq-len", "--stride", "--protocol", "--batch-size"};
  const std::vector<std::string> passkey_only{"--lengths", "--trials", "--seed"};
  for (const auto& f : a.given) {
    const auto& other = a.task == "passkey" ? perplexity_only : passkey_only;
    if (std::find(other.begin(), other.end(), f) != other.end())
      throw Error("eval: " + f + " is for --task " + (a.task == "passkey" ? "perplexity" : "passkey") +
                  ", not " + a.task);
  }
  if (a.task == "passkey") {
    if (a.lengths.empty()) throw Error("eval: --task passkey needs --lengths L[,L2,...] (tokens)");
    for (auto L : a.lengths)
      if (L <= 0) throw Error("eval: --lengths: " + std::to_string(L) + " is not a positive token count");
    if (a.trials <= 0) throw Error("eval: --trials must be positive, got " + std::to_string(a.trials));
  } else if (a.task == "perplexity") {
    if (a.data.empty()) throw Error("eval: --task perplexity needs --data FILE");
    if (a.seq_lens.empty()) throw Error("eval: --task perplexity needs --seq-len L[,L2,...]");
    if (a.protocol != "plain" && a.protocol != "longlora")
      throw Error("eval: --protocol must be plain or longlora, got '" + a.protocol + "'");
    if (a.protocol == "plain" && std::find(a.given.begin(), a.given.end(), "--batch-size") != a.given.end())
      throw Error("eval: --batch-size is for --protocol longlora (its batches weigh the average)");
    if (a.protocol == "longlora")
      for (int64_t L : a.seq_lens)
        if (L < 2) throw Error("eval: --seq-len " + std::to_string(L) + ": --protocol longlora scores L - 1 tokens a window");
  } else {
    throw Error("eval: --task must be perplexity or passkey, got '" + a.task + "'");
  }

  auto m = model::load_for_inference(a.model, a.adapter, a.device, a.dtype, a.rope_factor);
  if (a.task == "passkey") return run_passkey(a, *m);

  std::unique_ptr<data::Tokenizer> tok;
  const auto tok_path = fs::path(a.model) / "tokenizer.model";
  if (fs::path(a.data).extension() != ".bin") {
    tok = std::make_unique<data::Tokenizer>(tok_path.string());
    tok->check_fits(m->cfg.vocab_size, (fs::path(a.model) / "config.json").string());
  }
  const auto tokens = data::load_token_stream(a.data, tok.get());
  data::check_token_ids(tokens, m->cfg.vocab_size, a.data);

  // Every length before the first window: a length the data is too short for failed
  // only after the earlier lengths had run and printed.
  const bool longlora = a.protocol == "longlora";
  // --stride, else each protocol's default: seq_len, or eval.py's 256.
  auto stride_for = [&](int64_t L) { return a.stride > 0 ? a.stride : longlora ? 256 : L; };
  for (int64_t L : a.seq_lens) {
    eval::check_windows(static_cast<int64_t>(tokens.size()), L, a.data);
    if (longlora) eval::check_longlora_windows(static_cast<int64_t>(tokens.size()), L, stride_for(L), a.data);
  }
  const double context = m->cfg.max_position_embeddings * m->cfg.rope_factor;
  for (int64_t L : a.seq_lens)
    if (static_cast<double>(L) > context)
      spdlog::warn("seq_len {} is past the model's context ({} positions x rope factor {:g} = {:g})", L,
                   m->cfg.max_position_embeddings, m->cfg.rope_factor, context);
  for (int64_t L : a.seq_lens) {
    auto r = longlora ? eval::perplexity_longlora(*m, tokens, L, stride_for(L), a.batch_size, a.data)
                      : eval::perplexity(*m, tokens, L, stride_for(L), a.data);
    // "loss nan" with exit 0 reads as a result; say where the non-finite values are.
    if (!std::isfinite(r.loss))
      throw Error("eval: " + (a.adapter.empty() ? a.model : a.adapter + " on " + a.model) + ": seq_len " +
                  std::to_string(L) + ": loss " + std::to_string(r.loss) + ": " + model::explain_non_finite(*m));
    if (a.json) {
      nlohmann::json j = {{"loss", r.loss},       {"perplexity", r.perplexity}, {"tokens", r.tokens},
                          {"windows", r.windows}, {"seq_len", r.seq_len},       {"rope_factor", m->cfg.rope_factor},
                          {"protocol", a.protocol}};
      std::cout << j.dump() << std::endl;
    } else {
      std::cout << "seq_len " << r.seq_len << ": loss " << r.loss << ", perplexity " << r.perplexity
                << " (" << r.tokens << " tokens, " << r.windows << " windows, rope factor "
                << m->cfg.rope_factor << (longlora ? ", LongLoRA's eval.py protocol" : "") << ")" << std::endl;
    }
  }
  return 0;
}

}  // namespace longlora::cli
