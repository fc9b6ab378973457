// longlora-sentencepiece.so: sentencepiece behind the C interface of
// include/longlora/data/sentencepiece_module.h. It links nothing but sentencepiece.
#include <sentencepiece_processor.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <string_view>
#include <utility>
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

// --- The normalization rules' trie, checked before sentencepiece walks it.
// sentencepiece takes precompiled_charsmap (NormalizerSpec field 2) as it is: a uint32
// trie size, a darts-clone double array of that many bytes, then the rules' strings.
// Its normalizer walks the array without bounds checks, so a crafted tokenizer.model
// (units 0xffffffff) crashed every command that tokenizes.

// The length-delimited fields `number` of a protobuf message, in order; false when the
// wire format is broken.
bool proto_fields(std::string_view msg, uint32_t number, std::vector<std::string_view>& out) {
  size_t i = 0;
  auto varint = [&](uint64_t& v) {
    v = 0;
    for (int shift = 0; shift < 64 && i < msg.size(); shift += 7) {
      const uint8_t b = static_cast<uint8_t>(msg[i++]);
      v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if (!(b & 0x80)) return true;
    }
    return false;
  };
  while (i < msg.size()) {
    uint64_t key = 0, v = 0;
    if (!varint(key)) return false;
    switch (key & 7) {
      case 0: if (!varint(v)) return false; break;
      case 1: if (msg.size() - i < 8) return false; i += 8; break;
      case 5: if (msg.size() - i < 4) return false; i += 4; break;
      case 2:
        if (!varint(v) || v > msg.size() - i) return false;
        if ((key >> 3) == number) out.push_back(msg.substr(i, v));
        i += v;
        break;
      default: return false;
    }
  }
  return true;
}

// Why a precompiled_charsmap is unsafe to use, or "" when it is not: every path
// darts-clone's commonPrefixSearch can take stays inside the array, and every rule it
// finds points at a NUL-terminated string.
std::string charsmap_problem(std::string_view blob) {
  if (blob.empty()) return "";  // no rules (LLaMA's identity normalizer)
  uint32_t trie_bytes = 0;
  if (blob.size() <= 4) return "shorter than its header";
  std::memcpy(&trie_bytes, blob.data(), 4);
  if (trie_bytes > blob.size() - 4) return "its trie runs past its end";
  const size_t n = trie_bytes / 4;
  std::vector<uint32_t> units(n);
  if (n > 0) std::memcpy(units.data(), blob.data() + 4, n * 4);
  const std::string_view strings = blob.substr(4 + trie_bytes);
  const size_t last_nul = strings.rfind('\0');
  auto offset = [](uint32_t u) { return static_cast<size_t>((u >> 10) << ((u & (1u << 9)) >> 6)); };
  auto label = [](uint32_t u) { return u & ((1u << 31) | 0xffu); };
  auto has_leaf = [](uint32_t u) { return ((u >> 8) & 1) == 1; };
  if (n == 0) return "an empty trie";
  std::vector<bool> seen(n);
  std::vector<size_t> bases{offset(units[0])};  // the root: position 0 ^ its offset
  while (!bases.empty()) {
    const size_t base = bases.back();
    bases.pop_back();
    if ((base | 0xff) >= n) return "a trie node past the trie's end";  // base ^ any byte
    for (uint32_t b = 0; b < 256; ++b) {
      const size_t q = base ^ b;
      const uint32_t u = units[q];
      if (label(u) != b || seen[q]) continue;
      seen[q] = true;
      const size_t next = q ^ offset(u);
      if ((next | 0xff) >= n) return "a trie node past the trie's end";
      if (has_leaf(u) && (last_nul == std::string_view::npos || (units[next] & 0x7fffffffu) > last_nul))
        return "a rule pointing past its strings";
      bases.push_back(next);
    }
  }
  return "";
}

// The charsmaps of normalizer_spec (ModelProto field 3) and denormalizer_spec (5),
// each as protobuf merges repeated fields: the last one given.
std::string model_problem(const std::string& proto) {
  for (const auto& [field, name] : {std::pair{3u, "normalizer_spec"}, std::pair{5u, "denormalizer_spec"}}) {
    std::vector<std::string_view> specs, maps;
    if (!proto_fields(proto, field, specs)) return "a broken protobuf";
    for (const auto spec : specs)
      if (!proto_fields(spec, 2, maps)) return std::string("a broken ") + name;
    if (maps.empty()) continue;
    if (const std::string why = charsmap_problem(maps.back()); !why.empty())
      return std::string(name) + ".precompiled_charsmap: " + why + " (the file is damaged)";
  }
  return "";
}

void* load(const char* path) {
  Processor* p = nullptr;
  const int rc = guarded([&] {
    p = new Processor();
    auto st = p->Load(path);
    if (!st.ok()) return st;
    if (const std::string why = model_problem(p->serialized_model_proto()); !why.empty())
      return sentencepiece::util::Status(sentencepiece::util::StatusCode::kInvalidArgument, why);
    return st;
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
