#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <iostream>
#include <limits>
#include <sstream>

#include "longlora/cli/commands.h"
#include "longlora/common/device.h"
#include "longlora/common/error.h"
#include "longlora/common/fs.h"
#include "longlora/data/tokenizer.h"
#include "longlora/data/tokens.h"
#include "longlora/eval/generate.h"
#include "longlora/model/loader.h"

namespace fs = std::filesystem;

namespace longlora::cli {

int run_generate(const GenerateArgs& a) {
  if (a.model.empty()) throw Error("generate: --model DIR is required");
  if (a.prompt.empty() == a.prompt_file.empty())
    throw Error("generate: give exactly one of --prompt TEXT (not empty) and --prompt-file FILE");
  if (a.max_new_tokens <= 0)
    throw Error("generate: --max-new-tokens must be positive, got " + std::to_string(a.max_new_tokens));
  // inf divides every logit to 0: uniform sampling over the vocabulary, not a temperature.
  if (!(a.temperature >= 0) || !std::isfinite(a.temperature))
    throw Error("generate: --temperature must be finite and >= 0 (0 = greedy)");
  if (!(a.top_p > 0 && a.top_p <= 1)) throw Error("generate: --top-p must be in (0, 1]");

  std::string prompt = a.prompt;
  if (!a.prompt_file.empty()) {
    check_not_directory(a.prompt_file, "--prompt-file");
    std::ifstream in(a.prompt_file, std::ios::binary);
    if (!in) throw Error(a.prompt_file + ": cannot read the prompt file: " + std::strerror(errno));
    // At most 16 MiB (some 4M tokens, past any context): /dev/zero was read until
    // memory ran out, and the failure blamed tokenizer.model.
    constexpr size_t kMaxPrompt = size_t{16} << 20;
    prompt.assign(kMaxPrompt + 1, '\0');
    in.read(prompt.data(), static_cast<std::streamsize>(prompt.size()));
    if (in.bad()) throw Error(a.prompt_file + ": cannot read the prompt file: " + std::strerror(errno));
    prompt.resize(static_cast<size_t>(in.gcount()));
    if (prompt.size() > kMaxPrompt)
      fail(a.prompt_file, "--prompt-file", "more than 16 MiB of prompt: no model's context holds that much text");
    // As --prompt "" is refused: generating from BOS alone is not what was asked.
    if (prompt.empty()) fail(a.prompt_file, "--prompt-file", "the prompt file is empty");
  }
  data::check_utf8(prompt, a.prompt_file.empty() ? "--prompt" : a.prompt_file);

  const auto tok_path = (fs::path(a.model) / "tokenizer.model").string();
  if (!fs::exists(tok_path)) throw Error(tok_path + ": no tokenizer.model in the model directory");
  const data::Tokenizer tok(tok_path);

  auto m = model::load_for_inference(a.model, a.adapter, a.device, a.dtype, a.rope_factor);
  tok.check_fits(m->cfg.vocab_size, (fs::path(a.model) / "config.json").string());

  std::vector<int> ids{tok.bos_id()};
  const auto body = tok.encode(prompt);
  // A prompt of spaces (or a BOM) is no tokens: BOS alone again, as an empty one.
  if (body.empty())
    throw Error((a.prompt_file.empty() ? std::string("generate: --prompt") : a.prompt_file + ": --prompt-file") +
                ": the prompt gives no tokens (only whitespace?)");
  ids.insert(ids.end(), body.begin(), body.end());

  // As eval and passkey warn: positions past the context were never trained. The
  // last new token is never fed back, so total - 1 positions run.
  const double context = m->cfg.max_position_embeddings * m->cfg.rope_factor;
  // Saturating: 2^63 - 1 new tokens wrapped the sum negative, and the warning went.
  const auto prompt_len = static_cast<int64_t>(ids.size());
  const int64_t total = a.max_new_tokens > std::numeric_limits<int64_t>::max() - prompt_len
                            ? std::numeric_limits<int64_t>::max()
                            : prompt_len + a.max_new_tokens;
  if (context > 0 && static_cast<double>(total - 1) > context)
    spdlog::warn("prompt ({} tokens) + --max-new-tokens {} = {} is past the model's context ({} positions x rope "
                 "factor {:g} = {:g})",
                 ids.size(), a.max_new_tokens, total, m->cfg.max_position_embeddings, m->cfg.rope_factor, context);

  eval::GenerateOptions g;
  g.max_new_tokens = a.max_new_tokens;
  g.temperature = a.temperature;
  g.top_p = a.top_p;
  g.top_k = a.top_k;
  g.seed = a.seed;
  g.use_cache = !a.no_cache;

  eval::StreamDecoder dec(tok, ids.back());
  const auto t0 = std::chrono::steady_clock::now();
  const auto out = eval::generate(*m, tok, ids, g, [&](int id) {
    if (!eval::is_stop_token(*m, tok, id)) std::cout << dec.push(id) << std::flush;
    // Text that cannot be written is lost: stop here, main() reports it.
    return static_cast<bool>(std::cout);
  });
  const bool written = static_cast<bool>(std::cout);
  std::cout << dec.finish() << std::endl;
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const char* why = !written ? "stdout failed"
                    : !out.empty() && eval::is_stop_token(*m, tok, out.back()) ? "stopped at EOS"
                                                                                : "max tokens";
  spdlog::info("{} prompt tokens, {} new tokens ({}) in {:.2f} s, {:.1f} tokens/s", ids.size(), out.size(), why, secs,
               static_cast<double>(out.size()) / std::max(secs, 1e-9));
  return 0;
}

}  // namespace longlora::cli
