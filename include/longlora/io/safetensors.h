// safetensors: 8-byte little-endian header length, a JSON header
// {"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
// then the raw bytes. Reader memory-maps the file and validates every entry;
// writer writes one tensor at a time (streaming) and is used by export and
// checkpoints. No torch here: torch views are made in io/tensors.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "longlora/io/checksum.h"

namespace longlora::io {

enum class DType { F32, F16, BF16, I64, I32, U8 };

// Throws longlora::Error (naming `file` and `tensor`) for dtypes we do not take.
DType parse_dtype(const std::string& s, const std::string& file, const std::string& tensor);
const char* dtype_name(DType d);
bool is_float(DType d);  // F32, F16 or BF16
size_t dtype_size(DType d);
// True when none of the n elements at p (raw bits of dtype d) is inf or NaN; always
// true for integers. Tested on the bits, not through torch::isfinite: a LLaMA-7B
// export copies ~13 GB as stored, and isfinite on bf16 ran at 0.7 GB/s on two cores.
bool all_finite(const void* p, size_t n, DType d);

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // into the mapping (or the memory its file holds)
  size_t nbytes = 0;
  int64_t numel() const;
};

// A validated safetensors file, memory-mapped; or (the second constructor) entries over
// bytes held in memory, such as a torch.save pickle's.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  // Entries over bytes that `owner` holds: a file read some other way (a torch.save
  // pickle), named by `path` in errors.
  SafetensorsFile(std::string path, std::vector<TensorInfo> tensors, std::shared_ptr<const void> owner);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // Whether the entries lie in a read-only file mapping (else in memory `owner` holds).
  bool mapped() const { return map_ != nullptr; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  bool contains(const std::string& name) const;
  const TensorInfo& get(const std::string& name) const;  // Error if missing

 private:
  void release();
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, std::string> metadata_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::shared_ptr<const void> owner_;
};

// Whether `dir` holds a model's weights under a name transformers looks for:
// model.safetensors, model.safetensors.index.json, pytorch_model.bin or
// pytorch_model.bin.index.json.
bool has_weight_files(const std::string& dir);

// rotary_emb.inv_freq: a buffer transformers 4.28-4.30 saved with the weights, which
// later versions (and we) skip on load and leave out of a merge.
bool is_stale_buffer(const std::string& name);

// Reads a torch.save file of tensors into a SafetensorsFile (io/tensors.h's
// read_pickled_tensors, which needs LibTorch; this file does not).
using PickleReader = std::function<std::shared_ptr<SafetensorsFile>(const std::string& path)>;

// A checkpoint directory or file: one model.safetensors, or shards listed in
// model.safetensors.index.json; given a PickleReader, also PyTorch pickles
// (pytorch_model.bin, or the shards pytorch_model.bin.index.json lists). Files stay
// mapped (pickles: read whole) while this object lives.
class SafetensorsCheckpoint {
 public:
  // `path` is a directory or a file. In a directory the first of model.safetensors,
  // model.safetensors.index.json, pytorch_model.bin and pytorch_model.bin.index.json
  // is read, transformers' order. Without `read_pickle`, pickles are refused with
  // their conversion to safetensors; a file is then always read as safetensors.
  explicit SafetensorsCheckpoint(const std::string& path, PickleReader read_pickle = nullptr);
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const;
  const TensorInfo& get(const std::string& name) const;
  const SafetensorsFile& file_of(const std::string& name) const;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::shared_ptr<SafetensorsFile>> where_;
};

// Streaming writer: the header is computed from the declared entries first, then
// each tensor's bytes are produced by its callback, in order, straight to disk.
struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  // Writes exactly numel*dtype_size bytes through `sink`.
  std::function<void(const std::function<void(const void*, size_t)>& sink)> write;
};

// Writes `path` (through path + ".tmp" and a rename) and returns the size and CRC-32
// of what it wrote. Errors name the file.
FileDigest write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Byte size of one tensor entry.
size_t tensor_nbytes(DType dtype, const std::vector<int64_t>& shape);

}  // namespace longlora::io
