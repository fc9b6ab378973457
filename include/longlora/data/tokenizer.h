// sentencepiece tokenizer.model (LLaMA's): encode, decode, bos/eos.
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace longlora::data {

class Tokenizer {
 public:
  explicit Tokenizer(const std::string& model_path);
  ~Tokenizer();
  std::vector<int> encode(const std::string& text) const;  // no BOS/EOS
  std::string decode(const std::vector<int>& ids) const;
  std::string piece(int id) const;
  int bos_id() const;
  int eos_id() const;
  int vocab_size() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string path_;
};

}  // namespace longlora::data
