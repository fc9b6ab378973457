#include "longlora/data/tokenizer.h"

#include <sentencepiece_processor.h>

#include "longlora/common/error.h"

namespace longlora::data {

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

Tokenizer::Tokenizer(const std::string& path) : impl_(std::make_unique<Impl>()), path_(path) {
  auto st = impl_->sp.Load(path);
  if (!st.ok()) fail(path, "", "cannot load sentencepiece model: " + st.ToString());
}

Tokenizer::~Tokenizer() = default;

std::vector<int> Tokenizer::encode(const std::string& text) const {
  std::vector<int> ids;
  auto st = impl_->sp.Encode(text, &ids);
  if (!st.ok()) fail(path_, "", "encode failed: " + st.ToString());
  return ids;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  std::string out;
  auto st = impl_->sp.Decode(ids, &out);
  if (!st.ok()) fail(path_, "", "decode failed: " + st.ToString());
  return out;
}

std::string Tokenizer::piece(int id) const { return impl_->sp.IdToPiece(id); }
int Tokenizer::bos_id() const { return impl_->sp.bos_id(); }
int Tokenizer::eos_id() const { return impl_->sp.eos_id(); }
int Tokenizer::vocab_size() const { return impl_->sp.GetPieceSize(); }

}  // namespace longlora::data
