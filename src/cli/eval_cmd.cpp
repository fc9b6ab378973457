#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <filesystem>
#include <iostream>

#include "longlora/cli/commands.h"
#include "longlora/common/device.h"
#include "longlora/common/error.h"
#include "longlora/data/tokenizer.h"
#include "longlora/data/tokens.h"
#include "longlora/eval/perplexity.h"
#include "longlora/model/loader.h"

namespace fs = std::filesystem;

namespace longlora::cli {

int run_eval(const EvalArgs& a) {
  const auto device = pick_device(a.device);
  model::LoadOptions lo;
  lo.device = device;
  lo.compute_dtype = pick_dtype(a.dtype, device);
  if (a.rope_factor > 0) lo.rope_factor = a.rope_factor;
  auto m = model::load_model(a.model, lo);
  if (!a.adapter.empty()) model::apply_adapter(*m, a.adapter);

  std::unique_ptr<data::Tokenizer> tok;
  const auto tok_path = fs::path(a.model) / "tokenizer.model";
  if (fs::path(a.data).extension() != ".bin") tok = std::make_unique<data::Tokenizer>(tok_path.string());
  const auto tokens = data::load_token_stream(a.data, tok.get());
  for (auto id : tokens)
    if (id >= m->cfg.vocab_size)
      throw Error(a.data + ": token id " + std::to_string(id) + " >= the model's vocab_size " +
                  std::to_string(m->cfg.vocab_size));

  for (int64_t L : a.seq_lens) {
    auto r = eval::perplexity(*m, tokens, L, a.stride > 0 ? a.stride : L, a.data);
    if (a.json) {
      nlohmann::json j = {{"loss", r.loss},       {"perplexity", r.perplexity}, {"tokens", r.tokens},
                          {"windows", r.windows}, {"seq_len", r.seq_len},       {"rope_factor", m->cfg.rope_factor}};
      std::cout << j.dump() << std::endl;
    } else {
      std::cout << "seq_len " << r.seq_len << ": loss " << r.loss << ", perplexity " << r.perplexity
                << " (" << r.tokens << " tokens, " << r.windows << " windows, rope factor "
                << m->cfg.rope_factor << ")" << std::endl;
    }
  }
  return 0;
}

}  // namespace longlora::cli
