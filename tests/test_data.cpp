// Training rows: packing of token streams and LongAlpaca-style supervised records.
#include "longlora/common/error.h"
#include "longlora/data/dataset.h"
#include "longlora/data/synthetic.h"
#include "longlora/data/tokenizer.h"
#include "longlora/data/tokens.h"
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <thread>

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <limits>
#include <fstream>
#include <sstream>
#include <nlohmann/json.hpp>
#include <iterator>
#include <numeric>
#include <random>
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
}

TEST(Data, TokenFilesReadWholeAcrossSlicesAndOddSizesAreRefused) {
  const auto d = testutil::temp_dir("bin-read");
  // 600k ids: more than one 1 MiB slice of the reader, every value of uint16 used.
  std::vector<int32_t> ids(600000);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>((i * 40503u) % 65536u);
  data::write_bin(d + "/big.bin", ids);
  EXPECT_EQ(data::read_bin(d + "/big.bin"), ids);
  testutil::write_file(d + "/odd.bin", std::string("\x01\x00\x02", 3));
  EXPECT_NE(testutil::error_of([&] { data::read_bin(d + "/odd.bin"); })
                .find("odd.bin: odd byte count 3: not a uint16 token file"),
            std::string::npos);
  longlora::remove_tree(d);
}

TEST(Data, ShuffledRowsAreANewPermutationEachEpochAndSeed) {
  const auto d = testutil::temp_dir("shuffle");
  std::vector<int32_t> ids;
  for (int i = 0; i < 50 * 4; ++i) ids.push_back(i + 3);
  data::write_bin(d + "/t.bin", ids);
  data::Dataset ds(d + "/t.bin", "auto", 4, nullptr, 512);
  ASSERT_EQ(ds.size(), 50);
  // The order rows come in, by their first token's row number.
  auto order = [&](int64_t epoch, uint64_t seed, bool shuffle) {
    std::vector<int32_t> o;
    for (int64_t c = epoch * 50; c < (epoch + 1) * 50; ++c) o.push_back((ds.row_at(c, shuffle, seed).ids[0] - 3) / 4);
    return o;
  };
  std::vector<int32_t> identity(50);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_EQ(order(0, 7, false), identity);
  EXPECT_EQ(order(1, 7, false), identity);
  const auto e0 = order(0, 7, true), e1 = order(1, 7, true);
  for (const auto& o : {e0, e1}) {  // every row once an epoch, not in file order
    EXPECT_EQ(std::set<int32_t>(o.begin(), o.end()).size(), 50u);
    EXPECT_NE(o, identity);
  }
  EXPECT_NE(e0, e1);                 // reshuffled each epoch
  EXPECT_NE(order(0, 8, true), e0);  // another seed, another order
  EXPECT_EQ(order(0, 7, true), e0);  // the same seed and epoch, the same order (resume)
  EXPECT_EQ(order(1, 7, true), e1);
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
TEST(Data, Utf8CheckAgreesWithTheJsonParser) {
  // The .jsonl path refuses what nlohmann's parser refuses in a string; .txt and
  // prompt files are held to the same by check_utf8. Short random byte strings drawn
  // to hit lead, continuation and invalid bytes, each judged by both.
  const std::vector<unsigned char> alphabet = {'a', 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc1, 0xc2,
                                               0xdf, 0xe0, 0xe1, 0xec, 0xed, 0xee, 0xef, 0xf0, 0xf1, 0xf3, 0xf4,
                                               0xf5, 0xf8, 0xff};
  std::mt19937 rng(1);
  int valid = 0;
  for (int trial = 0; trial < 100000; ++trial) {
    std::string s;
    for (int k = 1 + static_cast<int>(rng() % 5); k > 0; --k) s.push_back(static_cast<char>(alphabet[rng() % alphabet.size()]));
    const bool json_ok = nlohmann::json::accept("\"" + s + "\"");
    bool ours = true;
    try {
      data::check_utf8(s, "x");
    } catch (const Error&) {
      ours = false;
    }
    ASSERT_EQ(ours, json_ok) << testing::PrintToString(s);
    valid += ours;
  }
  EXPECT_GT(valid, 1000);  // both verdicts were exercised
  try {
    data::check_utf8("caf\xc3\xa9\nna\xefve", "doc.txt");  // line 2: a Latin-1 byte
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("doc.txt: line 2, byte 8: not valid UTF-8", 0), 0u) << e.what();
  }
}

TEST(DataBadInput, Latin1TextIsRefusedAsJsonlIs) {
  const auto d = testutil::temp_dir("latin1");
  testutil::write_file(d + "/doc.txt", "The grass is green.\nCaf\xe9 au lait.\n");
  auto r = testutil::run_cli("eval --model " + testutil::golden("tiny-llama/model") + " --data " + d +
                             "/doc.txt --seq-len 4 --device cpu");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find(d + "/doc.txt: line 2, byte 23: not valid UTF-8"), std::string::npos) << r.err;
  r = testutil::run_cli("generate --model " + testutil::golden("tiny-llama/model") + " --prompt-file " + d +
                        "/doc.txt --device cpu");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find(d + "/doc.txt: line 2, byte 23: not valid UTF-8"), std::string::npos) << r.err;
  longlora::remove_tree(d);
}

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
  // LongLoRA's supervised-fine-tune.py: BOS + tokens(prompt + output) + EOS, the first
  // 1 + len(tokens(prompt)) labels masked.
  // PROMPT_DICT of LongLoRA's supervised-fine-tune.py (Stanford Alpaca's), letter for letter.
  const std::string prompt_text =
      "Below is an instruction that describes a task. Write a response that appropriately "
      "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:";
  EXPECT_EQ(data::sft_prompt({"Say hi.", "", "hi there"}), prompt_text);
  EXPECT_EQ(data::sft_prompt({"Add", "2 and 3", "5"}),
            "Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd"
            "\n\n### Input:\n2 and 3\n\n### Response:");
  const auto prompt = tok.encode(prompt_text);
  const auto whole = tok.encode(prompt_text + "hi there");
  const size_t p = 1 + prompt.size();  // BOS + prompt
  ASSERT_EQ(r.ids.size(), 128u);
  EXPECT_EQ(r.ids[0], tok.bos_id());
  for (size_t i = 0; i < whole.size(); ++i) EXPECT_EQ(r.ids[1 + i], whole[i]) << i;
  EXPECT_EQ(r.ids[1 + whole.size()], tok.eos_id());
  // Tokenized apart, the output would start with a word-initial piece that the joint
  // text does not have after "Response:".
  EXPECT_NE(std::vector<int>(whole.begin() + prompt.size(), whole.end()), tok.encode("hi there"));
  // Predictions of prompt tokens are not counted; the output tokens and EOS are.
  for (size_t i = 0; i + 1 < p; ++i) EXPECT_EQ(r.targets[i], -1) << i;
  for (size_t i = p - 1; i < whole.size(); ++i) EXPECT_EQ(r.targets[i], whole[i]) << i;
  EXPECT_EQ(r.targets[whole.size()], tok.eos_id());
  // Padding is never counted.
  for (size_t i = whole.size() + 1; i < 128; ++i) EXPECT_EQ(r.targets[i], -1) << i;
  EXPECT_NE(data::sft_prompt({"Add", "2 and 3", "5"}).find("### Input:\n2 and 3"), std::string::npos);
}

TEST(Data, SupervisedRecordsWithoutATemplateAreTheInstructionThenTheOutput) {
  // data.sft_prompt "none": LongLoRA's supervised-fine-tune.py since Nov 2023, which
  // tokenizes instruction + output with no template around them.
  const auto d = testutil::temp_dir("sft-none");
  testutil::write_file(d + "/a.jsonl", R"({"instruction": "Say hi.", "output": " hi there", "file": "x"})" "\n");
  data::Tokenizer tok(testutil::golden("tokenizer.model"));
  data::Dataset ds(d + "/a.jsonl", "auto", 64, &tok, 512, "none");
  ASSERT_EQ(ds.size(), 1);
  const auto r = ds.row_at(0, false, 0);
  const auto prompt = tok.encode("Say hi.");
  const auto whole = tok.encode("Say hi. hi there");
  ASSERT_LT(whole.size() + 1, 64u);
  EXPECT_EQ(r.ids[0], tok.bos_id());
  for (size_t i = 0; i < whole.size(); ++i) EXPECT_EQ(r.ids[1 + i], whole[i]) << i;
  EXPECT_EQ(r.ids[1 + whole.size()], tok.eos_id());
  for (size_t i = 0; i < prompt.size(); ++i) EXPECT_EQ(r.targets[i], -1) << i;
  for (size_t i = prompt.size(); i < whole.size(); ++i) EXPECT_EQ(r.targets[i], whole[i]) << i;
  EXPECT_EQ(r.targets[whole.size()], tok.eos_id());
  // An input has no place there: refused, not dropped.
  // Named where a parse error would name it: the line (a blank one before it here).
  testutil::write_file(d + "/b.jsonl", R"({"instruction": "Add", "output": "5"})" "\n\n"
                                       R"({"instruction": "Add", "input": "2 and 3", "output": "5"})" "\n");
  const auto e = testutil::error_of([&] { data::Dataset(d + "/b.jsonl", "auto", 64, &tok, 512, "none"); });
  EXPECT_NE(e.find(d + "/b.jsonl:3: input: not empty, but data.sft_prompt \"none\""), std::string::npos) << e;
  testutil::write_file(d + "/b.json", R"([{"instruction": "Add", "output": "5"},)"
                                      R"( {"instruction": "Add", "input": "2 and 3", "output": "5"}])");
  EXPECT_NE(testutil::error_of([&] { data::Dataset(d + "/b.json", "auto", 64, &tok, 512, "none"); })
                .find(d + "/b.json: record 1: input: not empty"),
            std::string::npos);
  EXPECT_EQ(data::Dataset(d + "/b.jsonl", "auto", 256, &tok, 512).size(), 2);  // the Alpaca template has one
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

// Copy drills alone: keys that could not fit do not matter (the check was refusing
// --max-keys 100 here), and long drills land exactly on the length, each line the
// same string, the last one cut short.
TEST(Data, MakeDataCopyDrillsOnlyAreExactAtLongRows) {
  const auto d = testutil::temp_dir("make-data-drills");
  data::PasskeyCorpusOptions o;
  o.tokenizer = testutil::golden("tokenizer.model");
  o.out = d + "/c.jsonl";
  o.docs = 3;
  o.row_tokens = 8192;
  o.max_keys = 100;
  o.min_keys = 100;
  o.copy_frac = 1;
  o.seed = 1;
  EXPECT_EQ(data::write_passkey_corpus(o), 3);
  data::Tokenizer tok(o.tokenizer);
  std::ifstream in(o.out);
  int docs = 0;
  for (std::string row; std::getline(in, row); ++docs) {
    const auto text = nlohmann::json::parse(row)["text"].get<std::string>();
    EXPECT_EQ(tok.encode(text).size(), 8190u) << docs;
    const std::string first = text.substr(0, text.find('\n'));
    std::vector<std::string> lines;
    std::stringstream ss(text);
    for (std::string l; std::getline(ss, l);) lines.push_back(l);
    ASSERT_GT(lines.size(), 100u);
    for (size_t i = 0; i + 1 < lines.size(); ++i) EXPECT_EQ(lines[i], first) << docs << " line " << i;
    EXPECT_EQ(first.rfind(lines.back(), 0), 0u) << docs;  // a prefix of the line
  }
  EXPECT_EQ(docs, 3);
}

// ---------------------------------------------------------------- bad input (review of the data loaders)

namespace {

bool has(const std::string& s, const std::string& what) { return s.find(what) != std::string::npos; }

data::PasskeyCorpusOptions small_corpus(const std::string& out) {
  data::PasskeyCorpusOptions o;
  o.tokenizer = testutil::golden("tokenizer.model");
  o.out = out;
  o.docs = 3;
  o.min_tokens = 200;
  o.max_tokens = 300;
  return o;
}

size_t entries(const std::string& dir) {
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir)) ++n;
  return n;
}

}  // namespace

TEST(DataBadInput, MakeDataNeverDamagesAnExistingOut) {
  // --out used to be truncated before the first document: a run that then failed left
  // it empty, and a run that succeeded replaced it without a word.
  const auto d = testutil::temp_dir("make-data-keep");
  const std::string out = d + "/precious.jsonl";
  testutil::write_file(out, "keep me\n");
  auto o = small_corpus(out);
  EXPECT_TRUE(has(testutil::error_of([&] { data::write_passkey_corpus(o); }), "already exists (pass --overwrite"));
  EXPECT_EQ(testutil::read_file(out), "keep me\n");
  // --overwrite, and the run fails: the old file stays, nothing beside it (a failure
  // after documents were written: MakeDataFailsOnAWriteError).
  o.overwrite = true;
  o.row_tokens = 64;  // one key and its question never fit 62 golden tokens
  EXPECT_NE(testutil::error_of([&] { data::write_passkey_corpus(o); }), "");
  EXPECT_EQ(testutil::read_file(out), "keep me\n");
  EXPECT_EQ(entries(d), 1u);
  // A successful --overwrite replaces it.
  o = small_corpus(out);
  o.overwrite = true;
  EXPECT_EQ(data::write_passkey_corpus(o), 3);
  EXPECT_NE(testutil::read_file(out), "keep me\n");
  EXPECT_EQ(entries(d), 1u);
  // The output must be a .jsonl: under a .bin name training reads its bytes as token ids.
  EXPECT_TRUE(has(testutil::error_of([&] { data::write_passkey_corpus(small_corpus(d + "/c.bin")); }),
                  "c.bin: --out: must end in .jsonl"));
  std::filesystem::create_directory(d + "/dir.jsonl");
  o = small_corpus(d + "/dir.jsonl");
  o.overwrite = true;
  EXPECT_TRUE(has(testutil::error_of([&] { data::write_passkey_corpus(o); }), "dir.jsonl: --out: is a directory"));
  longlora::remove_tree(d);
}

TEST(DataBadInput, MakeDataFailsOnAWriteError) {
  // A file size limit stands in for a full disk (write() fails with EFBIG once
  // SIGXFSZ is ignored): exit 0 before, the tail lost. The run fails after several
  // documents were written, and the file it was to replace is still whole.
  const auto d = testutil::temp_dir("make-data-full");
  testutil::write_file(d + "/c.jsonl", "keep me\n");
  const std::string cmd = "ulimit -f 8; trap '' XFSZ; " + std::string(LONGLORA_BINARY) + " make-data --tokenizer " +
                          testutil::golden("tokenizer.model") + " --out " + d +
                          "/c.jsonl --overwrite --docs 40 --min-tokens 200 --max-tokens 300 >/dev/null 2>" + d + "/err";
  const int status = std::system(cmd.c_str());  // /bin/sh
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 1);
  const auto err = testutil::read_file(d + "/err");
  EXPECT_TRUE(has(err, "c.jsonl: write failed: File too large")) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  EXPECT_EQ(testutil::read_file(d + "/c.jsonl"), "keep me\n");
  EXPECT_EQ(entries(d), 2u);  // c.jsonl and err: no temporary file left
  longlora::remove_tree(d);
}

TEST(DataBadInput, MakeDataInterruptedLeavesNoTemporaryAndTheOldFileWhole) {
  // SIGINT/SIGTERM left .c.jsonl.tmp-PID beside --out; it stops before the next
  // document, removes it and keeps the file it was to replace.
  const auto d = testutil::temp_dir("make-data-signal");
  testutil::write_file(d + "/c.jsonl", "keep me\n");
  for (int sig : {SIGINT, SIGTERM}) {
    const pid_t pid = testutil::spawn_cli("make-data --tokenizer " + testutil::golden("tokenizer.model") + " --out " +
                                              d + "/c.jsonl --overwrite --docs 1000 --min-tokens 200 --max-tokens 300",
                                          "LONGLORA_TEST_INTERRUPT_PAUSE_MS=100", d + "/err");
    ASSERT_TRUE(testutil::wait_until([&] { return entries(d) == 3; }, 60)) << sig;  // c.jsonl, err and the temporary
    ::kill(pid, sig);
    EXPECT_EQ(testutil::wait_exit(pid), 128 + sig) << sig;
    EXPECT_EQ(testutil::read_file(d + "/err"), "interrupted: nothing written to " + d + "/c.jsonl\n");
    EXPECT_EQ(testutil::read_file(d + "/c.jsonl"), "keep me\n");
    EXPECT_EQ(entries(d), 2u);  // c.jsonl and err: no temporary file left
  }
  longlora::remove_tree(d);
}

// A signal was answered between documents only: a 4M-token document counts its
// tokens ~25 times (seconds each), and SIGTERM took 6 minutes to act (with the demo's
// tokenizer, on the 2-core machine). Now between counts: ~2 s there. The bound is a
// liveness check with room for a slow machine, not a timing.
TEST(DataBadInput, MakeDataAnswersASignalWithinALongDocument) {
  const auto d = testutil::temp_dir("make-data-long-signal");
  const pid_t pid = testutil::spawn_cli("make-data --tokenizer " + testutil::data("../../configs/demo/tokenizer.model") +
                                            " --out " + d +
                                            "/c.jsonl --docs 1 --min-tokens 4194304 --max-tokens 4194304",
                                        "", d + "/err");
  ASSERT_TRUE(testutil::wait_until([&] { return entries(d) == 2; }, 60));  // err and the temporary
  std::this_thread::sleep_for(std::chrono::seconds(1));  // into the document's counting
  const auto t0 = std::chrono::steady_clock::now();
  ::kill(pid, SIGTERM);
  EXPECT_EQ(testutil::wait_exit(pid), 128 + SIGTERM);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(60));
  EXPECT_EQ(testutil::read_file(d + "/err"), "interrupted: nothing written to " + d + "/c.jsonl\n");
  EXPECT_EQ(entries(d), 1u);  // err: no temporary file left
  longlora::remove_tree(d);
}

TEST(DataBadInput, MakeDataKeepsEveryDocumentWithinMaxTokens) {
  const auto d = testutil::temp_dir("make-data-max");
  // The keys and questions alone can exceed --max-tokens: five keys never fit 20 tokens.
  auto o = small_corpus(d + "/a.jsonl");
  o.min_tokens = 16;
  o.max_tokens = 20;
  o.min_keys = o.max_keys = 5;
  const auto e = testutil::error_of([&] { data::write_passkey_corpus(o); });
  EXPECT_TRUE(has(e, "--min-keys 5") && has(e, "--max-tokens 20")) << e;
  EXPECT_FALSE(std::filesystem::exists(o.out));
  // Some draws (two keys asked three times each) are longer than 260 tokens without
  // filler; they were written anyway, over --max-tokens. Now they are drawn again.
  o = small_corpus(d + "/b.jsonl");
  o.docs = 40;
  o.min_tokens = 16;
  o.max_tokens = 260;
  o.max_keys = 2;
  o.max_asks = 3;
  o.seed = 1;
  ASSERT_EQ(data::write_passkey_corpus(o), 40);
  data::Tokenizer tok(o.tokenizer);
  std::ifstream in(o.out);
  int docs = 0;
  for (std::string line; std::getline(in, line); ++docs)
    EXPECT_LE(tok.encode(nlohmann::json::parse(line)["text"].get<std::string>()).size(), 260u) << docs;
  EXPECT_EQ(docs, 40);
  longlora::remove_tree(d);
}

TEST(DataBadInput, LongAlpacaJsonIsParsedWhole) {
  // `in >> j` read the first array and dropped what followed it.
  const auto d = testutil::temp_dir("sft-trailing");
  data::Tokenizer tok(testutil::golden("tokenizer.model"));
  const std::string records = R"([{"instruction": "Say hi.", "output": "hi there"}])";
  testutil::write_file(d + "/garbage.json", records + " garbage");
  testutil::write_file(d + "/two.json", records + "\n" + records);
  for (const char* f : {"/garbage.json", "/two.json"}) {
    const auto e = testutil::error_of([&] { data::Dataset(d + f, "auto", 128, &tok, 512); });
    EXPECT_TRUE(has(e, std::string(f).substr(1) + ": bad JSON:")) << e;
    EXPECT_TRUE(has(e, "expected end of input")) << e;
  }
  longlora::remove_tree(d);
}

// nlohmann stops at a NUL: the rest of the line or file was dropped, unread.
TEST(DataBadInput, ANulByteInJsonIsRefused) {
  const auto d = testutil::temp_dir("json-nul");
  data::Tokenizer tok(testutil::golden("tokenizer.model"));
  const std::string nul("\0junk", 5);
  testutil::write_file(d + "/text.jsonl", "{\"text\": \"a b c\"}\n{\"text\": \"d\"}" + nul + "\n");
  testutil::write_file(d + "/sft.jsonl", "{\"instruction\": \"Say hi.\", \"output\": \"hi\"}" + nul + "\n");
  testutil::write_file(d + "/sft.json", R"([{"instruction": "Say hi.", "output": "hi"}])" + nul);
  EXPECT_EQ(testutil::error_of([&] { (void)data::load_token_stream(d + "/text.jsonl", &tok); }),
            d + "/text.jsonl:2: a NUL byte at column 14: not a JSON text");
  EXPECT_EQ(testutil::error_of([&] { data::Dataset(d + "/sft.jsonl", "sft", 128, &tok, 512); }),
            d + "/sft.jsonl:1: a NUL byte at column 43: not a JSON text");
  EXPECT_EQ(testutil::error_of([&] { data::Dataset(d + "/sft.json", "auto", 128, &tok, 512); }),
            d + "/sft.json: a NUL byte at offset 44: not a JSON text");
  longlora::remove_tree(d);
}

// sentencepiece failing on one text (here out of memory: ~350 bytes a character on a
// 12 MB line, under a 4 GB limit) named only tokenizer.model, not the data.
TEST(DataBadInput, ATextTheTokenizerFailsOnIsNamed) {
  // A GPU driver reserves more address space than the limit leaves.
  if (std::filesystem::exists("/dev/nvidiactl")) GTEST_SKIP() << "address-space limit with a GPU driver";
  const auto d = testutil::temp_dir("encode-fails");
  const std::string huge(12000000, 'a');
  testutil::write_file(d + "/text.jsonl", R"({"text": "a b c"})" "\n" + nlohmann::json({{"text", huge}}).dump() + "\n");
  testutil::write_file(d + "/sft.jsonl", R"({"instruction": "Say hi.", "output": "hi"})" "\n" +
                                             nlohmann::json({{"instruction", "Say it."}, {"output", huge}}).dump() + "\n");
  // Text documents through eval, instruction records through a training run.
  testutil::write_file(d + "/run.json", nlohmann::json({{"device", "cpu"},
                                                         {"model", {{"path", testutil::golden("tiny-llama/model")}}},
                                                         {"data", {{"train", d + "/sft.jsonl"}, {"seq_len", 64}}},
                                                         {"output", {{"dir", d + "/out"}}}})
                                            .dump());
  for (const char* f : {"text.jsonl", "sft.jsonl"}) {
    const std::string args = f[0] == 't' ? "eval --model " + testutil::golden("tiny-llama/model") + " --data " + d +
                                               "/text.jsonl --seq-len 16 --device cpu"
                                         : "--config " + d + "/run.json";
    auto r = testutil::run_cli(args, "ulimit -v 4000000; OMP_NUM_THREADS=1 ");
    EXPECT_EQ(r.code, 1) << r.err;
    const std::string want = d + "/" + f + (f[0] == 't' ? ": document 2: " : ": record 2: ");
    EXPECT_NE(r.err.find(want), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("tokenizer.model: encode failed: "), std::string::npos) << r.err;
  }
  longlora::remove_tree(d);
}

TEST(DataBadInput, MakeDataDoesNotWriteOverItsTokenizer) {
  // `--tokenizer t --out t --overwrite` replaced the tokenizer it was reading.
  const auto d = testutil::temp_dir("md-tok");
  std::filesystem::copy_file(testutil::golden("tokenizer.model"), d + "/tok.jsonl");
  auto r = testutil::run_cli("make-data --tokenizer " + d + "/tok.jsonl --out " + d + "/tok.jsonl --overwrite --docs 2");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find(d + "/tok.jsonl: --out: is the --tokenizer file"), std::string::npos) << r.err;
  EXPECT_EQ(testutil::read_file(d + "/tok.jsonl"), testutil::read_file(testutil::golden("tokenizer.model")));
  longlora::remove_tree(d);
}

TEST(DataBadInput, SupervisedRecordsDroppedOrTruncatedAreCounted) {
  const auto d = testutil::temp_dir("sft-counts");
  data::Tokenizer tok(testutil::golden("tokenizer.model"));
  std::string long_text;
  for (int i = 0; i < 60; ++i) long_text += "The grass is green. ";
  nlohmann::json recs = nlohmann::json::array();
  recs.push_back({{"instruction", "Say hi."}, {"output", "hi"}});                  // fits
  recs.push_back({{"instruction", "Say hi."}, {"input", long_text}, {"output", "hi"}});  // prompt fills the row
  recs.push_back({{"instruction", "Say hi."}, {"output", long_text}});             // output cut
  testutil::write_file(d + "/a.json", recs.dump());
  data::Dataset ds(d + "/a.json", "auto", 128, &tok, 512);
  EXPECT_EQ(ds.size(), 2);
  EXPECT_EQ(ds.dropped(), 1);
  EXPECT_EQ(ds.truncated(), 1);
  longlora::remove_tree(d);
}

// The cut row: the first seq_len tokens of BOS + prompt + output, no EOS (it fell past
// the cut), every output token in the row predicted but the last position's (its next
// token is not in the row); the dropped record is not in the rows at all.
TEST(DataBadInput, ATruncatedSupervisedRowIsTheRecordsFirstTokens) {
  const auto d = testutil::temp_dir("sft-cut");
  data::Tokenizer tok(testutil::golden("tokenizer.model"));
  std::string long_text;
  for (int i = 0; i < 60; ++i) long_text += "The grass is green. ";
  nlohmann::json recs = nlohmann::json::array();
  recs.push_back({{"instruction", "Say hi."}, {"input", long_text}, {"output", "hi"}});  // dropped
  recs.push_back({{"instruction", "Say hi."}, {"output", long_text}});
  testutil::write_file(d + "/a.json", recs.dump());
  data::Dataset ds(d + "/a.json", "auto", 128, &tok, 512);
  ASSERT_EQ(ds.size(), 1);
  const auto r = ds.row_at(0, false, 0);
  const std::string prompt = data::sft_prompt({"Say hi.", "", long_text});
  std::vector<int> want{tok.bos_id()};
  for (int id : tok.encode(prompt + long_text)) want.push_back(id);
  ASSERT_GT(want.size(), 128u);
  const size_t p = 1 + tok.encode(prompt).size();
  ASSERT_EQ(r.ids.size(), 128u);
  for (size_t i = 0; i < 128; ++i) EXPECT_EQ(r.ids[i], want[i]) << i;
  for (size_t i = 0; i + 1 < p; ++i) EXPECT_EQ(r.targets[i], -1) << i;
  for (size_t i = p - 1; i < 127; ++i) EXPECT_EQ(r.targets[i], want[i + 1]) << i;
  EXPECT_EQ(r.targets[127], -1);
  EXPECT_EQ(std::count(r.ids.begin(), r.ids.end(), tok.eos_id()), 0);
  // Every record dropped: an error naming the file, not an empty run.
  testutil::write_file(d + "/b.json", nlohmann::json::array({recs[0]}).dump());
  EXPECT_EQ(testutil::error_of([&] { data::Dataset(d + "/b.json", "auto", 128, &tok, 512); }),
            d + "/b.json: no record has output tokens within seq_len 128");
  longlora::remove_tree(d);
}

TEST(DataBadInput, AnUnknownExtensionOrAJsonThatIsNoListIsNamed) {
  const auto d = testutil::temp_dir("data-kinds");
  data::Tokenizer tok(testutil::golden("tokenizer.model"));
  testutil::write_file(d + "/a.csv", "text\nThe grass is green.\n");
  EXPECT_EQ(testutil::error_of([&] { data::Dataset(d + "/a.csv", "auto", 8, &tok, 512); }),
            d + "/a.csv: unknown data extension '.csv' (expected .bin, .txt, .json or .jsonl)");
  testutil::write_file(d + "/a.json", R"({"instruction": "Say hi.", "output": "hi"})");
  EXPECT_EQ(testutil::error_of([&] { data::Dataset(d + "/a.json", "auto", 8, &tok, 512); }),
            d + "/a.json: expected a JSON array of {instruction, input, output} records");
  longlora::remove_tree(d);
}

TEST(DataBadInput, ADirectoryIsNamedAsSuch) {
  const auto d = testutil::temp_dir("data-dir");
  data::Tokenizer tok(testutil::golden("tokenizer.model"));
  for (const char* name : {"a.bin", "a.txt", "a.json", "a.jsonl"}) {
    const std::string p = d + "/" + name;
    std::filesystem::create_directory(p);
    EXPECT_EQ(testutil::error_of([&] { data::Dataset(p, "auto", 8, &tok, 512); }), p + ": is a directory, a file is expected");
    if (std::string(name) != "a.json")  // eval's and data.eval's reader
      EXPECT_EQ(testutil::error_of([&] { data::load_token_stream(p, &tok); }), p + ": is a directory, a file is expected");
  }
  longlora::remove_tree(d);
}

TEST(DataBadInput, FormatContradictingTheExtensionIsRefused) {
  // data.format=text on a .bin was read as tokens anyway (and logged as text).
  const auto d = testutil::temp_dir("data-format");
  data::Tokenizer tok(testutil::golden("tokenizer.model"));
  std::vector<int32_t> ids(64, 5);
  data::write_bin(d + "/t.bin", ids);
  testutil::write_file(d + "/t.jsonl", "{\"text\": \"The grass is green.\"}\n");
  for (const char* f : {"text", "sft"})
    EXPECT_TRUE(has(testutil::error_of([&] { data::Dataset(d + "/t.bin", f, 8, &tok, 512); }), "t.bin: data.format: ")) << f;
  EXPECT_TRUE(has(testutil::error_of([&] { data::Dataset(d + "/t.jsonl", "tokens", 8, &tok, 512); }), "t.jsonl: data.format: "));
  EXPECT_EQ(data::Dataset(d + "/t.bin", "tokens", 8, &tok, 512).size(), 8);
  longlora::remove_tree(d);
}

TEST(DataBadInput, GuessedInstructionDataSaysHowToReadItAsText) {
  const auto d = testutil::temp_dir("data-guess");
  data::Tokenizer tok(testutil::golden("tokenizer.model"));
  testutil::write_file(d + "/t.jsonl", "{\"text\": \"hello world\", \"instruction\": \"meta\"}\n");
  const auto e = testutil::error_of([&] { data::Dataset(d + "/t.jsonl", "auto", 4, &tok, 512); });
  EXPECT_TRUE(has(e, "t.jsonl:1: output: missing")) << e;
  EXPECT_TRUE(has(e, "data.format=text")) << e;
  EXPECT_EQ(data::Dataset(d + "/t.jsonl", "text", 4, &tok, 512).kind(), "text");
  longlora::remove_tree(d);
}

TEST(DataBadInput, WindowStartsDoNotOverflow) {
  // s + L + 1 overflowed for a huge L and gave a window at 0.
  EXPECT_TRUE(data::window_starts(10, std::numeric_limits<int64_t>::max(), 1).empty());
  EXPECT_EQ(data::window_starts(10, 3, std::numeric_limits<int64_t>::max()), std::vector<int64_t>{0});
  EXPECT_EQ(data::window_starts(10, 3, 3), (std::vector<int64_t>{0, 3, 6}));
  EXPECT_EQ(data::window_starts(10, 9, 1), std::vector<int64_t>{0});
}

TEST(DataBadInput, MakeDataFlagsAreCheckedInOneLine) {
  const auto d = testutil::temp_dir("make-data-flags");
  const std::string base = "make-data --tokenizer " + testutil::golden("tokenizer.model") + " --out " + d + "/never.jsonl";
  for (const auto& [flag, want] : std::vector<std::pair<std::string, std::string>>{
           {" --docs 0", "error: --docs: expected an integer >= 1, got 0\n"},
           {" --docs abc", "error: --docs: expected an integer, got 'abc'\n"},
           {" --max-asks 0", "error: --max-asks: expected an integer >= 1, got 0\n"},
           {" --seed -1", "error: --seed: expected an integer >= 0, got -1\n"},
           {" --max-tokens 5000000000", "error: --max-tokens: expected an integer in [16, 4194304], got 5000000000\n"},
           {" --min-tokens 8", "error: --min-tokens: expected an integer in [16, 4194304], got 8\n"}}) {
    const auto r = testutil::run_cli(base + flag);
    EXPECT_EQ(r.code, 2) << flag;  // a command line that does not parse
    EXPECT_EQ(r.err, want) << flag;
  }
  EXPECT_FALSE(std::filesystem::exists(d + "/never.jsonl"));
}
