// longlora-sentencepiece.so: sentencepiece behind the C interface of
// include/longlora/data/sentencepiece_module.h. It links nothing but sentencepiece.
#include <sentencepiece_processor.h>

#include <exception>
#include <string>
#include <vector>

#include "longlora/data/sentencepiece_module.h"

namespace {

thread_local std::string t_error;
thread_local std::vector<int> t_ids;
thread_local std::string t_text;

using Processor = sentencepiece::SentencePieceProcessor;
const Processor& sp(const void* p) { return *static_cast<const Processor*>(p); }

// Runs f, turning a failed status or an exception into -1 and error().
template <class F>
int guarded(F&& f) {
  try {
    const auto st = f();
    if (st.ok()) return 0;
    t_error = st.ToString();
  } catch (const std::exception& e) {
    t_error = e.what();
  } catch (...) {
    t_error = "unknown exception in sentencepiece";
  }
  return -1;
}

void* load(const char* path) {
  Processor* p = nullptr;
  const int rc = guarded([&] {
    p = new Processor();
    return p->Load(path);
  });
  if (rc == 0) return p;
  delete p;
  return nullptr;
}

void destroy(void* p) { delete static_cast<Processor*>(p); }

int encode(const void* p, const char* text, size_t size, const int** out, size_t* count) {
  const int rc = guarded([&] { return sp(p).Encode(std::string(text, size), &t_ids); });
  *out = t_ids.data();
  *count = rc == 0 ? t_ids.size() : 0;
  return rc;
}

int decode(const void* p, const int* ids, size_t count, const char** out, size_t* size) {
  const int rc = guarded([&] { return sp(p).Decode(std::vector<int>(ids, ids + count), &t_text); });
  *out = t_text.data();
  *size = rc == 0 ? t_text.size() : 0;
  return rc;
}

int id_to_piece(const void* p, int id, const char** out, size_t* size) {
  const int rc = guarded([&] {
    t_text = sp(p).IdToPiece(id);
    return sentencepiece::util::Status();  // ok
  });
  *out = t_text.data();
  *size = rc == 0 ? t_text.size() : 0;
  return rc;
}

int bos_id(const void* p) { return sp(p).bos_id(); }
int eos_id(const void* p) { return sp(p).eos_id(); }
int piece_size(const void* p) { return sp(p).GetPieceSize(); }
const char* error() { return t_error.c_str(); }

const LongloraSpmApi kApi = {LONGLORA_SPM_ABI, load, destroy, encode, decode, id_to_piece,
                             bos_id, eos_id, piece_size, error};

}  // namespace

extern "C" __attribute__((visibility("default"))) const LongloraSpmApi* longlora_spm_api() { return &kApi; }
