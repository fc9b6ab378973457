// Training rows: packing of token streams and LongAlpaca-style supervised records.
#include "longlora/common/error.h"
#include "longlora/data/dataset.h"
#include "longlora/data/synthetic.h"
#include "longlora/data/tokenizer.h"
#include "longlora/data/tokens.h"
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <iterator>
#include <set>

#include "test_util.h"

using namespace longlora;

TEST(Data, TokenRowsPredictTheNextTokenInsideTheRow) {
  const auto d = testutil::temp_dir("rows");
  std::vector<int32_t> ids;
  for (int i = 0; i < 25; ++i) ids.push_back(i + 3);
  data::write_bin(d + "/t.bin", ids);
  data::Dataset ds(d + "/t.bin", "auto", 8, nullptr, 512);
  EXPECT_EQ(ds.kind(), "tokens");
  ASSERT_EQ(ds.size(), 3);  // 25 tokens: three full rows of 8, the tail dropped
  auto r = ds.row_at(1, /*shuffle=*/false, 0);
  EXPECT_EQ(r.ids, (std::vector<int32_t>{11, 12, 13, 14, 15, 16, 17, 18}));
  EXPECT_EQ(r.targets, (std::vector<int32_t>{12, 13, 14, 15, 16, 17, 18, -1}));
  // Shuffled order is a permutation per epoch, the same for the same seed.
  std::set<int32_t> firsts;
  for (int64_t c = 0; c < 3; ++c) firsts.insert(ds.row_at(c, true, 7).ids[0]);
  EXPECT_EQ(firsts, (std::set<int32_t>{3, 11, 19}));
  EXPECT_EQ(ds.row_at(4, true, 7).ids, ds.row_at(4, true, 7).ids);
  EXPECT_EQ(data::permutation(100, 7, 0), data::permutation(100, 7, 0));
  EXPECT_NE(data::permutation(100, 7, 0), data::permutation(100, 7, 1));
}

TEST(Data, TextDocumentsMakeOneStreamForTrainingAndEval) {
  // BOS d1 EOS BOS d2: the trainer's rows and eval's windows read the same stream,
  // so a held-out .jsonl is scored the way a model trained on such files saw text.
  const auto d = testutil::temp_dir("text-stream");
  testutil::write_file(d + "/a.jsonl", "{\"text\": \"The sky is blue.\"}\n{\"text\": \"Here we go.\"}\n");
  data::Tokenizer tok(testutil::golden("tokenizer.model"));
  std::vector<int32_t> want{tok.bos_id()};
  for (int id : tok.encode("The sky is blue.")) want.push_back(id);
  want.push_back(tok.eos_id());
  want.push_back(tok.bos_id());
  for (int id : tok.encode("Here we go.")) want.push_back(id);
  EXPECT_EQ(data::load_token_stream(d + "/a.jsonl", &tok), want);
  const auto L = static_cast<int64_t>(want.size()) - 1;
  data::Dataset ds(d + "/a.jsonl", "auto", L, &tok, 100000);
  ASSERT_EQ(ds.size(), 1);
  EXPECT_EQ(ds.row_at(0, false, 0).ids, std::vector<int32_t>(want.begin(), want.end() - 1));
}

// Corpora are tokenized on several threads: the same ids, in the same order, as one
// encode() per document, for documents of very different lengths.
TEST(Data, ParallelTokenizationEqualsOneEncodePerText) {
  data::Tokenizer tok(testutil::golden("tokenizer.model"));
  std::vector<std::string> texts;
  std::string jsonl;
  for (int i = 0; i < 300; ++i) {
    std::string t = "Document " + std::to_string(i) + ":";
    for (int k = 0; k < (i * 37) % 50; ++k) t += " The pass key is " + std::to_string(i * k) + ".";
    texts.push_back(t);
    jsonl += nlohmann::json({{"text", t}}).dump() + "\n";
  }
  std::vector<std::vector<int>> want;
  for (const auto& t : texts) want.push_back(tok.encode(t));
  EXPECT_EQ(tok.encode_all(texts, 4), want);
  EXPECT_EQ(tok.encode_all(texts, 1), want);

  // The stream the trainer reads, built with three workers (OMP_NUM_THREADS).
  const auto d = testutil::temp_dir("text-parallel");
  testutil::write_file(d + "/c.jsonl", jsonl);
  std::vector<int32_t> stream;
  for (size_t i = 0; i < want.size(); ++i) {
    if (i > 0) stream.push_back(tok.eos_id());
    stream.push_back(tok.bos_id());
    stream.insert(stream.end(), want[i].begin(), want[i].end());
  }
  const char* old = std::getenv("OMP_NUM_THREADS");
  const std::string saved = old ? old : "";
  setenv("OMP_NUM_THREADS", "3", 1);
  const auto got = data::load_token_stream(d + "/c.jsonl", &tok);
  if (old) setenv("OMP_NUM_THREADS", saved.c_str(), 1); else unsetenv("OMP_NUM_THREADS");
  EXPECT_EQ(got, stream);
}

TEST(Data, TooShortForOneRowIsAClearError) {
  const auto d = testutil::temp_dir("rows-short");
  data::write_bin(d + "/t.bin", {1, 2, 3});
  try {
    data::Dataset ds(d + "/t.bin", "auto", 8, nullptr, 512);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("t.bin"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("no complete row"), std::string::npos);
  }
}

TEST(Data, SupervisedRecordsCountOnlyTheOutputAndEos) {
  const auto d = testutil::temp_dir("sft");
  testutil::write_file(d + "/a.json",
                       R"([{"instruction": "Say hi.", "output": "hi there"},
                           {"instruction": "Add", "input": "2 and 3", "output": "5"}])");
  data::Tokenizer tok(testutil::golden("tokenizer.model"));
  data::Dataset ds(d + "/a.json", "auto", 128, &tok, 512);
  EXPECT_EQ(ds.kind(), "sft");
  ASSERT_EQ(ds.size(), 2);
  auto r = ds.row_at(0, false, 0);
  const auto prompt = tok.encode(data::sft_prompt({"Say hi.", "", "hi there"}));
  const auto out = tok.encode("hi there");
  const size_t p = 1 + prompt.size();  // BOS + prompt
  ASSERT_EQ(r.ids.size(), 128u);
  EXPECT_EQ(r.ids[0], tok.bos_id());
  // Predictions of prompt tokens are not counted; the output tokens and EOS are.
  for (size_t i = 0; i + 1 < p; ++i) EXPECT_EQ(r.targets[i], -1) << i;
  for (size_t k = 0; k < out.size(); ++k) EXPECT_EQ(r.targets[p - 1 + k], out[k]) << k;
  EXPECT_EQ(r.targets[p - 1 + out.size()], tok.eos_id());
  // Padding is never counted.
  for (size_t i = p + out.size(); i < 128; ++i) EXPECT_EQ(r.targets[i], -1) << i;
  EXPECT_NE(data::sft_prompt({"Add", "2 and 3", "5"}).find("### Input:\n2 and 3"), std::string::npos);
}

TEST(Data, MakeDataStopsWithAnErrorWhereNoDocumentFitsTheRowLength) {
  // Five keys with their info lines and questions never fit 64 tokens: this looped
  // for ever before; now it names the flags.
  const auto d = testutil::temp_dir("make-data-nofit");
  data::PasskeyCorpusOptions o;
  o.tokenizer = testutil::golden("tokenizer.model");
  o.out = d + "/c.jsonl";
  o.docs = 2;
  o.row_tokens = 64;
  o.min_keys = o.max_keys = 5;
  o.max_asks = 8;
  try {
    data::write_passkey_corpus(o);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--row-tokens 64"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("--min-keys 5"), std::string::npos) << e.what();
  }
}

// The README's demo numbers reproduce bit for bit only while make-data writes the
// same documents. tests/data/demo holds the first documents of the demo's two
// training sets (scripts/demo.sh's flags; written before make-data counted tokens
// part by part); make-data's stream is sequential, so a shorter run writes them first.
TEST(Data, MakeDataWritesTheDemosDocumentsUnchanged) {
  const auto d = testutil::temp_dir("make-data-demo");
  data::PasskeyCorpusOptions o;
  o.tokenizer = testutil::data("../../configs/demo/tokenizer.model");
  o.out = d + "/256.jsonl";
  o.docs = 16;
  o.row_tokens = 256;
  o.max_asks = 8;
  o.seed = 5;
  data::write_passkey_corpus(o);
  EXPECT_EQ(testutil::read_file(o.out), testutil::read_file(testutil::data("demo/train_256_head.jsonl")));
  o.out = d + "/1024.jsonl";
  o.docs = 4;
  o.row_tokens = 1024;
  o.min_keys = 2;
  o.max_keys = 5;
  o.max_asks = 4;
  o.seed = 2;
  data::write_passkey_corpus(o);
  EXPECT_EQ(testutil::read_file(o.out), testutil::read_file(testutil::data("demo/train_1024_head.jsonl")));
  // Every document is exactly row_tokens - 2 tokens, counted whole.
  data::Tokenizer tok(o.tokenizer);
  std::ifstream in(o.out);
  for (std::string line; std::getline(in, line);)
    EXPECT_EQ(tok.encode(nlohmann::json::parse(line)["text"].get<std::string>()).size(), 1022u);
}

TEST(Data, MakeDataRowTokensGiveRowsThatAreWholeDocuments) {
  const auto d = testutil::temp_dir("make-data");
  data::PasskeyCorpusOptions o;
  o.tokenizer = testutil::golden("tokenizer.model");
  o.out = d + "/c.jsonl";
  o.docs = 12;
  o.row_tokens = 384;
  o.max_keys = 2;
  o.max_asks = 2;
  o.copy_frac = 0.5;
  o.seed = 3;
  EXPECT_EQ(data::write_passkey_corpus(o), 12);
  data::Tokenizer tok(o.tokenizer);
  data::Dataset ds(o.out, "auto", 384, &tok, tok.vocab_size());
  ASSERT_EQ(ds.size(), 11);  // BOS doc EOS per row; the last document has no EOS after it
  for (int64_t i = 0; i < ds.size(); ++i) {
    const auto r = ds.row_at(i, false, 0);
    EXPECT_EQ(r.ids.front(), tok.bos_id()) << i;
    EXPECT_EQ(r.ids.back(), tok.eos_id()) << i;
  }
  const std::string text = testutil::read_file(o.out);
  EXPECT_NE(text.find("What is the pass key? The pass key is"), std::string::npos);
  EXPECT_NE(text.find("\\n"), std::string::npos);
}
