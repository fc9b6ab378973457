// Passkey retrieval (LongLoRA's test) and generation with / without the KV cache.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>

#include "longlora/common/error.h"
#include "longlora/data/tokenizer.h"
#include "longlora/data/tokens.h"
#include "longlora/eval/generate.h"
#include "longlora/eval/passkey.h"
#include "longlora/io/hf_config.h"
#include "longlora/io/tensors.h"
#include "longlora/model/loader.h"
#include "test_util.h"

using namespace longlora;

namespace {

// The strings of LongLoRA's passkey_retrivial.py, typed out again on purpose.
const std::string kTask =
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.";
const std::string kFiller =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
const std::string kQuestion = "What is the pass key? The pass key is";

std::string model_dir() { return testutil::golden("tiny-llama/model"); }

const data::Tokenizer& tokenizer() {
  static data::Tokenizer tok(testutil::golden("tokenizer.model"));
  return tok;
}

model::LlamaForCausalLM tiny() { return model::load_model(model_dir(), {}); }

std::vector<int> with_bos(const std::string& text) {
  std::vector<int> ids{tokenizer().bos_id()};
  const auto body = tokenizer().encode(text);
  ids.insert(ids.end(), body.begin(), body.end());
  return ids;
}

size_t count_of(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
  return n;
}

size_t lines(const std::string& s) { return static_cast<size_t>(std::count(s.begin(), s.end(), '\n')); }

// A model whose greedy continuation is known without running it: after chain[i] it
// picks chain[i + 1]. The golden config with random weights, every o_proj and
// down_proj zero, so no layer adds to the residual stream and the last hidden state is
// the final RMSNorm (weight 1) of the current token's embedding alone. chain[i]'s
// embedding is the basis vector e_i, which the norm scales to 8 e_i (hidden 64);
// lm_head's first n = chain.size() columns are zero but for column i of row
// chain[i + 1], 10: after chain[i] that token scores 80 and every other token 0.
// The chain's tokens must be distinct (a token has one successor).
model::LlamaForCausalLM chain_model(const std::vector<int>& chain) {
  auto cfg = io::load_model_config(model_dir() + "/config.json");
  EXPECT_FALSE(cfg.tie_word_embeddings);  // lm_head is set apart from the embedding
  EXPECT_LE(static_cast<int64_t>(chain.size()), cfg.hidden_size);
  EXPECT_EQ(std::set<int>(chain.begin(), chain.end()).size(), chain.size()) << "the chain repeats a token";
  model::LoadOptions lo;
  lo.random_init = true;
  lo.seed = 11;
  auto m = model::random_model(cfg, lo);
  torch::NoGradGuard ng;
  auto params = m->named_parameters();
  for (auto& p : params) {
    const auto& name = p.key();
    if (name.find("o_proj.weight") != std::string::npos || name.find("down_proj.weight") != std::string::npos)
      p.value().zero_();
  }
  auto embed = params["model.embed_tokens.weight"], head = params["lm_head.weight"];
  const auto n = static_cast<int64_t>(chain.size());
  head.slice(1, 0, n).zero_();
  for (int64_t i = 0; i < n; ++i) {
    embed[chain[i]].zero_();
    embed[chain[i]][i] = 1.0;
    if (i + 1 < n) head[chain[i + 1]][i] = 10.0;
  }
  EXPECT_TRUE(torch::equal(params["model.norm.weight"], torch::ones({cfg.hidden_size})));
  return m;
}

// chain_model(chain) saved as a model directory the command line loads: a copy of the
// golden one (config, tokenizer, shards) whose every weight is the chain model's, in
// the file's dtype (the chain's 0, 1 and 10 are exact in any of them).
std::string save_chain_model(const std::string& dst, const std::vector<int>& chain) {
  auto m = chain_model(chain);
  const auto params = m->named_parameters();
  std::filesystem::copy(model_dir(), dst);
  size_t written = 0;
  for (const auto& e : std::filesystem::directory_iterator(dst)) {
    if (e.path().extension() != ".safetensors") continue;
    std::vector<std::pair<std::string, torch::Tensor>> ts;
    for (auto& [name, t] : io::load_tensors(e.path().string())) {
      const auto* p = params.find(name);
      EXPECT_NE(p, nullptr) << name << " is no parameter of the model";
      if (p == nullptr) continue;
      EXPECT_EQ(p->sizes(), t.sizes()) << name;
      ts.emplace_back(name, p->detach().to(t.scalar_type()).contiguous());
      ++written;
    }
    io::save_tensors(e.path().string(), ts);
  }
  EXPECT_EQ(written, params.size()) << "the shards lack some of the model's weights";
  return dst;
}

}  // namespace

// ---------------------------------------------------------------- passkey prompt

TEST(PasskeyPrompt, FillerCharsFollowLongLoRAsRatio) {
  // int(3.75 * L // 1024 * 1024)
  EXPECT_EQ(eval::passkey_filler_chars(1024), 3072);
  EXPECT_EQ(eval::passkey_filler_chars(2048), 7168);   // 7680 // 1024 = 7
  EXPECT_EQ(eval::passkey_filler_chars(4096), 15360);
  EXPECT_EQ(eval::passkey_filler_chars(32000), 119808);
  EXPECT_EQ(eval::passkey_filler_chars(273), 0);       // 1023.75 // 1024 = 0
  EXPECT_EQ(eval::passkey_filler_chars(274), 1024);
}

TEST(PasskeyPrompt, FillerIsTheSentenceRepeatedWithSpacesAndCutByCharacters) {
  EXPECT_EQ(eval::passkey_filler(0), "");
  EXPECT_EQ(eval::passkey_filler(static_cast<int64_t>(kFiller.size())), kFiller);
  EXPECT_EQ(eval::passkey_filler(static_cast<int64_t>(kFiller.size()) + 5), kFiller + " The ");
  EXPECT_EQ(eval::passkey_filler(3 * static_cast<int64_t>(kFiller.size()) + 2),
            kFiller + " " + kFiller + " " + kFiller);
  const auto long_one = eval::passkey_filler(500000);  // longer than LongLoRA's 5000 repetitions
  EXPECT_EQ(long_one.size(), 500000u);
  EXPECT_EQ(long_one.compare(0, kFiller.size() + 1, kFiller + " "), 0);
}

TEST(PasskeyPrompt, ExactStrings) {
  const auto p = eval::passkey_prompt(1024, 12345, 100);
  EXPECT_EQ(p.answer, "12345");
  EXPECT_EQ(p.filler_chars, 3072);
  const std::string want = kTask + "\n" + eval::passkey_filler(100) + "\n" +
                           "The pass key is 12345. Remember it. 12345 is the pass key." + "\n" +
                           eval::passkey_filler(3072 - 100) + "\n" + kQuestion;
  EXPECT_EQ(p.prompt, want);
  EXPECT_EQ(eval::passkey_info_line(7), "The pass key is 7. Remember it. 7 is the pass key.");
  // The prefix filler is 100 characters: the key line starts right after it.
  EXPECT_EQ(p.prompt.find("The pass key is 12345."), kTask.size() + 1 + 100 + 1);
  // Filler repetitions: 3072 characters hold 34 whole sentences (89 + 1 each) in the suffix
  // (2972 chars: 33 whole) and 1 in the 100-char prefix.
  EXPECT_EQ(kFiller.size(), 89u);
  EXPECT_EQ(count_of(p.prompt, kFiller), 1u + (3072 - 100 + 1) / 90);
  EXPECT_EQ(lines(p.prompt), 4u);  // five lines
}

TEST(PasskeyPrompt, SplitAtEitherEnd) {
  const auto a = eval::passkey_prompt(2048, 42, 0);
  EXPECT_EQ(a.prompt.rfind(kTask + "\n\nThe pass key is 42. Remember it. 42 is the pass key.\n" + kFiller, 0), 0u);
  const auto b = eval::passkey_prompt(2048, 42, 7168);
  const std::string tail = "\nThe pass key is 42. Remember it. 42 is the pass key.\n\n" + kQuestion;
  ASSERT_GE(b.prompt.size(), tail.size());
  EXPECT_EQ(b.prompt.substr(b.prompt.size() - tail.size()), tail);
  EXPECT_EQ(a.prompt.size(), b.prompt.size());
  EXPECT_THROW(eval::passkey_prompt(2048, 42, 7169), Error);
  EXPECT_THROW(eval::passkey_prompt(2048, 42, -1), Error);
  EXPECT_THROW(eval::passkey_prompt(0, 42, 0), Error);
}

TEST(PasskeyPrompt, DrawsAreSeededAndInRange) {
  std::map<int64_t, int> keys;
  for (int64_t t = 0; t < 200; ++t) {
    const auto d = eval::passkey_draw(4096, 0, t);
    EXPECT_GE(d.key, 1);
    EXPECT_LT(d.key, 50000);
    EXPECT_GE(d.split, 0);
    EXPECT_LT(d.split, eval::passkey_filler_chars(4096));
    ++keys[d.key];
    const auto again = eval::passkey_draw(4096, 0, t);
    EXPECT_EQ(again.key, d.key);
    EXPECT_EQ(again.split, d.split);
    // A trial's key does not depend on the length (as LongLoRA's seed = trial index).
    EXPECT_EQ(eval::passkey_draw(1024, 0, t).key, d.key);
  }
  EXPECT_GT(keys.size(), 190u);
  EXPECT_NE(eval::passkey_draw(4096, 1, 0).key, eval::passkey_draw(4096, 0, 0).key);
  EXPECT_EQ(eval::passkey_draw(100, 0, 3).split, 0);  // no filler at all
}

TEST(PasskeyPrompt, TokenCountNearTheTargetWithTheGoldenTokenizer) {
  // LongLoRA's 3.75 characters a token is LLaMA's tokenizer on this filler; the
  // golden 512-piece tokenizer cuts it much finer, and the ratio measured on it
  // brings the prompt near the requested length again.
  const double cpt = eval::passkey_chars_per_token(tokenizer());
  EXPECT_GT(cpt, 1.0);
  EXPECT_LT(cpt, 3.0);
  for (int64_t L : {1024, 2048, 4096, 8192, 16384}) {
    const auto d = eval::passkey_draw(L, 0, 0, cpt);
    const auto p = eval::passkey_prompt(L, d.key, d.split, cpt);
    const auto n = static_cast<int64_t>(with_bos(p.prompt).size());
    // Below by up to the 1024 characters rounded off, above by the fixed lines.
    EXPECT_GT(n, L * 7 / 10) << "L " << L << ", " << cpt << " chars a token";
    EXPECT_LT(n, L * 12 / 10) << "L " << L << ", " << cpt << " chars a token";
    if (L >= 4096) EXPECT_NEAR(static_cast<double>(n), static_cast<double>(L), 0.1 * L) << "L " << L;
    // LongLoRA's own ratio overshoots with this tokenizer: the reason it is measured.
    const auto q = eval::passkey_prompt(L, d.key, 0);
    EXPECT_GT(static_cast<int64_t>(with_bos(q.prompt).size()), L * 3 / 2);
  }
}

TEST(PasskeyTrial, ReportsWhatTheModelAnswered) {
  // The answer is the greedy continuation of BOS + prompt, as many tokens as the key
  // encodes to: a model made to say ids 100, 101, ... there (as many) misses, and the
  // trial reports those tokens' text and the prompt's length.
  const auto p = eval::passkey_prompt(300, 27183, 100);
  const auto key = tokenizer().encode(p.answer);
  const auto prompt = with_bos(p.prompt);
  std::vector<int> wrong;
  for (size_t i = 0; i < key.size(); ++i) wrong.push_back(100 + static_cast<int>(i));
  std::vector<int> chain{prompt.back()};
  chain.insert(chain.end(), wrong.begin(), wrong.end());
  auto m = chain_model(chain);
  std::string said;
  int64_t n = 0;
  EXPECT_FALSE(eval::passkey_trial(*m, tokenizer(), p, true, &n, &said));
  EXPECT_EQ(said, tokenizer().decode(wrong));
  EXPECT_NE(said, "27183");
  // BOS, then the prompt's own tokens.
  EXPECT_EQ(n, 1 + static_cast<int64_t>(tokenizer().encode(p.prompt).size()));
}

TEST(PasskeyTrial, CountsTheKeyWhenTheModelAnswersIt) {
  // No other test has a trial come out correct: a model made to answer "27183" after
  // the question (its last token, then the key's own encoding, leading piece included).
  const auto p = eval::passkey_prompt(300, 27183, 100);
  const auto answer = tokenizer().encode(p.answer);
  std::vector<int> chain{with_bos(p.prompt).back()};
  chain.insert(chain.end(), answer.begin(), answer.end());
  auto m = chain_model(chain);
  std::string said;
  EXPECT_TRUE(eval::passkey_trial(*m, tokenizer(), p, true, nullptr, &said));
  EXPECT_EQ(said, "27183");
  EXPECT_TRUE(eval::passkey_trial(*m, tokenizer(), p, false));
  // The same digits in another order, as many tokens: the model still says 27183, a miss.
  const auto other = eval::passkey_prompt(300, 27138, 100);
  ASSERT_EQ(tokenizer().encode(other.answer).size(), answer.size());
  EXPECT_FALSE(eval::passkey_trial(*m, tokenizer(), other, true, nullptr, &said));
  EXPECT_EQ(said, "27183");
}

TEST(PasskeyEval, AccuracyIsTheShareOfTrialsAnsweredExactly) {
  // A model that answers trial 0's key and nothing else scores exactly 1/2 over 2 trials.
  // The seed is the first one whose trial-0 key has distinct tokens (the chain needs
  // them) and whose trial-1 key is another key of as many tokens: the model then says
  // trial 0's key there, a miss.
  const double cpt = eval::passkey_chars_per_token(tokenizer());
  const int64_t L = 128;
  uint64_t seed = 0;
  std::vector<int> key0;
  for (;; ++seed) {
    ASSERT_LT(seed, 100u);
    const auto k0 = eval::passkey_draw(L, seed, 0, cpt).key, k1 = eval::passkey_draw(L, seed, 1, cpt).key;
    key0 = tokenizer().encode(std::to_string(k0));
    const auto key1 = tokenizer().encode(std::to_string(k1));
    if (std::set<int>(key0.begin(), key0.end()).size() == key0.size() && key1.size() == key0.size() && key1 != key0)
      break;
  }
  const auto d0 = eval::passkey_draw(L, seed, 0, cpt);
  std::vector<int> chain{with_bos(eval::passkey_prompt(L, d0.key, d0.split, cpt).prompt).back()};
  chain.insert(chain.end(), key0.begin(), key0.end());
  auto m = chain_model(chain);
  eval::PasskeyOptions o;
  o.lengths = {L};
  o.trials = 2;
  o.seed = seed;
  o.chars_per_token = cpt;
  const auto r = eval::passkey_eval(*m, tokenizer(), o);
  ASSERT_EQ(r.accuracy.size(), 1u);
  EXPECT_EQ(r.accuracy[0], 0.5);
  // One trial, the one the model answers: all of them.
  o.trials = 1;
  EXPECT_EQ(eval::passkey_eval(*m, tokenizer(), o).accuracy, std::vector<double>{1.0});
}

TEST(PasskeyTrial, VerdictQuotesAndEscapesTheAnswer) {
  EXPECT_EQ(eval::passkey_verdict(true, "31415"), "correct");
  EXPECT_EQ(eval::passkey_verdict(false, "4937."), "wrong (answered \"4937.\")");
  // A newline or quote in the answer must not break the one-line log record.
  EXPECT_EQ(eval::passkey_verdict(false, "12\n3\""), "wrong (answered \"12\\n3\\\"\")");
}

// ---------------------------------------------------------------- generation

// Unbounded or closed streams (an audit of the CLI): /dev/zero as a prompt was read until
// memory ran out (the error blamed tokenizer.model); a closed stdout pipe killed eval
// and generate with SIGPIPE, exit 141 and no word.
TEST(GenerateCli, UnboundedPromptsAndClosedPipesAreOneLine) {
  const std::string model = testutil::golden("tiny-llama/model");
  auto r = testutil::run_cli("generate --model " + model + " --prompt-file /dev/zero --max-new-tokens 2 --device cpu");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("/dev/zero: --prompt-file: more than 16 MiB of prompt"), std::string::npos) << r.err;
  const auto d = testutil::temp_dir("sigpipe");
  for (const std::string args : {"eval --model " + model + " --data " + testutil::golden("tiny-llama/eval.bin") +
                                     " --seq-len 64 --device cpu",
                                 "generate --model " + model + " --prompt \"The sky\" --max-new-tokens 4 --device cpu"}) {
    // The reader is gone long before the model has loaded and the result is written.
    const std::string cmd = "bash -c '" + std::string(LONGLORA_BINARY) + " " + args + " 2>" + d +
                            "/err | (exec 0<&-; true); exit ${PIPESTATUS[0]}'";
    const int status = std::system(cmd.c_str());
    EXPECT_EQ(WEXITSTATUS(status), 1) << args;
    EXPECT_NE(testutil::read_file(d + "/err").find("stdout"), std::string::npos) << testutil::read_file(d + "/err");
  }
  longlora::remove_tree(d);
}

TEST(Generate, CachedForwardEqualsFullForward) {
  // Prefill in pieces through the cache: query i of n new tokens sees keys up to T - n + i.
  auto m = tiny();
  torch::NoGradGuard ng;
  auto ids = torch::randint(3, 512, {1, 37}, at::detail::createCPUGenerator(7), torch::kInt64);
  auto full = m->forward(ids, {});
  model::KVCache cache;
  std::vector<torch::Tensor> parts;
  for (auto [s, e] : std::vector<std::pair<int64_t, int64_t>>{{0, 10}, {10, 11}, {11, 25}, {25, 26}, {26, 37}}) {
    model::ForwardOptions f;
    f.cache = &cache;
    f.position_offset = cache.length;
    parts.push_back(m->forward(ids.slice(1, s, e), f));
  }
  EXPECT_EQ(cache.length, 37);
  EXPECT_LE(testutil::max_abs_diff(torch::cat(parts, 1), full), 1e-5);
}

TEST(Generate, WithCacheEqualsWithoutCacheGreedy) {
  auto m = tiny();
  const std::vector<std::string> prompts = {
      "The grass is green.", "Once upon a time", "What is the pass key? The pass key is",
      "a", "There is an important info hidden inside a lot of irrelevant text."};
  for (const auto& text : prompts) {
    const auto ids = with_bos(text);
    eval::GenerateOptions o;
    o.max_new_tokens = 20;
    o.temperature = 0;
    o.stop_at_eos = false;
    o.use_cache = false;
    const auto plain = eval::generate(*m, tokenizer(), ids, o);
    o.use_cache = true;
    const auto cached = eval::generate(*m, tokenizer(), ids, o);
    o.prefill_chunk = 3;  // the prompt fed through the cache 3 tokens at a time
    const auto chunked = eval::generate(*m, tokenizer(), ids, o);
    ASSERT_EQ(plain.size(), 20u) << text;
    EXPECT_EQ(cached, plain) << text;
    EXPECT_EQ(chunked, plain) << text;
  }
  // Through a peft adapter (LoRA on the projections) too.
  model::apply_adapter(*m, testutil::golden("tiny-llama/adapter"));
  const auto ids = with_bos("The sky is blue. The sun is yellow.");
  eval::GenerateOptions o;
  o.max_new_tokens = 20;
  o.temperature = 0;
  o.stop_at_eos = false;
  const auto cached = eval::generate(*m, tokenizer(), ids, o);
  o.use_cache = false;
  EXPECT_EQ(eval::generate(*m, tokenizer(), ids, o), cached);
}

TEST(Generate, SamplingIsSeededAndSameWithOrWithoutCache) {
  auto m = tiny();
  const auto ids = with_bos("Here we go.");
  eval::GenerateOptions o;
  o.max_new_tokens = 20;
  o.temperature = 0.8;
  o.top_p = 0.9;
  o.seed = 5;
  o.stop_at_eos = false;
  const auto a = eval::generate(*m, tokenizer(), ids, o);
  EXPECT_EQ(eval::generate(*m, tokenizer(), ids, o), a);
  o.use_cache = false;
  EXPECT_EQ(eval::generate(*m, tokenizer(), ids, o), a);
  o.use_cache = true;
  o.seed = 6;
  EXPECT_NE(eval::generate(*m, tokenizer(), ids, o), a);
}

TEST(Generate, StopsAtEosMaxTokensOrCallback) {
  auto m = tiny();
  const auto ids = with_bos("Once upon a time");
  eval::GenerateOptions o;
  o.max_new_tokens = 7;
  o.temperature = 0;
  o.stop_at_eos = false;
  const auto all = eval::generate(*m, tokenizer(), ids, o);
  EXPECT_EQ(all.size(), 7u);
  // The golden model picks no EOS in these 7: stopping at EOS changes nothing.
  ASSERT_EQ(std::find(all.begin(), all.end(), tokenizer().eos_id()), all.end());
  o.stop_at_eos = true;
  EXPECT_EQ(eval::generate(*m, tokenizer(), ids, o), all);
  int calls = 0;
  const auto out = eval::generate(*m, tokenizer(), ids, o, [&](int) { return ++calls < 3; });
  EXPECT_EQ(calls, 3);
  EXPECT_EQ(out, std::vector<int>(all.begin(), all.begin() + 3));
  // An EOS after the first token (chain_model: 100, then EOS) ends the generation right
  // after it; without stop_at_eos it goes on to max_new_tokens.
  const int eos = tokenizer().eos_id();
  auto chain = chain_model({ids.back(), 100, eos});
  for (bool cache : {true, false}) {
    o.use_cache = cache;
    o.stop_at_eos = true;
    EXPECT_EQ(eval::generate(*chain, tokenizer(), ids, o), (std::vector<int>{100, eos})) << "cache " << cache;
    o.stop_at_eos = false;
    const auto on = eval::generate(*chain, tokenizer(), ids, o);
    ASSERT_EQ(on.size(), 7u) << "cache " << cache;
    EXPECT_EQ(std::vector<int>(on.begin(), on.begin() + 2), (std::vector<int>{100, eos})) << "cache " << cache;
  }
}

TEST(Generate, StopsRightAfterTheEosTheModelPicks) {
  // A model whose greedy first token is EOS (chain_model: the prompt's last token, then
  // EOS): generation ends there, the EOS included; without stop_at_eos it goes on to
  // max_new_tokens.
  const auto ids = with_bos("Once upon a time");
  const int eos = tokenizer().eos_id();
  auto m = chain_model({ids.back(), eos});
  eval::GenerateOptions o;
  o.max_new_tokens = 7;
  o.temperature = 0;
  for (bool cache : {true, false}) {
    o.use_cache = cache;
    o.stop_at_eos = true;
    EXPECT_EQ(eval::generate(*m, tokenizer(), ids, o), std::vector<int>{eos}) << "cache " << cache;
    o.stop_at_eos = false;
    const auto out = eval::generate(*m, tokenizer(), ids, o);
    ASSERT_EQ(out.size(), 7u) << "cache " << cache;
    EXPECT_EQ(out[0], eos);
  }
}

// config.json's eos_token_id may list several end tokens (LLaMA 3 Instruct ends its
// turns with the second); transformers stops at any of them.
TEST(Generate, StopsAtAnyEndTokenOfAnEosTokenIdList) {
  const auto dir = testutil::temp_dir("eos-list");
  auto j = testutil::read_json(model_dir() + "/config.json");
  j["eos_token_id"] = {2, 101};
  testutil::write_file(dir + "/config.json", j.dump());
  const auto cfg = io::load_model_config(dir + "/config.json");
  EXPECT_EQ(cfg.eos_token_id, 2);
  EXPECT_EQ(cfg.eos_token_ids, (std::vector<int64_t>{2, 101}));
  EXPECT_EQ(io::model_config_to_json(cfg)["eos_token_id"], j["eos_token_id"]);  // written back as a list

  const auto ids = with_bos("Once upon a time");
  auto m = chain_model({ids.back(), 100, 101, 102});
  eval::GenerateOptions o;
  o.max_new_tokens = 5;
  o.temperature = 0;
  for (bool cache : {true, false}) {
    o.use_cache = cache;
    const auto on = eval::generate(*m, tokenizer(), ids, o);  // end token 2 only: 101 is no end
    ASSERT_EQ(on.size(), 5u) << "cache " << cache;
    EXPECT_EQ(std::vector<int>(on.begin(), on.begin() + 3), (std::vector<int>{100, 101, 102}));
    m->cfg.eos_token_ids = cfg.eos_token_ids;
    EXPECT_EQ(eval::generate(*m, tokenizer(), ids, o), (std::vector<int>{100, 101})) << "cache " << cache;
    m->cfg.eos_token_ids = {2};
  }
  longlora::remove_tree(dir);
}

TEST(Generate, TopPKeepsTheNucleusOnly) {
  // p = (0.5, 0.3, 0.15, 0.05): top_p 0.7 keeps tokens 0 and 1 (0.5 < 0.7 <= 0.8).
  auto logits = torch::tensor({0.5, 0.3, 0.15, 0.05}, torch::kFloat64).log().to(torch::kFloat32);
  std::mt19937_64 rng(1);
  std::map<int, int> seen;
  for (int i = 0; i < 4000; ++i) ++seen[eval::sample_token(logits, 1.0, 0.7, rng)];
  EXPECT_EQ(seen.size(), 2u);
  EXPECT_NEAR(seen[0] / 4000.0, 0.5 / 0.8, 0.03);
  // top_p 1: every token, about as often as its probability.
  seen.clear();
  for (int i = 0; i < 8000; ++i) ++seen[eval::sample_token(logits, 1.0, 1.0, rng)];
  EXPECT_NEAR(seen[3] / 8000.0, 0.05, 0.015);
  // A tiny top_p or temperature 0: the argmax.
  EXPECT_EQ(eval::sample_token(logits, 1.0, 0.01, rng), 0);
  EXPECT_EQ(eval::sample_token(logits, 0.0, 0.9, rng), 0);
}

TEST(Generate, TopKKeepsTheKMostProbableThenTopPRenormalized) {
  // p = (0.5, 0.3, 0.15, 0.05).
  auto logits = torch::tensor({0.5, 0.3, 0.15, 0.05}, torch::kFloat64).log().to(torch::kFloat32);
  std::mt19937_64 rng(2);
  // top_k 2, top_p 1: tokens 0 and 1 only, 0 with 0.5 / 0.8 of the draws.
  std::map<int, int> seen;
  for (int i = 0; i < 4000; ++i) ++seen[eval::sample_token(logits, 1.0, 1.0, rng, 0, 2)];
  EXPECT_EQ(seen.size(), 2u);
  EXPECT_NEAR(seen[0] / 4000.0, 0.5 / 0.8, 0.03);
  // top_k 1 samples as greedy does.
  for (int i = 0; i < 50; ++i) EXPECT_EQ(eval::sample_token(logits, 1.0, 1.0, rng, 0, 1), 0);
  // top_p acts on what top_k kept, renormalized (transformers' order): after top_k 2,
  // token 0 holds 0.625 >= top_p 0.6, so it alone is kept. Without top_k, 0.5 < 0.6
  // lets token 1 in as well.
  seen.clear();
  for (int i = 0; i < 500; ++i) ++seen[eval::sample_token(logits, 1.0, 0.6, rng, 0, 2)];
  EXPECT_EQ(seen.size(), 1u);
  seen.clear();
  for (int i = 0; i < 500; ++i) ++seen[eval::sample_token(logits, 1.0, 0.6, rng, 0, 0)];
  EXPECT_EQ(seen.size(), 2u);
  // Ties with the k-th are kept, as TopKLogitsWarper removes only scores below it.
  auto tied = torch::tensor({1.0, 1.0, 1.0, 0.0});
  seen.clear();
  for (int i = 0; i < 600; ++i) ++seen[eval::sample_token(tied, 1.0, 1.0, rng, 0, 2)];
  EXPECT_EQ(seen.size(), 3u);
  EXPECT_EQ(seen.count(3), 0u);
  // k counts the ids that can be chosen: with the best logit past n_ids, top_k 1 is
  // the best id below it.
  auto past = torch::tensor({0.0, 2.0, 1.0, 9.0});
  for (int i = 0; i < 50; ++i) EXPECT_EQ(eval::sample_token(past, 1.0, 1.0, rng, 3, 1), 1);
  // A k past the vocabulary is no limit.
  seen.clear();
  for (int i = 0; i < 4000; ++i) ++seen[eval::sample_token(logits, 1.0, 1.0, rng, 0, 100)];
  EXPECT_EQ(seen.size(), 4u);
}

TEST(Generate, TemperatureScalesTheLogitsBeforeTheSoftmax) {
  // With top_p 1 every id is drawn with probability softmax(l / T); each frequency over
  // n draws must lie within 4 standard deviations (sqrt(p (1 - p) / n)) of it.
  const std::vector<double> l{0.0, 1.0, 2.0, -1.0};
  const auto logits = torch::tensor(l, torch::kFloat64).to(torch::kFloat32);
  std::mt19937_64 rng(3);
  const int n = 20000;
  for (double t : {0.5, 2.0}) {
    std::vector<double> p(l.size());
    double z = 0;
    for (size_t i = 0; i < l.size(); ++i) z += p[i] = std::exp(l[i] / t);
    std::vector<int> seen(l.size(), 0);
    for (int i = 0; i < n; ++i) ++seen.at(static_cast<size_t>(eval::sample_token(logits, t, 1.0, rng)));
    for (size_t i = 0; i < l.size(); ++i) {
      const double want = p[i] / z;
      EXPECT_NEAR(seen[i] / static_cast<double>(n), want, 4 * std::sqrt(want * (1 - want) / n))
          << "T " << t << ", id " << i;
    }
  }
}

TEST(Generate, ATinyTemperatureIsGreedy) {
  // logits / 1e-308 overflowed to inf, softmax gave NaN and sample_token returned id 0,
  // printed as "⁇ ⁇ ..." with exit 0. T -> 0 is greedy: every finite T > 0 must sample.
  auto logits = torch::tensor({-3.0, 2.5, 7.0, 6.9, -50.0});
  std::mt19937_64 rng(0);
  for (double t : {1e-308, 5e-324, 1e-30, 1e-3}) EXPECT_EQ(eval::sample_token(logits, t, 0.9, rng), 2) << t;
  // A huge T is about uniform, not NaN: every id comes up.
  std::map<int, int> seen;
  for (int i = 0; i < 500; ++i) ++seen[eval::sample_token(logits, 1e300, 1.0, rng)];
  EXPECT_EQ(seen.size(), 5u);

  const std::string base = "generate --model " + model_dir() + " --prompt 'the cat' --max-new-tokens 10 --device cpu";
  const auto greedy = testutil::run_cli(base + " --temperature 0");
  ASSERT_EQ(greedy.code, 0) << greedy.err;
  const auto tiny_t = testutil::run_cli(base + " --temperature 1e-308");
  ASSERT_EQ(tiny_t.code, 0) << tiny_t.err;
  EXPECT_EQ(tiny_t.out, greedy.out);
}

TEST(Generate, StreamDecoderPiecesJoinToTheDecodedText) {
  const auto& tok = tokenizer();
  for (const std::string text : std::vector<std::string>{"Hello world, this is a test.", "The pass key is 12345. Remember it.",
                                 "caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC  spaces"}) {
    const auto ids = tok.encode(text);
    ASSERT_GE(ids.size(), 2u);
    eval::StreamDecoder dec(tok, ids[0]);
    std::string joined;
    for (size_t i = 1; i < ids.size(); ++i) joined += dec.push(ids[i]);
    joined += dec.finish();
    const auto all = tok.decode(ids);
    const auto first = tok.decode({ids[0]});
    EXPECT_EQ(first + joined, all) << text;
  }
}

// ---------------------------------------------------------------- command line

TEST(GenerateCli, StreamsTheSameTextWithAndWithoutCache) {
  const std::string base = "generate --model " + model_dir() + " --prompt 'Once upon a time' --max-new-tokens 16 "
                           "--temperature 0 --device cpu";
  auto a = testutil::run_cli(base);
  ASSERT_EQ(a.code, 0) << a.err;
  auto b = testutil::run_cli(base + " --no-cache");
  ASSERT_EQ(b.code, 0) << b.err;
  EXPECT_EQ(a.out, b.out);
  // The printed text is the decoding of generate()'s ids (EOS not printed).
  auto m = tiny();
  eval::GenerateOptions o;
  o.max_new_tokens = 16;
  o.temperature = 0;
  const auto ids = with_bos("Once upon a time");
  auto out = eval::generate(*m, tokenizer(), ids, o);
  if (!out.empty() && out.back() == tokenizer().eos_id()) out.pop_back();
  std::vector<int> ctx{ids.back()};
  ctx.insert(ctx.end(), out.begin(), out.end());
  EXPECT_EQ(a.out, tokenizer().decode(ctx).substr(tokenizer().decode({ids.back()}).size()) + "\n");

  const auto dir = testutil::temp_dir("generate-prompt-file");
  testutil::write_file(dir + "/p.txt", "Once upon a time");
  auto c = testutil::run_cli("generate --model " + model_dir() + " --prompt-file " + dir +
                             "/p.txt --max-new-tokens 16 --temperature 0 --device cpu");
  ASSERT_EQ(c.code, 0) << c.err;
  EXPECT_EQ(c.out, a.out);
  longlora::remove_tree(dir);
}

TEST(GenerateCli, SeedTemperatureAndTopPReachTheSampler) {
  // The printed text is the decoding of generate()'s ids under the same sampling
  // options, the same on every run; another seed draws another text.
  const std::string prompt = "Once upon a time";
  auto cli = [&](int seed) {
    return testutil::run_cli("generate --model " + model_dir() + " --prompt '" + prompt +
                             "' --max-new-tokens 24 --temperature 1.5 --top-p 0.7 --seed " + std::to_string(seed) +
                             " --device cpu");
  };
  const auto a = cli(5), again = cli(5), b = cli(6);
  ASSERT_EQ(a.code, 0) << a.err;
  ASSERT_EQ(again.code, 0) << again.err;
  ASSERT_EQ(b.code, 0) << b.err;
  EXPECT_EQ(again.out, a.out);
  EXPECT_NE(b.out, a.out);
  auto m = tiny();
  eval::GenerateOptions o;
  o.max_new_tokens = 24;
  o.temperature = 1.5;
  o.top_p = 0.7;
  o.seed = 5;
  const auto ids = with_bos(prompt);
  auto out = eval::generate(*m, tokenizer(), ids, o);
  if (!out.empty() && out.back() == tokenizer().eos_id()) out.pop_back();  // not printed
  std::vector<int> ctx{ids.back()};
  ctx.insert(ctx.end(), out.begin(), out.end());
  EXPECT_EQ(a.out, tokenizer().decode(ctx).substr(tokenizer().decode({ids.back()}).size()) + "\n");
}

TEST(GenerateCli, TopKReachesTheSampler) {
  // --top-k 1 leaves one candidate: any seed prints the greedy text, which sampling at
  // T 1.5 over the default 50 does not.
  auto cli = [&](const std::string& flags) {
    return testutil::run_cli("generate --model " + model_dir() +
                             " --prompt 'Once upon a time' --max-new-tokens 24 --device cpu " + flags);
  };
  const auto greedy = cli("--temperature 0");
  const auto k1 = cli("--temperature 1.5 --top-k 1 --seed 5"), k1b = cli("--temperature 1.5 --top-k 1 --seed 6");
  ASSERT_EQ(greedy.code, 0) << greedy.err;
  ASSERT_EQ(k1.code, 0) << k1.err;
  EXPECT_EQ(k1.out, greedy.out);
  EXPECT_EQ(k1b.out, greedy.out);
  // Without it (the default 50) the same seed samples another text: the check can fail.
  EXPECT_NE(cli("--temperature 1.5 --seed 5").out, greedy.out);
}

TEST(GenerateCli, BadInputIsOneLine) {
  const std::string m = "generate --model " + model_dir();
  for (const auto& [args, want] : std::vector<std::pair<std::string, std::string>>{
           {"generate --prompt hi", "error: generate: --model DIR is required\n"},
           {m, "error: generate: give exactly one of --prompt TEXT (not empty) and --prompt-file FILE\n"},
           // Both given: refused as such before the file is looked at.
           {m + " --prompt hi --prompt-file /nonexistent",
            "error: generate: give exactly one of --prompt TEXT (not empty) and --prompt-file FILE\n"},
           {m + " --prompt-file /nonexistent", "error: /nonexistent: cannot read the prompt file: No such file or directory\n"},
           {m + " --prompt hi --top-p 0", "error: --top-p: expected a number in (0, 1], got '0'\n"},
           {m + " --prompt hi --top-p 1.5", "error: --top-p: expected a number in (0, 1], got '1.5'\n"},
           {m + " --prompt hi --temperature -1", "error: --temperature: expected a number >= 0, got '-1'\n"},
           // Past 64 bits it was read as 2^63 - 1, silently.
           {m + " --prompt hi --max-new-tokens 99999999999999999999",
            "error: --max-new-tokens: expected an integer >= 1, got 99999999999999999999 (past 64 bits)\n"},
           {m + " --prompt hi --top-k -1", "error: --top-k: expected an integer >= 0, got -1\n"},
           {m + " --prompt hi --max-new-tokens 0", "error: --max-new-tokens: expected an integer >= 1, got 0\n"}}) {
    auto r = testutil::run_cli(args);
    // 2 where the command line does not parse (a value outside its flag's range), else 1.
    EXPECT_EQ(r.code, want.find(": expected ") != std::string::npos ? 2 : 1) << args;
    EXPECT_EQ(r.err, want) << args;  // one line, naming the flag and the reason
    EXPECT_EQ(r.out, "") << args;
  }
}

TEST(PasskeyCli, PrintsJsonAccuracyPerLength) {
  // A saved chain_model that answers one key, trial 0's, after the question: over 4
  // trials whose other keys are as many tokens but other tokens it scores exactly 1/4
  // at each length (the oracle: which trial it answers is known before it runs). The
  // seed is the first for which the draws are so; the CLI measures the tokenizer's
  // characters a token, as here. The lengths hold 1024 and 2048 filler characters
  // (300 and 600 held none: the same 157-token prompt twice), so the key sits at a
  // drawn depth in prompts of two sizes.
  const double cpt = eval::passkey_chars_per_token(tokenizer());
  const std::vector<int64_t> L{700, 1400};
  const int64_t trials = 4;
  uint64_t seed = 0;
  std::vector<int> key0;
  for (;; ++seed) {
    ASSERT_LT(seed, 200u);
    key0 = tokenizer().encode(std::to_string(eval::passkey_draw(L[0], seed, 0, cpt).key));
    bool fits = std::set<int>(key0.begin(), key0.end()).size() == key0.size();
    for (int64_t len : L) {
      fits = fits && tokenizer().encode(std::to_string(eval::passkey_draw(len, seed, 0, cpt).key)) == key0;
      for (int64_t t = 1; t < trials; ++t) {
        const auto k = tokenizer().encode(std::to_string(eval::passkey_draw(len, seed, t, cpt).key));
        fits = fits && k.size() == key0.size() && k != key0;
      }
    }
    if (fits) break;
  }
  const auto d0 = eval::passkey_draw(L[0], seed, 0, cpt);
  const int question_end = with_bos(eval::passkey_prompt(L[0], d0.key, d0.split, cpt).prompt).back();
  // Every trial's prompt ends with the same token, the one the chain starts from.
  for (int64_t len : L)
    for (int64_t t = 0; t < trials; ++t) {
      const auto d = eval::passkey_draw(len, seed, t, cpt);
      ASSERT_EQ(with_bos(eval::passkey_prompt(len, d.key, d.split, cpt).prompt).back(), question_end) << len << " " << t;
    }
  std::vector<int> chain{question_end};
  chain.insert(chain.end(), key0.begin(), key0.end());
  const auto dir = testutil::temp_dir("passkey-chain");
  const std::string m = save_chain_model(dir + "/model", chain);
  const std::string key0_text = std::to_string(d0.key);

  const std::string args = "eval --task passkey --model " + m + " --lengths 700,1400 --trials " +
                           std::to_string(trials) + " --seed " + std::to_string(seed) + " --device cpu";
  auto r = testutil::run_cli(args + " --json");
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["task"], "passkey");
  EXPECT_EQ(j["lengths"], nlohmann::json({700, 1400}));
  EXPECT_EQ(j["trials"], trials);
  EXPECT_EQ(j["seed"], seed);
  ASSERT_EQ(j["prompt_tokens"].size(), 2u);
  EXPECT_LT(j["prompt_tokens"][0], j["prompt_tokens"][1]);  // two prompt sizes ran
  EXPECT_EQ(j["accuracy"], nlohmann::json({0.25, 0.25})) << "seed " << seed << ", key " << key0_text;
  // Readable form: one line per length.
  auto t = testutil::run_cli(args);
  ASSERT_EQ(t.code, 0) << t.err;
  EXPECT_EQ(lines(t.out), 2u) << t.out;
  EXPECT_EQ(t.out.rfind("passkey length 700: accuracy 0.25 (1/4 trials, prompts of ", 0), 0u) << t.out;
  EXPECT_NE(t.out.find("\npasskey length 1400: accuracy 0.25 (1/4 trials, prompts of "), std::string::npos) << t.out;
  // Progress on stderr: a wrong trial says what the model answered, escaped, so every
  // line is a log record of its own (spdlog's "[time]" prefix) even if the answer has a newline.
  std::istringstream err(t.err);
  for (std::string line; std::getline(err, line);) EXPECT_EQ(line.rfind('[', 0), 0u) << line;
  // One verdict a trial: trial 1 (the key the model says) correct, the others wrong
  // with trial 1's key as the answer, so "correct" comes accuracy x trials = 1 time a length.
  for (int64_t len : L) {
    for (int64_t k = 0; k < trials; ++k) {
      const std::string head = "passkey length " + std::to_string(len) + ": trial " + std::to_string(k + 1) + "/4 (";
      const std::string verdict = k == 0 ? "): correct [" : "): wrong (answered \"" + key0_text + "\") [";
      const auto at = t.err.find(head);
      ASSERT_NE(at, std::string::npos) << head << "\n" << t.err;
      const auto line = t.err.substr(at, t.err.find('\n', at) - at);
      EXPECT_NE(line.find(", key " + std::to_string(eval::passkey_draw(len, seed, k, cpt).key) + " after "),
                std::string::npos) << line;
      EXPECT_NE(line.find(verdict), std::string::npos) << line;
    }
  }
  EXPECT_EQ(count_of(t.err, "): correct ["), 2u) << t.err;
  EXPECT_EQ(count_of(t.err, "): wrong (answered \""), 6u) << t.err;
  // The tiny model's context is 128 positions: both lengths are past it, and it says so.
  EXPECT_NE(t.err.find("passkey length 700 is past the model's context (128 positions x rope factor 1 = 128)"),
            std::string::npos) << t.err;
  EXPECT_NE(t.err.find("passkey length 1400 is past"), std::string::npos) << t.err;
  EXPECT_EQ(t.err.find("give the same prompts"), std::string::npos) << t.err;
  longlora::remove_tree(dir);
}

TEST(PasskeyCli, BadInputIsOneLine) {
  const std::string m = " --model " + model_dir();
  for (const auto& [args, want] : std::vector<std::pair<std::string, std::string>>{
           {"eval --task passkey" + m + " --lengths 0", "error: --lengths: expected an integer in [1, 4194304], got 0\n"},
           {"eval --task passkey --lengths 1024", "error: eval: --model DIR is required\n"},
           {"eval --task passkey" + m, "error: eval: --task passkey needs --lengths L[,L2,...] (tokens)\n"},
           {"eval --task passkey" + m + " --lengths 512 --trials 0", "error: --trials: expected an integer >= 1, got 0\n"},
           {"eval --task nope" + m, "error: --task: expected one of perplexity, passkey, got 'nope'\n"},
           {"eval" + m + " --seq-len 64", "error: eval: --task perplexity needs --data FILE\n"},
           {"eval" + m + " --data x.bin", "error: eval: --task perplexity needs --seq-len L[,L2,...]\n"}}) {
    auto r = testutil::run_cli(args);
    // 2 where the command line does not parse (a value outside its flag's range), else 1.
    EXPECT_EQ(r.code, want.find(": expected ") != std::string::npos ? 2 : 1) << args;
    EXPECT_EQ(r.err, want) << args;  // one line, naming the flag and the reason
    EXPECT_EQ(r.out, "") << args;
  }
}

// ---------------------------------------------------------------- bad input (review of eval / generate)

TEST(PasskeyPrompt, LengthsThatRunTheSamePromptOrFarFromTheTargetAreWarnedAbout) {
  // LongLoRA's filler is a multiple of 1024 characters: with the golden tokenizer's
  // 1.525 characters a token, 700 and 1300 both run the same 831-token prompt.
  const double cpt = eval::passkey_chars_per_token(tokenizer());
  const auto w = eval::passkey_length_warnings(tokenizer(), {700, 1300, 4096}, cpt);
  ASSERT_EQ(w.size(), 2u) << (w.empty() ? "" : w[0]);
  EXPECT_NE(w[0].find("passkey lengths 700 and 1300 give the same prompts"), std::string::npos) << w[0];
  EXPECT_NE(w[1].find("passkey length 1300: the prompt is 831 tokens, more than 25% away"), std::string::npos) << w[1];
  EXPECT_TRUE(eval::passkey_length_warnings(tokenizer(), {4096, 8192}, cpt).empty());
  EXPECT_THROW(eval::passkey_prompt(eval::kPasskeyMaxLength + 1, 1, 0), Error);
}

TEST(PasskeyCli, ReportsThePromptLengthsThatRan) {
  auto r = testutil::run_cli("eval --task passkey --model " + model_dir() +
                             " --lengths 700,1300 --trials 2 --rope-factor 16 --json --device cpu");
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["prompt_tokens_min"], nlohmann::json({831, 831}));
  EXPECT_EQ(j["prompt_tokens_max"], nlohmann::json({831, 831}));
  EXPECT_NE(r.err.find("passkey lengths 700 and 1300 give the same prompts"), std::string::npos) << r.err;
  auto t = testutil::run_cli("eval --task passkey --model " + model_dir() + " --lengths 700 --trials 1 --device cpu");
  ASSERT_EQ(t.code, 0) << t.err;
  EXPECT_NE(t.out.find("prompts of 831-831 tokens (mean 831)"), std::string::npos) << t.out;
}

TEST(EvalCli, FlagsAreCheckedBeforeAnyResultInOneLine) {
  const std::string m = " --model " + model_dir();
  const std::string data = " --data " + testutil::golden("tiny-llama/eval.bin");
  for (const auto& [args, want] : std::vector<std::pair<std::string, std::string>>{
           {"eval" + m + data + " --seq-len 0", "error: --seq-len: expected an integer >= 1, got 0\n"},
           {"eval" + m + data + " --seq-len 64 --stride abc", "error: --stride: expected an integer, got 'abc'\n"},
           {"eval --task passkey" + m + " --lengths 5000000000",
            "error: --lengths: expected an integer in [1, 4194304], got 5000000000\n"},
           {"eval --task passkey" + m + " --lengths 256 --seed -1", "error: --seed: expected an integer >= 0, got -1\n"},
           {"eval --task passkey" + m + " --lengths 256" + data, "error: eval: --data is for --task perplexity, not passkey\n"},
           {"eval --task passkey" + m + " --lengths 256 --seq-len 64",
            "error: eval: --seq-len is for --task perplexity, not passkey\n"},
           {"eval" + m + data + " --seq-len 64 --trials 3", "error: eval: --trials is for --task passkey, not perplexity\n"},
           {"eval" + m + data + " --seq-len 64 --seed 0", "error: eval: --seed is for --task passkey, not perplexity\n"},
           {"eval" + m + data + " --seq-len 64 --protocol lm-eval",
            "error: --protocol: expected one of plain, longlora, got 'lm-eval'\n"},
           {"eval" + m + data + " --seq-len 64 --batch-size 4",
            "error: eval: --batch-size is for --protocol longlora (its batches weigh the average)\n"},
           {"eval --task passkey" + m + " --lengths 256 --protocol longlora",
            "error: eval: --protocol is for --task perplexity, not passkey\n"}}) {
    const auto r = testutil::run_cli(args);
    // 2 where the command line does not parse (a value outside its flag's range), else 1.
    EXPECT_EQ(r.code, want.find(": expected ") != std::string::npos ? 2 : 1) << args;
    EXPECT_EQ(r.err, want) << args;
    EXPECT_EQ(r.out, "") << args;
  }
  // Every length is checked against the data before the first one runs and prints.
  const auto dir = testutil::temp_dir("eval-lengths");
  data::write_bin(dir + "/short.bin", std::vector<int32_t>(100, 7));
  const auto r = testutil::run_cli("eval" + m + " --data " + dir + "/short.bin --seq-len 64,128 --device cpu");
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(r.out, "");
  EXPECT_NE(r.err.find("short.bin: 100 tokens are too few for one window of seq_len 128"), std::string::npos) << r.err;
  longlora::remove_tree(dir);
}

TEST(GenerateCli, EmptyPromptFilesAndOutOfRangeSamplingAreRefused) {
  const auto dir = testutil::temp_dir("generate-bad");
  testutil::write_file(dir + "/empty.txt", "");
  testutil::write_file(dir + "/spaces.txt", "\xef\xbb\xbf  \n");  // a BOM and spaces: no tokens
  const std::string m = "generate --model " + model_dir() + " --device cpu";
  for (const auto& [args, want] : std::vector<std::pair<std::string, std::string>>{
           {" --prompt-file " + dir + "/empty.txt", dir + "/empty.txt: --prompt-file: the prompt file is empty"},
           {" --prompt-file " + dir + "/spaces.txt", dir + "/spaces.txt: --prompt-file: the prompt gives no tokens"},
           {" --prompt '  '", "generate: --prompt: the prompt gives no tokens"},
           {" --prompt-file " + dir, dir + ": --prompt-file: is a directory, a file is expected"},
           {" --prompt hi --temperature inf", "--temperature: expected a number >= 0, got 'inf'"},
           {" --prompt hi --seed -1", "--seed: expected an integer >= 0, got -1"}}) {
    const auto r = testutil::run_cli(m + args);
    // 2 where the command line does not parse (a value outside its flag's range), else 1.
    EXPECT_EQ(r.code, want.find(": expected ") != std::string::npos ? 2 : 1) << args;
    EXPECT_EQ(r.out, "") << args;
    EXPECT_EQ(lines(r.err), 1u) << args << "\n" << r.err;
    EXPECT_NE(r.err.find(want), std::string::npos) << args << "\n" << r.err;
  }
  longlora::remove_tree(dir);
}

TEST(Generate, NeverChoosesAnIdTheTokenizerLacks) {
  // LongAlpaca's models have 32001 rows for a 32000-piece tokenizer: an id past the
  // tokenizer's pieces cannot be decoded, and generate failed in mid-stream on one.
  std::mt19937_64 rng(0);
  auto logits = torch::zeros({6});
  logits[5] = 10;  // the most probable id is one the tokenizer (4 pieces) lacks
  EXPECT_EQ(eval::sample_token(logits, 0, 1, rng), 5);
  EXPECT_LT(eval::sample_token(logits, 0, 1, rng, 4), 4);
  for (int i = 0; i < 50; ++i) EXPECT_LT(eval::sample_token(logits, 1.0, 1.0, rng, 4), 4);
  // A model with 600 rows and the golden 512-piece tokenizer, sampling at temperature 1.
  auto cfg = io::load_model_config(model_dir() + "/config.json");
  cfg.vocab_size = 600;
  model::LoadOptions lo;
  lo.random_init = true;
  lo.seed = 3;
  auto m = model::random_model(cfg, lo);
  eval::GenerateOptions o;
  o.max_new_tokens = 64;
  o.temperature = 1.0;
  o.top_p = 1.0;
  o.stop_at_eos = false;
  const auto out = eval::generate(*m, tokenizer(), with_bos("The grass is green."), o);
  ASSERT_EQ(out.size(), 64u);
  for (int id : out) EXPECT_LT(id, tokenizer().vocab_size());
  EXPECT_NO_THROW(tokenizer().decode(out));
}

TEST(EvalCli, ANonFiniteLossNamesTheTensorThatHoldsIt) {
  // One NaN in a weight made eval print "loss nan" and exit 0, which reads as a result;
  // generate printed garbage, and passkey counted wrong answers.
  const auto d = testutil::temp_dir("eval-nan");
  const std::string m = testutil::golden_model_with_a_nan(d + "/model", "model.layers.0.self_attn.q_proj.weight");
  const std::string nan_weight = "the model's model.layers.0.self_attn.q_proj.weight holds non-finite values";
  auto g = testutil::run_cli("generate --model " + m + " --prompt hello --max-new-tokens 3 --device cpu");
  EXPECT_EQ(g.code, 1) << g.out;
  EXPECT_NE(g.err.find("generate: non-finite logits at new token 1: " + nan_weight), std::string::npos) << g.err;
  auto r = testutil::run_cli("eval --model " + m + " --data " + testutil::golden("tiny-llama/eval.bin") +
                             " --seq-len 64 --device cpu");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.err.find(nan_weight), std::string::npos) << r.err;
  // The passkey test names its trial, not "generate".
  auto p = testutil::run_cli("eval --task passkey --model " + m + " --lengths 100 --trials 2 --device cpu");
  EXPECT_EQ(p.code, 1) << p.out;
  EXPECT_NE(p.err.find("passkey length 100 trial 1: non-finite logits at new token 1: " + nan_weight),
            std::string::npos) << p.err;
  longlora::remove_tree(d);
}

TEST(EvalCli, ALengthPastTheModelsContextIsWarnedOf) {
  // The tiny model has 128 positions: 256 runs on positions it never saw.
  auto r = testutil::run_cli("eval --model " + testutil::golden("tiny-llama/model") + " --data " +
                             testutil::golden("tiny-llama/eval.bin") + " --seq-len 64,256 --device cpu");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("seq_len 256 is past the model's context (128 positions x rope factor 1 = 128)"),
            std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("seq_len 64 is past"), std::string::npos) << r.err;
}

TEST(EvalCli, ATokenizerWithMorePiecesThanTheModelsVocabularyIsNamed) {
  // A model of 256 rows beside a 512-piece tokenizer: passkey and generate stopped on
  // the first prompt id past 256 with "generate: prompt token id 330 ...", naming no file.
  const auto d = testutil::temp_dir("tok-vocab");
  const std::string m = d + "/model";
  std::filesystem::copy(model_dir(), m);
  for (const auto& e : std::filesystem::directory_iterator(m)) {
    if (e.path().extension() != ".safetensors") continue;
    std::vector<std::pair<std::string, torch::Tensor>> ts;
    for (auto& [name, t] : io::load_tensors(e.path().string()))
      ts.emplace_back(name, name == "model.embed_tokens.weight" || name == "lm_head.weight"
                                ? t.slice(0, 0, 256).contiguous() : t);
    io::save_tensors(e.path().string(), ts);
  }
  auto cfg = testutil::read_json(m + "/config.json");
  cfg["vocab_size"] = 256;
  testutil::write_file(m + "/config.json", cfg.dump());
  testutil::write_file(d + "/doc.txt", "The grass is green. The sky is blue. The sun is yellow.\n");
  testutil::write_file(d + "/run.json", nlohmann::json{{"model", {{"path", m}}},
                                                       {"data", {{"train", d + "/doc.txt"}, {"seq_len", 16}}},
                                                       {"train", {{"max_steps", 1}}},
                                                       {"output", {{"dir", d + "/run"}}},
                                                       {"device", "cpu"}}.dump());
  const std::string want = m + "/tokenizer.model: 512 pieces, more than the model's vocab_size 256 (";
  for (const std::string args : {"eval --task passkey --lengths 256 --trials 1 --device cpu --model " + m,
                                 "generate --prompt hello --device cpu --model " + m,
                                 "eval --data " + d + "/doc.txt --seq-len 8 --device cpu --model " + m,
                                 "--config " + d + "/run.json"}) {
    auto r = testutil::run_cli(args);
    EXPECT_EQ(r.code, 1) << args;
    EXPECT_NE(r.err.find(want), std::string::npos) << args << ": " << r.err;
  }
  longlora::remove_tree(d);
}

TEST(EvalCli, ResultsThatCannotBeWrittenToStdoutAreAnError) {
  // > /dev/full: the results were lost and every command exited 0, reading as success.
  const std::string m = " --model " + model_dir() + " --device cpu";
  for (const std::string args :
       {"eval" + m + " --data " + testutil::golden("tiny-llama/eval.bin") + " --seq-len 64 --json",
        "eval" + m + " --data " + testutil::golden("tiny-llama/eval.bin") + " --seq-len 64",
        "eval --task passkey" + m + " --lengths 128 --trials 1 --json",
        "generate" + m + " --prompt 'the cat' --max-new-tokens 10 --temperature 0", std::string("--version")}) {
    const auto r = testutil::run_cli(args + " > /dev/full");
    EXPECT_EQ(r.code, 1) << args;
    EXPECT_NE(r.err.find("error: stdout: the output could not be written"),
              std::string::npos) << args << "\n" << r.err;
    if (args.rfind("generate", 0) == 0)  // why it stopped: not the token limit
      EXPECT_NE(r.err.find(" new tokens (stdout failed)"), std::string::npos) << r.err;
    // To a writable stdout, the same command succeeds.
    EXPECT_EQ(testutil::run_cli(args + " > /dev/null").code, 0) << args;
  }
}

TEST(EvalCli, RunningOutOfMemoryIsAOneLineError) {
  // A failed CPU allocation aborted (exit 134, "[F ... Logging.cpp:54] [enforce fail at
  // alloc_cpu.cpp:127]"): libsentencepiece's static constructor set c10's flag that
  // turns a failed CAFFE_ENFORCE into an abort (sentencepiece is now loaded apart,
  // data/sentencepiece_module.h). A 2M-token window under a 4 GB limit.
  const auto d = testutil::temp_dir("eval-oom");
  data::write_bin(d + "/big.bin", std::vector<int32_t>(2100000, 7));
  const auto r = testutil::run_cli("eval --model " + model_dir() + " --data " + d +
                                       "/big.bin --seq-len 2000000 --device cpu",
                                   "ulimit -v 4000000; ");
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_EQ(r.err.find("Logging.cpp"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("\nerror: out of memory: you tried to allocate "), std::string::npos) << r.err;
  EXPECT_EQ(r.err.back(), '\n');
  longlora::remove_tree(d);
}

TEST(BenchCli, ASeqLenPastRopeFactor1024IsRefused) {
  // bench --seq-len 100000000 ran a model at "rope factor 24415" (model.rope_factor and
  // --rope-factor stop at 1024), then aborted out of memory.
  const std::string shape = model_dir() + "/config.json";  // 128 positions
  const auto r = testutil::run_cli("bench --shape " + shape + " --seq-len 131073 --steps 1 --warmup 0 --device cpu");
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(r.err, "error: --seq-len: 131073 needs a RoPE factor of 1025 over max_position_embeddings 128, past the "
                   "limit of 1024: at most 131072\n");
}

TEST(BenchCli, AttentionBenchWithoutCudaIsAnErrorOnStderr) {
  // "attention bench: no CUDA device available; nothing to time" came on stdout.
  if (torch::cuda::is_available()) GTEST_SKIP() << "a CUDA device is here: the bench would run";
  const auto r = testutil::run_cli("bench attention --seq-len 1024 --heads 2 --kv-heads 2 --head-dim 64");
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(r.out, "");
  EXPECT_EQ(lines(r.err), 1u) << r.err;
  EXPECT_EQ(r.err.rfind("error: attention bench: ", 0), 0u) << r.err;
  EXPECT_NE(r.err.find("; nothing to time"), std::string::npos) << r.err;
}

TEST(GenerateCli, APromptPlusNewTokensPastTheModelsContextIsWarnedOf) {
  // eval and passkey warned of positions the model never saw; generate did not.
  const std::string base = "generate --model " + model_dir() + " --prompt 'the cat' --temperature 0 --device cpu";
  const auto r = testutil::run_cli(base + " --max-new-tokens 200");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("prompt (4 tokens) + --max-new-tokens 200 = 204 is past the model's context (128 positions x rope factor 1 = 128)"), std::string::npos)
      << r.err;
  const auto fits = testutil::run_cli(base + " --max-new-tokens 125");  // 128 positions run
  ASSERT_EQ(fits.code, 0) << fits.err;
  EXPECT_EQ(fits.err.find("past the model's context"), std::string::npos) << fits.err;
}

TEST(PasskeyCli, APromptPastTheModelsContextIsWarnedOfWhenTheLengthIsNot) {
  // --lengths 128 runs 157-token prompts on the 128-position model: no warning, since
  // only the requested length was compared with the context.
  const auto r = testutil::run_cli("eval --task passkey --model " + model_dir() + " --lengths 128 --trials 1 --device cpu");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("passkey length 128: prompts of 157 tokens are past the model's context (128 positions x "
                       "rope factor 1 = 128)"),
            std::string::npos) << r.err;
  EXPECT_EQ(count_of(r.err, "past the model's context"), 1u) << r.err;
  const auto fits = testutil::run_cli("eval --task passkey --model " + model_dir() +
                                      " --lengths 128 --trials 1 --rope-factor 2 --device cpu");
  ASSERT_EQ(fits.code, 0) << fits.err;
  EXPECT_EQ(fits.err.find("past the model's context"), std::string::npos) << fits.err;
}
