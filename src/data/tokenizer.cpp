#include "longlora/data/tokenizer.h"

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <mutex>
#include <thread>

#include "longlora/common/error.h"
#include "longlora/common/fs.h"
#include "longlora/data/sentencepiece_module.h"

namespace longlora::data {

namespace {

// The module lies next to the executable (build/, as the binary is run from there), or
// in ../lib/longlora-train/ where `cmake --install` puts it; errors name the first.
std::string module_path() {
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  const auto dir = ec ? std::filesystem::path(".") : exe.parent_path();
  const auto installed = dir / ".." / "lib" / "longlora-train" / LONGLORA_SPM_MODULE;
  if (!std::filesystem::exists(dir / LONGLORA_SPM_MODULE) && std::filesystem::exists(installed, ec))
    return installed.lexically_normal().string();
  return (dir / LONGLORA_SPM_MODULE).string();
}

// Loaded once, never unloaded; a failure is reported to every caller, naming the file.
const LongloraSpmApi& module_api() {
  static const LongloraSpmApi* api = nullptr;
  static std::string path, error;
  static std::once_flag once;
  std::call_once(once, [] {
    path = module_path();
    // A namespace of its own (see sentencepiece_module.h).
    void* handle = dlmopen(LM_ID_NEWLM, path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
      error = std::string("cannot load the sentencepiece module (it belongs beside the binary, or in "
                          "../lib/longlora-train/ after cmake --install): ") + dlerror();
      return;
    }
    auto entry = reinterpret_cast<LongloraSpmEntry>(dlsym(handle, LONGLORA_SPM_ENTRY));
    const LongloraSpmApi* a = entry ? entry() : nullptr;
    if (!a || a->abi != LONGLORA_SPM_ABI) {
      error = "not the sentencepiece module of this build (rebuild it)";
      return;
    }
    api = a;
  });
  if (!api) fail(path, "", error);
  return *api;
}

}  // namespace

struct Tokenizer::Impl {
  const LongloraSpmApi* api = nullptr;
  void* sp = nullptr;
  ~Impl() {
    if (sp) api->destroy(sp);
  }
};

Tokenizer::Tokenizer(const std::string& path) : impl_(std::make_unique<Impl>()), path_(path) {
  check_regular_file(path);  // sentencepiece's own message names no path; a FIFO blocked its read
  impl_->api = &module_api();
  impl_->sp = impl_->api->load(path.c_str());
  if (!impl_->sp) {
    const std::string e = impl_->api->error();
    // sentencepiece says "Internal: ./src/sentencepiece_processor.cc(1101) [model_proto->ParseFromArray(...)]".
    if (e.find("ParseFromArray") != std::string::npos)
      fail(path, "", "not a sentencepiece model (damaged, or another kind of file)");
    fail(path, "", "cannot load sentencepiece model: " + e);
  }
}

Tokenizer::~Tokenizer() = default;

std::vector<int> Tokenizer::encode(const std::string& text) const {
  const int* ids = nullptr;
  size_t n = 0;
  if (impl_->api->encode(impl_->sp, text.data(), text.size(), &ids, &n) != 0)
    fail(path_, "", std::string("encode failed: ") + impl_->api->error());
  return std::vector<int>(ids, ids + n);
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

std::vector<std::vector<int>> Tokenizer::encode_all(const std::vector<std::string>& texts, int threads,
                                                    const std::function<std::string(size_t)>& where) const {
  auto encode_one = [&](size_t i) {
    try {
      return encode(texts[i]);
    } catch (const Error& e) {
      if (!where) throw;
      throw Error(where(i) + ": " + e.what());
    }
  };
  // Texts are handed out in blocks from a shared counter (documents differ in length);
  // no more workers than blocks. The first failure stops every worker and is rethrown here.
  constexpr size_t kBlock = 16;
  std::vector<std::vector<int>> out(texts.size());
  const size_t workers = std::min<size_t>(static_cast<size_t>(threads > 0 ? threads : worker_count()),
                                          (texts.size() + kBlock - 1) / kBlock);
  if (workers <= 1) {
    for (size_t i = 0; i < texts.size(); ++i) out[i] = encode_one(i);
    return out;
  }
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&] {
    try {
      for (size_t b; !failed && (b = next.fetch_add(kBlock)) < texts.size();)
        for (size_t i = b; i < std::min(b + kBlock, texts.size()); ++i) out[i] = encode_one(i);
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
  const char* text = nullptr;
  size_t n = 0;
  if (impl_->api->decode(impl_->sp, ids.data(), ids.size(), &text, &n) != 0)
    fail(path_, "", std::string("decode failed: ") + impl_->api->error());
  return std::string(text, n);
}

std::string Tokenizer::piece(int id) const {
  const char* text = nullptr;
  size_t n = 0;
  if (impl_->api->id_to_piece(impl_->sp, id, &text, &n) != 0)
    fail(path_, "", std::string("piece failed: ") + impl_->api->error());
  return std::string(text, n);
}

int Tokenizer::bos_id() const {
  const int id = impl_->api->bos_id(impl_->sp);
  if (id < 0) fail(path_, "bos_piece", "the tokenizer has no BOS piece, which starts every document and prompt");
  return id;
}
int Tokenizer::eos_id() const {
  const int id = impl_->api->eos_id(impl_->sp);
  if (id < 0) fail(path_, "eos_piece", "the tokenizer has no EOS piece, which ends every document");
  return id;
}
bool Tokenizer::has_eos() const { return impl_->api->eos_id(impl_->sp) >= 0; }
int Tokenizer::vocab_size() const { return impl_->api->piece_size(impl_->sp); }

void Tokenizer::check_fits(int64_t model_vocab_size, const std::string& config_path) const {
  if (vocab_size() > model_vocab_size)
    fail(path_, "", std::to_string(vocab_size()) + " pieces, more than the model's vocab_size " +
                        std::to_string(model_vocab_size) + " (" + config_path +
                        "): the tokenizer belongs to another model");
}

}  // namespace longlora::data
