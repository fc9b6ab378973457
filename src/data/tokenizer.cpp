#include "longlora/data/tokenizer.h"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <mutex>
#include <thread>

#include "longlora/common/error.h"
#include "longlora/common/fs.h"

namespace longlora::data {

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

Tokenizer::Tokenizer(const std::string& path) : impl_(std::make_unique<Impl>()), path_(path) {
  check_not_directory(path);  // sentencepiece's own message names no path
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

namespace {

int worker_count() {
  if (const char* e = std::getenv("OMP_NUM_THREADS")) {
    const int n = std::atoi(e);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

}  // namespace

std::vector<std::vector<int>> Tokenizer::encode_all(const std::vector<std::string>& texts, int threads) const {
  // Texts are handed out in blocks from a shared counter (documents differ in length);
  // no more workers than blocks. The first failure stops every worker and is rethrown here.
  constexpr size_t kBlock = 16;
  std::vector<std::vector<int>> out(texts.size());
  const size_t workers = std::min<size_t>(static_cast<size_t>(threads > 0 ? threads : worker_count()),
                                          (texts.size() + kBlock - 1) / kBlock);
  if (workers <= 1) {
    for (size_t i = 0; i < texts.size(); ++i) out[i] = encode(texts[i]);
    return out;
  }
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&] {
    try {
      for (size_t b; !failed && (b = next.fetch_add(kBlock)) < texts.size();)
        for (size_t i = b; i < std::min(b + kBlock, texts.size()); ++i) out[i] = encode(texts[i]);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      failed = true;
    }
  };
  std::vector<std::thread> pool;
  for (size_t t = 1; t < workers; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
  return out;
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

void Tokenizer::check_fits(int64_t model_vocab_size, const std::string& config_path) const {
  if (vocab_size() > model_vocab_size)
    fail(path_, "", std::to_string(vocab_size()) + " pieces, more than the model's vocab_size " +
                        std::to_string(model_vocab_size) + " (" + config_path +
                        "): the tokenizer belongs to another model");
}

}  // namespace longlora::data
