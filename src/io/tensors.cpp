#include "longlora/io/tensors.h"

#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/import_read.h>
#include <torch/csrc/jit/serialization/storage_context.h>

#include <filesystem>
#include <fstream>

#include "longlora/common/strings.h"
#include "longlora/common/error.h"

namespace longlora::io {

namespace {
// A state dict's pickle builds some six containers a tensor (the rebuild call's
// argument tuples, sizes, strides, an empty OrderedDict). LibTorch frees a nested
// value recursively: a 2 MB pickle of lists nested 10^6 deep overflowed the stack and
// crashed. Containers bound the depth; this allows ~16000 tensors a file (LLaMA-2-70B
// has 723).
constexpr size_t kMaxPickleContainers = 100000;

// Walks the pickle's opcodes (every protocol's, 0 to 5) and counts those that make a
// container or object; refuses more than kMaxPickleContainers, and bytes that are no
// opcode (the unpickler refuses them too, after building what came before).
void check_pickle_size(const uint8_t* p, size_t n, const std::string& path) {
  auto le = [&](size_t at, int bytes) {
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; --i) v = v << 8 | p[at + static_cast<size_t>(i)];
    return v;
  };
  size_t i = 0, containers = 0;
  auto skip_line = [&] {
    while (i < n && p[i] != '\n') ++i;
    ++i;
  };
  while (i < n) {
    const uint8_t op = p[i++];
    // Argument bytes: a fixed count, or a length prefix of `len` bytes and that many.
    int fixed = 0, len = 0;
    switch (op) {
      case 0x80: case 'K': case 'h': case 'q': case 0x82: fixed = 1; break;  // PROTO BININT1 BINGET BINPUT EXT1
      case 'M': case 0x83: fixed = 2; break;                                  // BININT2 EXT2
      case 'J': case 'j': case 'r': case 0x84: fixed = 4; break;              // BININT LONG_BINGET LONG_BINPUT EXT4
      case 'G': case 0x95: fixed = 8; break;                                  // BINFLOAT FRAME
      case 0x8a: case 'U': case 'C': case 0x8c: len = 1; break;  // LONG1 SHORT_BINSTRING SHORT_BINBYTES SHORT_BINUNICODE
      case 0x8b: case 'T': case 'B': case 'X': len = 4; break;   // LONG4 BINSTRING BINBYTES BINUNICODE
      case 0x8d: case 0x8e: case 0x96: len = 8; break;           // BINUNICODE8 BINBYTES8 BYTEARRAY8
      case 'I': case 'L': case 'S': case 'V': case 'F': case 'p': case 'g': case 'P':  // protocol 0: one line
        skip_line();
        break;
      case 'c': case 'i':  // GLOBAL, INST: module and name lines
        skip_line();
        skip_line();
        containers += op == 'i';
        break;
      case ']': case '}': case ')': case 0x8f: case 'l': case 't': case 'd': case 0x91:  // lists, dicts, tuples, sets
      case 0x85: case 0x86: case 0x87: case 'R': case 0x81: case 0x92: case 'o': case 'b':  // TUPLE1-3, objects
        ++containers;
        break;
      case '(': case '.': case '0': case '1': case '2': case 'N': case 0x88: case 0x89: case 'a': case 'e':
      case 's': case 'u': case 'Q': case 0x90: case 0x93: case 0x94: case 0x97: case 0x98:
        break;  // no argument
      default:
        fail(path, "data.pkl", "byte " + std::to_string(op) + " at offset " + std::to_string(i - 1) +
                                   " is no pickle opcode: the file is damaged");
    }
    if (len > 0) {
      if (i + static_cast<size_t>(len) > n) break;
      const uint64_t m = le(i, len);
      i += static_cast<size_t>(len);
      if (m > n - i) break;  // cut short: the unpickler says so
      i += static_cast<size_t>(m);
    }
    i += static_cast<size_t>(fixed);
    if (containers > kMaxPickleContainers)
      fail(path, "data.pkl", "more than " + std::to_string(kMaxPickleContainers) +
                                 " containers (a state dict has some six a tensor): refused, as nesting that deep "
                                 "crashes LibTorch");
    if (op == '.') break;  // STOP
  }
}
// LibTorch's reader takes a record's bytes as they are: a record cut short (an empty
// data/N entry) left a tensor whose view ran past its storage, and reading it
// crashed or gave whatever lay beyond.
void check_within_storage(const torch::Tensor& t, const std::string& path, const std::string& name) {
  if (t.numel() == 0) return;
  uint64_t last = static_cast<uint64_t>(t.storage_offset());  // last element's index
  bool overflow = t.storage_offset() < 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    uint64_t step = 0;
    overflow = overflow || t.stride(d) < 0 ||
               __builtin_mul_overflow(static_cast<uint64_t>(t.size(d) - 1), static_cast<uint64_t>(t.stride(d)), &step) ||
               __builtin_add_overflow(last, step, &last);
  }
  uint64_t need = 0;
  overflow = overflow || __builtin_add_overflow(last, uint64_t{1}, &need) ||
             __builtin_mul_overflow(need, static_cast<uint64_t>(t.element_size()), &need);
  const uint64_t have = t.storage().nbytes();
  if (overflow || need > have)
    fail(path, "tensor '" + name + "'",
         "its shape and strides need " + (overflow ? std::string("more than 2^64") : std::to_string(need)) +
             " bytes of its storage record, which holds " + std::to_string(have) + ": the file is damaged");
  // Strides of 0 (or overlapping rows) repeat elements: a 320 KB shard claiming a
  // (2^31, 64) tensor of stride (0, 1) fit its storage, and making it contiguous asked
  // for 512 GB. A state dict's tensors never overlap.
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(t.numel()), static_cast<uint64_t>(t.element_size()), &bytes) ||
      bytes > have)
    fail(path, "tensor '" + name + "'",
         "its " + std::to_string(t.numel()) + " elements need " + std::to_string(bytes) +
             " bytes, more than its storage record holds (" + std::to_string(have) +
             "): strides that repeat elements; the file is damaged");
}
}  // namespace

// Onto the CPU: older peft saved an adapter where the model was, often on a GPU
// (map_location="cpu").
std::shared_ptr<SafetensorsFile> read_pickled_tensors(const std::string& path) {
  if (!std::filesystem::is_regular_file(path)) fail(path, "", "cannot read: not a file");
  // LibTorch's unpickler has no OrderedDict, the type of a module's state_dict(): it
  // gives None, or fails inside.
  const std::string ordered =
      "holds an OrderedDict (a state_dict() as it is), which LibTorch cannot read: save it as a plain dict, in "
      "Python: torch.save(dict(torch.load(F)), F), or as safetensors";
  // torch.save before 1.6 (or with _use_new_zipfile_serialization=False) wrote a bare
  // pickle stream, which LibTorch cannot read; it called such a file corrupted.
  {
    std::ifstream f(path, std::ios::binary);
    char head[2] = {0, 0};
    f.read(head, 2);
    if (f.gcount() == 2 && static_cast<unsigned char>(head[0]) == 0x80 && head[1] >= 2 && head[1] <= 5)
      fail(path, "", "a torch.save file in the legacy (non-zip) format, which LibTorch cannot read: re-save it in "
                     "Python: torch.save(torch.load(F), F), or as safetensors");
  }
  c10::IValue v;
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    if (reader.hasRecord("data.pkl")) {
      auto [pkl, size] = reader.getRecord("data.pkl");
      check_pickle_size(static_cast<const uint8_t*>(pkl.get()), size, path);
    }
    // The storages from their records, each as long as its record really is: left to
    // itself the unpickler sizes a storage by the element count the pickle states,
    // whatever the record holds, and check_within_storage would pass a cut record.
    auto storages = std::make_shared<torch::jit::DeserializationStorageContext>();
    for (const auto& rec : reader.getAllRecords()) {
      if (rec.rfind("data/", 0) != 0) continue;  // torch.save's layout: data/KEY
      auto [ptr, size] = reader.getRecord(rec);
      storages->addStorage(rec.substr(5), c10::Storage(c10::Storage::use_byte_size_t(), size, std::move(ptr),
                                                       /*allocator=*/nullptr, /*resizable=*/false));
    }
    v = torch::jit::readArchiveAndTensors("data", "", "", std::nullopt, std::nullopt, torch::Device(torch::kCPU),
                                          reader, torch::jit::Unpickler::defaultTypeParser, storages);
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    if (what.find("got None") != std::string::npos) fail(path, "", ordered);
    fail(path, "", "cannot read it as a torch.save file: " + first_line(what));
  }
  if (v.isNone()) fail(path, "", ordered);
  if (!v.isGenericDict()) fail(path, "", "expected a dict of tensors (torch.save of a state dict)");
  // The entries point into the tensors themselves, which the file object keeps.
  auto held = std::make_shared<std::vector<torch::Tensor>>();
  std::vector<TensorInfo> infos;
  for (const auto& kv : v.toGenericDict()) {
    if (!kv.key().isString()) fail(path, "", "a key that is not a string");
    const std::string name = kv.key().toStringRef();
    if (!kv.value().isTensor()) fail(path, "tensor '" + name + "'", "not a tensor");
    const auto& raw = kv.value().toTensor();
    // Every storage is read onto the CPU from its record; a "meta" location makes a
    // tensor without data, which nothing can copy.
    if (!raw.device().is_cpu())
      fail(path, "tensor '" + name + "'", "stored on device " + raw.device().str() + ", which holds no data");
    check_within_storage(raw, path, name);
    auto t = raw.to(torch::kCPU).contiguous();
    const auto st = t.scalar_type();
    if (st != torch::kFloat32 && st != torch::kFloat16 && st != torch::kBFloat16)
      fail(path, "tensor '" + name + "'", std::string("dtype ") + c10::toString(st) + " is not a float type");
    TensorInfo ti;
    ti.name = name;
    ti.dtype = from_torch_dtype(st, path + ": tensor '" + name + "'");
    ti.shape = t.sizes().vec();
    ti.nbytes = static_cast<size_t>(t.numel() * t.element_size());
    ti.data = t.data_ptr();
    held->push_back(t);
    infos.push_back(std::move(ti));
  }
  return std::make_shared<SafetensorsFile>(path, std::move(infos), held);
}

std::shared_ptr<SafetensorsCheckpoint> open_checkpoint(const std::string& path) {
  return std::make_shared<SafetensorsCheckpoint>(path, read_pickled_tensors);
}

std::shared_ptr<SafetensorsFile> open_adapter_weights(const std::string& dir) {
  const auto d = std::filesystem::path(dir);
  if (std::filesystem::exists(d / "adapter_model.safetensors"))
    return std::make_shared<SafetensorsFile>((d / "adapter_model.safetensors").string());
  if (std::filesystem::exists(d / "adapter_model.bin")) return read_pickled_tensors((d / "adapter_model.bin").string());
  fail(dir, "adapter_model.safetensors", "missing (the adapter has a config but no weights)");
}

std::shared_ptr<SafetensorsFile> open_trainable_params(const std::string& dir) {
  const auto p = std::filesystem::path(dir) / "trainable_params.bin";
  return std::filesystem::exists(p) ? read_pickled_tensors(p.string()) : nullptr;
}

torch::ScalarType to_torch_dtype(DType d) {
  switch (d) {
    case DType::F32: return torch::kFloat32;
    case DType::F16: return torch::kFloat16;
    case DType::BF16: return torch::kBFloat16;
    case DType::I64: return torch::kInt64;
    case DType::I32: return torch::kInt32;
    case DType::U8: return torch::kUInt8;
  }
  return torch::kFloat32;
}

DType from_torch_dtype(torch::ScalarType t, const std::string& what) {
  switch (t) {
    case torch::kFloat32: return DType::F32;
    case torch::kFloat16: return DType::F16;
    case torch::kBFloat16: return DType::BF16;
    case torch::kInt64: return DType::I64;
    case torch::kInt32: return DType::I32;
    case torch::kUInt8: return DType::U8;
    default: throw Error(what + ": dtype " + std::string(c10::toString(t)) + " cannot be saved");
  }
}

torch::Tensor view_tensor(const TensorInfo& t, std::shared_ptr<const void> owner) {
  auto keep = new std::shared_ptr<const void>(std::move(owner));
  return torch::from_blob(const_cast<void*>(t.data), t.shape,
                          [keep](void*) { delete keep; },
                          torch::dtype(to_torch_dtype(t.dtype)));
}

std::map<std::string, torch::Tensor> load_tensors(const std::string& path) {
  auto ckpt = open_checkpoint(path);
  std::map<std::string, torch::Tensor> out;
  for (const auto& n : ckpt->names()) out[n] = view_tensor(ckpt->get(n), ckpt);
  return out;
}

FileDigest save_tensors(const std::string& path,
                        const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  std::vector<TensorToWrite> entries;
  for (const auto& [name, t] : tensors) {
    TensorToWrite e;
    e.name = name;
    e.dtype = from_torch_dtype(t.scalar_type(), path + ": tensor '" + name + "'");
    e.shape = t.sizes().vec();
    torch::Tensor src = t;
    e.write = [src](const std::function<void(const void*, size_t)>& sink) {
      auto c = src.detach().to(torch::kCPU).contiguous();
      sink(c.data_ptr(), c.numel() * c.element_size());
    };
    entries.push_back(std::move(e));
  }
  return write_safetensors(path, entries, metadata);
}

}  // namespace longlora::io
