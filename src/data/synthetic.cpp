#include "longlora/data/synthetic.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "longlora/common/error.h"
#include "longlora/data/tokenizer.h"
#include "longlora/eval/passkey.h"

namespace longlora::data {

int64_t write_passkey_corpus(const PasskeyCorpusOptions& o) {
  if (o.min_tokens < 16 || o.max_tokens < o.min_tokens)
    throw Error("make-data: need 16 <= --min-tokens <= --max-tokens");
  Tokenizer tok(o.tokenizer);
  const double cpt = eval::passkey_chars_per_token(tok);
  std::mt19937_64 rng(o.seed);
  std::ofstream out(o.out);
  if (!out) throw Error(o.out + ": cannot write");
  for (int64_t d = 0; d < o.docs; ++d) {
    const int64_t target = std::uniform_int_distribution<int64_t>(o.min_tokens, o.max_tokens)(rng);
    const int64_t key = std::uniform_int_distribution<int64_t>(1, 49999)(rng);
    // Filler characters for this length, without LongLoRA's rounding to 1024
    // characters (short documents would otherwise have none).
    const int64_t chars = std::max<int64_t>(0, static_cast<int64_t>(cpt * target) - 160);
    const int64_t split = chars > 0 ? std::uniform_int_distribution<int64_t>(0, chars)(rng) : 0;
    // The question comes back 1-3 times, each after its own stretch of filler, so a
    // document carries several long-range retrievals (a denser learning signal).
    const int64_t asks = std::uniform_int_distribution<int64_t>(1, 3)(rng);
    std::string text = std::string(eval::kPasskeyTask) + "\n" + eval::passkey_filler(split) + "\n" +
                       eval::passkey_info_line(key);
    int64_t left = chars - split;
    for (int64_t a = 0; a < asks; ++a) {
      const int64_t n = a + 1 == asks ? left : std::uniform_int_distribution<int64_t>(0, left)(rng);
      left -= n;
      text += "\n" + eval::passkey_filler(n) + "\n" + eval::kPasskeyQuestion + " " + std::to_string(key) + ".";
    }
    out << nlohmann::json({{"text", text}}).dump() << "\n";
  }
  if (!out) throw Error(o.out + ": write failed");
  return o.docs;
}

}  // namespace longlora::data
