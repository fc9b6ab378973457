// Training: the golden S2 loss and gradients, a loss that falls, exact resume,
// crash safety of saves, clean exit on SIGTERM.
#include <signal.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <functional>
#include <chrono>
#include <limits>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <thread>

#include <caffe2/serialize/inline_container.h>

#include "longlora/data/dataset.h"
#include "longlora/data/tokenizer.h"
#include "longlora/eval/perplexity.h"
#include "longlora/io/checksum.h"
#include "longlora/io/tensors.h"
#include "longlora/model/loader.h"
#include "longlora/train/checkpoint.h"
#include "longlora/train/setup.h"
#include "golden_step.h"
#include "test_util.h"

using namespace longlora;
using nlohmann::json;
using testutil::golden_step;
using testutil::StepOptions;
namespace fs = std::filesystem;

namespace {

// On the CPU wherever the tests run: they compare runs with replays on the CPU and with
// each other bit for bit, which a GPU's atomics and kernels do not give (on the GPU
// machine three of them failed by 1e-5 to 1e-4). test_gpu_train.cpp runs the CLI there.
std::string tiny_config(const std::string& dir, const std::string& extra = "") {
  const std::string path = dir + "/run.json";
  testutil::write_file(path, R"({
    "device": "cpu",
    "model": {"path": ")" + testutil::golden("tiny-llama/model") + R"("},
    "data": {"train": ")" + testutil::golden("tiny-llama/eval.bin") + R"(", "seq_len": 64},
    "lora": {"r": 4, "dropout": 0.1},
    "attention": {"shift_mode": "segments"},
    "train": {"lr": 0.003, "warmup_steps": 2, "max_steps": 6, "grad_accum": 2, "micro_batch_size": 2},
    "output": {"dir": ")" + dir + R"(/out", "save_steps": 3, "keep_last": 5, "log_steps": 1}
  })" + extra);
  return path;
}

// Four instruction records of different lengths in `dir`/sft.jsonl, and the flags that
// train on them at seq_len 256, in order, without dropout.
std::string sft_flags(const std::string& dir) {
  std::string jsonl;
  for (const char* out : {"Blue.", "The sky is blue and the grass is green today.", "Yes.", "No, it is not."})
    jsonl += json({{"instruction", "Say it."}, {"output", out}}).dump() + "\n";
  testutil::write_file(dir + "/sft.jsonl", jsonl);
  return " --set data.train=" + dir + "/sft.jsonl --set data.seq_len=256 --set lora.dropout=0 --set data.shuffle=false";
}

// Rewrites checkpoint `ck` of the run `config` as the format-1 writer did: state.pt, a
// LibTorch archive of the optimizer (moments by position) and the CPU RNG, in place of
// optimizer.safetensors. `edit` may change the restored states before they are written;
// `sets` are --set overrides of the config.
void to_format_1(const std::string& ck, const std::string& config,
                 const std::function<void(torch::optim::AdamWParamState&)>& edit = nullptr,
                 const std::vector<std::string>& sets = {}) {
  auto cfg = train::load_run_config(config);
  for (const auto& a : sets) train::apply_override(cfg, a);
  auto s = train::make_session(cfg, false);
  train::load_checkpoint(ck, s.trainable, *s.optimizer, cfg, s.model->cfg);
  if (edit)
    for (auto& [key, st] : s.optimizer->state()) edit(static_cast<torch::optim::AdamWParamState&>(*st));
  torch::serialize::OutputArchive ar;
  s.optimizer->save(ar);
  ar.write("rng_cpu", at::detail::getDefaultCPUGenerator().get_state());
  ar.save_to(ck + "/state.pt");
  fs::remove(ck + "/optimizer.safetensors");
  json st = testutil::read_json(ck + "/trainer_state.json");
  st["format_version"] = 1;
  if (st.contains("files")) {
    st["files"].erase("optimizer.safetensors");
    const auto dg = io::digest_file(ck + "/state.pt");
    st["files"]["state.pt"] = {{"bytes", dg.bytes}, {"crc32", fmt::format("{:08x}", dg.crc32)}};
  }
  testutil::write_file(ck + "/trainer_state.json", st.dump(2));
}


}  // namespace

TEST(TrainGolden, S2RollLossAndGradientsMatchTransformers) {
  auto j = testutil::golden_json();
  auto g = testutil::load(testutil::golden("tiny-llama/golden.safetensors"));
  // Without and with checkpointing, and with the recompute's MLP in ragged chunks.
  for (int variant : {0, 1, 2}) {
    StepOptions so;
    so.checkpointing = variant >= 1;
    so.mlp_chunk = variant == 2 ? 48 : 0;
    const std::string ckpt = std::to_string(variant);
    std::map<std::string, torch::Tensor> grads;
    const double loss = golden_step(attention::Mode::Roll, so, &grads);
    EXPECT_NEAR(loss, j["loss_s2"].get<double>(), 1e-4 * j["loss_s2"].get<double>()) << "checkpointing " << ckpt;
    int checked = 0;
    for (auto& [key, want] : g) {
      if (key.rfind("grad.", 0) != 0) continue;
      const std::string name = key.substr(5);
      ASSERT_TRUE(grads.count(name)) << name << " is not trainable";
      const double d = testutil::max_abs_diff(grads[name], want);
      const double scale = want.abs().max().item<double>();
      EXPECT_LE(d, 1e-4 * scale + 1e-7) << name << " variant " << ckpt << " max abs diff " << d;
      ++checked;
    }
    EXPECT_EQ(checked, 5);
  }
}

TEST(TrainGolden, FullAttentionLossMatchesTransformersAndEvalUsesIt) {
  auto j = testutil::golden_json();
  const double full = j["loss_full_lora"].get<double>(), s2 = j["loss_s2"].get<double>();
  ASSERT_GT(std::abs(full - s2), 1e-3 * full);  // else the eval check below tells nothing
  EXPECT_NEAR(golden_step(attention::Mode::Full, {}, nullptr), full, 1e-4 * full);
  // Evaluation's own entry point: one window of the 128 golden ids scores their 127 next
  // tokens, and must give transformers' full-attention loss, not an S2 one.
  auto g = testutil::load(testutil::golden("tiny-llama/golden.safetensors"));
  auto m = model::load_model(testutil::golden("tiny-llama/model"), {});
  model::apply_adapter(*m, testutil::golden("tiny-llama/adapter"));
  const auto ids64 = g["input_ids"].flatten().to(torch::kInt32).contiguous();
  const std::vector<int32_t> ids(ids64.data_ptr<int32_t>(), ids64.data_ptr<int32_t>() + ids64.numel());
  ASSERT_EQ(ids.size(), 128u);
  torch::NoGradGuard ng;
  const auto r = eval::perplexity(*m, ids, 127, 127, "golden input_ids");
  EXPECT_EQ(r.windows, 1);
  EXPECT_NEAR(r.loss, full, 1e-4 * full);
}

// Every trainable grad (the post-attention norms too, which the golden set lacks):
// the chunked MLP recompute equals the whole-sequence one up to fp32 rounding.
TEST(TrainMemory, ChunkedMlpRecomputeGivesTheSameGrads) {
  std::map<std::string, torch::Tensor> whole, chunked;
  StepOptions a;
  a.checkpointing = true;
  StepOptions b = a;
  b.mlp_chunk = 40;
  const double la = golden_step(attention::Mode::Segments, a, &whole);
  const double lb = golden_step(attention::Mode::Segments, b, &chunked);
  EXPECT_NEAR(la, lb, 1e-6 * la);
  ASSERT_EQ(whole.size(), chunked.size());
  int norms = 0;
  for (auto& [name, w] : whole) {
    if (name.find("post_attention_layernorm") != std::string::npos) ++norms;
    const double scale = w.abs().max().item<double>();
    EXPECT_LE(testutil::max_abs_diff(chunked[name], w), 1e-5 * scale + 1e-8) << name;
  }
  EXPECT_GT(norms, 0);
}

// The recompute's down_proj skips its frozen product: forward_for_backward must
// give forward()'s gradients for the input and both LoRA factors, with dropout on
// (same RNG draw), and without LoRA.
TEST(TrainMemory, ForwardForBackwardGivesForwardsGrads) {
  for (bool with_lora : {true, false}) {
    lora::Linear lin(24, 16);
    lin->weight = torch::randn({16, 24});
    if (with_lora) {
      lin->add_lora(4, 8.0, 0.25);
      lin->lora_B->weight.data().normal_();  // nonzero, or dA would be zero
    }
    lin->train();
    auto x = torch::randn({2, 5, 24});
    auto g = torch::randn({2, 5, 16});
    std::vector<torch::Tensor> got[2];
    for (int variant : {0, 1}) {
      torch::manual_seed(7);
      auto xi = x.clone().requires_grad_(true);
      auto y = variant == 0 ? lin->forward(xi) : lin->forward_for_backward(xi);
      std::vector<torch::Tensor> inputs{xi};
      if (with_lora) inputs.insert(inputs.end(), {lin->lora_A->weight, lin->lora_B->weight});
      got[variant] = torch::autograd::grad({y}, inputs, {g});
    }
    for (size_t i = 0; i < got[0].size(); ++i)
      EXPECT_TRUE(torch::allclose(got[1][i], got[0][i], 1e-5, 1e-6)) << "lora " << with_lora << " grad " << i;
  }
}

// Offloading the checkpointed inputs to pinned host memory is a copy there and
// back: loss and grads are bit-identical to keeping them on the GPU.
TEST(TrainMemory, OffloadedCheckpointsGiveIdenticalGradsOnGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device: offload runs on the GPU machine";
  std::map<std::string, torch::Tensor> kept, off;
  StepOptions a;
  a.checkpointing = true;
  a.device = torch::Device(torch::kCUDA, 0);
  StepOptions b = a;
  b.offload = true;
  b.mlp_chunk = 40;
  a.mlp_chunk = 40;
  const double la = golden_step(attention::Mode::Segments, a, &kept);
  const double lb = golden_step(attention::Mode::Segments, b, &off);
  EXPECT_EQ(la, lb);
  for (auto& [name, w] : kept) EXPECT_TRUE(torch::equal(off[name], w)) << name;
}

// Three logged steps of `longlora-train` against the same steps replayed here from
// the base model and the run's initial weights, with the S2 grouping, the learning
// rates, the gradient clipping and AdamW (decay on matrices only) written out in the
// test: what the config asks for must reach the step. LoRA's dropout is 0 and rows
// come in file order, so both sides see the same batches.
TEST(Train, StepsMatchAReplayOfS2AndAdamWWrittenOutHere) {
  const double lr = 0.003, wd = 0.5, b1 = 0.8, b2 = 0.9, eps = 1e-8, max_norm = 0.05;
  const std::vector<double> lrs{0.0, lr / 2, lr};  // warmup 2: 0/2, 1/2, then the peak
  std::map<std::string, double> first_loss;
  for (const std::string mode : {"segments", "roll"}) {
    const auto d = testutil::temp_dir("replay-" + mode);
    auto r = testutil::run_cli("--config " + tiny_config(d) + " --set attention.shift_mode=" + mode +
                               " --set lora.dropout=0 --set data.shuffle=false --set train.max_steps=3"
                               " --set output.save_steps=1 --set train.weight_decay=0.5"
                               " --set train.max_grad_norm=0.05 --set 'train.betas=[0.8,0.9]'");
    ASSERT_EQ(r.code, 0) << r.err;
    std::vector<json> recs;
    std::ifstream in(d + "/out/metrics.jsonl");
    for (std::string line; std::getline(in, line);) recs.push_back(json::parse(line));
    ASSERT_EQ(recs.size(), 3u);

    // The learning rate is 0 at the first step, so checkpoint-1 holds the initial weights.
    auto m = model::load_model(testutil::golden("tiny-llama/model"), {});
    model::apply_adapter(*m, d + "/out/checkpoint-1");
    train::RunConfig rc;
    auto params = train::select_trainable(*m, rc);
    model::ForwardOptions fo;
    fo.attn.mode = mode == "roll" ? attention::Mode::Roll : attention::Mode::Segments;
    fo.attn.group = 16;  // a quarter of seq_len 64
    data::Dataset ds(testutil::golden("tiny-llama/eval.bin"), "auto", 64, nullptr, 512, "alpaca");
    std::map<std::string, std::pair<torch::Tensor, torch::Tensor>> adam;  // first and second moments
    m->train();
    for (int step = 0; step < 3; ++step) {
      for (auto& [n, p] : params) p.mutable_grad() = torch::Tensor();
      // Two micro-batches of two rows; the loss is over the step's target tokens.
      std::vector<torch::Tensor> ids, tgts;
      double count = 0;
      for (int a = 0; a < 2; ++a) {
        std::vector<torch::Tensor> ri, rt;
        for (int b = 0; b < 2; ++b) {
          const auto row = ds.row_at(step * 4 + a * 2 + b, false, 0);
          ri.push_back(torch::tensor(std::vector<int64_t>(row.ids.begin(), row.ids.end())));
          rt.push_back(torch::tensor(std::vector<int64_t>(row.targets.begin(), row.targets.end())));
          for (int32_t t : row.targets) count += t >= 0;
        }
        ids.push_back(torch::stack(ri));
        tgts.push_back(torch::stack(rt));
      }
      double loss = 0;
      for (int a = 0; a < 2; ++a) {
        auto logp = torch::log_softmax(m->logits(m->hidden(ids[a], fo)), -1);
        auto t = tgts[a];
        auto nll = -(logp.gather(2, t.clamp_min(0).unsqueeze(2)).squeeze(2) * t.ge(0)).sum();
        (nll / count).backward();
        loss += nll.item<double>() / count;
      }
      if (step == 0) {
        first_loss[mode] = loss;
        // Full attention gives another loss: a run that dropped S2 would fail above.
        torch::NoGradGuard ng;
        model::ForwardOptions full;
        auto logp = torch::log_softmax(m->logits(m->hidden(ids[0], full)), -1);
        auto again = torch::log_softmax(m->logits(m->hidden(ids[0], fo)), -1);
        EXPECT_GT((logp - again).abs().max().item<double>(), 1e-2) << mode;
      }
      double sq = 0;
      for (auto& [n, p] : params) sq += p.grad().pow(2).sum().item<double>();
      const double norm = std::sqrt(sq);
      EXPECT_NEAR(recs[step]["loss"].get<double>(), loss, 2e-6 * loss) << mode << " step " << step + 1;
      EXPECT_NEAR(recs[step]["grad_norm"].get<double>(), norm, 1e-5 * norm) << mode << " step " << step + 1;
      EXPECT_DOUBLE_EQ(recs[step]["lr"].get<double>(), lrs[step]) << mode << " step " << step + 1;
      ASSERT_GT(norm, 2 * max_norm) << "the clipping must act for the test to see it";
      torch::NoGradGuard ng;
      const double t = step + 1;
      for (auto& [n, p] : params) {
        auto g = p.grad() * (max_norm / (norm + 1e-6));
        auto& [mo, v] = adam[n];
        if (!mo.defined()) mo = torch::zeros_like(p), v = torch::zeros_like(p);
        mo = b1 * mo + (1 - b1) * g;
        v = b2 * v + (1 - b2) * g * g;
        if (p.dim() >= 2) p.mul_(1 - lrs[step] * wd);  // norms are not decayed
        auto denom = (v.sqrt() / std::sqrt(1 - std::pow(b2, t))) + eps;
        p.sub_(lrs[step] / (1 - std::pow(b1, t)) * mo / denom);
      }
    }
    // The weights the run saved after step 3 are the replay's.
    auto saved = model::load_model(testutil::golden("tiny-llama/model"), {});
    model::apply_adapter(*saved, d + "/out/checkpoint-3");
    auto want = train::select_trainable(*saved, rc);
    ASSERT_EQ(want.size(), params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      const auto& [n, p] = params[i];
      const auto& w = want[i].second;
      // AdamW divides by sqrt(v): an entry whose gradient is near zero (a sum that
      // cancels) moves by lr times a ratio that rounding decides. On AVX-512 one of the
      // embedding's 32768 entries differed by 1.4e-5, the rest within 1e-7. A wrong lr,
      // beta or decay moves most entries by more than the tolerance.
      const auto diff = (p - w).abs();
      const double tol = 1e-6 + 1e-5 * w.abs().max().item<double>();
      EXPECT_LE((diff > tol).sum().item<int64_t>(), diff.numel() / 1000) << mode << " " << n;
      EXPECT_LE(diff.max().item<double>(), 1e-4) << mode << " " << n;
    }
    longlora::remove_tree(d);
  }
  // The two shift modes train on different attention, so the check above tells them apart.
  EXPECT_GT(std::abs(first_loss["roll"] - first_loss["segments"]), 1e-4 * first_loss["roll"]);
}

TEST(Train, TinyModelLossFallsAndCheckpointLoadsAsAdapter) {
  const auto dir = testutil::temp_dir("train-falls");
  auto r = testutil::run_cli("--config " + tiny_config(dir) + " --set train.max_steps=30 --set output.save_steps=30");
  ASSERT_EQ(r.code, 0) << r.err;
  auto l = testutil::metric_losses(dir + "/out/metrics.jsonl");
  ASSERT_EQ(l.size(), 30u);
  const double first = (l[0] + l[1] + l[2]) / 3, last = (l[27] + l[28] + l[29]) / 3;
  EXPECT_LT(last, first - 0.3) << "first " << first << " last " << last;
  // The checkpoint is a peft adapter that eval --adapter reads.
  const std::string ck = dir + "/out/checkpoint-30";
  ASSERT_TRUE(fs::exists(ck + "/COMPLETE"));
  auto cfg = json::parse(std::ifstream(ck + "/adapter_config.json"));
  EXPECT_EQ(cfg["r"], 4);
  EXPECT_EQ(cfg["modules_to_save"].size(), 4u);  // embed_tokens, input/post layernorm, norm
  auto e = testutil::run_cli("eval --model " + testutil::golden("tiny-llama/model") + " --adapter " + ck +
                             " --data " + testutil::golden("tiny-llama/eval.bin") + " --seq-len 64 --json");
  ASSERT_EQ(e.code, 0) << e.err;
  auto base = testutil::run_cli("eval --model " + testutil::golden("tiny-llama/model") + " --data " +
                                testutil::golden("tiny-llama/eval.bin") + " --seq-len 64 --json");
  EXPECT_LT(json::parse(e.out)["loss"].get<double>(), json::parse(base.out)["loss"].get<double>() - 0.3);
}

// A tied base trains one matrix for both layers. peft loads each module_to_save as its
// own copy, so a saved embed_tokens alone would leave peft's lm_head on the base's
// matrix: the checkpoint names lm_head too, with the same matrix.
TEST(Train, ATiedBasesTrainedEmbeddingIsSavedForBothLayers) {
  const auto dir = testutil::temp_dir("train-tied");
  const std::string base = dir + "/base";
  std::filesystem::copy(testutil::golden("tiny-llama/model"), base);
  auto mc = testutil::read_json(base + "/config.json");
  mc["tie_word_embeddings"] = true;
  testutil::write_file(base + "/config.json", mc.dump());
  auto r = testutil::run_cli("--config " + tiny_config(dir) + " --set model.path=" + base +
                             " --set train.max_steps=2 --set output.save_steps=2");
  ASSERT_EQ(r.code, 0) << r.err;
  const std::string ck = dir + "/out/checkpoint-2";
  const auto cfg = testutil::read_json(ck + "/adapter_config.json");
  const auto mods = cfg["modules_to_save"].get<std::vector<std::string>>();
  EXPECT_NE(std::find(mods.begin(), mods.end(), "embed_tokens"), mods.end()) << cfg.dump();
  EXPECT_NE(std::find(mods.begin(), mods.end(), "lm_head"), mods.end()) << cfg.dump();
  auto t = testutil::load(ck + "/adapter_model.safetensors");
  const std::string pre = io::kPeftPrefix;
  const auto& embed = t.at(pre + "model.embed_tokens.weight");
  EXPECT_TRUE(torch::equal(t.at(pre + "lm_head.weight"), embed));
  // Trained, and loads back as the one matrix.
  auto m = model::load_model(base, {});
  EXPECT_GT(testutil::max_abs_diff(embed, m->head_weight()), 0);
  model::apply_adapter(*m, ck);
  EXPECT_TRUE(torch::equal(m->head_weight(), embed));
  // It resumes: the file's second name for the embedding (lm_head) is no tensor the run
  // would drop. On its own base, eval has no word about other base weights.
  r = testutil::run_cli("--config " + tiny_config(dir) + " --set model.path=" + base +
                        " --set train.max_steps=3 --set output.save_steps=3 --resume");
  EXPECT_EQ(r.code, 0) << r.err;
  r = testutil::run_cli("eval --model " + base + " --adapter " + dir + "/out/checkpoint-3 --data " +
                        testutil::golden("tiny-llama/eval.bin") + " --seq-len 64 --device cpu");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.err.find("base_sample"), std::string::npos) << r.err;
  longlora::remove_tree(dir);
}

TEST(Train, InstructionBatchesAreCutToTheirLongestRow) {
  // Padded to seq_len, a short record cost as much as a long one, and S2 grouped it by
  // a quarter of seq_len. Cut to the micro-batch's longest row (rounded to S2's four
  // even groups), the step is the one replayed here on the cut rows, a group being a
  // quarter of their width, as LongLoRA sizes it from the batch.
  const auto d = testutil::temp_dir("sft-cut");
  auto r = testutil::run_cli("--config " + tiny_config(d) + sft_flags(d) +
                             " --set train.grad_accum=1 --set train.max_steps=2 --set output.save_steps=1");
  ASSERT_EQ(r.code, 0) << r.err;
  std::vector<json> recs;
  std::ifstream in(d + "/out/metrics.jsonl");
  for (std::string line; std::getline(in, line);) recs.push_back(json::parse(line));
  ASSERT_EQ(recs.size(), 2u);
  data::Tokenizer tok(testutil::golden("tiny-llama/model/tokenizer.model"));
  data::Dataset ds(d + "/sft.jsonl", "auto", 256, &tok, 512);
  model::LoadOptions lo;
  lo.rope_factor = 2;  // seq_len 256 over the model's 128 positions
  auto m = model::load_model(testutil::golden("tiny-llama/model"), lo);
  model::apply_adapter(*m, d + "/out/checkpoint-1");  // the initial weights (lr 0 at step 1)
  m->train();
  torch::NoGradGuard ng;
  for (int step = 0; step < 2; ++step) {
    std::vector<data::Row> rows{ds.row_at(2 * step, false, 0), ds.row_at(2 * step + 1, false, 0)};
    int64_t need = 0;
    for (const auto& row : rows)
      for (int64_t i = 0; i < 256; ++i)
        if (row.targets[i] >= 0) need = std::max(need, i + 1);
    const int64_t width = (need + 7) / 8 * 8;
    ASSERT_LT(width, 256);
    auto batch = [&](int64_t w, bool targets) {
      std::vector<torch::Tensor> t;
      for (const auto& row : rows) {
        const auto& v = targets ? row.targets : row.ids;
        t.push_back(torch::tensor(std::vector<int64_t>(v.begin(), v.begin() + w)));
      }
      return torch::stack(t);
    };
    auto loss_at = [&](int64_t w, int64_t group) {
      model::ForwardOptions fo;
      fo.attn.mode = attention::Mode::Segments;
      fo.attn.group = group;
      auto logp = torch::log_softmax(m->logits(m->hidden(batch(w, false), fo)), -1);
      auto t = batch(w, true);
      return (-(logp.gather(2, t.clamp_min(0).unsqueeze(2)).squeeze(2) * t.ge(0)).sum() / t.ge(0).sum())
          .item<double>();
    };
    // Step 2 ran on checkpoint-1's weights, the ones loaded: its loss checks the second
    // micro-batches' gathering, cut and S2 group as step 1's checks the first.
    const double want = loss_at(width, width / 4);
    EXPECT_NEAR(recs[step]["loss"].get<double>(), want, 2e-6 * want) << "step " << step + 1;
    // Uncut, S2's groups of 64 see the rows otherwise: the check above tells them apart.
    EXPECT_GT(std::abs(loss_at(256, 64) - want), 1e-3 * want) << "step " << step + 1;
    // The positions computed are the cut rows'.
    EXPECT_NEAR(recs[step]["tokens_per_s"].get<double>() * recs[step]["step_time_s"].get<double>(), 2.0 * width,
                1e-6 * width)
        << "step " << step + 1;
  }
  longlora::remove_tree(d);
}

// group_ratio 1 is full attention; with instruction rows cut to their longest, its
// group (seq_len) was once left wider than the cut rows and the first step failed.
TEST(Train, S2AtRatioOneOnInstructionRowsIsFullAttention) {
  const auto d = testutil::temp_dir("sft-ratio1");
  std::vector<std::vector<double>> losses;
  for (const std::string attn : {"attention.group_ratio=1", "attention.s2=false"}) {
    longlora::remove_tree(d + "/out");
    auto r = testutil::run_cli("--config " + tiny_config(d) + sft_flags(d) +
                               " --set train.grad_accum=1 --set train.max_steps=2 --set " + attn);
    ASSERT_EQ(r.code, 0) << attn << ": " << r.err;
    losses.push_back(testutil::metric_losses(d + "/out/metrics.jsonl"));
  }
  ASSERT_EQ(losses[0].size(), 2u);
  EXPECT_EQ(losses[0], losses[1]);
  longlora::remove_tree(d);
}

TEST(Train, EvalDataIsScoredAtEverySaveAsEvalScoresThatCheckpoint) {
  const auto a = testutil::temp_dir("eval-data-a"), b = testutil::temp_dir("eval-data-b");
  const std::string eval_bin = testutil::golden("tiny-llama/eval.bin");
  auto r = testutil::run_cli("--config " + tiny_config(a) + " --set data.eval=" + eval_bin);
  ASSERT_EQ(r.code, 0) << r.err;
  ASSERT_EQ(testutil::run_cli("--config " + tiny_config(b)).code, 0);
  std::map<int, json> evals;
  std::ifstream in(a + "/out/metrics.jsonl");
  for (std::string line; std::getline(in, line);)
    if (json j = json::parse(line); j.contains("eval_loss")) evals[j["step"].get<int>()] = j;
  ASSERT_EQ(evals.size(), 2u);
  for (int step : {3, 6}) {
    ASSERT_TRUE(evals.count(step)) << step;
    auto e = testutil::run_cli("eval --model " + testutil::golden("tiny-llama/model") + " --adapter " + a +
                               "/out/checkpoint-" + std::to_string(step) + " --data " + eval_bin + " --seq-len 64 --json");
    ASSERT_EQ(e.code, 0) << e.err;
    const double want = json::parse(e.out)["loss"].get<double>();
    EXPECT_NEAR(evals[step]["eval_loss"].get<double>(), want, 1e-6 * want) << step;
    EXPECT_NEAR(evals[step]["eval_perplexity"].get<double>(), std::exp(want), 1e-6 * std::exp(want)) << step;
  }
  // Evaluating changes nothing in training: the steps after it (LoRA dropout back on)
  // are those of a run without eval data, bit for bit.
  const auto la = testutil::metric_losses(a + "/out/metrics.jsonl");
  ASSERT_EQ(la.size(), 6u);
  EXPECT_EQ(la, testutil::metric_losses(b + "/out/metrics.jsonl"));
  longlora::remove_tree(a);
  longlora::remove_tree(b);
}

TEST(Train, RelativePathsOfARunAreReadFromAnyDirectory) {
  // A relative model.path went into run_config.json as given, and export, run from
  // another directory, looked for the base model there (or found another one).
  const auto d = testutil::temp_dir("relative-paths");
  fs::create_directories(d + "/work");
  fs::create_directory_symlink(testutil::golden("tiny-llama/model"), d + "/work/m");
  fs::create_symlink(testutil::golden("tiny-llama/eval.bin"), d + "/work/eval.bin");
  testutil::write_file(d + "/work/run.json", R"({
    "model": {"path": "m"}, "data": {"train": "eval.bin", "seq_len": 64},
    "lora": {"r": 4}, "train": {"max_steps": 2, "grad_accum": 1},
    "output": {"dir": "out", "save_steps": 1}})");
  const std::string in_work = "cd " + d + "/work && ";
  auto r = testutil::run_cli("--config run.json --set train.max_steps=1", in_work);
  ASSERT_EQ(r.code, 0) << r.err;
  const auto rc = testutil::read_json(d + "/work/out/checkpoint-1/run_config.json");
  EXPECT_EQ(rc["model"]["path"], d + "/work/m");
  EXPECT_EQ(rc["data"]["train"], d + "/work/eval.bin");
  EXPECT_EQ(rc["output"]["dir"], d + "/work/out");
  EXPECT_EQ(testutil::read_json(d + "/work/out/checkpoint-1/adapter_config.json")["base_model_name_or_path"],
            d + "/work/m");
  r = testutil::run_cli("export --checkpoint " + d + "/work/out/checkpoint-1 --output " + d + "/merged", "cd / && ");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(fs::exists(d + "/merged/tokenizer.model"));  // the base was found
  // The same relative config resumes without a word about changed paths.
  r = testutil::run_cli("--config run.json --resume", in_work);
  ASSERT_EQ(r.code, 0) << r.err;
  for (const char* key : {"model.path", "data.train", "output.dir"})
    EXPECT_EQ(r.err.find(std::string("resume: ") + key), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("resume: train.max_steps is 2 now, 1 in"), std::string::npos) << r.err;
  longlora::remove_tree(d);
}

TEST(Train, ResumeIsBitIdentical) {
  const auto a = testutil::temp_dir("resume-a"), b = testutil::temp_dir("resume-b");
  auto r = testutil::run_cli("--config " + tiny_config(a));
  ASSERT_EQ(r.code, 0) << r.err;
  r = testutil::run_cli("--config " + tiny_config(b) + " --set train.max_steps=3");
  ASSERT_EQ(r.code, 0) << r.err;
  // A record logged after the checkpoint, as by a run killed between saves: the
  // resumed run logs step 4 again and must not leave two of it.
  std::ofstream(b + "/out/metrics.jsonl", std::ios::app) << R"({"step": 4, "loss": 99.0})" << "\n";
  r = testutil::run_cli("--config " + tiny_config(b) + " --resume");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("resumed from"), std::string::npos) << r.err;
  auto la = testutil::metric_losses(a + "/out/metrics.jsonl"), lb = testutil::metric_losses(b + "/out/metrics.jsonl");
  ASSERT_EQ(la.size(), 6u);
  ASSERT_EQ(lb.size(), 6u);
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(la[i], lb[i]) << "step " << i + 1;  // bit-identical
  // The state is by name now: the moments, counts and RNG of every parameter the run
  // trains (LoRA on q and v, embed and norms), nothing else.
  io::SafetensorsFile opt(b + "/out/checkpoint-3/optimizer.safetensors");
  EXPECT_TRUE(opt.contains("model.layers.0.self_attn.q_proj.lora_A.weight.exp_avg_sq"));
  EXPECT_TRUE(opt.contains("model.norm.weight.step"));
  ASSERT_TRUE(opt.contains("rng.cpu"));
  EXPECT_EQ(opt.get("rng.cpu").dtype, io::DType::U8);
  // A checkpoint of format 1 (state.pt) resumes the same, bit for bit.
  const auto c = testutil::temp_dir("resume-c");
  ASSERT_EQ(testutil::run_cli("--config " + tiny_config(c) + " --set train.max_steps=3").code, 0);
  to_format_1(c + "/out/checkpoint-3", tiny_config(c));
  ASSERT_FALSE(fs::exists(c + "/out/checkpoint-3/optimizer.safetensors"));
  r = testutil::run_cli("--config " + tiny_config(c) + " --resume");
  ASSERT_EQ(r.code, 0) << r.err;
  auto lc = testutil::metric_losses(c + "/out/metrics.jsonl");
  ASSERT_EQ(lc.size(), 6u);
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(la[i], lc[i]) << "step " << i + 1;
  // The child's folder in output.dir is gone.
  for (const auto& e : fs::directory_iterator(c + "/out"))
    EXPECT_EQ(e.path().filename().string().rfind(".legacy-state-", 0), std::string::npos) << e.path();
  // Its next saves are of the current format.
  EXPECT_TRUE(fs::exists(c + "/out/checkpoint-6/optimizer.safetensors"));
  EXPECT_EQ(testutil::read_json(c + "/out/checkpoint-6/trainer_state.json")["format_version"], 2);
  for (const auto& dir : {a, b, c}) longlora::remove_tree(dir);
}

// --resume where nothing was saved yet (a run killed before its first save, started
// again by the same script) starts at step 0, as a fresh run, and says so; a resume of
// a checkpoint at max_steps trains nothing and writes nothing.
TEST(Train, ResumeWithNothingToResumeOrNothingLeftToTrain) {
  const auto a = testutil::temp_dir("resume-none-a"), b = testutil::temp_dir("resume-none-b");
  auto r = testutil::run_cli("--config " + tiny_config(a) + " --set train.max_steps=3");
  ASSERT_EQ(r.code, 0) << r.err;
  r = testutil::run_cli("--config " + tiny_config(b) + " --set train.max_steps=3 --resume");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("--resume: no complete checkpoint in " + b + "/out: starting from step 0"), std::string::npos)
      << r.err;
  const auto la = testutil::metric_losses(a + "/out/metrics.jsonl");
  ASSERT_EQ(la.size(), 3u);
  EXPECT_EQ(la, testutil::metric_losses(b + "/out/metrics.jsonl"));
  const std::string metrics = testutil::read_file(b + "/out/metrics.jsonl");
  r = testutil::run_cli("--config " + tiny_config(b) + " --set train.max_steps=3 --resume");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("checkpoint-3 is at step 3, train.max_steps is 3: nothing left to train"), std::string::npos)
      << r.err;
  EXPECT_EQ(r.err.find("step 4/"), std::string::npos) << r.err;
  EXPECT_EQ(testutil::read_file(b + "/out/metrics.jsonl"), metrics);
  size_t checkpoints = 0;
  for (const auto& e : fs::directory_iterator(b + "/out")) checkpoints += e.path().filename().string().rfind("checkpoint-", 0) == 0;
  EXPECT_EQ(checkpoints, 1u);
  longlora::remove_tree(a);
  longlora::remove_tree(b);
}

// train.max_grad_norm 0 turns clipping off: the same steps as a bound no gradient
// reaches, and not those of a bound that clips.
// At log_steps 2 a record's loss is the mean of its two steps' losses (Hugging Face's
// Trainer logs so), step_loss the second's; the steps themselves are those of a run
// that logs every step.
TEST(Train, ALoggedLossIsTheMeanSinceThePreviousRecord) {
  const auto a = testutil::temp_dir("log-every"), b = testutil::temp_dir("log-two");
  ASSERT_EQ(testutil::run_cli("--config " + tiny_config(a) + " --set train.max_steps=4 --set output.save_steps=4").code, 0);
  auto r = testutil::run_cli("--config " + tiny_config(b) + " --set train.max_steps=4 --set output.save_steps=4 --set output.log_steps=2");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto every = testutil::metric_records(a + "/out/metrics.jsonl"), two = testutil::metric_records(b + "/out/metrics.jsonl");
  ASSERT_EQ(every.size(), 4u);
  ASSERT_EQ(two.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const double first = every[2 * i]["loss"].get<double>(), second = every[2 * i + 1]["loss"].get<double>();
    EXPECT_EQ(two[i]["step"], 2 * i + 2);
    EXPECT_DOUBLE_EQ(two[i]["loss"].get<double>(), (first + second) / 2) << i;
    EXPECT_EQ(two[i]["step_loss"].get<double>(), second) << i;
    EXPECT_EQ(every[2 * i]["step_loss"].get<double>(), first) << i;  // one step: the same
    EXPECT_EQ(two[i]["grad_norm"], every[2 * i + 1]["grad_norm"]) << i;
  }
  EXPECT_NE(r.err.find(fmt::format("step 2/4 | loss {:.4f} |", two[0]["loss"].get<double>())), std::string::npos) << r.err;
  longlora::remove_tree(a);
  longlora::remove_tree(b);
}

TEST(Train, MaxGradNormZeroDoesNotClip) {
  std::vector<std::vector<double>> losses;
  for (const char* norm : {"0", "1e9", "0.05"}) {
    const auto d = testutil::temp_dir(std::string("clip-") + norm);
    auto r = testutil::run_cli("--config " + tiny_config(d) + " --set train.max_steps=4 --set train.max_grad_norm=" + norm);
    ASSERT_EQ(r.code, 0) << r.err;
    losses.push_back(testutil::metric_losses(d + "/out/metrics.jsonl"));
    longlora::remove_tree(d);
  }
  ASSERT_EQ(losses[0].size(), 4u);
  EXPECT_EQ(losses[0], losses[1]);  // bit for bit
  EXPECT_NE(losses[0][3], losses[2][3]);
}

TEST(Train, ResumeTakesTheConfigsOptimizerSettingsAndSaysWhatChanged) {
  const auto a = testutil::temp_dir("resume-eps-a"), b = testutil::temp_dir("resume-eps-b");
  ASSERT_EQ(testutil::run_cli("--config " + tiny_config(a)).code, 0);
  ASSERT_EQ(testutil::run_cli("--config " + tiny_config(b) + " --set train.max_steps=3").code, 0);
  // The optimizer archive holds eps too; the resumed run must use the config's.
  auto r = testutil::run_cli("--config " + tiny_config(b) + " --set train.eps=0.5 --resume");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("resume: train.eps is 0.5 now, 1e-08 in"), std::string::npos) << r.err;
  auto la = testutil::metric_losses(a + "/out/metrics.jsonl"), lb = testutil::metric_losses(b + "/out/metrics.jsonl");
  ASSERT_EQ(la.size(), 6u);
  ASSERT_EQ(lb.size(), 6u);
  EXPECT_EQ(la[3], lb[3]);  // step 4 ran before the first update with the new eps
  EXPECT_NE(la[5], lb[5]);
}

TEST(Train, RunsDoNotMixInOneOutputDir) {
  const auto d = testutil::temp_dir("mix");
  ASSERT_EQ(testutil::run_cli("--config " + tiny_config(d)).code, 0);  // checkpoints 3 and 6
  // A new run there would log over the old metrics, and keep_last would prune its own
  // (lower-numbered) checkpoints first.
  for (const std::string extra : {"", " --dry-run"}) {
    auto r = testutil::run_cli("--config " + tiny_config(d) + " --set train.max_steps=2" + extra);
    EXPECT_EQ(r.code, 1) << extra;
    EXPECT_NE(r.err.find("holds checkpoint-6 of an earlier run: --resume continues it"), std::string::npos) << r.err;
  }
  // A rollback beside newer checkpoints: the next --resume would take checkpoint-6.
  auto r = testutil::run_cli("--config " + tiny_config(d) + " --resume-from " + d + "/out/checkpoint-3");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("checkpoint-6 is newer than the resumed"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::exists(d + "/out/checkpoint-6/COMPLETE"));
  EXPECT_EQ(testutil::metric_losses(d + "/out/metrics.jsonl").size(), 6u);
}

TEST(Train, AFailedSaveIsAnErrorAndKeepsThePreviousCheckpoint) {
  const auto d = testutil::temp_dir("save-fails");
  // Files may not exceed 200 KB (400 blocks of 512 bytes): the adapter (150 KB) fits,
  // the optimizer state (330 KB) does not. A short write in the archive writer used to
  // abort the process from a destructor.
  auto r = testutil::run_cli("--config " + tiny_config(d), "trap '' XFSZ; ulimit -f 400; ");
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find(".tmp-checkpoint-3/optimizer.safetensors: write failed: File too large"), std::string::npos) << r.err;
  EXPECT_FALSE(train::latest_checkpoint(d + "/out").has_value());
  // Nor does the failed save keep the space it took: on a full disk the stale folder
  // made the next --resume fail too.
  EXPECT_FALSE(fs::exists(d + "/out/.tmp-checkpoint-3"));
}

TEST(Train, BadCheckpointFieldsAndTrainableNamesAreNamed) {
  const auto d = testutil::temp_dir("bad-state");
  ASSERT_EQ(testutil::run_cli("--config " + tiny_config(d) + " --set train.max_steps=3").code, 0);
  const std::string ts = d + "/out/checkpoint-3/trainer_state.json";
  auto j = json::parse(testutil::read_file(ts));
  j["step"] = -3;  // trained with a negative learning rate and saved checkpoint--2
  testutil::write_file(ts, j.dump());
  auto r = testutil::run_cli("--config " + tiny_config(d) + " --resume");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("trainer_state.json: step: expected an integer in [0, 2^62], got -3"), std::string::npos)
      << r.err;
  // A cursor of 2^63 - 1 overflowed at the next row: a crash, or rows read out of bounds.
  j["step"] = 3;
  j["cursor"] = std::numeric_limits<int64_t>::max();
  testutil::write_file(ts, j.dump());
  r = testutil::run_cli("--config " + tiny_config(d) + " --resume --set train.max_steps=5");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("trainer_state.json: cursor: expected an integer in [0, 2^62], got 9223372036854775807"),
            std::string::npos)
      << r.err;
  // A recorded RoPE factor eval and export refuse is refused on resume too (it was
  // ignored when not a number).
  j["cursor"] = 12;
  j["rope_factor"] = "x";
  testutil::write_file(ts, j.dump());
  r = testutil::run_cli("--config " + tiny_config(d) + " --resume --set train.max_steps=5");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("trainer_state.json: rope_factor: expected a number in [1, 1024], got \"x\""),
            std::string::npos)
      << r.err;
  // Past the bound every reader takes: export wrote a config.json eval then refused.
  j["rope_factor"] = 1e6;
  testutil::write_file(ts, j.dump());
  r = testutil::run_cli("export --checkpoint " + d + "/out/checkpoint-3 --output " + d + "/exported");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("trainer_state.json: rope_factor: expected a number in [1, 1024], got 1000000.0"),
            std::string::npos)
      << r.err;
  EXPECT_FALSE(fs::exists(d + "/exported"));
  // checkpoint-3 saying step 2: the resume would repeat a step and shift the schedule.
  j["rope_factor"] = 1.0;
  j["step"] = 2;
  testutil::write_file(ts, j.dump());
  r = testutil::run_cli("--config " + tiny_config(d) + " --resume --set train.max_steps=5");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("checkpoint-3/trainer_state.json: step: 2, but the directory is checkpoint-3"),
            std::string::npos)
      << r.err;
  // Named with a trailing slash too.
  r = testutil::run_cli("--config " + tiny_config(d) + " --resume-from " + d + "/out/checkpoint-3/ --set train.max_steps=5");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("trainer_state.json: step: 2, but the directory is checkpoint-3"), std::string::npos) << r.err;
  // A trainable_params entry that names no parameter would train less than asked.
  r = testutil::run_cli("--config " + tiny_config(testutil::temp_dir("bad-trainable")) +
                        " --set trainable_params=embed,nrom");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("trainable_params: \"nrom\" is in no parameter name"), std::string::npos) << r.err;
}

// A resume on other frozen weights than the checkpoint trained on: the adapter went
// on training against a different model, and only the loss said so.
// A NaN in a frozen base weight made every step a skipped one; the run printed
// "training done" and exited 0 with nothing trained.
TEST(Train, ABaseWithNonFiniteWeightsIsRefusedBeforeTraining) {
  const auto d = testutil::temp_dir("nan-base");
  fs::copy(testutil::golden("tiny-llama/model"), d + "/m", fs::copy_options::recursive);
  const std::string shard = d + "/m/model-00001-of-00004.safetensors";
  auto t = io::load_tensors(shard);
  std::string name;
  for (auto& [n, x] : t)
    if (n.find("q_proj") != std::string::npos) {
      x = x.clone();  // load_tensors maps the file read-only
      x.view(-1)[5] = std::numeric_limits<float>::quiet_NaN();
      name = n;
      break;
    }
  ASSERT_FALSE(name.empty());
  io::save_tensors(shard, std::vector<std::pair<std::string, torch::Tensor>>(t.begin(), t.end()));
  auto r = testutil::run_cli("--config " + tiny_config(d) + " --set model.path=" + d + "/m");
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find("error: " + d + "/m: tensor '" + name + "': holds non-finite values (NaN or inf) as loaded"),
            std::string::npos)
      << r.err;
  EXPECT_FALSE(train::latest_checkpoint(d + "/out").has_value());
}

TEST(Train, AResumeOnAnotherBaseIsRefused) {
  const auto d = testutil::temp_dir("other-base");
  const std::string q = "model.layers.0.self_attn.q_proj.weight";
  testutil::golden_model_with(d + "/base", q, [](torch::Tensor&) {});
  const std::string cfg = "--config " + tiny_config(d) + " --set model.path=" + d + "/base";
  ASSERT_EQ(testutil::run_cli(cfg + " --set train.max_steps=3").code, 0);
  // The same weights in another place are the same base (and order-only changes of
  // the set-valued keys are the same config).
  fs::rename(d + "/base", d + "/moved");
  auto r = testutil::run_cli("--config " + tiny_config(d) + " --set model.path=" + d +
                             "/moved --set train.max_steps=4 --set trainable_params=norm,embed --resume");
  EXPECT_EQ(r.code, 0) << r.err;
  fs::rename(d + "/moved", d + "/base");
  testutil::golden_model_with(d + "/other", q, [](torch::Tensor& w) { w.mul_(2); });
  remove_tree(d + "/base");
  fs::rename(d + "/other", d + "/base");
  r = testutil::run_cli(cfg + " --set train.max_steps=5 --resume");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("checkpoint-4/trainer_state.json: base_sample: the base weights differ from those this "
                       "checkpoint trained on (model.path " + d + "/base holds other weights now)"),
            std::string::npos)
      << r.err;
  // A checkpoint that lost its record of sizes and checksums is damaged, not unchecked.
  fs::remove(d + "/out/checkpoint-4/trainer_state.json");
  r = testutil::run_cli("eval --model " + testutil::golden("tiny-llama/model") + " --adapter " + d +
                        "/out/checkpoint-4 --data " + testutil::golden("tiny-llama/eval.bin") + " --seq-len 64");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find(d + "/out/checkpoint-4: trainer_state.json: missing beside COMPLETE"), std::string::npos)
      << r.err;
  // Random init draws the base from train.seed: another seed is another base.
  const auto rd = testutil::temp_dir("other-seed");
  const std::string rcfg = "--config " + tiny_config(rd) + " --set model.init=random";
  ASSERT_EQ(testutil::run_cli(rcfg + " --set train.max_steps=3").code, 0);
  r = testutil::run_cli(rcfg + " --set train.seed=7 --resume");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("train.seed or the config changed"), std::string::npos) << r.err;
  EXPECT_EQ(testutil::run_cli(rcfg + " --resume").code, 0);
}

// The sample tells other weights from the same ones rounded to bf16 (a base stored in
// fp32, resumed where it is cast).
TEST(Train, TheBaseSampleSeesOtherWeightsNotRounding) {
  const auto load = [] { return model::load_model(testutil::golden("tiny-llama/model"), {}); };
  auto m = load();
  const auto want = model::base_weight_sample(*m);
  const size_t n = m->named_parameters().size();
  ASSERT_EQ(want.sums.size(), 2 * n);
  ASSERT_EQ(want.entries.size(), n);
  for (const auto& e : want.entries) EXPECT_EQ(e.size(), 16u);
  const model::BaseSample sums_only{want.sums, {}};  // what checkpoints before base_entries hold
  torch::NoGradGuard ng;
  // The same weights rounded to bf16 or fp16 are the same base.
  for (auto dt : {torch::kBFloat16, torch::kFloat16}) {
    auto r = load();
    for (auto& p : r->parameters()) p.set_data(p.to(dt).to(torch::kFloat32));
    EXPECT_TRUE(model::same_base(want, model::base_weight_sample(*r))) << dt;
    EXPECT_TRUE(model::same_base(sums_only, model::base_weight_sample(*r))) << dt;
  }
  // A copy rounded twice (fp16, then bf16 as a bf16 run casts it) lands a bf16 step
  // from one rounded once: the same base.
  {
    auto once = load(), twice = load();
    for (auto& p : once->parameters()) p.set_data(p.to(torch::kBFloat16));
    for (auto& p : twice->parameters()) p.set_data(p.to(torch::kFloat16).to(torch::kBFloat16));
    EXPECT_TRUE(model::same_base(model::base_weight_sample(*once), model::base_weight_sample(*twice)));
  }
  // One matrix moved by 1% (a fine-tune, a small merged adapter): the entries see it,
  // the sums alone do not.
  auto w = m->named_parameters()["model.layers.1.mlp.up_proj.weight"];
  w.set_data(w * 1.01);  // not in place: the loaded weights map the file read-only
  EXPECT_FALSE(model::same_base(want, model::base_weight_sample(*m)));
  EXPECT_TRUE(model::same_base(sums_only, model::base_weight_sample(*m)));
  w.set_data(w.neg());
  EXPECT_FALSE(model::same_base(sums_only, model::base_weight_sample(*m)));
  EXPECT_FALSE(model::same_base(want, {}));
  EXPECT_FALSE(model::same_base(sums_only, {}));
}

// Ctrl-C on `longlora-train ... | tee log` ends tee too; the run's next log line then
// killed it with SIGPIPE, before the save the signal asks for.
TEST(Train, AClosedLogPipeDoesNotKillTheRun) {
  const auto d = testutil::temp_dir("closed-pipe");
  const std::string cmd = "bash -c 'set -o pipefail; " + std::string(LONGLORA_BINARY) + " --config " + tiny_config(d) +
                          " 2>&1 | head -c 20 >/dev/null'";
  const int status = std::system(cmd.c_str());
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  EXPECT_EQ(train::latest_checkpoint(d + "/out").value_or(""), d + "/out/checkpoint-6");
}

TEST(Train, EvalDataAndModelConfigAreCheckedBeforeTheFirstStep) {
  const auto d = testutil::temp_dir("early-checks");
  // Until then a bad eval file failed at the first save, after the training steps.
  testutil::write_file(d + "/short.bin", std::string(40, '\x01'));  // 20 tokens < 64 + 1
  auto r = testutil::run_cli("--config " + tiny_config(d) + " --set data.eval=" + d + "/short.bin");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("data.eval: " + d + "/short.bin: 20 tokens are too few"), std::string::npos) << r.err;
  std::string oov;
  for (int i = 0; i < 100; ++i) oov += i == 70 ? std::string("\x60\xea", 2) : std::string("\x05\x00", 2);  // id 60000
  testutil::write_file(d + "/oov.bin", oov);
  r = testutil::run_cli("--config " + tiny_config(d) + " --set data.eval=" + d + "/oov.bin");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("oov.bin: token 70 is id 60000, outside the model's vocabulary"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("step 1/"), std::string::npos) << r.err;
  // model.config beside pretrained weights set the RoPE factor but not the shape.
  r = testutil::run_cli("--config " + tiny_config(d) + " --set model.config=" +
                        testutil::golden("tiny-llama/model/config.json"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--set model.config: goes with model.init \"random\""), std::string::npos) << r.err;
}

TEST(Train, ASeqLenPastRopeFactor1024IsRefused) {
  // model.rope_factor's range ends at 1024; the factor resolved from seq_len had no limit.
  const auto d = testutil::temp_dir("rope-limit");
  auto r = testutil::run_cli("--config " + tiny_config(d) + " --set data.seq_len=131073 --set attention.s2=false");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("data.seq_len: 131073 needs a RoPE factor of 1025 over max_position_embeddings 128, past "
                       "the limit of 1024: at most 131072"),
            std::string::npos) << r.err;
  longlora::remove_tree(d);
}

// trainable_params is compared by the parameters it selects: other words for the same
// set resume (with a note of the change); a set that drops what the checkpoint trained,
// or adds what it did not, is refused by name.
TEST(Train, AResumeComparesWhatTrainableParamsSelects) {
  const auto d = testutil::temp_dir("resume-trainable");
  ASSERT_EQ(testutil::run_cli("--config " + tiny_config(d) + " --set train.max_steps=3").code, 0);
  auto r = testutil::run_cli("--config " + tiny_config(d) +
                             " --set trainable_params=embed_tokens,norm --set train.max_steps=4 --resume");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("resume: trainable_params is \"embed_tokens,norm\" now, \"embed,norm\" in"), std::string::npos)
      << r.err;
  r = testutil::run_cli("--config " + tiny_config(d) + " --set trainable_params=embed --set train.max_steps=5 --resume");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("checkpoint-4: tensor 'base_model.model.model.layers.0.input_layernorm.weight' was trained by "
                       "the checkpoint's run, not by this one (trainable_params \"embed_tokens,norm\" there, \"embed\" "
                       "here)"),
            std::string::npos)
      << r.err;
  r = testutil::run_cli("--config " + tiny_config(d) +
                        " --set trainable_params=embed,norm,lm_head --set train.max_steps=5 --resume");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("checkpoint-4: tensor 'base_model.model.lm_head.weight' missing from the checkpoint "
                       "(trainable_params \"embed_tokens,norm\" there, \"embed,norm,lm_head\" here)"),
            std::string::npos)
      << r.err;
  longlora::remove_tree(d);
}

TEST(Train, MismatchedCheckpointIsRefused) {
  const auto d = testutil::temp_dir("resume-mismatch");
  ASSERT_EQ(testutil::run_cli("--config " + tiny_config(d) + " --set train.max_steps=3").code, 0);
  auto r = testutil::run_cli("--config " + tiny_config(d) + " --set lora.r=8 --resume");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("does not fit the config"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("lora.r is 4 there, 8 here"), std::string::npos) << r.err;
}

TEST(Checksum, Crc32MatchesZlib) {
  // Values from Python's zlib.crc32; the long file spans two 4 MiB read chunks.
  const auto d = testutil::temp_dir("crc");
  testutil::write_file(d + "/check", "123456789");
  testutil::write_file(d + "/empty", "");
  std::string big(5 * 1024 * 1024 + 17, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>((i * 7 + 3) % 251);
  testutil::write_file(d + "/big", big);
  EXPECT_EQ(io::digest_file(d + "/check").crc32, 0xcbf43926u);
  EXPECT_EQ(io::digest_file(d + "/empty").crc32, 0u);
  const auto b = io::digest_file(d + "/big");
  EXPECT_EQ(b.crc32, 0x02565dd7u);
  EXPECT_EQ(b.bytes, big.size());
  longlora::remove_tree(d);
}

TEST(Checksum, TheBigFilesAreDigestedAsTheyAreWritten) {
  // model.safetensors and optimizer.safetensors are digested by their writers, not read back; each
  // recorded digest must still be the file's, as a read finds it.
  const auto d = testutil::temp_dir("crc-written");
  const auto w = io::save_tensors(d + "/x.safetensors", {{"a", torch::randn({300, 7})}, {"b", torch::ones({5})}});
  const auto r = io::digest_file(d + "/x.safetensors");
  EXPECT_EQ(w.bytes, r.bytes);
  EXPECT_EQ(w.crc32, r.crc32);
  ASSERT_EQ(testutil::run_cli("--config " + tiny_config(d) + " --set train.max_steps=1 --set lora.enabled=false").code, 0);
  const std::string ck = d + "/out/checkpoint-1";
  const auto files = testutil::read_json(ck + "/trainer_state.json")["files"];
  for (const char* f : {"model.safetensors", "optimizer.safetensors", "config.json", "tokenizer.model"}) {
    ASSERT_TRUE(files.contains(f)) << f;
    const auto want = io::digest_file(ck + "/" + f);
    char hex[9];
    std::snprintf(hex, sizeof hex, "%08x", want.crc32);
    EXPECT_EQ(files[f]["bytes"], want.bytes) << f;
    EXPECT_EQ(files[f]["crc32"], std::string(hex)) << f;
  }
  longlora::remove_tree(d);
}

TEST(Train, ACheckpointFileChangedAfterTheSaveIsRefusedWhereverItIsRead) {
  // Bytes changed at the same size (zeroed, as a sync placeholder leaves them) loaded
  // as weights: resume trained on, eval scored them, export merged them.
  const auto d = testutil::temp_dir("ckpt-crc");
  ASSERT_EQ(testutil::run_cli("--config " + tiny_config(d) + " --set train.max_steps=3").code, 0);
  const std::string ck = d + "/out/checkpoint-3";
  const auto ts = testutil::read_json(ck + "/trainer_state.json");
  for (const char* f : {"adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors"})
    EXPECT_EQ(ts["files"][f]["bytes"], fs::file_size(ck + "/" + f)) << f;
  auto zero_tail = [](const std::string& path) {
    std::string b = testutil::read_file(path);
    std::fill(b.end() - 4096, b.end(), '\0');
    testutil::write_file(path, b);
  };
  const std::string adapter_bytes = testutil::read_file(ck + "/adapter_model.safetensors");
  zero_tail(ck + "/adapter_model.safetensors");
  const std::string says = ck + "/adapter_model.safetensors: " + std::to_string(adapter_bytes.size()) +
                           " bytes with CRC-32 ";
  const std::string eval = "eval --model " + testutil::golden("tiny-llama/model") + " --data " +
                           testutil::golden("tiny-llama/eval.bin") + " --seq-len 64 --device cpu --adapter " + ck;
  for (const std::string args : {"--config " + tiny_config(d) + " --resume", eval,
                                 "export --checkpoint " + ck + " --output " + d + "/merged"}) {
    auto r = testutil::run_cli(args);
    EXPECT_EQ(r.code, 1) << args;
    EXPECT_NE(r.err.find(says), std::string::npos) << args << ": " << r.err;
    EXPECT_NE(r.err.find("the file changed after the save"), std::string::npos) << r.err;
  }
  testutil::write_file(ck + "/adapter_model.safetensors", adapter_bytes);
  // The optimizer state matters to a resume only.
  const std::string state_bytes = testutil::read_file(ck + "/optimizer.safetensors");
  zero_tail(ck + "/optimizer.safetensors");
  auto r = testutil::run_cli(eval);
  EXPECT_EQ(r.code, 0) << r.err;
  r = testutil::run_cli("--config " + tiny_config(d) + " --resume");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find(ck + "/optimizer.safetensors: " + std::to_string(state_bytes.size()) + " bytes with CRC-32 "),
            std::string::npos) << r.err;
  testutil::write_file(ck + "/optimizer.safetensors", state_bytes);
  // A checkpoint saved before checksums were recorded resumes as before.
  auto old = ts;
  old.erase("files");
  testutil::write_file(ck + "/trainer_state.json", old.dump());
  r = testutil::run_cli("--config " + tiny_config(d) + " --resume");
  EXPECT_EQ(r.code, 0) << r.err;
  longlora::remove_tree(d);
}

TEST(Train, KillDuringSaveKeepsLastGoodCheckpoint) {
  const auto d = testutil::temp_dir("kill-save");
  pid_t pid = testutil::spawn_cli("--config " + tiny_config(d), "LONGLORA_TEST_SAVE_PAUSE_MS=3000");
  // The first save (step 3) completes slowly; kill the second one (step 6) half-way.
  ASSERT_TRUE(testutil::wait_until([&] { return fs::exists(d + "/out/.tmp-checkpoint-6"); }, 120));
  ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  EXPECT_TRUE(fs::exists(d + "/out/checkpoint-3/COMPLETE"));
  EXPECT_FALSE(fs::exists(d + "/out/checkpoint-6"));
  EXPECT_EQ(train::latest_checkpoint(d + "/out").value(), d + "/out/checkpoint-3");
  auto r = testutil::run_cli("--config " + tiny_config(d) + " --resume");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(fs::exists(d + "/out/checkpoint-6/COMPLETE"));
  EXPECT_FALSE(fs::exists(d + "/out/.tmp-checkpoint-6"));  // stale temporary pruned
}

TEST(Train, SigtermSavesAndExitsCleanly) {
  // SIGHUP as SIGTERM: a closed terminal saves instead of losing the steps since the
  // last checkpoint.
  for (int sig : {SIGTERM, SIGHUP}) {
    SCOPED_TRACE(strsignal(sig));
    const auto d = testutil::temp_dir("sigterm");
    pid_t pid = testutil::spawn_cli("--config " + tiny_config(d) + " --set train.max_steps=100000 --set output.save_steps=100000");
    ASSERT_TRUE(testutil::wait_until([&] { return testutil::metric_losses(d + "/out/metrics.jsonl").size() >= 2; }, 120));
    ::kill(pid, sig);
    EXPECT_EQ(testutil::wait_exit(pid), 0);
    auto ck = train::latest_checkpoint(d + "/out");
    ASSERT_TRUE(ck.has_value());
    auto st = json::parse(std::ifstream(*ck + "/trainer_state.json"));
    EXPECT_GE(st["step"].get<int64_t>(), 2);
    EXPECT_LT(st["step"].get<int64_t>(), 100000);
  }
}

TEST(Train, ASecondSignalExitsAtOnceAndAnIgnoredOneStaysIgnored) {
  {
    // The first signal lets the save under way finish (three pauses of 4 s); the
    // second ends the process now, 128 + SIGINT, the save left unfinished.
    const auto d = testutil::temp_dir("two-signals");
    pid_t pid = testutil::spawn_cli("--config " + tiny_config(d) + " --set output.save_steps=1",
                                    "LONGLORA_TEST_SAVE_PAUSE_MS=4000");
    ASSERT_TRUE(testutil::wait_until([&] { return fs::exists(d + "/out/.tmp-checkpoint-1"); }, 120));
    ::kill(pid, SIGTERM);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    ::kill(pid, SIGINT);
    EXPECT_EQ(testutil::wait_exit(pid), 128 + SIGINT);
    EXPECT_FALSE(fs::exists(d + "/out/checkpoint-1"));
    longlora::remove_tree(d);
  }
  {
    // Started with SIGTERM ignored (as nohup leaves SIGHUP): SIGTERM changes nothing,
    // SIGINT still stops the run with a checkpoint.
    const auto d = testutil::temp_dir("ignored-signal");
    pid_t pid = testutil::spawn_cli("--config " + tiny_config(d) + " --set train.max_steps=100000", "trap '' TERM;");
    auto steps = [&] { return testutil::metric_losses(d + "/out/metrics.jsonl").size(); };
    ASSERT_TRUE(testutil::wait_until([&] { return steps() >= 2; }, 120));
    ::kill(pid, SIGTERM);
    const size_t at = steps();
    int status = 0;
    bool exited = false;
    ASSERT_TRUE(testutil::wait_until([&] {
      exited = exited || ::waitpid(pid, &status, WNOHANG) == pid;
      return exited || steps() >= at + 3;
    }, 120));
    ASSERT_FALSE(exited) << "the run stopped on SIGTERM";
    ::kill(pid, SIGINT);
    EXPECT_EQ(testutil::wait_exit(pid), 0);
    EXPECT_TRUE(train::latest_checkpoint(d + "/out").has_value());
    longlora::remove_tree(d);
  }
}

TEST(Train, TheStepARunStopsAtIsInTheMetrics) {
  // log_steps past the run: only the checkpoint's step is recorded, and it is, though
  // the signal lands during its save. (The resume logs from the step after it.)
  const auto d = testutil::temp_dir("stop-record");
  pid_t pid = testutil::spawn_cli("--config " + tiny_config(d) + " --set output.log_steps=1000 --set output.save_steps=2",
                                  "LONGLORA_TEST_SAVE_PAUSE_MS=1000");
  ASSERT_TRUE(testutil::wait_until([&] { return fs::exists(d + "/out/.tmp-checkpoint-2"); }, 120));
  ::kill(pid, SIGTERM);
  EXPECT_EQ(testutil::wait_exit(pid), 0);
  ASSERT_TRUE(fs::exists(d + "/out/checkpoint-2/COMPLETE"));
  std::vector<int> logged;
  std::ifstream in(d + "/out/metrics.jsonl");
  for (std::string line; std::getline(in, line);) logged.push_back(json::parse(line)["step"].get<int>());
  EXPECT_EQ(logged, std::vector<int>{2});
  longlora::remove_tree(d);
}

TEST(Train, OneRunAtATimeAndASignalDuringASaveStopsThere) {
  const auto d = testutil::temp_dir("lock");
  // Two pauses of 4 s in each save: the signal and the second run both land in the first.
  pid_t pid = testutil::spawn_cli("--config " + tiny_config(d), "LONGLORA_TEST_SAVE_PAUSE_MS=4000");
  ASSERT_TRUE(testutil::wait_until([&] { return fs::exists(d + "/out/.tmp-checkpoint-3"); }, 120));
  // The signal arrives during the save of step 3: the run stops at that checkpoint
  // (it trained step 4 and saved again).
  ::kill(pid, SIGTERM);
  // A second run into the same output.dir trimmed the first's metrics and overwrote its
  // checkpoints, both exiting 0.
  auto r = testutil::run_cli("--config " + tiny_config(d) + " --resume");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("is in use by another longlora-train run (pid " + std::to_string(pid) + ")"),
            std::string::npos) << r.err;
  EXPECT_EQ(testutil::wait_exit(pid), 0);
  EXPECT_EQ(train::latest_checkpoint(d + "/out").value_or(""), d + "/out/checkpoint-3");
  EXPECT_FALSE(fs::exists(d + "/out/checkpoint-4"));
  EXPECT_EQ(testutil::metric_losses(d + "/out/metrics.jsonl").size(), 3u);
  longlora::remove_tree(d);
}

TEST(Train, AResumeDropsARecordCutShortAndSkipsForeignCheckpointNames) {
  const auto d = testutil::temp_dir("cut-short");
  ASSERT_EQ(testutil::run_cli("--config " + tiny_config(d) + " --set train.max_steps=3").code, 0);
  // A crash mid-write: the next record was appended to this fragment.
  std::ofstream(d + "/out/metrics.jsonl", std::ios::app) << R"({"step":4,"lo)";
  // A step number past int64: std::stoll stopped the run with "error: stoll".
  fs::create_directories(d + "/out/checkpoint-99999999999999999999");
  testutil::write_file(d + "/out/checkpoint-99999999999999999999/COMPLETE", "ok\n");
  auto r = testutil::run_cli("--config " + tiny_config(d) + " --resume");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("checkpoint-99999999999999999999: step number too large"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("the last one cut short"), std::string::npos) << r.err;
  std::ifstream in(d + "/out/metrics.jsonl");
  std::vector<int64_t> steps;
  for (std::string line; std::getline(in, line);) {
    ASSERT_NO_THROW(steps.push_back(json::parse(line)["step"].get<int64_t>())) << line;
  }
  EXPECT_EQ(steps, (std::vector<int64_t>{1, 2, 3, 4, 5, 6}));
  longlora::remove_tree(d);
}

TEST(Train, MetricsThatCannotBeWrittenStopTheRunWithACheckpoint) {
  const auto d = testutil::temp_dir("metrics-fail");
  fs::create_directories(d + "/out/metrics.jsonl");
  auto r = testutil::run_cli("--config " + tiny_config(d));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("metrics.jsonl: not a regular file"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("step 1/"), std::string::npos) << "found only after training: " << r.err;
  fs::remove(d + "/out/metrics.jsonl");
  // Files may not exceed 800 blocks of 512 bytes: the checkpoint's files fit, the
  // metrics (filled to just under it with step-0 records, which a new run keeps) do not.
  std::string fill;
  while (fill.size() < 409600 - 200) fill += R"({"step": 0, "note": "padding padding padding"})" "\n";
  testutil::write_file(d + "/out/metrics.jsonl", fill);
  r = testutil::run_cli("--config " + tiny_config(d), "trap '' XFSZ; ulimit -f 800; ");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("metrics.jsonl: write failed: checkpoint saved at step 1"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::exists(d + "/out/checkpoint-1/COMPLETE"));
  // The record the failed write lost is in the checkpoint, and the resume (room on
  // the disk again) appends it: every step's record is there once.
  const json state = json::parse(testutil::read_file(d + "/out/checkpoint-1/trainer_state.json"));
  ASSERT_TRUE(state.contains("unlogged_metrics")) << state.dump();
  ASSERT_EQ(state["unlogged_metrics"].size(), 1u);
  EXPECT_EQ(state["unlogged_metrics"][0]["step"], 1);
  r = testutil::run_cli("--config " + tiny_config(d) + " --resume");
  ASSERT_EQ(r.code, 0) << r.err;
  std::vector<int64_t> steps;
  for (const auto& rec : testutil::metric_records(d + "/out/metrics.jsonl")) steps.push_back(rec["step"]);
  EXPECT_EQ(steps, (std::vector<int64_t>{1, 2, 3, 4, 5, 6}));
  EXPECT_DOUBLE_EQ(testutil::metric_records(d + "/out/metrics.jsonl")[0]["loss"].get<double>(),
                   state["unlogged_metrics"][0]["loss"].get<double>());
  // Its next checkpoints carry nothing over.
  EXPECT_FALSE(json::parse(testutil::read_file(d + "/out/checkpoint-3/trainer_state.json")).contains("unlogged_metrics"));
  longlora::remove_tree(d);
}

// A checkpoint whose record of checksums is gone (saved before they were recorded, or
// edited) is still checked as far as its contents go: every damage is one line naming
// the checkpoint's file and what does not fit, before any step.
TEST(Train, ADamagedCheckpointWithoutChecksumsIsRefusedByName) {
  const auto d = testutil::temp_dir("damaged-ckpt");
  ASSERT_EQ(testutil::run_cli("--config " + tiny_config(d) + " --set train.max_steps=3").code, 0);
  // A run of rank 8: its optimizer moments have other shapes.
  ASSERT_EQ(testutil::run_cli("--config " + tiny_config(d) + " --set train.max_steps=3 --set lora.r=8 --set output.dir=" +
                              d + "/r8").code, 0);
  const std::string good = d + "/out/checkpoint-3";
  int n = 0;
  // A copy of the good checkpoint without checksums, changed by `damage`; resumed into a
  // fresh output.dir, it must fail with `want` in the message and train no step.
  auto expect_refused = [&](const std::function<void(const std::string&, json&)>& damage, const std::string& want) {
    const std::string c = d + "/bad" + std::to_string(++n) + "/checkpoint-3";
    fs::create_directories(fs::path(c).parent_path());
    fs::copy(good, c, fs::copy_options::recursive);
    json st = json::parse(testutil::read_file(c + "/trainer_state.json"));
    st.erase("files");
    damage(c, st);
    testutil::write_file(c + "/trainer_state.json", st.dump(2));
    auto r = testutil::run_cli("--config " + tiny_config(d) + " --set output.dir=" + d + "/run" + std::to_string(n) +
                               " --resume-from " + c);
    if (want.empty()) {  // undamaged
      EXPECT_EQ(r.code, 0) << r.err;
      return;
    }
    EXPECT_EQ(r.code, 1) << want << ": " << r.err;
    EXPECT_NE(r.err.find(want), std::string::npos) << r.err;
    EXPECT_EQ(r.err.find("step 4/"), std::string::npos) << r.err;
  };
  // Undamaged, it resumes: the refusals below are the damage's.
  expect_refused([](const std::string&, json&) {}, "");
  EXPECT_TRUE(fs::exists(d + "/run1/checkpoint-6/COMPLETE"));
  // A checkpoint from before base_entries (the sums alone) resumes, and the next save
  // records both.
  expect_refused([](const std::string&, json& st) { st.erase("base_entries"); }, "");
  const json next = json::parse(testutil::read_file(d + "/run2/checkpoint-6/trainer_state.json"));
  ASSERT_TRUE(next.contains("base_entries"));
  EXPECT_EQ(next["base_sample"].size(), 2 * next["base_entries"].size());
  // A damaged record is named as such, not taken for other base weights.
  expect_refused([](const std::string&, json& st) { st["base_entries"][0] = json::array(); },
                 "trainer_state.json: base_entries: item 0: expected 1 to 16 numbers, got []");
  expect_refused([](const std::string&, json& st) { st["base_entries"].erase(0); },
                 "trainer_state.json: base_entries: ");
  const std::string q = std::string(io::kPeftPrefix) + "model.layers.0.self_attn.q_proj.lora_A.weight";
  auto rewrite_adapter = [&](const std::string& c, const std::function<void(std::map<std::string, torch::Tensor>&)>& f) {
    auto t = io::load_tensors(c + "/adapter_model.safetensors");
    f(t);
    std::vector<std::pair<std::string, torch::Tensor>> out(t.begin(), t.end());
    io::save_tensors(c + "/adapter_model.safetensors", out);
  };
  expect_refused([&](const std::string& c, json&) { rewrite_adapter(c, [&](auto& t) { t.erase(q); }); },
                 "tensor '" + q + "' missing from the checkpoint");
  expect_refused([&](const std::string& c, json&) {
    rewrite_adapter(c, [&](auto& t) { t[q] = t[q].reshape({-1, 2}).contiguous(); });
  }, "tensor '" + q + "' has another shape than the model's");
  const std::string opt = "optimizer.safetensors: tensor '";
  expect_refused([&](const std::string& c, json&) {
    fs::copy_file(d + "/r8/checkpoint-3/optimizer.safetensors", c + "/optimizer.safetensors",
                  fs::copy_options::overwrite_existing);
  }, opt + "model.layers.0.self_attn.q_proj.lora_A.weight.exp_avg' has shape [8, 64], the parameter [4, 64]");
  expect_refused([&](const std::string& c, json&) {
    rewrite_adapter(c, [&](auto& t) { t[q] = t[q].to(torch::kInt32); });
  }, "tensor '" + q + "' is not floating point (Int)");
  // A NaN made every step a skipped one, and the NaN was saved again.
  expect_refused([&](const std::string& c, json&) {
    rewrite_adapter(c, [&](auto& t) {
      t[q] = t[q].clone();  // load_tensors maps the file read-only
      t[q][0][0] = std::nan("");
    });
  }, "tensor '" + q + "' is not finite");
  // The optimizer's own state, read by name through the safetensors reader: a step
  // count below 0 gave NaN bias corrections, negative second moments NaN updates; a
  // state of a parameter this run does not train, or half a parameter's, is no state
  // to continue from; LibTorch checks the RNG state's bytes.
  auto rewrite_state = [&](const std::string& c, const std::function<void(std::map<std::string, torch::Tensor>&)>& f) {
    std::map<std::string, torch::Tensor> t;
    for (const auto& [name, v] : io::load_tensors(c + "/optimizer.safetensors")) t[name] = v.clone();
    f(t);
    io::save_tensors(c + "/optimizer.safetensors", std::vector<std::pair<std::string, torch::Tensor>>(t.begin(), t.end()));
  };
  const std::string qa = "model.layers.0.self_attn.q_proj.lora_A.weight";
  expect_refused([&](const std::string& c, json&) {
    rewrite_state(c, [&](auto& t) { t[qa + ".step"] = torch::tensor({int64_t{-5}}); });
  }, opt + qa + ".step': step count -5 outside [0, 3]");
  expect_refused([&](const std::string& c, json&) {
    rewrite_state(c, [&](auto& t) { t[qa + ".step"] = torch::tensor({3.0}); });
  }, opt + qa + ".step' is not one I64 step count");
  expect_refused([&](const std::string& c, json&) {
    rewrite_state(c, [&](auto& t) { t[qa + ".exp_avg_sq"] = -t[qa + ".exp_avg_sq"] - 1; });
  }, opt + qa + ".exp_avg_sq' has negative entries");
  expect_refused([&](const std::string& c, json&) {
    rewrite_state(c, [&](auto& t) { t[qa + ".exp_avg"][0][0] = std::numeric_limits<float>::infinity(); });
  }, opt + qa + ".exp_avg' is not finite");
  expect_refused([&](const std::string& c, json&) {
    rewrite_state(c, [&](auto& t) { t[qa + ".exp_avg"] = t[qa + ".exp_avg"].to(torch::kInt32); });
  }, opt + qa + ".exp_avg' is I32, not floating point");
  expect_refused([&](const std::string& c, json&) {
    rewrite_state(c, [&](auto& t) { t.erase(qa + ".exp_avg_sq"); });
  }, opt + qa + ".exp_avg_sq' missing beside the others of its parameter");
  expect_refused([&](const std::string& c, json&) {
    rewrite_state(c, [&](auto& t) { t["model.layers.0.mlp.up_proj.lora_A.weight.exp_avg"] = torch::zeros({4, 64}); });
  }, opt + "model.layers.0.mlp.up_proj.lora_A.weight.exp_avg' is the state of no parameter this run trains");
  expect_refused([&](const std::string& c, json&) {
    rewrite_state(c, [&](auto& t) { t["rng.cpu"] = t["rng.cpu"].slice(0, 0, 100).clone(); });
  }, opt + "rng.cpu' is no CPU generator state");
  expect_refused([&](const std::string& c, json&) {
    rewrite_state(c, [&](auto& t) { t["rng.cpu"] = t["rng.cpu"].to(torch::kInt32); });
  }, opt + "rng.cpu' is not a list of bytes (U8)");
  expect_refused([&](const std::string& c, json&) { rewrite_state(c, [&](auto& t) { t.erase("rng.cpu"); }); },
                 opt + "rng.cpu' missing");
  // LibTorch checks mt19937's position and count each alone: 624 and 624 passed, and
  // the next draw read past the state (valgrind).
  expect_refused([&](const std::string& c, json&) {
    rewrite_state(c, [&](auto& t) {
      ASSERT_EQ(t["rng.cpu"].numel(), 5056);
      const int32_t left = 624, next = 624;
      std::memcpy(t["rng.cpu"].template data_ptr<uint8_t>() + 8, &left, 4);
      std::memcpy(t["rng.cpu"].template data_ptr<uint8_t>() + 16, &next, 4);
    });
  }, opt + "rng.cpu' is no CPU generator state: mt19937 position 624 with 624 left runs past its 624 words");
  // Every update steps every parameter: a state that lacks one (its moments restarted
  // from zero, silently) or whose counts differ is no state of a run.
  expect_refused([&](const std::string& c, json&) {
    rewrite_state(c, [&](auto& t) {
      for (const char* part : {".exp_avg", ".exp_avg_sq", ".step"}) t.erase(std::string("model.norm.weight") + part);
    });
  }, opt + "model.norm.weight.exp_avg' missing: the state of some parameters, not of all");
  expect_refused([&](const std::string& c, json&) {
    rewrite_state(c, [&](auto& t) { t["model.norm.weight.step"] = torch::tensor({int64_t{2}}); });
  }, opt + "model.norm.weight.step': step count 2, another parameter's 3");
  // Damaged bytes the reader refuses (no checksum record in these copies).
  expect_refused([&](const std::string& c, json&) {
    testutil::write_file(c + "/optimizer.safetensors", testutil::read_file(c + "/optimizer.safetensors").substr(0, 5000));
  }, "optimizer.safetensors: ");
  expect_refused([&](const std::string& c, json&) { fs::remove(c + "/optimizer.safetensors"); },
                 "optimizer.safetensors: missing: the checkpoint has no optimizer state");
  // A format-1 checkpoint's state.pt is read in a process of its own and then checked
  // as format 2's, its moments by their position in the optimizer.
  expect_refused([&](const std::string& c, json& st) {
    to_format_1(c, tiny_config(d), [](auto& s) { s.step(-5); });
    st["format_version"] = 1;
  }, "checkpoint-3/state.pt: tensor '0.step' (of model.embed_tokens.weight): step count -5 outside [0, 3]");
  expect_refused([&](const std::string& c, json& st) {
    to_format_1(c, tiny_config(d), [](auto& s) { s.exp_avg_sq(-s.exp_avg_sq() - 1); });
    st["format_version"] = 1;
  }, "state.pt: tensor '0.exp_avg_sq' (of model.embed_tokens.weight) has negative entries");
  expect_refused([&](const std::string& c, json& st) {
    to_format_1(d + "/r8/checkpoint-3", tiny_config(d), nullptr, {"lora.r=8"});
    fs::copy_file(d + "/r8/checkpoint-3/state.pt", c + "/state.pt", fs::copy_options::overwrite_existing);
    st["format_version"] = 1;
  }, "' (of model.layers.0.self_attn.q_proj.lora_A.weight) has shape [8, 64], the parameter [4, 64]");
  // A state.pt LibTorch's reader cannot take, or crashes on: lists nested 10^6 deep
  // overflowed the stack (exit 139), now in the child; either way one line, exit 1.
  expect_refused([&](const std::string& c, json& st) {
    fs::remove(c + "/optimizer.safetensors");
    std::string pkl = "\x80\x02" + std::string(1000000, ']') + std::string(999999, 'a') + ".";
    caffe2::serialize::PyTorchStreamWriter w(c + "/state.pt");
    w.writeRecord("data.pkl", pkl.data(), pkl.size());
    w.writeRecord("constants.pkl", "\x80\x02).", 4);
    w.writeRecord("version", "3\n", 2);
    w.writeEndOfFile();
    st["format_version"] = 1;
  }, "checkpoint-3/state.pt: ");
  {
    // (Crashed, "LibTorch's reader crashed on it", or refused; either way) the child's
    // folder in output.dir is gone.
    const std::string run = d + "/run" + std::to_string(n);
    if (fs::exists(run))
      for (const auto& e : fs::directory_iterator(run))
        EXPECT_EQ(e.path().filename().string().rfind(".legacy-state-", 0), std::string::npos) << e.path();
  }
  expect_refused([&](const std::string& c, json& st) {
    fs::remove(c + "/optimizer.safetensors");
    testutil::write_file(c + "/state.pt", "not a zip");
    st["format_version"] = 1;
  }, "checkpoint-3/state.pt: cannot restore the optimizer and RNG state: ");
  // nlohmann copies and prints values recursively: a record nested 60,000 deep (a run
  // config 200,000 deep) crashed the resume. Nothing of ours is 64 levels deep.
  auto nested = [](int depth) {
    json v = json::array();
    for (int i = 1; i < depth; ++i) v = json::array({v});
    return v;
  };
  expect_refused([&](const std::string&, json& st) {
    st["unlogged_metrics"] = json::array({{{"step", 1}, {"x", nested(65)}}});
  }, "trainer_state.json: JSON nested deeper than 64 levels: refused");
  expect_refused([&](const std::string& c, json&) {
    json rc = testutil::read_json(c + "/run_config.json");
    rc["device"] = nested(100);
    testutil::write_file(c + "/run_config.json", rc.dump());
  }, "run_config.json: JSON nested deeper than 64 levels: refused");
  // 64 levels in all are read as before (here: a record the resume appends to metrics.jsonl).
  expect_refused([&](const std::string&, json& st) {
    st["unlogged_metrics"] = json::array({{{"step", 1}, {"x", nested(61)}}});
  }, "");
  expect_refused([](const std::string&, json& st) { st["format_version"] = 99; }, "trainer_state.json: format_version");
  expect_refused([](const std::string&, json& st) { st["overflow_steps"] = 4; }, "overflow_steps: more than step");
  longlora::remove_tree(d);
}

TEST(Train, AResumeRunsTheEvalThatTheStoppedRunSavedButNeverRan) {
  // A run killed after a save and before its eval: the checkpoint has no eval record,
  // and the resume (from that step on) would never score it.
  const auto d = testutil::temp_dir("eval-resume");
  const std::string eval_bin = testutil::golden("tiny-llama/eval.bin");
  auto r = testutil::run_cli("--config " + tiny_config(d) + " --set data.eval=" + eval_bin);
  ASSERT_EQ(r.code, 0) << r.err;
  auto evals = [&] {
    std::map<int64_t, std::vector<double>> out;
    std::ifstream in(d + "/out/metrics.jsonl");
    for (std::string line; std::getline(in, line);)
      if (json j = json::parse(line); j.contains("eval_loss")) out[j["step"]].push_back(j["eval_loss"]);
    return out;
  };
  const auto before = evals();
  ASSERT_EQ(before.size(), 2u);
  // As the kill left it: checkpoint-3 the latest, its eval not written.
  longlora::remove_tree(d + "/out/checkpoint-6");
  std::string kept;
  {
    std::ifstream in(d + "/out/metrics.jsonl");
    for (std::string line; std::getline(in, line);)
      if (json j = json::parse(line); j["step"].get<int64_t>() < 3 || (j["step"] == 3 && !j.contains("eval_loss")))
        kept += line + "\n";
  }
  testutil::write_file(d + "/out/metrics.jsonl", kept);
  r = testutil::run_cli("--config " + tiny_config(d) + " --set data.eval=" + eval_bin + " --resume");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("eval at step 3 (not in metrics.jsonl"), std::string::npos) << r.err;
  const auto after = evals();
  ASSERT_EQ(after.size(), 2u);
  for (int64_t step : {3, 6}) {
    ASSERT_EQ(after.at(step).size(), 1u) << step;
    EXPECT_NEAR(after.at(step)[0], before.at(step)[0], 1e-6 * before.at(step)[0]) << step;
  }
  // A resume whose checkpoint has its eval does not run it again.
  longlora::remove_tree(d + "/out/checkpoint-6");
  r = testutil::run_cli("--config " + tiny_config(d) + " --set data.eval=" + eval_bin + " --resume");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.err.find("not in metrics.jsonl"), std::string::npos) << r.err;
  EXPECT_EQ(evals().at(3).size(), 1u);
  longlora::remove_tree(d);
}

TEST(Train, AnOutputDirItCannotWriteIsFoundBeforeTheFirstStep) {
  {
    // Where the permission bits allow it and the file system does not: access() said
    // /proc was writable, and the dry run passed a run that then failed.
    const auto d = testutil::temp_dir("procdir");
    auto r = testutil::run_cli("--config " + tiny_config(d) + " --set output.dir=/proc/longlora-out --dry-run");
    EXPECT_EQ(r.code, 1) << r.err;
    // (As root; another user is refused by access() already.)
    const std::string says = ::geteuid() == 0 ? "cannot create folders in /proc: " : "cannot write in /proc: ";
    EXPECT_NE(r.err.find("output.dir: /proc/longlora-out: " + says), std::string::npos) << r.err;
    // A folder it can write in passes, and the probe leaves nothing behind.
    r = testutil::run_cli("--config " + tiny_config(d) + " --dry-run");
    EXPECT_EQ(r.code, 0) << r.err;
    std::vector<std::string> left;
    for (const auto& e : fs::directory_iterator(d)) left.push_back(e.path().filename().string());
    EXPECT_EQ(left, std::vector<std::string>{"run.json"});
    longlora::remove_tree(d);
  }
  // As an unprivileged user (root writes anywhere): the run found out at its first save.
  const std::string as_nobody = "setpriv --reuid=65534 --regid=65534 --clear-groups ";
  if (std::system((as_nobody + LONGLORA_BINARY + " --version >/dev/null 2>&1").c_str()) != 0)
    GTEST_SKIP() << "cannot run the binary as uid 65534 here";
  const auto d = testutil::temp_dir("readonly");  // made by this (root) process, mode 755
  ::chmod(d.c_str(), 0755);
  for (const std::string extra : {" --dry-run", ""}) {
    const std::string cmd = as_nobody + LONGLORA_BINARY + " --config " + tiny_config(d) + extra + " 2>&1";
    FILE* p = ::popen(cmd.c_str(), "r");
    std::string out;
    char buf[4096];
    for (size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
    const int status = ::pclose(p);
    EXPECT_EQ(WEXITSTATUS(status), 1) << extra << ": " << out;
    EXPECT_NE(out.find("output.dir: " + d + "/out: cannot write in " + d), std::string::npos) << extra << ": " << out;
    EXPECT_EQ(out.find("step 1/"), std::string::npos) << out;
  }
  longlora::remove_tree(d);
}

// Outputs that used to land on what a run or an export must keep (an audit of the CLI):
// each is refused in one line, nothing lost.
TEST(Train, OutputsNeverLandOnCheckpointsOrUnfinishedSaves) {
  const auto d = testutil::temp_dir("out-safety");
  ASSERT_EQ(testutil::run_cli("--config " + tiny_config(d) + " --set train.max_steps=3").code, 0);
  const std::string ck = d + "/out/checkpoint-3";
  // A run inside a checkpoint: its run's output.keep_last deleted it with the checkpoint.
  auto r = testutil::run_cli("--config " + tiny_config(d) + " --set output.dir=" + ck + "/nested --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--set output.dir: " + ck + "/nested: lies inside the training checkpoint " + ck), std::string::npos)
      << r.err;
  // A file named as one of the run's saves: the save replaced it.
  const auto f = testutil::temp_dir("out-file");
  testutil::write_file(f + "/checkpoint-3", "mine");
  r = testutil::run_cli("--config " + tiny_config(d) + " --set output.dir=" + f + " --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find(f + "/checkpoint-3 is not a directory, but the name of one of this run's saves"), std::string::npos)
      << r.err;
  EXPECT_EQ(testutil::read_file(f + "/checkpoint-3"), "mine");
  // A dry run while another run holds output.dir passed; the run is refused.
  {
    const int fd = ::open((d + "/out/.lock").c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);
    r = testutil::run_cli("--config " + tiny_config(d) + " --resume --dry-run");
    EXPECT_EQ(r.code, 1);
    EXPECT_NE(r.err.find("output.dir: " + d + "/out is in use by another longlora-train run"), std::string::npos) << r.err;
    ::close(fd);
    EXPECT_EQ(testutil::run_cli("--config " + tiny_config(d) + " --resume --dry-run").code, 0);
  }
  // A save killed partway (.tmp-checkpoint-N), or one of ours without COMPLETE, taken
  // as an adapter without a word.
  const std::string eval = "eval --model " + testutil::golden("tiny-llama/model") + " --data " +
                           testutil::golden("tiny-llama/eval.bin") + " --seq-len 64 --device cpu --adapter ";
  fs::create_directories(d + "/out/.tmp-checkpoint-6");
  for (const char* file : {"adapter_config.json", "adapter_model.safetensors"})
    fs::copy_file(ck + "/" + file, d + "/out/.tmp-checkpoint-6/" + file);
  r = testutil::run_cli(eval + d + "/out/.tmp-checkpoint-6");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find(d + "/out/.tmp-checkpoint-6: an unfinished save"), std::string::npos) << r.err;
  fs::copy(ck, d + "/cut", fs::copy_options::recursive);
  fs::remove(d + "/cut/COMPLETE");
  r = testutil::run_cli(eval + d + "/cut");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find(d + "/cut: COMPLETE: missing"), std::string::npos) << r.err;
  // A Hugging Face Trainer checkpoint (LongLoRA's scripts save peft adapters in them)
  // has a trainer_state.json of its own and no COMPLETE: it is an adapter, not a cut
  // save of ours.
  fs::create_directories(d + "/hf/checkpoint-1000");
  for (const char* file : {"adapter_config.json", "adapter_model.safetensors"})
    fs::copy_file(ck + "/" + file, d + "/hf/checkpoint-1000/" + file);
  testutil::write_file(d + "/hf/checkpoint-1000/trainer_state.json", R"({"global_step": 1000, "log_history": []})");
  r = testutil::run_cli(eval + d + "/hf/checkpoint-1000");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(testutil::run_cli(eval + ck).code, 0);
  // export --overwrite onto another training checkpoint made it a merged model.
  ASSERT_EQ(testutil::run_cli("--config " + tiny_config(d) + " --set train.max_steps=6 --resume").code, 0);
  r = testutil::run_cli("export --checkpoint " + d + "/out/checkpoint-6 --output " + ck + " --overwrite");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find(ck + ": --output: is a training checkpoint"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::exists(ck + "/optimizer.safetensors"));
  // --output through a symlink and "..": the check and the replacement meant two
  // directories (the one named as text was replaced).
  fs::create_directories(d + "/elsewhere/x");
  fs::create_directories(d + "/x");
  testutil::write_file(d + "/x/keep.txt", "mine");
  fs::create_directory_symlink(d + "/elsewhere/sub", d + "/link");
  fs::create_directories(d + "/elsewhere/sub");
  r = testutil::run_cli("export --checkpoint " + ck + " --output " + d + "/link/../x --overwrite");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(testutil::read_file(d + "/x/keep.txt"), "mine");
  EXPECT_TRUE(fs::exists(d + "/elsewhere/x/model.safetensors"));
  longlora::remove_tree(d);
  longlora::remove_tree(f);
}

TEST(Train, ScheduleFollowsTransformers) {
  train::TrainSection t;
  t.lr = 1.0;
  t.warmup_steps = 10;
  t.max_steps = 110;
  EXPECT_DOUBLE_EQ(train::lr_at(t, 0), 0.0);
  EXPECT_DOUBLE_EQ(train::lr_at(t, 5), 0.5);
  EXPECT_DOUBLE_EQ(train::lr_at(t, 50), 1.0);
  t.scheduler = "cosine";
  EXPECT_DOUBLE_EQ(train::lr_at(t, 60), 0.5);
  EXPECT_NEAR(train::lr_at(t, 35), 0.5 * (1 + std::cos(M_PI / 4)), 1e-15);  // linear would be 0.75
  EXPECT_NEAR(train::lr_at(t, 110), 0.0, 1e-12);
  t.scheduler = "linear";
  EXPECT_DOUBLE_EQ(train::lr_at(t, 60), 0.5);
}

TEST(Train, BadDataIsAClearError) {
  const auto d = testutil::temp_dir("bad-data");
  testutil::write_file(d + "/sft.jsonl", "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": 3}\n");
  auto r = testutil::run_cli("--config " + tiny_config(d) + " --set data.train=" + d + "/sft.jsonl");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("sft.jsonl:2: instruction: "), std::string::npos) << r.err;
}

TEST(Train, ARunStoppedByNonFiniteStepsSavesItsLastFiniteState) {
  // The stop (train.max_bad_steps in a row) saved nothing: the good steps since the
  // last save were lost. Skipped steps change nothing, so the state saved at the stop
  // is the one after the last finite step, and the older checkpoint stays.
  const auto d = testutil::temp_dir("bad-steps");
  const std::string cfg = tiny_config(d, "") + " --set train.max_steps=20 --set output.save_steps=4 "
                          "--set output.keep_last=1 --set train.max_bad_steps=3";
  auto r = testutil::run_cli("--config " + cfg, "LONGLORA_TEST_NONFINITE_FROM_STEP=6 ");
  EXPECT_EQ(r.code, 3) << r.err;
  EXPECT_NE(r.err.find("3 non-finite steps in a row: stopping"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("checkpoint-8: the state after step 5, the last finite one"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::exists(d + "/out/checkpoint-4/COMPLETE"));  // not pruned for it
  ASSERT_TRUE(fs::exists(d + "/out/checkpoint-8/COMPLETE"));
  const auto ts = testutil::read_json(d + "/out/checkpoint-8/trainer_state.json");
  EXPECT_EQ(ts["step"], 8);
  EXPECT_EQ(ts["bad_steps"], 3);
  // Its weights are those of a run that stopped after step 5 (bit-identical on the CPU).
  const auto e = d + "/five";
  fs::create_directories(e);
  ASSERT_EQ(testutil::run_cli("--config " + tiny_config(e) + " --set train.max_steps=5 --set output.save_steps=5").code, 0);
  auto a = io::load_tensors(d + "/out/checkpoint-8/adapter_model.safetensors");
  auto b = io::load_tensors(e + "/out/checkpoint-5/adapter_model.safetensors");
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, t] : b) EXPECT_TRUE(torch::equal(a.at(name), t)) << name;
  // It resumes; finite steps reset the count.
  r = testutil::run_cli("--config " + cfg + " --set train.max_steps=10 --resume");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(testutil::read_json(d + "/out/checkpoint-10/trainer_state.json")["bad_steps"], 0);
  // Every step has its record, the one the run stopped at too (skipped), which the
  // resume, starting after it, never logs again.
  std::vector<int> logged;
  for (const auto& j : testutil::metric_records(d + "/out/metrics.jsonl")) {
    logged.push_back(j["step"].get<int>());
    EXPECT_EQ(j["skipped"].get<bool>(), logged.back() >= 6 && logged.back() <= 8) << j.dump();
  }
  EXPECT_EQ(logged, (std::vector<int>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}));
  // A normal save prunes to output.keep_last (1 here): both older checkpoints go.
  EXPECT_FALSE(fs::exists(d + "/out/checkpoint-4"));
  EXPECT_FALSE(fs::exists(d + "/out/checkpoint-8"));
  // A model with a NaN in its final norm (every step's loss NaN) is refused before
  // the first step, naming the tensor.
  const auto nan_model = testutil::golden_model_with_a_nan(d + "/nan-model", "model.norm.weight");
  r = testutil::run_cli("--config " + tiny_config(d + "/five") + " --set model.path=" + nan_model +
                        " --set lora.enabled=false --set train.max_bad_steps=2 --set output.dir=" + d + "/nan-out");
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find(nan_model + ": tensor 'model.norm.weight': holds non-finite values"), std::string::npos)
      << r.err;
  EXPECT_FALSE(fs::exists(d + "/nan-out/checkpoint-2"));
  longlora::remove_tree(d);
}

// An update that made the weights non-finite from a finite gradient (train.eps 1e-300
// is 0 in fp32: 0 / 0 for every parameter without gradient): every later step was
// skipped, and the NaN weights were saved, pruning the good checkpoints.
TEST(Train, AnUpdateThatMakesTheWeightsNonFiniteStopsTheRunAndSavesNothing) {
  const auto d = testutil::temp_dir("nan-update");
  const std::string cfg = tiny_config(d, "") + " --set train.max_steps=20 --set output.save_steps=4 "
                          "--set output.keep_last=1";
  auto r = testutil::run_cli("--config " + cfg, "LONGLORA_TEST_NAN_UPDATE_AT_STEP=6 ");
  EXPECT_EQ(r.code, 3) << r.err;
  EXPECT_NE(r.err.find("step 6: the update made the trainable weights non-finite, though the loss ("),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("stopping; nothing saved, no checkpoint removed"), std::string::npos) << r.err;
  EXPECT_EQ(train::latest_checkpoint(d + "/out"), std::optional<std::string>(d + "/out/checkpoint-4"));
  EXPECT_EQ(r.err.find("step 7/"), std::string::npos) << r.err;
  // The config that caused it is refused now.
  r = testutil::run_cli("--config " + cfg + " --set train.eps=1e-300 --dry-run");
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find("train.eps: expected a number in [1e-30, 1]"), std::string::npos) << r.err;
  // A run whose every step was skipped (fewer than train.max_bad_steps) trained
  // nothing, yet said "training done" and exited 0.
  fs::create_directories(d + "/all-bad");
  r = testutil::run_cli("--config " + tiny_config(d + "/all-bad") + " --set train.max_steps=2",
                        "LONGLORA_TEST_NONFINITE_FROM_STEP=1 ");
  EXPECT_EQ(r.code, 3) << r.err;
  EXPECT_NE(r.err.find("none of this run's 2 steps was finite: nothing trained"), std::string::npos) << r.err;
  longlora::remove_tree(d);
}

TEST(Train, ThroughputIsOverTheLoggedStepsAndCountsLossTokensApart) {
  // tokens/s was the last step's rate, and for instruction data it counted padding as
  // trained tokens. Now each record covers the steps since the last one, and
  // loss_tokens_per_s counts only positions with a target: the output and EOS.
  const auto d = testutil::temp_dir("throughput");
  const std::string output = "The sky is blue.";
  std::string jsonl;
  for (int i = 0; i < 8; ++i) jsonl += json({{"instruction", "Say it."}, {"output", output}}).dump() + "\n";
  testutil::write_file(d + "/sft.jsonl", jsonl);
  auto r = testutil::run_cli("--config " + tiny_config(d) + " --set data.train=" + d +
                             "/sft.jsonl --set train.max_steps=4 --set output.log_steps=2 --set data.seq_len=256" +
                             " --set output.save_steps=4");
  ASSERT_EQ(r.code, 0) << r.err;
  data::Tokenizer tok(testutil::golden("tiny-llama/model/tokenizer.model"));
  // The output's tokens (tokenized with its prompt, as LongLoRA does) and EOS.
  const std::string prompt = data::sft_prompt({"Say it.", "", output});
  const double per_row = static_cast<double>(tok.encode(prompt + output).size() - tok.encode(prompt).size() + 1);
  // Rows cut to the longest (all alike here): up to the position that predicts EOS, in
  // multiples of 8 (S2's four groups, each even).
  const double width = std::ceil((tok.encode(prompt + output).size() + 1) / 8.0) * 8;
  const auto recs = testutil::metric_records(d + "/out/metrics.jsonl");
  ASSERT_EQ(recs.size(), 2u);
  for (const auto& j : recs) {
    const double tps = j["tokens_per_s"].get<double>();
    // 2 rows x 2 accumulation steps x the rows' width a step, at the mean step time
    // (the Alpaca prompt alone takes more than 64 of this tokenizer's tokens).
    EXPECT_NEAR(tps * j["step_time_s"].get<double>(), 4 * width, 1e-6 * 4 * width);
    EXPECT_NEAR(j["loss_tokens_per_s"].get<double>() / tps, per_row / width, 1e-9);
  }
  EXPECT_NE(r.err.find(" with loss) | peak mem"), std::string::npos) << r.err;
  // Packed text: every position but a row's last has a target (the next token).
  r = testutil::run_cli("--config " + tiny_config(d) + " --set train.max_steps=2 --set output.dir=" + d + "/packed");
  ASSERT_EQ(r.code, 0) << r.err;
  std::ifstream packed(d + "/packed/metrics.jsonl");
  std::string line;
  ASSERT_TRUE(std::getline(packed, line));
  const json j = json::parse(line);
  EXPECT_NEAR(j["loss_tokens_per_s"].get<double>() / j["tokens_per_s"].get<double>(), 63.0 / 64, 1e-9);
  EXPECT_EQ(r.err.find(" with loss)"), std::string::npos) << r.err;
  // A save every other step, each held up for 6 s or more (3 s between its files):
  // the step time leaves them out. The record of the step after a save would say 6 s
  // or more with it; a step of this model takes milliseconds, and on a busy machine
  // (2 cores compiling beside it: 2.2 s seen) still well under 4 s.
  const auto t0 = std::chrono::steady_clock::now();
  r = testutil::run_cli("--config " + tiny_config(d) + " --set train.max_steps=4 --set output.save_steps=2" +
                            " --set output.log_steps=1 --set output.dir=" + d + "/saves",
                        "LONGLORA_TEST_SAVE_PAUSE_MS=3000 ");
  ASSERT_EQ(r.code, 0) << r.err;
  // The pauses happened (two saves, 6 s or more each), or the bound below proves nothing.
  EXPECT_GE(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 12.0);
  const auto saves = testutil::metric_records(d + "/saves/metrics.jsonl");
  for (const auto& k : saves) EXPECT_LT(k["step_time_s"].get<double>(), 4.0) << k.dump();
  EXPECT_EQ(saves.size(), 4u);
}

TEST(Train, ConfigsThatCannotRunAreSaidBeforeTheFirstStep) {
  const auto d = testutil::temp_dir("cannot-run");
  // Our kernel on the CPU failed at the first step, naming no config key.
  for (const std::string extra : {" --dry-run", ""}) {
    auto r = testutil::run_cli("--config " + tiny_config(d) + " --set attention.backend=kernel --set device=cpu" + extra);
    EXPECT_EQ(r.code, 1) << extra;
    EXPECT_NE(r.err.find("attention.backend: kernel"), std::string::npos) << r.err;
    EXPECT_EQ(r.err.find("step 1/"), std::string::npos) << r.err;
  }
  // A .json read as text: refused naming data.format (it failed on the extension alone).
  testutil::write_file(d + "/a.json", R"([{"instruction": "Say hi.", "output": "hi"}])");
  auto r = testutil::run_cli("--config " + tiny_config(d) + " --set data.train=" + d + "/a.json --set data.format=text");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("a.json: data.format: text does not read a '.json' file (auto picks sft for it)"),
            std::string::npos)
      << r.err;
  // Group ratio 1 is full attention: any seq_len trains (an odd one was refused as an
  // odd S2 group).
  r = testutil::run_cli("--config " + tiny_config(d) + " --set attention.group_ratio=1 --set data.seq_len=63" +
                        " --set train.max_steps=1 --set output.dir=" + d + "/odd");
  EXPECT_EQ(r.code, 0) << r.err;
  // data.eval's format: --dry-run passed an unknown extension, and the run failed after
  // loading the model with a message that named neither key nor role; instruction
  // records (which the eval cannot score) likewise.
  testutil::write_file(d + "/e.csv", "hello");
  r = testutil::run_cli("--config " + tiny_config(d) + " --set data.eval=" + d + "/e.csv --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--set data.eval: " + d + "/e.csv: unknown data extension '.csv' (expected .bin, .txt or .jsonl)"),
            std::string::npos)
      << r.err;
  r = testutil::run_cli("--config " + tiny_config(d) + " --set data.eval=" + d + "/a.json --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--set data.eval: " + d + "/a.json: instruction records (.json), which the eval does not score"),
            std::string::npos)
      << r.err;
  // A .jsonl is read for its "text" fields, whatever else its records hold (an Alpaca
  // export has instruction, input, output and text).
  testutil::write_file(d + "/alpaca.jsonl", json({{"instruction", "Say hi."}, {"input", ""}, {"output", "hi"},
                                                  {"text", "Say hi. hi"}}).dump() + "\n");
  r = testutil::run_cli("--config " + tiny_config(d) + " --set data.eval=" + d + "/alpaca.jsonl --dry-run");
  EXPECT_EQ(r.code, 0) << r.err;
  // The training data itself is allowed, with a word.
  r = testutil::run_cli("--config " + tiny_config(d) + " --set data.eval=" + testutil::golden("tiny-llama/eval.bin") +
                        " --dry-run");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("--set data.eval: the training data itself"), std::string::npos) << r.err;
  // Its errors say which file of the two they are in: the preflight's (a .bin's size),
  // and the read's, past the first record.
  testutil::write_file(d + "/odd.bin", "abc");
  r = testutil::run_cli("--config " + tiny_config(d) + " --set data.eval=" + d + "/odd.bin --set output.dir=" + d +
                        "/odd-eval");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("error: --set data.eval: " + d + "/odd.bin: odd byte count 3"), std::string::npos) << r.err;
  testutil::write_file(d + "/second.jsonl", R"({"text": "one"})" "\n" R"({"txt": "two"})" "\n");
  r = testutil::run_cli("--config " + tiny_config(d) + " --set data.eval=" + d + "/second.jsonl --set output.dir=" +
                        d + "/second-eval");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("error: data.eval: " + d + "/second.jsonl:2: text: missing or not a string"), std::string::npos)
      << r.err;
  // Data is read more than once (sniffed, then read): a FIFO blocked the run for good.
  ASSERT_EQ(::mkfifo((d + "/fifo.jsonl").c_str(), 0600), 0);
  r = testutil::run_cli("--config " + tiny_config(d) + " --set data.train=" + d + "/fifo.jsonl --dry-run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find(d + "/fifo.jsonl: is not a regular file"), std::string::npos) << r.err;
  longlora::remove_tree(d);
}

// A checkpoint-N folder without COMPLETE is no save of ours (ours are renamed into
// place whole): a new run's save of step N replaced it, and what it held was lost.
TEST(Train, AFolderNamedLikeACheckpointIsNotReplaced) {
  const auto d = testutil::temp_dir("foreign-ckpt");
  fs::create_directories(d + "/out/checkpoint-3");
  testutil::write_file(d + "/out/checkpoint-3/notes.txt", "mine");
  auto r = testutil::run_cli("--config " + tiny_config(d));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("output.dir: " + d + "/out/checkpoint-3 is not a complete checkpoint (no COMPLETE file) and "
                       "a save would replace it"),
            std::string::npos)
      << r.err;
  EXPECT_EQ(testutil::read_file(d + "/out/checkpoint-3/notes.txt"), "mine");
  // Below the resumed step such a folder is a prune killed mid-deletion (COMPLETE
  // gone first): no save will touch it, and it does not block the resume.
  longlora::remove_tree(d + "/out/checkpoint-3");
  ASSERT_EQ(testutil::run_cli("--config " + tiny_config(d) + " --set train.max_steps=6").code, 0);
  fs::remove(d + "/out/checkpoint-3/COMPLETE");
  r = testutil::run_cli("--config " + tiny_config(d) + " --set train.max_steps=7 --resume");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(fs::exists(d + "/out/checkpoint-7/COMPLETE"));
  longlora::remove_tree(d);
}

TEST(Train, TheAutomaticRopeFactorNeverDropsBelowTheModelsOwn) {
  // A model extended before (rope_scaling x4 over 128 positions: 512 tokens) trained on:
  // at 256 tokens the factor was ceil(256 / 128) = 2, half the model's, with no word.
  const auto d = testutil::temp_dir("rope-own");
  fs::create_directories(d + "/m");
  for (const auto& e : fs::directory_iterator(testutil::golden("tiny-llama/model")))
    fs::copy(e.path(), d + "/m/" + e.path().filename().string());
  auto cfg = testutil::read_json(d + "/m/config.json");
  cfg["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}};
  testutil::write_file(d + "/m/config.json", cfg.dump());
  for (const auto& [seq_len, want] : std::vector<std::pair<int, double>>{{64, 4}, {256, 4}, {512, 4}, {1024, 8}}) {
    const std::string out = d + "/out-" + std::to_string(seq_len);
    auto r = testutil::run_cli("--config " + tiny_config(d) + " --set model.path=" + d + "/m --set data.seq_len=" +
                               std::to_string(seq_len) + " --set train.max_steps=1 --set train.micro_batch_size=1" +
                               " --set train.grad_accum=1 --set output.dir=" + out);
    ASSERT_EQ(r.code, 0) << r.err;
    EXPECT_EQ(testutil::read_json(out + "/checkpoint-1/trainer_state.json")["rope_factor"].get<double>(), want)
        << "seq_len " << seq_len;
  }
  longlora::remove_tree(d);
}

TEST(Train, EvalOfACheckpointUsesItsTrainedRopeFactor) {
  const auto d = testutil::temp_dir("rope-ckpt");
  ASSERT_EQ(testutil::run_cli("--config " + tiny_config(d) + " --set train.max_steps=1 --set model.rope_factor=2").code, 0);
  const std::string args = "eval --model " + testutil::golden("tiny-llama/model") + " --adapter " + d +
                           "/out/checkpoint-1 --data " + testutil::golden("tiny-llama/eval.bin") + " --seq-len 64 --json";
  auto r = testutil::run_cli(args);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["rope_factor"].get<double>(), 2.0);
  const double loss = json::parse(r.out)["loss"].get<double>();
  r = testutil::run_cli(args + " --rope-factor 3");  // an explicit flag wins
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["rope_factor"].get<double>(), 3.0);
  // The factor reaches the positions, not only the report.
  EXPECT_NE(json::parse(r.out)["loss"].get<double>(), loss);
  r = testutil::run_cli(args + " --rope-factor 2");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["loss"].get<double>(), loss);
}

TEST(Train, Fp16ScalesTheLossSoThatSmallGradientsSurvive) {
  // lm_head shrunk by 1e-5: every gradient below it is ~1e-8 per token, under fp16's
  // smallest subnormal (6e-8), as a long context's 1/tokens share of the loss makes them.
  // (Its fp16 weights are subnormals themselves: this takes torch's default of keeping
  // subnormals, not flushing them.)
  const auto d = testutil::temp_dir("fp16-scale");
  const std::string model =
      testutil::golden_model_with(d + "/model", "lm_head.weight", [](torch::Tensor& w) { w.mul_(1e-5); });
  ASSERT_FALSE(HasFailure());
  auto run = [&](const std::string& name, const std::string& flags) {
    auto r = testutil::run_cli("--config " + tiny_config(d) + " --set model.path=" + model + " --set output.dir=" + d +
                               "/" + name + " --set train.max_steps=2 --set data.shuffle=false --set device=cpu " + flags);
    EXPECT_EQ(r.code, 0) << r.err;
    return testutil::metric_records(d + "/" + name + "/metrics.jsonl");
  };
  const auto fp32 = run("fp32", "--set model.dtype=fp32");
  const auto scaled = run("scaled", "--set model.dtype=fp16");
  const auto unscaled = run("unscaled", "--set model.dtype=fp16 --set train.loss_scale=1");
  ASSERT_EQ(fp32.size(), 2u);
  ASSERT_EQ(scaled.size(), 2u);
  ASSERT_EQ(unscaled.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const double want = fp32[i]["grad_norm"].get<double>();
    ASSERT_GT(want, 0);
    EXPECT_NEAR(scaled[i]["grad_norm"].get<double>(), want, 0.01 * want) << "step " << i + 1;
    EXPECT_EQ(scaled[i]["loss_scale"], 65536.0);
    // What the scale is for: unscaled, fp16 loses them (all of them, on this CPU).
    EXPECT_LT(unscaled[i]["grad_norm"].get<double>(), 0.1 * want) << "step " << i + 1;
    EXPECT_FALSE(unscaled[i].contains("loss_scale"));
    EXPECT_FALSE(fp32[i].contains("loss_scale"));
  }
}

TEST(Train, Fp16LossScaleHalvesAtAnOverflowGrowsAfterItsWindowAndResumes) {
  // Starting at 2^21 the scaled gradients overflow fp16 (65504): the scale must halve,
  // the update be skipped without counting as a bad step (one would stop this run),
  // and after 2 finite steps in a row the scale doubles (and may overflow again).
  const std::string flags =
      " --set model.dtype=fp16 --set device=cpu --set train.initial_loss_scale=2097152"
      " --set train.loss_scale_window=2 --set train.max_bad_steps=1 --set lora.dropout=0 --set train.max_steps=10"
      " --set output.save_steps=5 --set train.scheduler=cosine";
  const auto a = testutil::temp_dir("fp16-overflow-a"), b = testutil::temp_dir("fp16-overflow-b");
  auto r = testutil::run_cli("--config " + tiny_config(a) + flags);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("step 1: gradient overflow at loss scale 2.09715e+06, update skipped; scale now 1.04858e+06"),
            std::string::npos)
      << r.err;
  const auto recs = testutil::metric_records(a + "/out/metrics.jsonl");
  ASSERT_EQ(recs.size(), 10u);
  double scale = 2097152.0;
  int good = 0, skipped = 0, doubled = 0;
  // The schedule (warmup 2, then cosine) counts the updates only, as HF's Trainer.
  train::TrainSection t;
  t.lr = 0.003;
  t.warmup_steps = 2;
  t.max_steps = 10;
  t.scheduler = "cosine";
  for (const auto& rec : recs) {
    const std::string at = "step " + rec["step"].dump();
    EXPECT_DOUBLE_EQ(rec["lr"].get<double>(), train::lr_at(t, rec["step"].get<int>() - 1 - skipped)) << at;
    if (rec["skipped"].get<bool>()) {
      scale /= 2, good = 0, ++skipped;
    } else if (++good == 2) {
      scale *= 2, good = 0, ++doubled;
    }
    EXPECT_EQ(rec["loss_scale"].get<double>(), scale) << at;
  }
  EXPECT_GE(skipped, 2);
  EXPECT_GE(doubled, 1);
  // The checkpoint keeps the scale: a run stopped at 5 and resumed logs what the
  // uninterrupted one did, loss and scale.
  const auto ts = testutil::read_json(a + "/out/checkpoint-5/trainer_state.json");
  EXPECT_EQ(ts["loss_scale"].get<double>(), recs[4]["loss_scale"].get<double>());
  int skipped_by_5 = 0;
  for (size_t i = 0; i < 5; ++i) skipped_by_5 += recs[i]["skipped"].get<bool>();
  EXPECT_EQ(ts["overflow_steps"], skipped_by_5);
  r = testutil::run_cli("--config " + tiny_config(b) + flags + " --set train.max_steps=5");
  ASSERT_EQ(r.code, 0) << r.err;
  r = testutil::run_cli("--config " + tiny_config(b) + flags + " --resume");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto again = testutil::metric_records(b + "/out/metrics.jsonl");
  ASSERT_EQ(again.size(), 10u);
  for (size_t i = 5; i < 10; ++i) {
    EXPECT_EQ(again[i]["loss"], recs[i]["loss"]) << "step " << i + 1;
    EXPECT_EQ(again[i]["loss_scale"], recs[i]["loss_scale"]) << "step " << i + 1;
    EXPECT_EQ(again[i]["lr"], recs[i]["lr"]) << "step " << i + 1;
  }
  // A run whose steps all overflowed (the scale still coming down) is not one that
  // trained nothing for a fault: it ends as usual.
  const auto c = testutil::temp_dir("fp16-overflow-c");
  r = testutil::run_cli("--config " + tiny_config(c) + flags + " --set train.max_steps=1");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("step 1: gradient overflow"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("training done: 1 steps"), std::string::npos) << r.err;
}

TEST(Train, AResumeOnRewrittenDataSaysTheCursorCountsTheOldRows) {
  const auto d = testutil::temp_dir("data-changed");
  const std::string data = d + "/train.bin";
  std::filesystem::copy_file(testutil::golden("tiny-llama/eval.bin"), data);
  const std::string args = "--config " + tiny_config(d) + " --set data.train=" + data;
  auto r = testutil::run_cli(args + " --set train.max_steps=3");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto ts = testutil::read_json(d + "/out/checkpoint-3/trainer_state.json");
  EXPECT_EQ(ts["data"]["rows"], 257);  // 16482 tokens in rows of 64
  EXPECT_EQ(ts["data"]["bytes"], 32964);
  // The same data: nothing to say.
  r = testutil::run_cli(args + " --set train.max_steps=4 --resume");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.err.find("counts the old rows"), std::string::npos) << r.err;
  std::filesystem::resize_file(data, 64 * 2 * 100);  // 100 rows
  r = testutil::run_cli(args + " --set train.max_steps=5 --resume");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find(data + " has 100 rows (12800 bytes) now, 257 (32964 bytes) when " + d +
                       "/out/checkpoint-4 was saved: the data cursor (row 16) counts the old rows"),
            std::string::npos)
      << r.err;
}

// A full fine-tuning checkpoint's config.json is the base's, read when the run starts:
// a base folder moved away during a long run does not fail the saves.
TEST(Train, AFullFineTuneSavesTheConfigReadAtItsStart) {
  const auto d = testutil::temp_dir("fullft-config");
  const std::string base = d + "/base";
  std::filesystem::copy(testutil::golden("tiny-llama/model"), base);
  const std::string want = testutil::read_file(base + "/config.json");
  pid_t pid = testutil::spawn_cli("--config " + tiny_config(d) + " --set model.path=" + base +
                                  " --set lora.enabled=false --set train.max_steps=100000 --set output.save_steps=100000");
  if (!testutil::wait_until([&] { return testutil::metric_losses(d + "/out/metrics.jsonl").size() >= 1; }, 120)) {
    ::kill(pid, SIGKILL);  // not left training 100000 steps
    testutil::wait_exit(pid);
    FAIL() << "no step logged in 120 s";
  }
  std::filesystem::remove(base + "/config.json");
  ::kill(pid, SIGTERM);
  EXPECT_EQ(testutil::wait_exit(pid), 0);
  auto ck = train::latest_checkpoint(d + "/out");
  ASSERT_TRUE(ck.has_value());
  auto got = testutil::read_json(*ck + "/config.json"), base_cfg = json::parse(want);
  base_cfg["torch_dtype"] = "float32";  // the fp32 master weights it holds
  EXPECT_EQ(got, base_cfg);
}
