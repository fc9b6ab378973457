// sentencepiece tokenizer.model (LLaMA's): encode, decode, bos/eos.
#pragma once

#include <cstdint>
#include <memory>
#include <functional>
#include <string>
#include <vector>

namespace longlora::data {

class Tokenizer {
 public:
  explicit Tokenizer(const std::string& model_path);
  ~Tokenizer();
  std::vector<int> encode(const std::string& text) const;  // no BOS/EOS
  // encode() of every text, in order, on `threads` threads (0: OMP_NUM_THREADS where
  // set, else every core): a corpus is tokenized at every start and resume, and
  // sentencepiece is single-threaded. The ids are the same as one encode() per text.
  // `where(i)` names text i in a failure ("FILE: record 7"): sentencepiece failing on
  // one (out of memory on a 40 MB line) named only the tokenizer.
  std::vector<std::vector<int>> encode_all(const std::vector<std::string>& texts, int threads = 0,
                                           const std::function<std::string(size_t)>& where = nullptr) const;
  std::string decode(const std::vector<int>& ids) const;
  std::string piece(int id) const;
  // BOS and EOS ids; an Error naming the file when the model has no such piece
  // (sentencepiece says -1, which went on into the data as a token id).
  int bos_id() const;
  int eos_id() const;
  bool has_eos() const;
  int vocab_size() const;
  // Refuses a tokenizer with more pieces than the model's embedding has rows
  // (vocab_size, read from config_path): its ids past that would fail mid-prompt, or
  // mid-run, far from the cause. Fewer pieces is fine (LLaMA vocabularies are padded).
  void check_fits(int64_t model_vocab_size, const std::string& config_path) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string path_;
};

}  // namespace longlora::data
