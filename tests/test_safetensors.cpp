// safetensors reader/writer: round trip, and every malformed file is a one-line
// error naming the file and the tensor.
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <tuple>
#include <functional>
#include <caffe2/serialize/inline_container.h>
#include <nlohmann/json.hpp>

#include "longlora/common/error.h"
#include "longlora/data/tokenizer.h"
#include "longlora/io/safetensors.h"
#include "longlora/io/tensors.h"
#include "longlora/model/loader.h"
#include "test_util.h"

using namespace longlora;

namespace {

// A file with the given header JSON text and `data_bytes` bytes of data.
std::string make_file(const std::string& dir, const std::string& name, const std::string& header,
                      size_t data_bytes, int64_t declared_len = -1) {
  std::string s;
  const uint64_t n = declared_len >= 0 ? static_cast<uint64_t>(declared_len) : header.size();
  for (int i = 0; i < 8; ++i) s.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  s += header;
  s.append(data_bytes, '\0');
  const std::string path = dir + "/" + name;
  testutil::write_file(path, s);
  return path;
}

void expect_error(const std::string& path, const std::vector<std::string>& needles) {
  try {
    io::SafetensorsFile f(path);
    FAIL() << "accepted malformed " << path;
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
  }
}

}  // namespace

TEST(Safetensors, RoundTripAllDtypes) {
  const auto dir = testutil::temp_dir("st-roundtrip");
  std::vector<std::pair<std::string, torch::Tensor>> ts = {
      {"a", torch::randn({3, 5})},
      {"b", torch::randn({7}).to(torch::kBFloat16)},
      {"c", torch::randn({2, 2, 2}).to(torch::kFloat16)},
      {"d", torch::arange(10, torch::kInt64)},
      {"e", torch::randn({4, 6}).t()}};  // non-contiguous input is written contiguous
  io::save_tensors(dir + "/x.safetensors", ts, {{"format", "pt"}});
  io::SafetensorsFile f(dir + "/x.safetensors");
  EXPECT_EQ(f.metadata().at("format"), "pt");
  auto back = io::load_tensors(dir + "/x.safetensors");
  for (auto& [n, t] : ts) {
    ASSERT_TRUE(back.count(n));
    EXPECT_EQ(back[n].scalar_type(), t.scalar_type()) << n;
    EXPECT_TRUE(torch::equal(back[n], t)) << n;
  }
}

namespace {

// A safetensors file split as the specification lays it out, by hand (not io's reader):
// 8-byte little-endian header length N, N bytes of JSON header, then the data.
struct RawFile {
  uint64_t n = 0;
  std::string header;  // the N bytes, padding included
  nlohmann::json json;
  std::string data;
};

RawFile split_raw(const std::string& bytes) {
  RawFile r;
  EXPECT_GE(bytes.size(), 8u);
  if (bytes.size() < 8) return r;
  for (int i = 0; i < 8; ++i) r.n |= static_cast<uint64_t>(static_cast<uint8_t>(bytes[i])) << (8 * i);
  EXPECT_LE(8 + r.n, bytes.size());
  if (8 + r.n > bytes.size()) return r;
  r.header = bytes.substr(8, r.n);
  r.data = bytes.substr(8 + r.n);
  r.json = nlohmann::json::parse(r.header);  // trailing spaces are JSON whitespace
  return r;
}

// The header as the spec allows it to be padded: '{' first, then the JSON object, then
// spaces only, so that the data starts 8-byte aligned (as Python safetensors writes it).
void expect_spec_header(const RawFile& r, const std::string& what) {
  ASSERT_FALSE(r.header.empty()) << what;
  EXPECT_EQ(r.header.front(), '{') << what;
  const size_t close = r.header.find_last_not_of(' ');
  ASSERT_NE(close, std::string::npos) << what;
  EXPECT_EQ(r.header[close], '}') << what;
  EXPECT_EQ(r.header.find_first_not_of(' ', close + 1), std::string::npos) << what;
  EXPECT_LT(r.header.size() - close - 1, 8u) << what << ": more padding than alignment needs";
  EXPECT_EQ((8 + r.n) % 8, 0u) << what;
}

std::string bytes_of(std::initializer_list<uint8_t> b) { return std::string(b.begin(), b.end()); }

}  // namespace

TEST(Safetensors, WriterBytesFollowTheSpecification) {
  // The writer against the safetensors specification, not against our reader (a bug
  // both share, in a dtype tag, the header or the offsets, would round-trip): every
  // tensor's bytes are spelled out here as IEEE / two's-complement little-endian.
  const auto dir = testutil::temp_dir("st-spec");
  std::vector<std::pair<std::string, torch::Tensor>> ts = {
      {"w.f32", torch::tensor({1.0f, -2.5f, 0.15625f, 3.0f}).reshape({2, 2})},
      {"b.bf16", torch::tensor({1.0f, -2.0f, 0.5f}).to(torch::kBFloat16)},
      {"h.f16", torch::tensor({1.0f, -2.0f}).to(torch::kFloat16).reshape({1, 2})},
      {"ids.i64", torch::tensor({int64_t{1}, int64_t{-2}, int64_t{0x0102030405060708}}, torch::kInt64).reshape({3, 1})},
      {"n.i32", torch::tensor({-1, 0x01020304}, torch::kInt32)}};
  // name -> (spec dtype, shape, the little-endian bytes)
  const std::map<std::string, std::tuple<std::string, std::vector<int64_t>, std::string>> want = {
      {"w.f32",
       {"F32",
        {2, 2},
        bytes_of({0x00, 0x00, 0x80, 0x3f,     // 1.0    0x3f800000
                  0x00, 0x00, 0x20, 0xc0,     // -2.5   0xc0200000
                  0x00, 0x00, 0x20, 0x3e,     // 0.15625 0x3e200000
                  0x00, 0x00, 0x40, 0x40})}},  // 3.0   0x40400000
      {"b.bf16", {"BF16", {3}, bytes_of({0x80, 0x3f, 0x00, 0xc0, 0x00, 0x3f})}},  // 0x3f80 0xc000 0x3f00
      {"h.f16", {"F16", {1, 2}, bytes_of({0x00, 0x3c, 0x00, 0xc0})}},             // 0x3c00 0xc000
      {"ids.i64",
       {"I64",
        {3, 1},
        bytes_of({0x01, 0, 0, 0, 0, 0, 0, 0,                             // 1
                  0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,        // -2
                  0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01})}},    // 0x0102030405060708
      {"n.i32", {"I32", {2}, bytes_of({0xff, 0xff, 0xff, 0xff, 0x04, 0x03, 0x02, 0x01})}}};

  const std::string path = dir + "/spec.safetensors";
  io::save_tensors(path, ts, {{"format", "pt"}});
  const std::string bytes = testutil::read_file(path);
  const RawFile raw = split_raw(bytes);
  expect_spec_header(raw, path);

  // The header, offsets aside: exactly these entries and the metadata, nothing more.
  nlohmann::json header = raw.json;
  nlohmann::json want_header = {{"__metadata__", {{"format", "pt"}}}};
  std::vector<std::tuple<uint64_t, uint64_t, std::string>> spans;  // begin, end, name
  for (const auto& [name, w] : want) {
    const auto& [dtype, shape, data] = w;
    ASSERT_TRUE(header.contains(name)) << name << " in " << raw.header;
    ASSERT_TRUE(header[name].contains("data_offsets")) << name;
    const auto off = header[name]["data_offsets"].get<std::vector<uint64_t>>();
    ASSERT_EQ(off.size(), 2u) << name;
    header[name].erase("data_offsets");
    want_header[name] = {{"dtype", dtype}, {"shape", shape}};
    // Offsets are relative to the start of the data section.
    ASSERT_EQ(off[1] - off[0], data.size()) << name;
    ASSERT_LE(off[1], raw.data.size()) << name;
    EXPECT_EQ(raw.data.substr(off[0], off[1] - off[0]), data) << name;
    spans.emplace_back(off[0], off[1], name);
  }
  EXPECT_EQ(header, want_header);
  // The entries tile the data section with no gap or overlap, and nothing follows it.
  std::sort(spans.begin(), spans.end());
  uint64_t at = 0;
  for (const auto& [b, e, name] : spans) {
    EXPECT_EQ(b, at) << name;
    at = e;
  }
  EXPECT_EQ(at, raw.data.size());
  EXPECT_EQ(bytes.size(), 8 + raw.n + at);
}

TEST(Safetensors, ReadsFilesThePythonLibraryWrote) {
  // golden/ was written by Python safetensors (transformers / torch). Its layout is the
  // one expect_spec_header checks our writer against; and our reader finds in it what
  // config.json, eval.bin and the golden README say is there, at the bytes the header
  // (parsed by hand) points to.
  const std::string golden = testutil::golden("tiny-llama/golden.safetensors");
  const RawFile raw = split_raw(testutil::read_file(golden));
  expect_spec_header(raw, golden);
  io::SafetensorsFile f(golden);
  // input_ids: I64 [1, 128], the first 128 uint16 token ids of eval.bin.
  const auto& ids = f.get("input_ids");
  EXPECT_EQ(ids.dtype, io::DType::I64);
  EXPECT_EQ(ids.shape, (std::vector<int64_t>{1, 128}));
  const std::string eval = testutil::read_file(testutil::golden("tiny-llama/eval.bin"));
  ASSERT_GE(eval.size(), 256u);
  ASSERT_EQ(ids.nbytes, 128u * 8);
  std::string want_ids;
  for (int i = 0; i < 128; ++i) {
    want_ids += eval.substr(2 * i, 2);  // uint16 LE widened to int64 LE: zero-extended
    want_ids.append(6, '\0');
  }
  EXPECT_EQ(std::string(static_cast<const char*>(ids.data), ids.nbytes), want_ids);
  const auto off = raw.json["input_ids"]["data_offsets"].get<std::vector<uint64_t>>();
  EXPECT_EQ(raw.data.substr(off[0], off[1] - off[0]), want_ids);
  const auto cfg = testutil::read_json(testutil::golden("tiny-llama/model/config.json"));
  const int64_t vocab = cfg["vocab_size"], hidden = cfg["hidden_size"], inter = cfg["intermediate_size"];
  const int64_t heads = cfg["num_attention_heads"], kv = cfg["num_key_value_heads"], hd = hidden / heads;
  EXPECT_EQ(f.get("logits").dtype, io::DType::F32);
  EXPECT_EQ(f.get("logits").shape, (std::vector<int64_t>{1, 128, vocab}));

  // The merged model (transformers' save_pretrained): every weight's shape follows from
  // config.json, fp32 as its torch_dtype says, and its bytes are where the header says.
  const std::string merged = testutil::golden("tiny-llama/merged/model.safetensors");
  const RawFile mraw = split_raw(testutil::read_file(merged));
  expect_spec_header(mraw, merged);
  ASSERT_EQ(cfg["torch_dtype"], "float32");
  std::map<std::string, std::vector<int64_t>> shapes = {{"model.embed_tokens.weight", {vocab, hidden}},
                                                        {"model.norm.weight", {hidden}},
                                                        {"lm_head.weight", {vocab, hidden}}};
  for (int l = 0; l < cfg["num_hidden_layers"].get<int>(); ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    shapes[p + "self_attn.q_proj.weight"] = {heads * hd, hidden};
    shapes[p + "self_attn.k_proj.weight"] = {kv * hd, hidden};
    shapes[p + "self_attn.v_proj.weight"] = {kv * hd, hidden};
    shapes[p + "self_attn.o_proj.weight"] = {hidden, heads * hd};
    shapes[p + "mlp.gate_proj.weight"] = {inter, hidden};
    shapes[p + "mlp.up_proj.weight"] = {inter, hidden};
    shapes[p + "mlp.down_proj.weight"] = {hidden, inter};
    shapes[p + "input_layernorm.weight"] = {hidden};
    shapes[p + "post_attention_layernorm.weight"] = {hidden};
  }
  io::SafetensorsFile m(merged);
  std::map<std::string, std::vector<int64_t>> got;
  for (const auto& t : m.tensors()) {
    if (io::is_stale_buffer(t.name)) continue;
    got[t.name] = t.shape;
    EXPECT_EQ(t.dtype, io::DType::F32) << t.name;
    const auto o = mraw.json[t.name]["data_offsets"].get<std::vector<uint64_t>>();
    EXPECT_EQ(t.nbytes, o[1] - o[0]) << t.name;
    EXPECT_EQ(std::string(static_cast<const char*>(t.data), t.nbytes), mraw.data.substr(o[0], o[1] - o[0])) << t.name;
  }
  EXPECT_EQ(got, shapes);
  EXPECT_EQ(m.metadata().at("format"), mraw.json["__metadata__"]["format"].get<std::string>());
}

TEST(Safetensors, AllFiniteAgreesWithTorchOnEveryBitPattern) {
  // Every 16-bit pattern as bf16 and fp16 (inf, NaN, subnormals, -0 included), and
  // random 32-bit ones plus the edges as fp32: one element at a time against isfinite.
  using io::DType;
  auto bits16 = torch::arange(0, 65536, torch::kInt32).to(torch::kInt16);  // wraps to the negative half
  auto r = torch::randint(INT32_MIN, INT32_MAX, {100000}, torch::TensorOptions().dtype(torch::kInt64)).to(torch::kInt32);
  auto edges = torch::tensor({0x7f800000, 0x7f7fffff, 0x7fc00000, static_cast<int32_t>(0xff800000u), 0x00000001},
                             torch::kInt32);
  auto bits32 = torch::cat({r, edges});
  const std::pair<DType, torch::Tensor> cases[] = {{DType::BF16, bits16.view(torch::kBFloat16)},
                                                   {DType::F16, bits16.view(torch::kFloat16)},
                                                   {DType::F32, bits32.view(torch::kFloat32)}};
  for (const auto& [d, t] : cases) {
    const auto want = torch::isfinite(t);
    int64_t disagree = 0;
    for (int64_t i = 0; i < t.numel(); ++i)
      disagree += io::all_finite(static_cast<const char*>(t.data_ptr()) + i * t.element_size(), 1, d) !=
                  want[i].item<bool>();
    EXPECT_EQ(disagree, 0) << io::dtype_name(d);
    EXPECT_EQ(io::all_finite(t.data_ptr(), static_cast<size_t>(t.numel()), d), want.all().item<bool>());
  }
}

TEST(Safetensors, ReadsTheGoldenShardedCheckpoint) {
  io::SafetensorsCheckpoint c(testutil::golden("tiny-llama/model"));
  EXPECT_EQ(c.names().size(), 21u);
  EXPECT_EQ(c.get("model.embed_tokens.weight").shape, (std::vector<int64_t>{512, 64}));
}

TEST(SafetensorsMalformed, Truncated) {
  const auto dir = testutil::temp_dir("st-trunc");
  testutil::write_file(dir + "/t.safetensors", "abc");
  expect_error(dir + "/t.safetensors", {"truncated"});
}

TEST(SafetensorsMalformed, HeaderLengthPastEnd) {
  const auto dir = testutil::temp_dir("st-hlen");
  expect_error(make_file(dir, "h.safetensors", "{}", 0, 1000), {"header length 1000"});
}

TEST(SafetensorsMalformed, BadJson) {
  const auto dir = testutil::temp_dir("st-json");
  expect_error(make_file(dir, "j.safetensors", "{\"a\": [", 0), {"bad JSON"});
}

TEST(SafetensorsMalformed, OffsetsOutOfBounds) {
  const auto dir = testutil::temp_dir("st-oob");
  expect_error(make_file(dir, "o.safetensors",
                         R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8),
               {"tensor 'w'", "out of bounds"});
}

TEST(SafetensorsMalformed, OverlappingTensors) {
  const auto dir = testutil::temp_dir("st-overlap");
  expect_error(make_file(dir, "v.safetensors",
                         R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
               {"tensor 'b'", "overlaps tensor 'a'"});
  // An empty tensor that sorts between two overlapping ones does not hide them.
  expect_error(make_file(dir, "e.safetensors",
                         R"({"a":{"dtype":"F32","shape":[25],"data_offsets":[0,100]},)"
                         R"("z":{"dtype":"F32","shape":[0],"data_offsets":[10,10]},)"
                         R"("c":{"dtype":"F32","shape":[2],"data_offsets":[50,58]}})", 100),
               {"tensor 'c'", "overlaps tensor 'a'"});
}

TEST(SafetensorsMalformed, ShapeTimesDtypeMismatch) {
  const auto dir = testutil::temp_dir("st-size");
  expect_error(make_file(dir, "s.safetensors",
                         R"({"w":{"dtype":"BF16","shape":[3,3],"data_offsets":[0,16]}})", 16),
               {"tensor 'w'", "18 bytes", "16"});
}

TEST(SafetensorsMalformed, DuplicateNames) {
  const auto dir = testutil::temp_dir("st-dup");
  expect_error(make_file(dir, "d.safetensors",
                         R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                         R"("w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
               {"tensor 'w'", "duplicate"});
}

TEST(SafetensorsMalformed, UnsupportedDtype) {
  const auto dir = testutil::temp_dir("st-dtype");
  expect_error(make_file(dir, "u.safetensors",
                         R"({"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", 8),
               {"tensor 'w'", "F64"});
}

TEST(SafetensorsMalformed, MissingTensorInIndexAndModel) {
  // A shard that lacks a tensor its index lists; then a model missing a weight.
  const auto dir = testutil::temp_dir("st-missing");
  io::save_tensors(dir + "/part.safetensors", {{"a", torch::zeros({2})}});
  testutil::write_file(dir + "/model.safetensors.index.json",
                       R"({"weight_map": {"a": "part.safetensors", "b": "part.safetensors"}})");
  try {
    io::SafetensorsCheckpoint c(dir);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'b'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("part.safetensors"), std::string::npos) << e.what();
  }
  // A model directory whose checkpoint lacks lm_head.weight.
  const auto mdir = testutil::temp_dir("st-missing-model");
  std::filesystem::copy(testutil::golden("tiny-llama/model/config.json"), mdir + "/config.json");
  auto all = io::load_tensors(testutil::golden("tiny-llama/model"));
  std::vector<std::pair<std::string, torch::Tensor>> keep;
  for (auto& [n, t] : all)
    if (n != "lm_head.weight") keep.emplace_back(n, t);
  io::save_tensors(mdir + "/model.safetensors", keep);
  try {
    model::load_model(mdir, {});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'lm_head.weight'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("missing"), std::string::npos) << e.what();
  }
}

TEST(SafetensorsMalformed, WrongShapeForConfig) {
  const auto mdir = testutil::temp_dir("st-shape-model");
  std::filesystem::copy(testutil::golden("tiny-llama/model/config.json"), mdir + "/config.json");
  auto all = io::load_tensors(testutil::golden("tiny-llama/model"));
  all["model.norm.weight"] = torch::ones({32});
  std::vector<std::pair<std::string, torch::Tensor>> v(all.begin(), all.end());
  io::save_tensors(mdir + "/model.safetensors", v);
  try {
    model::load_model(mdir, {});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'model.norm.weight'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("[32]"), std::string::npos) << e.what();
  }
}

TEST(SafetensorsMalformed, CliReportsOneLineAndNonZeroExit) {
  const auto dir = testutil::temp_dir("st-cli");
  std::filesystem::copy(testutil::golden("tiny-llama/model/config.json"), dir + "/config.json");
  make_file(dir, "model.safetensors", "{\"a\": [", 0);
  auto r = testutil::run_cli("eval --model " + dir + " --data " + testutil::golden("tiny-llama/eval.bin") +
                             " --seq-len 16");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("model.safetensors"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("bad JSON"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

namespace {

// A copy of the golden sharded model whose config.json is changed by `edit`.
std::string golden_model_copy(const std::string& name, const std::function<void(nlohmann::json&)>& edit) {
  const auto dir = testutil::temp_dir(name);
  for (const auto& e : std::filesystem::directory_iterator(testutil::golden("tiny-llama/model")))
    std::filesystem::copy(e.path(), dir + "/" + e.path().filename().string());
  auto cfg = testutil::read_json(dir + "/config.json");
  edit(cfg);
  testutil::write_file(dir + "/config.json", cfg.dump());
  return dir;
}

}  // namespace

TEST(Safetensors, SingleFileIsReadBeforeTheIndexAsTransformersDoes) {
  // transformers' from_pretrained takes model.safetensors when a folder has both.
  const auto dir = testutil::temp_dir("st-both");
  io::save_tensors(dir + "/part.safetensors", {{"a", torch::zeros({2})}});
  testutil::write_file(dir + "/model.safetensors.index.json",
                       R"({"weight_map": {"a": "part.safetensors"}})");
  io::save_tensors(dir + "/model.safetensors", {{"a", torch::ones({2})}});
  io::SafetensorsCheckpoint c(dir);
  EXPECT_EQ(c.file_of("a").path(), dir + "/model.safetensors");
  EXPECT_TRUE(torch::equal(io::load_tensors(dir)["a"], torch::ones({2})));
}

TEST(SafetensorsMalformed, DirectoryWhereAFileBelongs) {
  // Each reader names the path; an ifstream or mmap on a directory says nothing useful.
  const std::string want = "is a directory, a file is expected";
  const auto dir = testutil::temp_dir("st-isdir");
  std::filesystem::create_directories(dir + "/x.safetensors");
  EXPECT_NE(testutil::error_of([&] { io::SafetensorsFile f(dir + "/x.safetensors"); }).find(dir + "/x.safetensors: " + want),
            std::string::npos);

  const auto idx = testutil::temp_dir("st-isdir-index");
  std::filesystem::create_directories(idx + "/model.safetensors.index.json");
  EXPECT_NE(testutil::error_of([&] { io::SafetensorsCheckpoint c(idx); })
                .find(idx + "/model.safetensors.index.json: " + want),
            std::string::npos);

  const auto shard = golden_model_copy("st-isdir-shard", [](nlohmann::json&) {});
  std::filesystem::remove(shard + "/model-00002-of-00004.safetensors");
  std::filesystem::create_directories(shard + "/model-00002-of-00004.safetensors");
  EXPECT_NE(testutil::error_of([&] { model::load_model(shard, {}); })
                .find(shard + "/model-00002-of-00004.safetensors: " + want),
            std::string::npos);

  const auto cfg = golden_model_copy("st-isdir-config", [](nlohmann::json&) {});
  std::filesystem::remove(cfg + "/config.json");
  std::filesystem::create_directories(cfg + "/config.json");
  EXPECT_NE(testutil::error_of([&] { model::load_model(cfg, {}); }).find(cfg + "/config.json: " + want),
            std::string::npos);

  const auto tok = testutil::temp_dir("st-isdir-tok");
  std::filesystem::create_directories(tok + "/tokenizer.model");
  EXPECT_NE(testutil::error_of([&] { data::Tokenizer t(tok + "/tokenizer.model"); }).find(tok + "/tokenizer.model: " + want),
            std::string::npos);
}

// A FIFO where a shard or the tokenizer belongs waited forever for a writer (open()
// and sentencepiece's read block); nothing can be mapped from it.
TEST(SafetensorsMalformed, AFifoWhereAFileBelongsIsRefusedNotWaitedOn) {
  const auto shard = golden_model_copy("st-fifo-shard", [](nlohmann::json&) {});
  std::filesystem::remove(shard + "/model-00002-of-00004.safetensors");
  ASSERT_EQ(::mkfifo((shard + "/model-00002-of-00004.safetensors").c_str(), 0600), 0);
  EXPECT_EQ(testutil::error_of([&] { model::load_model(shard, {}); }),
            shard + "/model-00002-of-00004.safetensors: is not a regular file");
  const auto tok = testutil::temp_dir("st-fifo-tok");
  ASSERT_EQ(::mkfifo((tok + "/tokenizer.model").c_str(), 0600), 0);
  EXPECT_EQ(testutil::error_of([&] { data::Tokenizer t(tok + "/tokenizer.model"); }),
            tok + "/tokenizer.model: is not a regular file");
  // Not a sentencepiece model at all: sentencepiece's message named its own source line.
  testutil::write_file(tok + "/other.model", std::string(100, '\x07'));
  EXPECT_EQ(testutil::error_of([&] { data::Tokenizer t(tok + "/other.model"); }),
            tok + "/other.model: not a sentencepiece model (damaged, or another kind of file)");
}

TEST(SafetensorsMalformed, EmptyShardNameInIndex) {
  const auto dir = testutil::temp_dir("st-empty-shard");
  testutil::write_file(dir + "/model.safetensors.index.json", R"({"weight_map": {"a": ""}})");
  EXPECT_NE(testutil::error_of([&] { io::SafetensorsCheckpoint c(dir); })
                .find("model.safetensors.index.json: weight_map.a: shard must be a file name"),
            std::string::npos);
}

TEST(SafetensorsMalformed, LayerCountCheckedBeforeTheModelIsBuilt) {
  // A layer the checkpoint lacks altogether is config.json's num_hidden_layers at
  // fault; it is found from the tensor names, before any layer is allocated (a
  // num_hidden_layers of 1000000 used to build every layer and run out of memory; the
  // largest config.json now allows is 65536).
  for (int64_t n : {3, 65536}) {
    const auto dir = golden_model_copy("st-layers-" + std::to_string(n),
                                       [n](nlohmann::json& c) { c["num_hidden_layers"] = n; });
    const auto t0 = std::chrono::steady_clock::now();
    const auto err = testutil::error_of([&] { model::load_model(dir, {}); });
    EXPECT_NE(err.find(dir + "/config.json: num_hidden_layers: " + std::to_string(n) +
                       " but the checkpoint has no tensor of layer 2"),
              std::string::npos)
        << err;
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 5.0);
    if (HasFailure()) break;  // without the check the big case takes minutes and gigabytes
  }
}

TEST(SafetensorsMalformed, ShapeWhoseSizeOverflowsIsRefused) {
  // A dimension of 2^63 read as int64 was negative, and products wrapped: these passed
  // as 0 bytes against data_offsets [0, 0]. safetensors' own reader refuses them.
  const auto dir = testutil::temp_dir("st-overflow");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"F32", "[9223372036854775808,2]"},  // a dimension past int64
      {"F32", "[4611686018427387904,4]"},  // 2^64 elements
      {"F16", "[4611686018427387904,2]"},  // 2^63 elements, 2^64 bytes
      {"F32", "[2305843009213693952,2]"},  // 2^62 elements, 2^64 bytes
  };
  int i = 0;
  for (const auto& [dtype, shape] : cases) {
    SCOPED_TRACE(shape);
    expect_error(make_file(dir, "o" + std::to_string(i++) + ".safetensors",
                           R"({"w":{"dtype":")" + dtype + R"(","shape":)" + shape + R"(,"data_offsets":[0,0]}})", 0),
                 {"tensor 'w'", "shape " + shape + " overflows"});
  }
  // Large shapes that do fit are still only checked against data_offsets.
  expect_error(make_file(dir, "big.safetensors",
                         R"({"w":{"dtype":"F32","shape":[1073741824,2],"data_offsets":[0,0]}})", 0),
               {"tensor 'w'", "8589934592 bytes"});
  // export --format peft copied such an entry into an adapter no reader takes.
  const std::string ad = dir + "/adapter";
  std::filesystem::create_directories(ad);
  std::filesystem::copy_file(testutil::golden("tiny-llama/adapter/adapter_config.json"), ad + "/adapter_config.json");
  make_file(ad, "adapter_model.safetensors",
            R"({"base_model.model.model.embed_tokens.weight":{"dtype":"F32","shape":[9223372036854775808,2],)"
            R"("data_offsets":[0,0]}})",
            0);
  auto r = testutil::run_cli("export --checkpoint " + ad + " --output " + dir + "/out --format peft");
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(r.err, "error: " + ad + "/adapter_model.safetensors: tensor 'base_model.model.model.embed_tokens.weight': "
                   "shape [9223372036854775808,2] overflows: a dimension past 2^63 - 1\n");
  EXPECT_FALSE(std::filesystem::exists(dir + "/out"));
}

TEST(SafetensorsMalformed, TensorInTwoShardsIsRefused) {
  // transformers loads every tensor of each shard, so of a tensor stored twice the
  // last shard's copy wins whatever weight_map says; taking weight_map's was silent.
  const auto dir = golden_model_copy("st-two-shards", [](nlohmann::json&) {});
  const std::string norm = "model.norm.weight", s3 = dir + "/model-00003-of-00004.safetensors",
                    s4 = dir + "/model-00004-of-00004.safetensors";
  ASSERT_EQ(testutil::read_json(dir + "/model.safetensors.index.json")["weight_map"][norm],
            "model-00003-of-00004.safetensors");
  std::vector<std::pair<std::string, torch::Tensor>> shard4;
  for (auto& [n, t] : io::load_tensors(s4)) shard4.emplace_back(n, t.clone());
  shard4.emplace_back(norm, torch::full({64}, 3.0));
  io::save_tensors(s4, shard4);
  const auto err = testutil::error_of([&] { io::SafetensorsCheckpoint c(dir); });
  EXPECT_EQ(err, s4 + ": tensor '" + norm + "': also in " + s3 + "; a tensor must be in one shard only");
  const auto r = testutil::run_cli("eval --model " + dir + " --data " + testutil::golden("tiny-llama/eval.bin") +
                                   " --seq-len 16 --device cpu");
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(r.err, "error: " + err + "\n");
  // The untouched shards load (a tensor once in each file is the normal case).
  const auto good = golden_model_copy("st-two-shards-good", [](nlohmann::json&) {});
  EXPECT_EQ(testutil::error_of([&] { io::SafetensorsCheckpoint c(good); }), "");
}

// A model of PyTorch pickles that LibTorch cannot read: one line naming the file and
// what is wrong, from the CLI. (Readable ones: ModelGolden.PickledShardsLoad...)
TEST(SafetensorsMalformed, AnUnreadablePickleCheckpointNamesItsFile) {
  struct Case {
    std::string file, bytes, want;
  };
  const std::string ordered_bytes = testutil::read_file(testutil::data("longlora-adapter/ordered/adapter_model.bin"));
  ASSERT_FALSE(ordered_bytes.empty());
  const Case cases[] = {
      {"pytorch_model.bin", "PK", "/pytorch_model.bin: cannot read it as a torch.save file: "},
      {"pytorch_model.bin.index.json", "PK", "/pytorch_model.bin.index.json: "},
      // DeepSpeed's zero_to_fp32.py saves the state_dict as it is, an OrderedDict.
      {"pytorch_model.bin", ordered_bytes,
       "/pytorch_model.bin: holds an OrderedDict (a state_dict() as it is), which LibTorch cannot read: save it "
       "as a plain dict, in Python: torch.save(dict(torch.load(F)), F), or as safetensors"},
  };
  for (const auto& c : cases) {
    const auto dir = testutil::temp_dir("st-pickle");
    std::filesystem::copy(testutil::golden("tiny-llama/model/config.json"), dir + "/config.json");
    testutil::write_file(dir + "/" + c.file, c.bytes);
    auto r = testutil::run_cli("eval --model " + dir + " --data " + testutil::golden("tiny-llama/eval.bin") +
                               " --seq-len 16");
    EXPECT_EQ(r.code, 1);
    EXPECT_EQ(r.err.rfind("error: " + dir + c.want, 0), 0u) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  // Without LibTorch's reader (the checkpoint class alone) pickles get the conversion.
  const std::string pickled = testutil::data("pickled-model");
  EXPECT_NE(testutil::error_of([&] { io::SafetensorsCheckpoint c(pickled); })
                .find(pickled + ": holds pytorch_model.bin weights (PyTorch pickles), which are not read; save them "
                                "as safetensors first: python -c"),
            std::string::npos);
  // pytorch_model.bin comes before the shards' index, as in transformers: a broken one
  // beside good shards is what is read (and named).
  const auto shards = testutil::temp_dir("st-pickle-order");
  for (const auto& e : std::filesystem::directory_iterator(pickled))
    std::filesystem::copy_file(e.path(), shards + "/" + e.path().filename().string());
  testutil::write_file(shards + "/pytorch_model.bin", "PK");
  EXPECT_EQ(testutil::error_of([&] { (void)model::load_model(shards, {}); })
                .rfind(shards + "/pytorch_model.bin: cannot read it as a torch.save file", 0),
            0u);
  // Safetensors come first, as in transformers: a broken pickle beside them is not read.
  const auto both = golden_model_copy("st-and-pickle", [](nlohmann::json&) {});
  testutil::write_file(both + "/pytorch_model.bin", "PK");
  EXPECT_EQ(testutil::error_of([&] { (void)model::load_model(both, {}); }), "");
}

// LibTorch's reader takes a record's bytes as they are: a tensor whose record was cut
// short was read past its end (a different loss, exit 0), or crashed when empty.
TEST(SafetensorsMalformed, DamagedPicklesAreRefusedNotRead) {
  const std::string dir = testutil::data("damaged-pickle/");
  EXPECT_EQ(testutil::error_of([&] { (void)io::read_pickled_tensors(dir + "short_record.bin"); }),
            dir + "short_record.bin: tensor 'w': its shape and strides need 64 bytes of its storage record, which "
                  "holds 8: the file is damaged");
  // Strides of 0 fit any storage: a 320 KB shard of a (2^31, 64) tensor asked for
  // 512 GB when made contiguous. A state dict's tensors never repeat elements.
  EXPECT_EQ(testutil::error_of([&] { (void)io::read_pickled_tensors(dir + "repeated.bin"); }),
            dir + "repeated.bin: tensor 'w': its 800000 elements need 3200000 bytes, more than its storage record "
                  "holds (32): strides that repeat elements; the file is damaged");
  EXPECT_EQ(testutil::error_of([&] { (void)io::read_pickled_tensors(dir + "legacy.bin"); })
                .rfind(dir + "legacy.bin: a torch.save file in the legacy (non-zip) format, which LibTorch cannot read", 0),
            0u);
}

// A pickle of lists nested 10^6 deep (2 MB) crashed the process: LibTorch frees a
// nested value recursively. Refused from a count of its containers, before unpickling.
TEST(SafetensorsMalformed, APickleNestedPastAnyStateDictIsRefused) {
  const auto dir = testutil::temp_dir("pickle-deep");
  auto write = [&](const std::string& name, const std::string& pkl) {
    caffe2::serialize::PyTorchStreamWriter w(dir + "/" + name);
    w.writeRecord("data.pkl", pkl.data(), pkl.size());
    w.writeEndOfFile();
    return dir + "/" + name;
  };
  const size_t depth = 1000000;
  const auto deep = write("deep.bin", "\x80\x02" + std::string(depth, ']') + std::string(depth - 1, 'a') + ".");
  EXPECT_EQ(testutil::error_of([&] { (void)io::read_pickled_tensors(deep); }),
            deep + ": data.pkl: more than 100000 containers (a state dict has some six a tensor): refused, as "
                   "nesting that deep crashes LibTorch");
  const auto junk = write("junk.bin", std::string("\x80\x02}\xff.", 5));
  EXPECT_EQ(testutil::error_of([&] { (void)io::read_pickled_tensors(junk); }),
            junk + ": data.pkl: byte 255 at offset 3 is no pickle opcode: the file is damaged");
  // The scan walks the arguments of every opcode a state dict uses: the golden files,
  // written by Python's torch.save, still read.
  EXPECT_FALSE(io::read_pickled_tensors(testutil::data("pickled-model/pytorch_model-00001-of-00002.bin"))
                   ->tensors()
                   .empty());
}
