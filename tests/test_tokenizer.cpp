// The tokenizer against Python sentencepiece's ids, and the isolation of sentencepiece
// from LibTorch's libraries (include/longlora/data/sentencepiece_module.h).
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "longlora/common/fs.h"
#include "longlora/data/tokenizer.h"
#include "longlora/data/tokens.h"
#include "test_util.h"

using namespace longlora;

TEST(Tokenizer, EncodesTheGoldenTextToPythonSentencepiecesIds) {
  // eval.bin is BOS then the GPL-3 text as Python's sentencepiece 0.2.2 encoded it.
  data::Tokenizer tok(testutil::golden("tokenizer.model"));
  const auto bin = data::read_bin(testutil::golden("tiny-llama/eval.bin"));
  ASSERT_GT(bin.size(), 1000u);
  EXPECT_EQ(bin[0], tok.bos_id());
  const std::vector<int> want(bin.begin() + 1, bin.end());
  // The licence's opening as its file has it (indents, line breaks) and as sentencepiece
  // normalizes it: both encode to Python's first ids, which decode to the second. The
  // next piece starts a word, so the excerpt's ids are a prefix of the whole text's.
  const std::string head =
      "                    GNU GENERAL PUBLIC LICENSE\n"
      "                       Version 3, 29 June 2007\n\n"
      " Copyright (C) 2007 Free Software Foundation, Inc. <https://fsf.org/>\n"
      " Everyone is permitted to copy and distribute verbatim copies\n"
      " of this license document, but changing it is not allowed.\n";
  const std::string normalized =
      "GNU GENERAL PUBLIC LICENSE Version 3, 29 June 2007 Copyright (C) 2007 Free Software Foundation, Inc. "
      "<https://fsf.org/> Everyone is permitted to copy and distribute verbatim copies of this license "
      "document, but changing it is not allowed.";
  const std::vector<int> prefix(want.begin(), want.begin() + 135);
  EXPECT_EQ(tok.encode(head), prefix);
  EXPECT_EQ(tok.encode(normalized), prefix);
  EXPECT_EQ(tok.decode(prefix), normalized);
  // The whole text round-trips through our decode and encode.
  EXPECT_EQ(tok.encode(tok.decode(want)), want);
  EXPECT_EQ(tok.vocab_size(), 512);
  EXPECT_EQ(tok.eos_id(), 2);
  std::string pieces;  // the word with sentencepiece's dummy-prefix space
  for (int id : tok.encode("GNU")) pieces += tok.piece(id);
  EXPECT_EQ(pieces, "\xe2\x96\x81GNU");
}

// Without the piece sentencepiece says -1, which went into the data as a token id and
// was blamed on the model's vocabulary ("token 0 is id -1").
TEST(Tokenizer, AMissingBosOrEosPieceIsNamed) {
  const std::string dir = testutil::data("tokenizer-without-bos-eos/");
  data::Tokenizer no_bos(dir + "no_bos.model"), no_eos(dir + "no_eos.model");
  EXPECT_EQ(testutil::error_of([&] { (void)no_bos.bos_id(); }),
            dir + "no_bos.model: bos_piece: the tokenizer has no BOS piece, which starts every document and prompt");
  EXPECT_EQ(testutil::error_of([&] { (void)no_eos.eos_id(); }),
            dir + "no_eos.model: eos_piece: the tokenizer has no EOS piece, which ends every document");
  EXPECT_TRUE(no_bos.has_eos());
  EXPECT_FALSE(no_eos.has_eos());
  EXPECT_GE(no_eos.bos_id(), 0);
  // Documents of a text file start with BOS: the loader says so, not the vocabulary check.
  const auto tmp = testutil::temp_dir("tok-no-bos");
  testutil::write_file(tmp + "/d.txt", "the grass is green");
  EXPECT_NE(testutil::error_of([&] { (void)data::load_token_stream(tmp + "/d.txt", &no_bos); }).find("no BOS piece"),
            std::string::npos);
}

// sentencepiece walks its normalization trie (precompiled_charsmap) without bounds
// checks: a tokenizer.model whose trie units were all 0xffffffff crashed every command
// that tokenizes (fuzzing). The module checks the trie at load.
TEST(Tokenizer, ADamagedNormalizationTrieIsRefusedAtLoad) {
  const std::string good = testutil::read_file(testutil::golden("tokenizer.model"));
  // NormalizerSpec: name (field 1) "nmt_nfkc", then precompiled_charsmap (field 2):
  // a varint length, a uint32 trie size, the trie, the rules' strings.
  const std::string head("\n\x08nmt_nfkc\x12", 11);
  size_t at = good.find(head);
  ASSERT_NE(at, std::string::npos);
  at += head.size();
  uint64_t len = 0;
  for (int shift = 0;; shift += 7) {
    const auto b = static_cast<uint8_t>(good[at++]);
    len |= static_cast<uint64_t>(b & 0x7f) << shift;
    if (!(b & 0x80)) break;
  }
  uint32_t trie_bytes = 0;
  std::memcpy(&trie_bytes, good.data() + at, 4);
  ASSERT_LT(trie_bytes + 4, len);
  const auto d = testutil::temp_dir("tok-trie");
  auto refused = [&](const std::function<void(std::string&)>& damage) {
    std::string bytes = good;
    damage(bytes);
    testutil::write_file(d + "/t.model", bytes);
    return testutil::error_of([&] { data::Tokenizer t(d + "/t.model"); });
  };
  const std::string says = d + "/t.model: cannot load sentencepiece model: Invalid argument: "
                               "normalizer_spec.precompiled_charsmap: ";
  EXPECT_EQ(refused([](std::string&) {}), "");
  EXPECT_EQ(refused([&](std::string& b) { std::fill_n(b.begin() + at + 4, trie_bytes, '\xff'); }),
            says + "a trie node past the trie's end (the file is damaged)");
  EXPECT_EQ(refused([&](std::string& b) { std::fill_n(b.begin() + at + 4 + trie_bytes, len - 4 - trie_bytes, 'x'); }),
            says + "a rule pointing past its strings (the file is damaged)");
  longlora::remove_tree(d);
}

TEST(Tokenizer, SentencepieceDoesNotShareLibTorchsNames) {
  // Linked into the binary, libsentencepiece's absl FLAGS_minloglevel bound to libc10's
  // int of that name and its constructor set the flag beside it, which turns every
  // failed CAFFE_ENFORCE (a CPU out-of-memory among them) into an abort.
  data::Tokenizer tok(testutil::golden("tokenizer.model"));
  EXPECT_EQ(tok.encode("The sky is blue.").size(), tok.encode(" The sky is blue.").size());
  // Looked up, not named: naming it would copy-relocate the flag into this binary,
  // out of the overwritten bytes' way, and the check could not fail.
  const auto* fatal = static_cast<const bool*>(dlsym(RTLD_DEFAULT, "FLAGS_caffe2_use_fatal_for_enforce"));
  ASSERT_NE(fatal, nullptr);
  EXPECT_FALSE(*fatal);
  // What that flag decides: an allocation that cannot be met throws (it aborted).
  EXPECT_THROW(torch::empty({int64_t{1} << 58}, torch::kUInt8), c10::Error);
  // sentencepiece is loaded, but not where this process's names are looked up.
  EXPECT_EQ(dlsym(RTLD_DEFAULT, "_ZN13sentencepiece22SentencePieceProcessorC1Ev"), nullptr);
  EXPECT_EQ(dlsym(RTLD_DEFAULT, "longlora_spm_api"), nullptr);
}

TEST(Tokenizer, AnInstalledBinaryFindsItsModule) {
  // `cmake --install` puts the module in PREFIX/lib/longlora-train/, not beside the binary.
  const auto d = testutil::temp_dir("install");
  const std::string install = std::string(LONGLORA_CMAKE_COMMAND) + " --install " + LONGLORA_BUILD_DIR +
                              " --prefix " + d + " > " + d + "/install.log 2>&1";
  ASSERT_EQ(std::system(install.c_str()), 0) << testutil::read_file(d + "/install.log");
  ASSERT_TRUE(std::filesystem::exists(d + "/lib/longlora-train/longlora-sentencepiece.so"));
  ASSERT_FALSE(std::filesystem::exists(d + "/bin/longlora-sentencepiece.so"));
  const std::string cmd = d + "/bin/longlora-train generate --model " + testutil::golden("tiny-llama/model") +
                          " --prompt hi --max-new-tokens 2 --device cpu > /dev/null 2> " + d + "/err";
  const int status = std::system(cmd.c_str());
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << testutil::read_file(d + "/err");
  longlora::remove_tree(d);
}

TEST(Tokenizer, ABinaryWithoutItsModuleSaysWhereTheModuleBelongs) {
  // A copy of the binary alone in a folder (its library path is absolute, so LibTorch
  // is still found): the first command that tokenizes names the missing module.
  const auto d = testutil::temp_dir("no-spm-module");
  std::filesystem::copy_file(LONGLORA_BINARY, d + "/longlora-train");
  std::filesystem::permissions(d + "/longlora-train", std::filesystem::perms::owner_exec,
                               std::filesystem::perm_options::add);
  const std::string cmd = d + "/longlora-train generate --model " + testutil::golden("tiny-llama/model") +
                          " --prompt hi --device cpu > /dev/null 2> " + d + "/err";
  const int status = std::system(cmd.c_str());
  const std::string err = testutil::read_file(d + "/err");
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << err;
  EXPECT_EQ(err.rfind("error: " + d + "/longlora-sentencepiece.so: cannot load the sentencepiece module", 0), 0u)
      << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  longlora::remove_tree(d);
}
