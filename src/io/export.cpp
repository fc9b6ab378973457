#include "longlora/io/export.h"

#include <fcntl.h>
#include <ftw.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "longlora/common/error.h"
#include "longlora/common/fs.h"
#include "longlora/common/interrupt.h"
#include "longlora/common/json_file.h"
#include "longlora/common/strings.h"
#include "longlora/io/adapter.h"
#include "longlora/io/checksum.h"
#include "longlora/io/hf_config.h"
#include "longlora/io/safetensors.h"
#include "longlora/io/tensors.h"
#include "longlora/model/loader.h"

namespace fs = std::filesystem;
using nlohmann::json;
using nlohmann::ordered_json;

namespace longlora::io {

// ---------------------------------------------------------------------------
// --max-shard-size

uint64_t parse_size(const std::string& s, const std::string& what) {
  auto bad = [&]() -> uint64_t {
    fail(what, "", "'" + s + "' is not a size (examples: 5GB, 500MB, 100KB, 2GiB, 1048576)");
  };
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  if (i == 0) return bad();
  double value = 0;
  try {
    size_t used = 0;
    value = std::stod(s.substr(0, i), &used);
    if (used != i) return bad();
  } catch (const std::exception&) {
    return bad();
  }
  size_t j = i;
  while (j < s.size() && s[j] == ' ') ++j;
  std::string unit;
  for (; j < s.size(); ++j) unit.push_back(static_cast<char>(std::toupper(static_cast<unsigned char>(s[j]))));
  static const std::map<std::string, double> units = {
      {"", 1.0},      {"B", 1.0},           {"KB", 1e3},          {"MB", 1e6},
      {"GB", 1e9},    {"TB", 1e12},         {"KIB", 1024.0},      {"MIB", 1048576.0},
      {"GIB", 1073741824.0}, {"TIB", 1099511627776.0}};
  auto it = units.find(unit);
  if (it == units.end()) return bad();
  const double bytes = std::floor(value * it->second);
  if (!(bytes >= 1.0)) fail(what, "", "'" + s + "': must be at least 1 byte");
  if (bytes > 1.8e19) fail(what, "", "'" + s + "': past 2^64 bytes");
  return static_cast<uint64_t>(bytes);
}

namespace {

// ---------------------------------------------------------------------------
// small helpers

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "", "cannot open");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

json read_json(const std::string& path) { return read_json_file(path); }

// POSIX writes so a full disk (ENOSPC) or a file size limit (EFBIG) is reported as such.
void write_text(const std::string& path, const std::string& text) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(path, "", std::string("cannot write: ") + std::strerror(errno));
  const char* p = text.data();
  size_t n = text.size();
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      const std::string why = std::strerror(w < 0 ? errno : ENOSPC);
      ::close(fd);
      fail(path, "", "write failed: " + why);
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) fail(path, "", std::string("write failed: ") + std::strerror(errno));
}

void copy_small_file(const fs::path& from, const fs::path& to) {
  // Through write_text's path (not fs::copy_file) so errors read the same; these files are small.
  write_text(to.string(), read_text(from.string()));
}

void fsync_dir(const fs::path& p) {
  int fd = ::open(p.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

DType dtype_from_flag(const std::string& s) {
  if (s == "bf16" || s == "bfloat16") return DType::BF16;
  if (s == "fp16" || s == "float16") return DType::F16;
  if (s == "fp32" || s == "float32") return DType::F32;
  fail("--dtype", "", "'" + s + "' is not one of bf16, fp16, fp32");
}

// config.json's torch_dtype -> DType (anything else, e.g. "auto": fp32).
DType dtype_from_config(const std::string& s) {
  if (s == "bfloat16") return DType::BF16;
  if (s == "float16") return DType::F16;
  return DType::F32;
}

const char* torch_dtype_name(DType d) {
  switch (d) {
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
    default: return "float32";
  }
}

// Hugging Face order: model.embed_tokens, model.layers.0 ... N (numerically), model.norm, lm_head.
bool hf_order(const std::string& a, const std::string& b) {
  const bool la = a.rfind("lm_head", 0) == 0, lb = b.rfind("lm_head", 0) == 0;
  if (la != lb) return lb;
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (std::isdigit(static_cast<unsigned char>(a[i])) && std::isdigit(static_cast<unsigned char>(b[j]))) {
      size_t ie = i, je = j;
      while (ie < a.size() && std::isdigit(static_cast<unsigned char>(a[ie]))) ++ie;
      while (je < b.size() && std::isdigit(static_cast<unsigned char>(b[je]))) ++je;
      const std::string na = a.substr(i, ie - i), nb = b.substr(j, je - j);
      if (na.size() != nb.size()) return na.size() < nb.size();
      if (na != nb) return na < nb;
      i = ie;
      j = je;
      continue;
    }
    if (a[i] != b[j]) return a[i] < b[j];
    ++i;
    ++j;
  }
  return a.size() - i < b.size() - j;
}

// Drops the pages of [p, p+n) of a read-only file mapping from this process's
// resident set (they stay in the page cache; touching them again re-reads
// them). Without this every tensor read through the mapping would stay counted
// in the RSS until the file is unmapped, and a 70B merge would show ~140 GB
// resident even though no memory is allocated for it.
void release_pages(const void* p, size_t n) {
  if (n == 0) return;
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t b = reinterpret_cast<uintptr_t>(p) & ~(page - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + n + page - 1) & ~(page - 1);
  ::madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
}

// rm -rf. Not std::filesystem::remove_all: in this binary that symbol binds to
// the copy inside libtorch.so, which crashes on a non-empty directory.
void remove_tree(const fs::path& p) {
  struct stat st {};
  if (::lstat(p.c_str(), &st) != 0) return;
  if (!S_ISDIR(st.st_mode)) {
    ::unlink(p.c_str());
    return;
  }
  ::nftw(
      p.c_str(),
      [](const char* path, const struct stat*, int type, struct FTW*) {
        if (type == FTW_DP) ::rmdir(path);
        else ::unlink(path);
        return 0;
      },
      16, FTW_DEPTH | FTW_PHYS);
}

// /proc/self/status field in KiB (-1 if unavailable).
int64_t proc_status_kib(const std::string& key) {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind(key + ":", 0) == 0) return std::atoll(line.c_str() + key.size() + 1);
  return -1;
}

// ---------------------------------------------------------------------------
// What to write

using Sink = std::function<void(const void*, size_t)>;

// One output tensor: `src` (mapped, or held in memory) cast to `dtype`, plus scale * B @ A
// when merged.
struct OutTensor {
  std::string name;
  DType dtype;
  const TensorInfo* src = nullptr;
  std::shared_ptr<const void> owner;  // keeps src's bytes alive
  std::string file;                   // where src was read, for messages
  const TensorInfo* lora_a = nullptr;
  const TensorInfo* lora_b = nullptr;
  std::shared_ptr<const void> lora_owner;
  std::string lora_file;  // the adapter's weights file, for messages
  double scale = 0;
  // Drop the source pages after writing: for large inputs, and only where they are a
  // file mapping (SafetensorsFile::mapped); madvise on a pickle's heap memory frees it.
  bool release = false;

  size_t nbytes() const { return tensor_nbytes(dtype, src->shape); }
};

// Rows per chunk: ~256K elements (1 MB in fp32), so memory is a few chunks whatever the tensor.
constexpr int64_t kChunkElems = int64_t(1) << 18;

void write_tensor(const OutTensor& t, const Sink& sink) {
  const TensorInfo& s = *t.src;
  const int64_t numel = s.numel();
  if (numel == 0) return;
  interrupt_test_pause();
  const bool merge = t.lora_a != nullptr;
  const bool cast = is_float(s.dtype) && s.dtype != t.dtype;
  if (!merge && !cast) {
    // Same bytes: straight from the mapping, in chunks so the pages can be dropped as we go.
    const auto* p = static_cast<const char*>(s.data);
    const size_t esize = dtype_size(s.dtype);
    const size_t chunk = static_cast<size_t>(kChunkElems) * esize;
    // Checked as the merge and cast paths check theirs: a NaN in a full fine-tuning
    // checkpoint (or a base weight no adapter touches) would be exported as a model that
    // loads and produces garbage. The bytes are read to be copied anyway.
    for (size_t off = 0; off < s.nbytes; off += chunk) {
      check_interrupt();  // a signal stops at the next chunk; OutputDir removes the temporary
      const size_t n = std::min(chunk, s.nbytes - off);
      if (!all_finite(p + off, n / esize, s.dtype))
        fail(t.file, "tensor '" + t.name + "'", "non-finite values in the source weight (exported as stored); nothing written");
      sink(p + off, n);
      if (t.release) release_pages(p + off, n);
    }
    return;
  }
  const int64_t rows = s.shape.empty() ? 1 : s.shape[0];
  const int64_t cols = rows == 0 ? 0 : numel / rows;
  auto src = view_tensor(s, t.owner).reshape({rows, cols});
  torch::Tensor a, b;
  if (merge) {
    a = view_tensor(*t.lora_a, t.lora_owner).to(torch::kFloat32);  // [r, in]
    b = view_tensor(*t.lora_b, t.lora_owner).to(torch::kFloat32);  // [out, r]
    // Checked before the merge so the message names the adapter, not the base weight.
    for (const auto& [info, f] : {std::pair{t.lora_a, a}, std::pair{t.lora_b, b}})
      if (!torch::isfinite(f).all().item<bool>())
        fail(t.lora_file, "tensor '" + info->name + "'", "non-finite values in the adapter; nothing written");
  }
  const int64_t step = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(1, cols));
  const size_t row_bytes = static_cast<size_t>(cols) * dtype_size(s.dtype);
  const auto out_dtype = to_torch_dtype(t.dtype);
  torch::NoGradGuard no_grad;
  // Two scratch buffers of one chunk, reused for every chunk (no allocation per chunk).
  const int64_t cap = std::min(rows, step) * cols;
  torch::Tensor acc = merge ? torch::empty({cap}, torch::kFloat32) : torch::Tensor();
  torch::Tensor cast_buf = (!merge || out_dtype != torch::kFloat32) ? torch::empty({cap}, out_dtype) : torch::Tensor();
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    check_interrupt();
    const int64_t r1 = std::min(rows, r0 + step);
    const torch::Tensor chunk = src.slice(0, r0, r1);
    torch::Tensor out;
    if (merge) {
      // W' = W + (B @ A) * scale, in fp32 (as peft's merge_and_unload), cast once.
      auto d = acc.narrow(0, 0, (r1 - r0) * cols).view({r1 - r0, cols});
      torch::mm_out(d, b.slice(0, r0, r1), a);
      d.mul_(t.scale);
      d.add_(chunk);  // a bf16/fp16 W is promoted to fp32 exactly
      out = d;
    } else {
      out = chunk;
    }
    if (out.scalar_type() != out_dtype) {
      auto c = cast_buf.narrow(0, 0, (r1 - r0) * cols).view({r1 - r0, cols});
      c.copy_(out);
      out = c;
    }
    // A NaN in the adapter, or a merged value past fp16's range, would be written as
    // a model that loads and produces garbage.
    if (!torch::isfinite(out).all().item<bool>())
      fail(t.file, "tensor '" + t.name + "'", std::string("non-finite values after the ") + (merge ? "merge" : "cast") + " to " +
                           torch_dtype_name(t.dtype) + (merge ? " (past the dtype's range)" : "") +
                           "; nothing written");
    sink(out.data_ptr(), static_cast<size_t>(out.numel()) * out.element_size());
    if (t.release)
      release_pages(static_cast<const char*>(s.data) + static_cast<size_t>(r0) * row_bytes,
                    static_cast<size_t>(r1 - r0) * row_bytes);
  }
}

TensorToWrite to_write(const OutTensor& t) {
  TensorToWrite w;
  w.name = t.name;
  w.dtype = t.dtype;
  w.shape = t.src->shape;
  w.write = [&t](const Sink& sink) { write_tensor(t, sink); };
  return w;
}

// ---------------------------------------------------------------------------
// Inputs

struct Source {
  fs::path dir;
  bool adapter = false;    // LoRA adapter (training checkpoint or peft dir); else full fine-tuning
  bool training = false;   // a training checkpoint (run_config.json / trainer_state.json)
  std::string base;        // base model dir ("" = unknown)
  std::optional<double> trained_factor;
};

Source resolve_source(const ExportOptions& opt) {
  Source s;
  s.dir = fs::path(opt.checkpoint);
  const std::string dir = opt.checkpoint;
  if (!fs::exists(s.dir)) fail(dir, "", "checkpoint directory not found");
  if (!fs::is_directory(s.dir)) fail(dir, "", "not a directory (expected checkpoint-STEP or a peft adapter directory)");
  const bool acfg = fs::exists(s.dir / "adapter_config.json");
  const bool ast = fs::exists(s.dir / "adapter_model.safetensors") || fs::exists(s.dir / "adapter_model.bin");
  const bool full = has_weight_files(dir);
  s.training = model::is_training_checkpoint(dir);
  if (acfg || ast) {
    if (!acfg) fail(dir, "adapter_config.json", "missing (the adapter has weights but no config)");
    if (!ast) fail(dir, "adapter_model.safetensors", "missing (the adapter has a config but no weights)");
    s.adapter = true;
  } else if (!full) {
    fail(dir, "adapter_config.json",
         "missing: neither a LoRA checkpoint / peft adapter (adapter_config.json + "
         "adapter_model.safetensors) nor a full fine-tuning checkpoint (model.safetensors or pytorch_model.bin, "
         "or their shards' index)");
  }
  s.trained_factor = model::trained_rope_factor(dir);  // also: a training checkpoint must be COMPLETE
  verify_checkpoint_files(dir, false);
  std::string from_run_config;
  bool random_init = false;  // the run drew its weights (model.init "random"): model.path holds none
  const std::string rc_path = (s.dir / "run_config.json").string();
  if (fs::exists(rc_path)) {
    const json rc = read_json(rc_path);
    if (rc.contains("model") && rc["model"].is_object()) {
      const json& m = rc["model"];
      if (m.contains("path") && m["path"].is_string()) from_run_config = m["path"].get<std::string>();
      random_init = m.contains("init") && m["init"] == "random";
    }
  }
  if (random_init && opt.base.empty()) {
    // A full fine-tuning checkpoint holds every weight, its config.json and tokenizer;
    // an adapter trained on drawn weights has nothing saved to merge into.
    if (s.adapter && opt.format == "merged")
      fail(rc_path, "model.init",
           "\"random\": the run's base weights were drawn at start and never saved, so there is nothing to "
           "merge the adapter into; export --format peft, or pass --base DIR");
    from_run_config.clear();
  }
  if (!opt.base.empty()) {
    if (!fs::is_directory(opt.base)) fail(opt.base, "", "base model directory not found (--base)");
    s.base = opt.base;
  } else if (!from_run_config.empty()) {
    if (!fs::is_directory(from_run_config)) {
      if (s.adapter && opt.format == "merged")
        fail(rc_path, "model.path", "base model directory '" + from_run_config + "' not found; pass --base DIR");
      spdlog::warn("export: base model '{}' (run_config.json model.path) not found; tokenizer files are not copied",
                   from_run_config);
    } else {
      s.base = from_run_config;
    }
  }
  if (s.base.empty() && s.adapter && opt.format == "merged")
    fail(dir, "--base", fs::exists(rc_path)
                            ? "run_config.json names no base model (model.path); pass --base DIR"
                            : "a peft adapter directory does not say where its base model is; pass --base DIR");
  return s;
}

// A LoRA adapter, its tensors sorted by role and checked against its own
// adapter_config.json (what needs no base model): peft keys, float dtypes, lora_A /
// lora_B in pairs of rank r on target_modules, other tensors only for modules_to_save
// or peft's saved embedding layers (embed_tokens, lm_head).
struct AdapterPlan {
  AdapterConfig cfg;
  std::shared_ptr<SafetensorsFile> file;
  std::string file_path;
  // Keyed by the base weight's name (model.layers.0.self_attn.q_proj.weight).
  std::map<std::string, const TensorInfo*> lora_a, lora_b, replace;
  // LongLoRA's trainable_params.bin: base weights its scripts load before the adapter.
  std::shared_ptr<SafetensorsFile> trainable;
};

AdapterPlan open_adapter(const fs::path& dir) {
  AdapterPlan p;
  p.cfg = load_adapter_config((dir / "adapter_config.json").string());
  p.file = open_adapter_weights(dir.string());
  p.file_path = p.file->path();
  p.trainable = open_trainable_params(dir.string());
  const std::string prefix = kPeftPrefix;
  const std::string& st = p.file_path;
  const int64_t r = p.cfg.r;
  for (const auto& t : p.file->tensors()) {
    const std::string field = "tensor '" + t.name + "'";
    if (t.name.rfind(prefix, 0) != 0)
      fail(st, field, "not a peft key (expected the '" + prefix + "' prefix)");
    if (!is_float(t.dtype)) fail(st, field, std::string("dtype ") + dtype_name(t.dtype) + " is not a float type");
    const std::string rest = t.name.substr(prefix.size());
    const bool is_a = ends_with(rest, ".lora_A.weight"), is_b = ends_with(rest, ".lora_B.weight");
    if (!is_a && !is_b) {
      if (rest.find(".lora_") != std::string::npos)
        fail(st, field, "unsupported LoRA tensor (only lora_A / lora_B of Linear layers are merged)");
      if (!model::is_module_to_save(rest, p.cfg.modules_to_save) && !is_embedding_layer(rest))
        fail(st, field, "replaces a base weight but its module is not in modules_to_save");
      p.replace[rest] = &t;
      continue;
    }
    const std::string mod = rest.substr(0, rest.size() - 14);
    // eval --adapter adds LoRA only to target_modules (and refuses other factors);
    // peft ignores them. Merging them would give a third model.
    if (!model::is_lora_target(mod, p.cfg.target_modules))
      fail(st, field, "LoRA factor of '" + mod + "', a module adapter_config.json target_modules does not name");
    // A is [r, in], B is [out, r]; in and out need the base, r does not.
    const bool fits = t.shape.size() == 2 && t.shape[is_a ? 0 : 1] == r;
    if (!fits)
      fail(st, field,
           "shape " + shape_str(t.shape) + " does not fit r = " + std::to_string(r) + " of adapter_config.json (expected " +
               (is_a ? "[" + std::to_string(r) + ", in_features]" : "[out_features, " + std::to_string(r) + "]") + ")");
    (is_a ? p.lora_a : p.lora_b)[mod + ".weight"] = &t;
  }
  for (const auto& [w, b] : p.lora_b)
    if (!p.lora_a.count(w))
      fail(st, "tensor '" + prefix + w.substr(0, w.size() - 7) + ".lora_A.weight'", "missing (lora_B is there)");
  for (const auto& [w, a] : p.lora_a)
    if (!p.lora_b.count(w))
      fail(st, "tensor '" + prefix + w.substr(0, w.size() - 7) + ".lora_B.weight'", "missing (lora_A is there)");
  return p;
}

// Output tensors of base + adapter, merged; validates every adapter tensor
// against the base (shapes, targets) before anything is written.
// `untied` (optional) is set when the adapter parts a tied base's embeddings (see
// model::unties_embeddings): the merged config.json must then say they are not tied.
std::vector<OutTensor> plan_merge(const AdapterPlan& ap, const std::shared_ptr<SafetensorsCheckpoint>& base,
                                  const std::string& base_dir, DType out_dtype, bool* untied = nullptr) {
  const std::string prefix = kPeftPrefix;
  const std::string& st = ap.file_path;
  const auto& lora_a = ap.lora_a;
  const auto& lora_b = ap.lora_b;
  auto replace = ap.replace;
  const std::string embed = "model.embed_tokens.weight", head = "lm_head.weight";
  // Untied here: lm_head.weight's source, the adapter's or the base's one matrix.
  const TensorInfo* head_src = nullptr;
  const bool base_tied = load_model_config((fs::path(base_dir) / "config.json").string()).tie_word_embeddings;
  // trainable_params.bin's embedding of a tied base (either name fills the one matrix),
  // loaded before the adapter.
  const TensorInfo* trained_embed = nullptr;
  if (base_tied && ap.trainable)
    for (const auto& n : {head, embed})
      if (ap.trainable->contains(n)) trained_embed = &ap.trainable->get(n);
  // Which file an entry is from, so that it stays mapped (or held) while written.
  auto from_trainable = [&](const TensorInfo* t) {
    return ap.trainable && ap.trainable->contains(t->name) && &ap.trainable->get(t->name) == t;
  };
  auto owner_of = [&](const TensorInfo* t) -> std::shared_ptr<const void> {
    if (from_trainable(t)) return ap.trainable;
    if (base->contains(t->name) && &base->get(t->name) == t) return base;
    return ap.file;
  };
  auto file_of = [&](const TensorInfo* t) -> std::string {
    if (from_trainable(t)) return ap.trainable->path();
    if (base->contains(t->name) && &base->get(t->name) == t) return base->file_of(t->name).path();
    return st;
  };
  // A tensor that takes the place of the base's `base_name` must have its shape.
  auto check_against = [&](const TensorInfo* t, const std::string& base_name) {
    const std::string field = "tensor '" + t->name + "'";
    const std::string& file = from_trainable(t) ? ap.trainable->path() : st;
    if (!base->contains(base_name)) fail(file, field, "no tensor '" + base_name + "' in the base model " + base_dir);
    const auto& w = base->get(base_name);
    if (const auto msg = vocabulary_mismatch(base_name, t->shape, w.shape); !msg.empty())
      fail(file, field, msg + " (" + base->file_of(base_name).path() + ")");
    if (w.shape != t->shape)
      fail(file, field, "shape " + shape_str(t->shape) + " but the base model's '" + base_name + "' is " +
                            shape_str(w.shape) + " (" + base->file_of(base_name).path() + ")");
  };
  if (base_tied && model::unties_embeddings(*ap.file, ap.cfg)) {
    // As peft loads it (and eval --adapter): each layer its own saved matrix, else the
    // base's (as trainable_params.bin left it). The base's lm_head.weight, if its
    // checkpoint has one, is not what transformers uses for a tied model: the embedding is.
    if (!base->contains(embed)) fail(st, "tensor '" + prefix + embed + "'", "no tensor '" + embed + "' in the base model " + base_dir);
    const auto h = replace.find(head);
    head_src = h != replace.end() ? h->second : trained_embed ? trained_embed : &base->get(embed);
    check_against(head_src, embed);  // the base may store no lm_head.weight
    replace.erase(head);
    if (untied) *untied = true;
    spdlog::info("export: {} gives embed_tokens and lm_head matrices of their own (modules_to_save), as peft loads "
                 "it; the merged model's config.json sets tie_word_embeddings false",
                 st);
  } else if (base_tied) {
    // One matrix for both layers, as eval --adapter loads it; a checkpoint's lm_head.weight
    // beside it (transformers ignores it) is written as the same matrix.
    const std::string key = tied_embedding_key(*ap.file);
    replace.erase("model.embed_tokens.weight");
    replace.erase("lm_head.weight");
    if (!key.empty())
      for (const char* w : {"model.embed_tokens.weight", "lm_head.weight"})
        if (base->contains(w)) replace[w] = &ap.file->get(key);
  }
  if (ap.trainable) {
    // Loaded into the base before the adapter (LongLoRA's load_state_dict), so the
    // adapter's own saved modules, already in `replace`, win.
    const std::string& tp = ap.trainable->path();
    for (const auto& t : ap.trainable->tensors()) {
      std::vector<std::string> names{t.name};
      if (base_tied && is_embedding_layer(t.name)) {
        if (&t != trained_embed) continue;  // both saved: the one loaded last, as load_state_dict
        names = head_src ? std::vector<std::string>{embed} : std::vector<std::string>{embed, head};
      }
      for (const auto& n : names) {
        if (n == head && base_tied && !base->contains(head)) continue;
        if (!base->contains(n)) fail(tp, "tensor '" + t.name + "'", "not a weight of the base model " + base_dir);
        replace.emplace(n, &t);
      }
    }
  }
  for (const auto& [rest, t] : replace) check_against(t, rest);
  std::set<std::string> targets_hit;
  for (const auto& [w, a] : lora_a) {
    const std::string a_key = a->name;
    const TensorInfo* b = lora_b.at(w);
    if (!base->contains(w)) fail(st, "tensor '" + a_key + "'", "no weight '" + w + "' in the base model " + base_dir);
    const auto& wi = base->get(w);
    if (wi.shape.size() != 2)
      fail(st, "tensor '" + a_key + "'", "base weight '" + w + "' is not a matrix: " + shape_str(wi.shape));
    const int64_t out = wi.shape[0], in = wi.shape[1];
    if (a->shape != std::vector<int64_t>{ap.cfg.r, in})
      fail(st, "tensor '" + a_key + "'",
           "shape " + shape_str(a->shape) + " does not fit the base weight '" + w + "' " + shape_str(wi.shape) +
               " with r = " + std::to_string(ap.cfg.r) + " (expected " + shape_str({ap.cfg.r, in}) + "; " +
               base->file_of(w).path() + ")");
    if (b->shape != std::vector<int64_t>{out, ap.cfg.r})
      fail(st, "tensor '" + b->name + "'",
           "shape " + shape_str(b->shape) + " does not fit the base weight '" + w + "' " + shape_str(wi.shape) +
               " with r = " + std::to_string(ap.cfg.r) + " (expected " + shape_str({out, ap.cfg.r}) + "; " +
               base->file_of(w).path() + ")");
    const std::string mod = w.substr(0, w.size() - 7);
    for (const auto& t : ap.cfg.target_modules)
      if (model::is_lora_target(mod, t)) targets_hit.insert(t);
  }
  // Every base Linear that target_modules names must have its factors.
  for (const auto& name : base->names()) {
    if (!ends_with(name, ".weight") || base->get(name).shape.size() != 2) continue;
    const std::string mod = name.substr(0, name.size() - 7);
    if (lora_a.count(name)) continue;
    for (const auto& t : ap.cfg.target_modules)
      if (model::is_lora_target(mod, t))
        fail(st, "tensor '" + prefix + mod + ".lora_A.weight'",
             "missing (adapter_config.json target_modules lists '" + t + "')");
  }
  for (const auto& t : ap.cfg.target_modules)
    if (!targets_hit.count(t))
      fail((fs::path(ap.file_path).parent_path() / "adapter_config.json").string(), "target_modules",
           "'" + t + "' has no LoRA factors in the adapter / matches no weight of the base model " +
                                     base_dir);

  // lm_head.weight of a merge that parts a tied base's embeddings.
  auto head_out = [&] {
    OutTensor o;
    o.name = head;
    o.src = head_src;
    o.owner = owner_of(head_src);
    o.file = file_of(head_src);
    o.dtype = is_float(o.src->dtype) ? out_dtype : o.src->dtype;
    return o;
  };
  std::vector<OutTensor> out;
  const double scale = ap.cfg.scale();
  for (const auto& name : base->names()) {
    if (is_stale_buffer(name)) continue;
    OutTensor o;
    o.name = name;
    if (auto it = replace.find(name); it != replace.end()) {
      o.src = it->second;
      o.owner = owner_of(it->second);
      o.file = file_of(it->second);
    } else {
      o.src = &base->get(name);
      o.owner = base;
      o.file = base->file_of(name).path();
      o.release = base->file_of(name).mapped();
      if (auto a = lora_a.find(name); a != lora_a.end()) {
        o.lora_a = a->second;
        o.lora_b = lora_b.at(name);
        o.lora_owner = ap.file;
        o.lora_file = ap.file_path;
        o.scale = scale;
      }
    }
    if (head_src && name == head) {  // LoRA factors of lm_head, if any, stay
      o.src = head_src;
      o.owner = owner_of(head_src);
      o.release = false;  // not the base's tensor, maybe not a mapping
      o.file = file_of(head_src);
    }
    o.dtype = is_float(o.src->dtype) ? out_dtype : o.src->dtype;
    out.push_back(std::move(o));
  }
  // A tied checkpoint usually stores the embedding alone.
  if (head_src && !base->contains(head)) out.push_back(head_out());
  std::stable_sort(out.begin(), out.end(), [](const OutTensor& a, const OutTensor& b) { return hf_order(a.name, b.name); });
  return out;
}

// ---------------------------------------------------------------------------
// config.json of the merged model

struct RopeChoice {
  bool change = false;  // false: keep the base config's RoPE fields and context as they are
  double factor = 1.0;
};

ordered_json merged_config(const std::string& template_path, DType dtype, const RopeChoice& rope) {
  const std::string text = read_text(template_path);
  ordered_json j;
  try {
    j = ordered_json::parse(text, json_depth_limit<ordered_json>(template_path));
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    fail(template_path, "", std::string("bad JSON: ") + e.what());
  }
  const ModelConfig c = parse_model_config(json::parse(text), template_path);
  if (rope.change) {
    const double f = rope.factor;
    // max_position_embeddings stays the base's: the context is max_position_embeddings
    // x factor, as LongLoRA's merge script, Hugging Face, vLLM and this tool's trainer
    // read it (and as its full fine-tuning checkpoints write it). Scaled here too, a
    // run continued from the export took half the factor it needed, without a warning.
    if (j.contains("rope_parameters") && !j["rope_parameters"].is_null()) {
      // transformers 5 form
      ordered_json r = ordered_json::object();
      if (f != 1.0) {
        r["rope_type"] = "linear";
        r["factor"] = f;
      } else {
        r["rope_type"] = "default";
      }
      r["rope_theta"] = c.rope_theta;
      j["rope_parameters"] = r;
      j.erase("rope_scaling");
    } else {
      j["rope_scaling"] = f != 1.0 ? ordered_json{{"type", "linear"}, {"factor", f}} : ordered_json(nullptr);
    }
  }
  j["torch_dtype"] = torch_dtype_name(dtype);
  if (j.contains("dtype")) j["dtype"] = torch_dtype_name(dtype);  // transformers 5 spelling
  return j;
}

// What a merged model needs beside its weights to tokenize and prompt as the base does.
// transformers >= 4.47 keeps the chat template in chat_template.jinja (or .json) and
// named ones in additional_chat_templates/, no longer in tokenizer_config.json.
bool is_tokenizer_file(const std::string& n) {
  return n.rfind("tokenizer", 0) == 0 || n == "special_tokens_map.json" || n == "added_tokens.json" ||
         n == "generation_config.json" || n == "chat_template.jinja" || n == "chat_template.json" ||
         n == "vocab.json" || n == "merges.txt";
}
const char* const kChatTemplateDir = "additional_chat_templates";

// Copies a folder of small files (additional_chat_templates/) with everything below it.
void copy_small_tree(const fs::path& from, const fs::path& to) {
  std::error_code ec;
  fs::create_directory(to, ec);
  if (ec) fail(to.string(), "", "cannot create the directory: " + ec.message());
  for (const auto& e : fs::directory_iterator(from)) {
    if (e.is_directory() && !e.is_symlink()) copy_small_tree(e.path(), to / e.path().filename());  // no link loops
    else if (e.is_regular_file()) copy_small_file(e.path(), to / e.path().filename());
  }
}

// Copies the tokenizer and chat-template files of `from` into `to`.
void copy_tokenizer_files(const fs::path& from, const fs::path& to) {
  for (const auto& e : fs::directory_iterator(from)) {
    const std::string n = e.path().filename().string();
    if (e.is_regular_file() && is_tokenizer_file(n)) copy_small_file(e.path(), to / n);
    if (e.is_directory() && n == kChatTemplateDir) copy_small_tree(e.path(), to / n);
  }
}

// ---------------------------------------------------------------------------
// Shards

struct Shard {
  std::vector<const OutTensor*> tensors;
  uint64_t bytes = 0;
};

// Hugging Face's rule: start a new shard when the next tensor would push the
// current one past the limit; a tensor larger than the limit gets its own shard.
std::vector<Shard> make_shards(const std::vector<OutTensor>& ts, uint64_t limit) {
  std::vector<Shard> shards(1);
  for (const auto& t : ts) {
    const uint64_t n = t.nbytes();
    if (!shards.back().tensors.empty() && shards.back().bytes + n > limit) shards.emplace_back();
    shards.back().tensors.push_back(&t);
    shards.back().bytes += n;
  }
  return shards;
}

std::string shard_name(size_t i, size_t n) {
  if (n == 1) return "model.safetensors";
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, n);
  return buf;
}

std::string mib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(bytes) / 1048576.0);
  return buf;
}

void write_model(const fs::path& dir, const std::vector<OutTensor>& ts, uint64_t limit) {
  const auto shards = make_shards(ts, limit);
  uint64_t total = 0;
  ordered_json weight_map = ordered_json::object();
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string name = shard_name(i, shards.size());
    std::vector<TensorToWrite> entries;
    for (const auto* t : shards[i].tensors) {
      entries.push_back(to_write(*t));
      weight_map[t->name] = name;
    }
    write_safetensors((dir / name).string(), entries, {{"format", "pt"}});
    total += shards[i].bytes;
    spdlog::info("export: wrote shard {}/{} {} ({} tensors, {})", i + 1, shards.size(), name,
                 shards[i].tensors.size(), mib(shards[i].bytes));
  }
  if (shards.size() > 1) {
    ordered_json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    write_text((dir / "model.safetensors.index.json").string(), index.dump(2) + "\n");
  }
}

// ---------------------------------------------------------------------------
// Checks that need the inputs as a whole

// The checks eval and training make when they load a model directory (every tensor
// config.json implies, of its shape and a float dtype, and nothing else), by the same
// code. On the CPU with no weight dtype the tensors are views of the file mapping,
// so this reads headers only and costs no memory whatever the model's size.
// Loads the model in `dir` from its opened weights, to check them against its config.json.
void check_model_dir(const std::string& dir, const std::shared_ptr<SafetensorsCheckpoint>& weights) {
  model::LoadOptions lo;
  lo.checkpoint = weights;
  (void)model::load_model(dir, lo);
}

fs::path resolved(const fs::path& p) {
  std::error_code ec;
  fs::path c = fs::canonical(p, ec);
  return ec ? fs::absolute(p).lexically_normal() : c;
}

// Whether `p` is `dir` or lies below it (both resolved).
bool is_within(const fs::path& p, const fs::path& dir) {
  return std::mismatch(dir.begin(), dir.end(), p.begin(), p.end()).first == dir.end();
}

// --overwrite replaces the output directory with everything below it: an output
// that is or contains the checkpoint or the base model would delete that input.
void refuse_output_over_inputs(const ExportOptions& opt, const std::string& base) {
  // As the OS finds it (resolved_path), here and in OutputDir: the existence check and
  // --overwrite's replacement must mean the same directory.
  fs::path out = resolved_path(opt.output);
  std::error_code ec;
  // Inside a training checkpoint the export is deleted with it when output.keep_last
  // prunes the checkpoint.
  const fs::path ck = resolved(opt.checkpoint), out_resolved = fs::weakly_canonical(out, ec);
  if (fs::exists(ck / "trainer_state.json", ec) && is_within(out_resolved, ck) && out_resolved != ck)
    fail(opt.output, "--output",
         "lies inside the training checkpoint " + opt.checkpoint +
             ", which output.keep_last deletes with all it holds; choose a directory outside it");
  if (!fs::exists(out, ec)) return;  // a new directory holds nothing yet
  out = resolved(out);
  // Another training checkpoint: --overwrite would turn it into a merged model, its
  // optimizer state (the run's resume) lost.
  if (fs::exists(out / "trainer_state.json", ec) || fs::exists(out / "COMPLETE", ec))
    fail(opt.output, "--output",
         "is a training checkpoint; replacing it would lose the run's state to resume from; choose another output "
         "directory");
  const std::pair<const char*, std::string> inputs[] = {{"--checkpoint", opt.checkpoint}, {"--base", base}};
  for (const auto& [flag, in] : inputs) {
    if (in.empty() || !is_within(resolved(in), out)) continue;
    fail(opt.output, "--output",
         std::string("is or contains the input ") + in + " (" + flag +
             "); replacing the output would delete it; choose another output directory");
  }
}

// ---------------------------------------------------------------------------
// The output directory: built under a temporary name beside it, renamed at the end.

class OutputDir {
 public:
  explicit OutputDir(const ExportOptions& opt) : opt_(opt) {
    final_ = resolved_path(opt.output);
    std::error_code ec;
    if (fs::exists(final_, ec) || fs::is_symlink(final_, ec)) {
      if (!opt.overwrite) fail(opt.output, "", "already exists (pass --overwrite to replace it)");
      if (!fs::is_directory(final_)) fail(opt.output, "", "exists and is not a directory; not replacing it");
    }
    const fs::path parent = final_.parent_path();
    // The topmost missing ancestor: created here, removed again on failure.
    for (fs::path p = parent; !p.empty() && !fs::exists(p, ec); p = p.parent_path()) {
      created_top_ = p;
      if (p == p.parent_path()) break;
    }
    tmp_ = parent / ("." + final_.filename().string() + ".tmp-export-" + std::to_string(::getpid()));
    remove_tree(tmp_);
    fs::create_directories(tmp_, ec);
    if (ec) {
      cleanup();
      fail(opt.output, "", "cannot create the output directory (" + tmp_.string() + "): " + ec.message());
    }
  }
  ~OutputDir() {
    if (!committed_) cleanup();
  }
  const fs::path& tmp() const { return tmp_; }

  // Runs `write` (which fills tmp()); errors name the final path, not the temporary one.
  template <class F>
  void fill(F&& write) {
    try {
      write();
    } catch (const Error& e) {
      std::string m = e.what();
      const std::string from = tmp_.string(), to = final_.string();
      for (size_t pos = 0; (pos = m.find(from, pos)) != std::string::npos; pos += to.size()) m.replace(pos, from.size(), to);
      throw Error(m);
    }
  }

  void commit() {
    fsync_dir(tmp_);
    std::error_code ec;
    if (fs::exists(final_, ec)) {
      const fs::path old = final_.parent_path() /
                           ("." + final_.filename().string() + ".old-export-" + std::to_string(::getpid()));
      remove_tree(old);
      fs::rename(final_, old, ec);
      if (ec) fail(opt_.output, "", "cannot move the existing directory aside: " + ec.message());
      fs::rename(tmp_, final_, ec);
      if (ec) {
        std::error_code ec2;
        fs::rename(old, final_, ec2);
        fail(opt_.output, "", "cannot rename the export into place: " + ec.message());
      }
      remove_tree(old);
    } else {
      fs::rename(tmp_, final_, ec);
      if (ec) fail(opt_.output, "", "cannot rename the export into place: " + ec.message());
    }
    fsync_dir(final_.parent_path());
    committed_ = true;
  }

 private:
  void cleanup() {
    if (!tmp_.empty()) remove_tree(tmp_);
    if (!created_top_.empty()) remove_tree(created_top_);
  }
  const ExportOptions& opt_;
  fs::path final_, tmp_, created_top_;
  bool committed_ = false;
};

}  // namespace

std::string model_dir_config(const std::string& template_path, DType dtype, double rope_factor) {
  const bool change = rope_factor != load_model_config(template_path).rope_factor;
  return merged_config(template_path, dtype, {change, rope_factor}).dump(2) + "\n";
}

// ---------------------------------------------------------------------------

void export_checkpoint(const ExportOptions& opt) {
  // A file size limit (ulimit -f) must surface as EFBIG from write() and go
  // through the error path that removes the temporary directory, not kill us.
  std::signal(SIGXFSZ, SIG_IGN);
  const bool report_memory = std::getenv("LONGLORA_REPORT_MEMORY") != nullptr;
  bool hwm_reset = false;
  if (report_memory) {
    // Linux >= 4.0: writing 5 to clear_refs resets VmHWM, so the peak below is the export's own.
    std::ofstream cr("/proc/self/clear_refs");
    cr << "5";
    cr.flush();
    hwm_reset = static_cast<bool>(cr);
  }
  const int64_t rss_start = report_memory ? proc_status_kib("VmRSS") : 0;
  const int64_t anon_start = report_memory ? proc_status_kib("RssAnon") : 0;
  const int64_t file_start = report_memory ? proc_status_kib("RssFile") : 0;

  if (opt.format != "merged" && opt.format != "peft")
    fail("--format", "", "'" + opt.format + "' is not one of merged, peft");
  if (opt.output.empty()) fail("--output", "", "required");
  if (!opt.overwrite && (fs::exists(opt.output) || fs::is_symlink(opt.output)))
    fail(opt.output, "", "already exists (pass --overwrite to replace it)");
  if (opt.max_shard_size == 0) fail("--max-shard-size", "", "must be at least 1 byte");
  if (opt.rope_factor && !(*opt.rope_factor >= 1.0)) fail("--rope-factor", "", "must be >= 1");
  const bool has_flag_dtype = !opt.dtype.empty();
  const DType flag_dtype = has_flag_dtype ? dtype_from_flag(opt.dtype) : DType::F32;

  const Source src = resolve_source(opt);
  if (!src.adapter && opt.format == "peft")
    fail(opt.checkpoint, "--format peft", "a full fine-tuning checkpoint has no adapter; use --format merged");
  refuse_output_over_inputs(opt, src.base);

  // Everything is opened and validated before the output directory exists.
  std::optional<AdapterPlan> ap;
  if (src.adapter) ap = open_adapter(src.dir);
  std::shared_ptr<SafetensorsCheckpoint> base_ckpt;
  if (!src.base.empty() && (src.adapter || opt.format == "merged")) {
    // The base as eval would load it: an adapter checked against (or merged into) a
    // base that does not match its own config.json is checked against nothing.
    base_ckpt = open_checkpoint(src.base);
    check_model_dir(src.base, base_ckpt);
  }
  // A training checkpoint knows the weights it trained on.
  if (const auto recorded = src.adapter && base_ckpt ? model::recorded_base_sample(src.dir) : std::nullopt)
    model::warn_if_other_base(
        src.dir, src.base, *recorded,
        model::base_weight_sample(load_model_config((fs::path(src.base) / "config.json").string()),
                                  [&](const std::string& name) { return view_tensor(base_ckpt->get(name), base_ckpt); }));

  if (opt.format == "peft") {
    // Validate against the base when we know it (shapes, targets), then write the adapter.
    if (base_ckpt) plan_merge(*ap, base_ckpt, src.base, DType::F32);
    std::vector<OutTensor> ts;
    for (const auto& t : ap->file->tensors()) {
      OutTensor o;
      o.name = t.name;
      o.src = &t;
      o.owner = ap->file;
      o.file = ap->file->path();
      o.dtype = has_flag_dtype ? flag_dtype : t.dtype;
      ts.push_back(std::move(o));
    }
    // adapter_config.json has no field for the RoPE factor, so an evaluator of the
    // exported adapter uses its base's unless told; say which factor it needs.
    const std::optional<double> factor = opt.rope_factor ? opt.rope_factor : src.trained_factor;
    const double base_factor =
        src.base.empty() ? 1.0 : load_model_config((fs::path(src.base) / "config.json").string()).rope_factor;
    if (factor && *factor != base_factor) {
      spdlog::warn("export: {} linear RoPE factor {:g}, which a peft adapter cannot record: run eval --adapter "
                   "and generate with this adapter with --rope-factor {:g} (or on a base whose config.json has "
                   "rope_scaling {{\"type\": \"linear\", \"factor\": {:g}}})",
                   opt.rope_factor ? "--rope-factor asks for" : "the run trained with", *factor, *factor, *factor);
    }
    AdapterConfig cfg = ap->cfg;
    if (ap->trainable) {
      // LongLoRA's trainable_params.bin becomes modules_to_save: peft then holds each in a
      // copy of its module, which is what loading it into the base amounted to. On a tied
      // base the embedding is saved as lm_head too (peft's copy of embed_tokens alone
      // would leave lm_head on the old matrix, where load_state_dict changed both).
      const bool tied =
          !src.base.empty() && load_model_config((fs::path(src.base) / "config.json").string()).tie_word_embeddings;
      std::set<std::string> added;
      auto add = [&](const TensorInfo& t, const std::string& param) {
        const std::string key = std::string(kPeftPrefix) + param;
        // The adapter's own, which peft loads after; or (a tied base's two names for one
        // matrix) written already.
        if (ap->file->contains(key) || !added.insert(key).second) return;
        OutTensor o;
        o.name = key;
        o.src = &t;
        o.owner = ap->trainable;
        o.file = ap->trainable->path();
        o.dtype = has_flag_dtype ? flag_dtype : t.dtype;
        ts.push_back(std::move(o));
        add_module_to_save(cfg, param);
      };
      for (const auto& t : ap->trainable->tensors()) {
        add(t, t.name);
        if (tied && is_embedding_layer(t.name))
          add(t, t.name == "lm_head.weight" ? "model.embed_tokens.weight" : "lm_head.weight");
      }
    }
    if (cfg.base_model_name_or_path.empty() && !src.base.empty())
      cfg.base_model_name_or_path = resolved_path(src.base);
    spdlog::info("export: peft adapter {} (r {}, lora_alpha {}, {} tensors) -> {}", opt.checkpoint, cfg.r,
                 cfg.lora_alpha, ts.size(), opt.output);
    OutputDir out(opt);
    out.fill([&] {
      write_text((out.tmp() / "adapter_config.json").string(), adapter_config_to_json(cfg).dump(2) + "\n");
      std::vector<TensorToWrite> entries;
      for (const auto& t : ts) entries.push_back(to_write(t));
      write_safetensors((out.tmp() / "adapter_model.safetensors").string(), entries, {{"format", "pt"}});
    });
    check_interrupt();  // the last chance to leave nothing behind; after the rename the export is done
    out.commit();
    spdlog::info("export: wrote {}", opt.output);
    return;
  }

  // merged
  const std::string template_cfg =
      ((src.base.empty() ? src.dir : fs::path(src.base)) / "config.json").string();
  if (!fs::exists(template_cfg)) fail(template_cfg, "", "missing (the exported config.json is based on it)");
  const ModelConfig tcfg = load_model_config(template_cfg);
  const DType out_dtype = has_flag_dtype ? flag_dtype : dtype_from_config(tcfg.torch_dtype);

  RopeChoice rope;
  if (opt.rope_factor) {
    rope = {true, *opt.rope_factor};
  } else if (src.trained_factor) {
    rope = {true, *src.trained_factor};
  } else {
    rope = {false, tcfg.rope_factor};  // the base config's own
  }

  std::vector<OutTensor> ts;
  bool untied = false;  // the adapter parts a tied base's embeddings
  std::shared_ptr<SafetensorsCheckpoint> full;
  if (src.adapter) {
    ts = plan_merge(*ap, base_ckpt, src.base, out_dtype, &untied);
  } else {
    // The weights against their own config.json, then (the exported config.json is
    // the base's when there is one) tensor for tensor against the checked base.
    full = open_checkpoint(src.dir.string());
    if (fs::exists(src.dir / "config.json")) check_model_dir(src.dir.string(), full);
    if (base_ckpt)
      for (const auto& name : base_ckpt->names())
        if (!is_stale_buffer(name) && !full->contains(name))
          fail(src.dir.string(), "tensor '" + name + "'",
               "missing from the checkpoint (the base model " + src.base + " has it)");
    for (const auto& name : full->names()) {
      if (is_stale_buffer(name)) continue;
      const auto& t = full->get(name);
      if (base_ckpt && !base_ckpt->contains(name))
        fail(full->file_of(name).path(), "tensor '" + name + "'",
             "not in the base model " + src.base + ", whose config.json the export gets");
      if (base_ckpt && base_ckpt->get(name).shape != t.shape)
        fail(full->file_of(name).path(), "tensor '" + name + "'",
             "shape " + shape_str(t.shape) + " but the base model's is " +
                 shape_str(base_ckpt->get(name).shape) + " (" + base_ckpt->file_of(name).path() + ")");
      if (!is_float(t.dtype))
        fail(full->file_of(name).path(), "tensor '" + name + "'",
             std::string("dtype ") + dtype_name(t.dtype) + " is not a float type");
      OutTensor o;
      o.name = name;
      o.src = &t;
      o.owner = full;
      o.file = full->file_of(name).path();
      o.release = full->file_of(name).mapped();
      o.dtype = is_float(t.dtype) ? out_dtype : t.dtype;
      ts.push_back(std::move(o));
    }
    std::stable_sort(ts.begin(), ts.end(), [](const OutTensor& a, const OutTensor& b) { return hf_order(a.name, b.name); });
  }
  ordered_json config = merged_config(template_cfg, out_dtype, rope);
  if (untied) config["tie_word_embeddings"] = false;
  uint64_t total = 0;
  for (const auto& t : ts) total += t.nbytes();
  spdlog::info("export: merged {} {}{} -> {} ({}, rope factor {}, {} tensors, {})",
               src.adapter ? "LoRA adapter" : "full fine-tuning checkpoint", opt.checkpoint,
               src.base.empty() ? "" : " onto " + src.base, opt.output, torch_dtype_name(out_dtype),
               rope.factor, ts.size(), mib(total));

  OutputDir out(opt);
  out.fill([&] {
    write_model(out.tmp(), ts, opt.max_shard_size);
    write_text((out.tmp() / "config.json").string(), config.dump(2) + "\n");
    copy_tokenizer_files(src.base.empty() ? src.dir : fs::path(src.base), out.tmp());
  });
  check_interrupt();  // the last chance to leave nothing behind; after the rename the export is done
  out.commit();
  spdlog::info("export: wrote {}", opt.output);

  if (report_memory) {
    // VmHWM counts mapped file pages too; release_pages keeps those from accumulating.
    spdlog::info("export: memory: peak RSS {} KiB (VmHWM{}), RSS at start {} KiB, RssAnon now {} KiB, "
                 "tensor data {} KiB; at start RssAnon {} KiB RssFile {} KiB, now RssFile {} KiB",
                 proc_status_kib("VmHWM"), hwm_reset ? ", reset at start" : ", not reset", rss_start,
                 proc_status_kib("RssAnon"), total / 1024, anon_start, file_start, proc_status_kib("RssFile"));
  }
}

}  // namespace longlora::io
