#include "longlora/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <stdexcept>

#include "longlora/common/error.h"
#include "longlora/common/json_file.h"
#include "longlora/common/strings.h"

#include <spdlog/spdlog.h>

namespace fs = std::filesystem;
using nlohmann::json;

namespace longlora::io {

DType parse_dtype(const std::string& s, const std::string& file, const std::string& tensor) {
  if (s == "F32") return DType::F32;
  if (s == "F16") return DType::F16;
  if (s == "BF16") return DType::BF16;
  if (s == "I64") return DType::I64;
  if (s == "I32") return DType::I32;
  if (s == "U8") return DType::U8;
  fail(file, "tensor '" + tensor + "'",
       "unsupported dtype '" + s + "' (supported: F32, F16, BF16, I64/I32 for token ids, U8 for RNG states)");
}

const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::U8: return "U8";
  }
  return "?";
}

bool is_float(DType d) { return d == DType::F32 || d == DType::F16 || d == DType::BF16; }

size_t dtype_size(DType d) {
  switch (d) {
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: return 2;
    case DType::I64: return 8;
    case DType::U8: return 1;
  }
  return 0;
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (auto s : shape) n *= s;  // the reader checked that the byte size, hence this, fits
  return n;
}

namespace {
// The byte size of `shape` in `dtype`, or nullopt when it (or the element count) does
// not fit int64: wrapped products made shapes like [2^63, 2] pass as 0 bytes.
std::optional<uint64_t> checked_nbytes(DType dtype, const std::vector<int64_t>& shape) {
  uint64_t elems = 1;
  for (auto s : shape) {
    if (s < 0 || __builtin_mul_overflow(elems, static_cast<uint64_t>(s), &elems)) return std::nullopt;
  }
  uint64_t n = 0;
  if (__builtin_mul_overflow(elems, static_cast<uint64_t>(dtype_size(dtype)), &n) ||
      n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    return std::nullopt;
  return n;
}
}  // namespace

size_t tensor_nbytes(DType dtype, const std::vector<int64_t>& shape) {
  const auto n = checked_nbytes(dtype, shape);
  // The reader refuses such shapes, so only a bug gets here.
  if (!n) throw std::logic_error("internal: tensor_nbytes of a shape whose size overflows");
  return static_cast<size_t>(*n);
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  // O_NONBLOCK: a FIFO in a shard's place waited forever in open() for a writer.
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) fail(path, "", std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    fail(path, "", std::string("cannot stat: ") + std::strerror(errno));
  }
  if (S_ISDIR(st.st_mode)) {  // open() takes a directory; mmap would say "No such device"
    ::close(fd);
    fail(path, "", "is a directory, a file is expected");
  }
  if (!S_ISREG(st.st_mode)) {  // a FIFO, socket or device: nothing to map
    ::close(fd);
    fail(path, "", "is not a regular file");
  }
  map_size_ = static_cast<size_t>(st.st_size);
  if (map_size_ < 8) {
    ::close(fd);
    fail(path, "header", "file truncated: " + std::to_string(map_size_) +
                             " bytes, less than the 8-byte header length");
  }
  map_ = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    fail(path, "", std::string("cannot map: ") + std::strerror(errno));
  }
  const auto* bytes = static_cast<const uint8_t*>(map_);
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | bytes[i];  // little-endian
  if (hlen > map_size_ - 8) {
    release();
    fail(path, "header", "header length " + std::to_string(hlen) + " runs past the end of the " +
                             std::to_string(map_size_) + "-byte file (truncated?)");
  }
  const char* hbeg = reinterpret_cast<const char*>(bytes + 8);
  const size_t data_size = map_size_ - 8 - hlen;
  const uint8_t* data = bytes + 8 + hlen;

  // nlohmann takes a NUL for the end of the input: what followed one went unread (the
  // format pads headers with spaces).
  if (const void* z = std::memchr(hbeg, 0, hlen)) {
    release();
    fail(path, "header", "a NUL byte at offset " + std::to_string(static_cast<const char*>(z) - hbeg + 8) +
                             ": not a JSON header");
  }
  json header;
  try {
    std::set<std::string> seen;
    header = json::parse(hbeg, hbeg + hlen, [&](int depth, json::parse_event_t ev, json& j) {
      if (ev == json::parse_event_t::key && depth == 1) {
        const std::string k = j.get<std::string>();
        if (!seen.insert(k).second) fail(path, "tensor '" + k + "'", "duplicate name in header");
      }
      return true;
    });
  } catch (const json::exception& e) {
    release();
    fail(path, "header", std::string("bad JSON: ") + e.what());
  } catch (const Error&) {
    release();
    throw;
  }
  auto bad = [&](const std::string& field, const std::string& msg) {
    release();
    fail(path, field, msg);
  };
  if (!header.is_object()) bad("header", "JSON header is not an object");

  struct Span { size_t b, e; std::string name; };
  std::vector<Span> spans;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) bad("__metadata__", "must be an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) bad("__metadata__." + m.key(), "must be a string");
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string field = "tensor '" + name + "'";
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") ||
        !v.contains("data_offsets"))
      bad(field, "entry needs dtype, shape and data_offsets");
    if (!v["dtype"].is_string()) bad(field, "dtype must be a string");
    TensorInfo t;
    t.name = name;
    try {
      t.dtype = parse_dtype(v["dtype"].get<std::string>(), path, name);
    } catch (const Error&) {
      release();
      throw;
    }
    if (!v["shape"].is_array()) bad(field, "shape must be an array");
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) bad(field, "shape entries must be non-negative integers");
      if (d.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        bad(field, "shape " + v["shape"].dump() + " overflows: a dimension past 2^63 - 1");
      t.shape.push_back(d.get<int64_t>());
    }
    const auto size = checked_nbytes(t.dtype, t.shape);
    if (!size)
      bad(field, "shape " + v["shape"].dump() + " overflows: its size in bytes does not fit in 64 bits");
    const json& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned())
      bad(field, "data_offsets must be [begin, end]");
    const uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
    if (b > e || e > data_size)
      bad(field, "data_offsets [" + std::to_string(b) + ", " + std::to_string(e) +
                     ") out of bounds of the " + std::to_string(data_size) + "-byte data section");
    t.nbytes = static_cast<size_t>(e - b);
    const size_t want = static_cast<size_t>(*size);
    if (want != t.nbytes)
      bad(field, "shape x dtype size is " + std::to_string(want) + " bytes but data_offsets span " +
                     std::to_string(t.nbytes));
    t.data = data + b;
    spans.push_back({static_cast<size_t>(b), static_cast<size_t>(e), name});
    index_[name] = tensors_.size();
    tensors_.push_back(std::move(t));
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.b < b.b; });
  // Against the furthest-reaching span so far, not only the previous one: an empty
  // span between two others must not hide their overlap.
  const Span* reach = nullptr;
  for (const auto& s : spans) {
    if (s.e == s.b) continue;
    if (reach && s.b < reach->e)
      bad("tensor '" + s.name + "'", "data overlaps tensor '" + reach->name + "'");
    if (!reach || s.e > reach->e) reach = &s;
  }
}

SafetensorsFile::SafetensorsFile(std::string path, std::vector<TensorInfo> tensors, std::shared_ptr<const void> owner)
    : path_(std::move(path)), tensors_(std::move(tensors)), owner_(std::move(owner)) {
  for (size_t i = 0; i < tensors_.size(); ++i)
    if (!index_.emplace(tensors_[i].name, i).second) fail(path_, "tensor '" + tensors_[i].name + "'", "twice");
}

void SafetensorsFile::release() {
  if (map_) ::munmap(map_, map_size_);
  map_ = nullptr;
}

SafetensorsFile::~SafetensorsFile() { release(); }

bool SafetensorsFile::contains(const std::string& name) const { return index_.count(name) > 0; }

const TensorInfo& SafetensorsFile::get(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) fail(path_, "tensor '" + name + "'", "not found");
  return tensors_[it->second];
}

bool has_weight_files(const std::string& dir) {
  for (const char* f : {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                        "pytorch_model.bin.index.json"})
    if (fs::exists(fs::path(dir) / f)) return true;
  return false;
}

bool is_stale_buffer(const std::string& name) {
  return name == "rotary_emb.inv_freq" || ends_with(name, ".rotary_emb.inv_freq");
}

SafetensorsCheckpoint::SafetensorsCheckpoint(const std::string& path, PickleReader read_pickle) : path_(path) {
  if (!fs::exists(path)) fail(path, "", "no such file or directory");
  auto add_whole = [&](std::shared_ptr<SafetensorsFile> f) {
    files_.push_back(f);
    for (const auto& t : f->tensors()) where_[t.name] = f;
  };
  auto open_safetensors = [](const std::string& p) { return std::make_shared<SafetensorsFile>(p); };
  if (!fs::is_directory(path)) {
    const bool pickle = read_pickle && fs::path(path).extension() == ".bin";
    add_whole(pickle ? read_pickle(path) : open_safetensors(path));
    return;
  }
  const fs::path dir(path);
  // The shards an index lists, each opened once by `open`.
  auto add_shards = [&](const fs::path& index, const PickleReader& open) {
    const std::string index_name = index.filename().string();
    json j = read_json_file(index.string());
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      fail(index.string(), "weight_map", "missing or not an object");
    std::map<std::string, std::shared_ptr<SafetensorsFile>> opened;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        fail(index.string(), "weight_map." + it.key(), "must name a shard file");
      const std::string shard = it.value().get<std::string>();
      if (shard.empty() || shard == "." || shard == ".." || shard.find('/') != std::string::npos)
        fail(index.string(), "weight_map." + it.key(), "shard must be a file name in the folder");
      auto& f = opened[shard];
      if (!f) {
        f = open((dir / shard).string());
        files_.push_back(f);
      }
      if (!f->contains(it.key()))
        fail(f->path(), "tensor '" + it.key() + "'", "listed in " + index_name + " but not in the shard");
      where_[it.key()] = f;
    }
    // transformers loads every tensor of each shard, in file-name order, so of a tensor
    // stored twice the last copy wins whatever weight_map says: ambiguous, refused.
    std::map<std::string, std::string> first_file;
    for (const auto& [shard, f] : opened)
      for (const auto& t : f->tensors())
        if (auto [prev, fresh] = first_file.emplace(t.name, f->path()); !fresh)
          fail(f->path(), "tensor '" + t.name + "'",
               "also in " + prev->second + "; a tensor must be in one shard only");
  };
  const fs::path index = dir / "model.safetensors.index.json";
  const fs::path single = dir / "model.safetensors";
  // transformers' from_pretrained looks for model.safetensors before the sharded
  // index; a folder with both (a merged file saved next to the shards) must give
  // the same weights here as there.
  if (fs::exists(single)) {
    if (fs::exists(index))
      spdlog::warn("{}: has both model.safetensors and model.safetensors.index.json; reading "
                   "model.safetensors, as transformers does", path);
    add_whole(open_safetensors(single.string()));
    return;
  }
  if (fs::exists(index)) {
    add_shards(index, open_safetensors);
    return;
  }
  // LongLoRA's released models (and most from 2023) hold PyTorch pickles only, which
  // transformers saves as plain dicts, one per shard, and LibTorch's unpickler reads.
  const fs::path bin = dir / "pytorch_model.bin", bin_index = dir / "pytorch_model.bin.index.json";
  if (fs::exists(bin) || fs::exists(bin_index)) {
    if (!read_pickle)
      fail(path, "",
           "holds pytorch_model.bin weights (PyTorch pickles), which are not read; save them as safetensors first: "
           "python -c \"import sys, transformers as t; t.AutoModelForCausalLM.from_pretrained(sys.argv[1], "
           "torch_dtype='auto').save_pretrained(sys.argv[2], safe_serialization=True)\" " +
               path + " NEW_DIR, then copy tokenizer.model into NEW_DIR");
    if (fs::exists(bin) && fs::exists(bin_index))
      spdlog::warn("{}: has both pytorch_model.bin and pytorch_model.bin.index.json; reading "
                   "pytorch_model.bin, as transformers does", path);
    if (fs::exists(bin))
      add_whole(read_pickle(bin.string()));
    else
      add_shards(bin_index, read_pickle);
    return;
  }
  fail(path, "", "no model.safetensors, model.safetensors.index.json or pytorch_model.bin in the folder");
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [k, v] : where_) out.push_back(k);
  return out;
}

bool SafetensorsCheckpoint::contains(const std::string& name) const {
  return where_.count(name) > 0;
}

const TensorInfo& SafetensorsCheckpoint::get(const std::string& name) const {
  return file_of(name).get(name);
}

const SafetensorsFile& SafetensorsCheckpoint::file_of(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) fail(path_, "tensor '" + name + "'", "missing from the checkpoint");
  return *it->second;
}

namespace {
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};
}  // namespace

FileDigest write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                             const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json h;
  if (!metadata.empty()) h["__metadata__"] = metadata;
  size_t off = 0;
  std::set<std::string> names;
  for (const auto& t : tensors) {
    if (!names.insert(t.name).second) fail(path, "tensor '" + t.name + "'", "written twice");
    const size_t n = tensor_nbytes(t.dtype, t.shape);
    h[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {off, off + n}}};
    off += n;
  }
  std::string header = h.dump();
  while ((header.size() + 8) % 8 != 0) header.push_back(' ');  // align the data section

  const std::string tmp = path + ".tmp";
  Fd f;
  f.fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (f.fd < 0) fail(path, "", std::string("cannot write: ") + std::strerror(errno));
  FileDigest digest;
  auto put = [&](const void* p, size_t n) {
    digest.add(p, n);
    const char* c = static_cast<const char*>(p);
    while (n > 0) {
      ssize_t w = ::write(f.fd, c, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        const std::string why = std::strerror(w < 0 ? errno : ENOSPC);
        ::unlink(tmp.c_str());
        fail(path, "", "write failed: " + why);
      }
      c += w;
      n -= static_cast<size_t>(w);
    }
  };
  uint8_t len[8];
  uint64_t hl = header.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(hl >> (8 * i));
  put(len, 8);
  put(header.data(), header.size());
  for (const auto& t : tensors) {
    size_t written = 0;
    t.write([&](const void* p, size_t n) {
      put(p, n);
      written += n;
    });
    if (written != tensor_nbytes(t.dtype, t.shape)) {
      ::unlink(tmp.c_str());
      fail(path, "tensor '" + t.name + "'", "internal: wrong byte count written");
    }
  }
  if (::fsync(f.fd) != 0) {
    ::unlink(tmp.c_str());
    fail(path, "", std::string("fsync failed: ") + std::strerror(errno));
  }
  ::close(f.fd);
  f.fd = -1;
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    fail(path, "", std::string("cannot rename into place: ") + std::strerror(errno));
  }
  return digest;
}

namespace {

template <typename U>
bool exponent_never_all_ones(const void* p, size_t n, U mask) {
  const U* u = static_cast<const U*>(p);
  bool bad = false;
  for (size_t i = 0; i < n; ++i) bad |= (u[i] & mask) == mask;
  return !bad;
}

}  // namespace

bool all_finite(const void* p, size_t n, DType d) {
  switch (d) {
    case DType::F32: return exponent_never_all_ones<uint32_t>(p, n, 0x7f800000u);
    case DType::BF16: return exponent_never_all_ones<uint16_t>(p, n, 0x7f80u);
    case DType::F16: return exponent_never_all_ones<uint16_t>(p, n, 0x7c00u);
    default: return true;  // integers
  }
}

}  // namespace longlora::io
