#include "longlora/io/checksum.h"

#include <caffe2/serialize/crc_alt.h>  // LibTorch's CRC-32 (slicing-by-16), header-only

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <vector>

#include "longlora/common/error.h"
#include "longlora/common/json_file.h"

namespace fs = std::filesystem;

namespace longlora::io {

namespace {

std::string hex8(uint32_t v) {
  char buf[9];
  std::snprintf(buf, sizeof buf, "%08x", v);
  return buf;
}

}  // namespace

void FileDigest::add(const void* p, size_t n) {
  crc32 = crc32_fast(p, n, crc32);
  bytes += n;
}

FileDigest digest_file(const std::string& path) {
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) fail(path, "", std::string("cannot open: ") + std::strerror(errno));
  std::vector<char> buf(size_t(4) << 20);
  FileDigest d;
  for (;;) {
    const size_t n = std::fread(buf.data(), 1, buf.size(), f.get());
    d.add(buf.data(), n);
    if (n < buf.size()) break;
  }
  if (std::ferror(f.get())) fail(path, "", "read failed");
  return d;
}

nlohmann::json digest_directory(const std::string& dir, const std::map<std::string, FileDigest>& written) {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& e : fs::directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    const auto w = written.find(e.path().filename().string());
    const FileDigest d = w != written.end() ? w->second : digest_file(e.path().string());
    out[e.path().filename().string()] = {{"bytes", d.bytes}, {"crc32", hex8(d.crc32)}};
  }
  return out;
}

void verify_checkpoint_files(const std::string& dir, bool with_optimizer_state) {
  // A save killed partway: its folder holds what was written so far (the adapter
  // first), and eval, generate and export took it without a word.
  fs::path name = fs::path(dir).lexically_normal();
  if (name.filename().empty()) name = name.parent_path();
  if (name.filename().string().rfind(".tmp-checkpoint-", 0) == 0)
    fail(dir, "", "an unfinished save (the run writes .tmp-checkpoint-N and renames it checkpoint-N once "
                  "complete): take a checkpoint-N");
  const std::string ts = (fs::path(dir) / "trainer_state.json").string();
  if (!fs::exists(ts)) {
    // A Hugging Face or peft directory has neither; a training checkpoint that lost its
    // record would otherwise be used unchecked.
    if (fs::exists(fs::path(dir) / "COMPLETE"))
      fail(dir, "trainer_state.json", "missing beside COMPLETE: the training checkpoint is damaged");
    return;
  }
  verify_checkpoint_files(dir, read_json_file(ts), ts, with_optimizer_state);
}

void verify_checkpoint_files(const std::string& dir, const nlohmann::json& j, const std::string& ts,
                             bool with_optimizer_state) {
  const JsonFields top(j, ts);
  const auto files = top.object("files");
  if (!files) return;  // saved before checksums were recorded
  for (const auto& [name, rec] : j.at("files").items()) {
    if (!with_optimizer_state && (name == "optimizer.safetensors" || name == "state.pt")) continue;
    if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..")
      fail(ts, "files", "'" + name + "' is not a file name");
    const JsonFields r(rec, ts, "files." + name);
    const auto bytes = r.integer("bytes");
    const auto crc = r.string("crc32");
    if (!bytes || !crc) r.fail(bytes ? "crc32" : "bytes", "missing");
    const std::string path = (fs::path(dir) / name).string();
    if (!fs::exists(path)) fail(path, "", "missing, but " + ts + " records it");
    const FileDigest d = digest_file(path);
    if (static_cast<int64_t>(d.bytes) != *bytes || hex8(d.crc32) != *crc)
      fail(path, "", std::to_string(d.bytes) + " bytes with CRC-32 " + hex8(d.crc32) + ", but " + ts + " recorded " +
                         std::to_string(*bytes) + " bytes with " + *crc +
                         ": the file changed after the save (copy it again from where it was written)");
  }
}

}  // namespace longlora::io
