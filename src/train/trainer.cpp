// The training loop. Thin on purpose: setup, the step, periodic work, save.
#include "longlora/train/trainer.h"

#include <spdlog/spdlog.h>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>

#include "longlora/attention/attention.h"
#include "longlora/common/device.h"
#include "longlora/common/error.h"
#include "longlora/common/interrupt.h"
#include "longlora/common/json_file.h"
#include "longlora/common/strings.h"
#include "longlora/data/dataset.h"
#include "longlora/data/tokenizer.h"
#include "longlora/eval/perplexity.h"
#include "longlora/data/tokens.h"
#include "longlora/model/loader.h"
#include "longlora/train/checkpoint.h"
#include "longlora/train/setup.h"


namespace fs = std::filesystem;

namespace longlora::train {
namespace {

// SIGINT, SIGTERM and SIGHUP (common/interrupt.h): the first finishes the step, saves
// and exits 0; SIGHUP too, so that a closed terminal or ssh session saves instead of
// losing the steps since the last checkpoint. A second signal leaves at once.
bool signalled() { return interrupt_signal() != 0; }

// The refusal of a run whose output.dir another run holds (`fd` on its .lock, which
// holds that run's pid).
Error in_use(const std::string& dir, int fd) {
  char buf[32] = {};
  const ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
  const std::string pid = n > 0 ? std::string(buf, static_cast<size_t>(n)) : "?";
  return Error("output.dir: " + dir + " is in use by another longlora-train run (pid " + first_line(pid) +
               "); wait for it to end, or choose another output.dir");
}

// Holds an exclusive lock on OUTPUT_DIR/.lock for the run: two runs in one output.dir
// pruned, overwrote and trimmed each other's checkpoints and metrics. Creating the file
// also finds an output.dir we cannot write before the first step, not at the first save.
class RunLock {
 public:
  explicit RunLock(const std::string& dir) : path_((fs::path(dir) / ".lock").string()) {
    fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) throw Error("output.dir: " + dir + ": cannot write there: " + std::strerror(errno));
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      Error e = in_use(dir, fd_);
      ::close(fd_);
      throw e;
    }
    const std::string me = std::to_string(::getpid()) + "\n";
    if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, me.data(), me.size(), 0) != static_cast<ssize_t>(me.size()))
      throw Error(path_ + ": write failed: " + std::strerror(errno));
  }
  ~RunLock() { ::close(fd_); }  // the lock goes with the descriptor
  RunLock(const RunLock&) = delete;
  RunLock& operator=(const RunLock&) = delete;

 private:
  std::string path_;
  int fd_ = -1;
};

std::string eta(double seconds) {
  const int64_t s = static_cast<int64_t>(seconds);
  char buf[32];
  std::snprintf(buf, sizeof buf, "%ldh%02ldm%02lds", s / 3600, (s / 60) % 60, s % 60);
  return buf;
}

}  // namespace

void refuse_if_in_use(const std::string& dir) {
  const int fd = ::open((fs::path(dir) / ".lock").c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;  // no run has used it
  // A shared lock, let go at once: it fails while a run holds the exclusive one.
  const bool busy = ::flock(fd, LOCK_SH | LOCK_NB) != 0;
  if (busy) {
    Error e = in_use(dir, fd);
    ::close(fd);
    throw e;
  }
  ::close(fd);
}

double lr_at(const TrainSection& t, int64_t step) {
  // As transformers' schedulers (the first step's multiplier is 0 with warmup).
  const double w = static_cast<double>(t.warmup_steps);
  if (step < t.warmup_steps) return t.lr * static_cast<double>(step) / std::max(1.0, w);
  const double total = static_cast<double>(t.max_steps);
  const double progress = (step - w) / std::max(1.0, total - w);
  if (t.scheduler == "cosine") return t.lr * 0.5 * (1.0 + std::cos(M_PI * progress));
  if (t.scheduler == "linear") return t.lr * std::max(0.0, (total - step) / std::max(1.0, total - w));
  return t.lr;
}

void validate_for_training(const RunConfig& c, const ConfigOrigin& o) {
  auto need = [&](const std::string& key, const std::string& path, bool dir) {
    std::error_code ec;
    if (!fs::exists(path, ec)) throw Error(o.at(key) + ": " + path + ": no such " + (dir ? "directory" : "file"));
    if (dir != fs::is_directory(path, ec))
      throw Error(o.at(key) + ": " + path + (dir ? ": not a directory" : ": is a directory, a file is expected"));
  };
  if (c.model.init == "pretrained") {
    if (c.model.path.empty()) throw Error(o.at("model.path") + ": required (or model.init \"random\" with model.config)");
    need("model.path", c.model.path, true);
    // The weights come with their own config.json; another one would only half apply.
    if (!c.model.config.empty())
      throw Error(o.at("model.config") + ": goes with model.init \"random\"; a pretrained model's shape is " +
                  "model.path's config.json");
  } else if (!c.model.config.empty()) {
    need("model.config", c.model.config, false);
  } else if (c.model.path.empty()) {
    throw Error(o.at("model.config") + ": required with model.init \"random\"");
  } else {
    need("model.path", (fs::path(c.model.path) / "config.json").string(), false);
  }
  if (c.data.train.empty()) throw Error(o.at("data.train") + ": required");
  need("data.train", c.data.train, false);
  if (!c.data.eval.empty()) need("data.eval", c.data.eval, false);
  if (c.output.dir.empty()) throw Error(o.at("output.dir") + ": required");
  std::error_code ec;
  if (fs::exists(c.output.dir, ec) && !fs::is_directory(c.output.dir, ec))
    throw Error(o.at("output.dir") + ": " + c.output.dir + ": exists and is not a directory");
  // Where the run will create files: output.dir, or the nearest folder above it that
  // exists. Found now, not at the first save hours later.
  fs::path w = fs::absolute(c.output.dir, ec);
  while (!w.empty() && !fs::exists(w, ec) && w.has_parent_path() && w.parent_path() != w) w = w.parent_path();
  // A file where a folder of the path should be: access() says "Permission denied".
  if (fs::exists(w, ec) && !fs::is_directory(w, ec))
    throw Error(o.at("output.dir") + ": " + c.output.dir + ": " + w.string() + " is a file, not a directory");
  if (::access(w.c_str(), W_OK | X_OK) != 0)
    throw Error(o.at("output.dir") + ": " + c.output.dir + ": cannot write in " + w.string() + ": " +
                std::strerror(errno));
  // A file named as a save of this run: the save replaced it.
  if (fs::is_directory(c.output.dir, ec))
    for (const auto& e : fs::directory_iterator(c.output.dir, ec)) {
      if (is_checkpoint_name(e.path().filename().string()) && !e.is_directory(ec))
        throw Error(o.at("output.dir") + ": " + e.path().string() +
                    " is not a directory, but the name of one of this run's saves; move it away");
    }
  // A run writing inside a training checkpoint (its own resume source, or another
  // run's) lost everything there when that run pruned the checkpoint.
  for (fs::path a = fs::weakly_canonical(fs::absolute(c.output.dir, ec), ec); !a.empty(); a = a.parent_path()) {
    if (fs::exists(a / "COMPLETE", ec) || (a.filename().string().rfind("checkpoint-", 0) == 0 &&
                                           fs::exists(a / "trainer_state.json", ec)))
      throw Error(o.at("output.dir") + ": " + c.output.dir + ": lies inside the training checkpoint " + a.string() +
                  ", which output.keep_last deletes with all it holds; choose a directory outside it");
    if (a == a.parent_path()) break;
  }
  // access() answers for the permission bits (always yes for root), not for what the
  // file system allows: under /proc it said writable and the run failed to create the
  // folder. A folder made and removed there is the real test.
  {
    std::string probe = (w / ".longlora-probe-XXXXXX").string();
    if (::mkdtemp(probe.data()) == nullptr)
      throw Error(o.at("output.dir") + ": " + c.output.dir + ": cannot create folders in " + w.string() + ": " +
                  std::strerror(errno));
    ::rmdir(probe.c_str());
  }
  if (c.attention.s2) {
    const double g = c.data.seq_len * c.attention.group_ratio;
    if (std::abs(g - std::round(g)) > 1e-9)
      throw Error(s2_group_where(c, o) + ": the S2 group (" + fmt::format("{}", g) + " tokens) is not a whole number");
  }
  // Paths go into run_config.json made absolute; JSON holds only UTF-8, so a name that
  // is not (here, or in the working directory above it) would fail the first save.
  for (const auto& [key, path] : {std::pair<const char*, const std::string*>{"model.path", &c.model.path},
                                  {"model.config", &c.model.config},
                                  {"data.train", &c.data.train},
                                  {"data.eval", &c.data.eval},
                                  {"output.dir", &c.output.dir}}) {
    if (path->empty()) continue;
    const std::string abs = fs::absolute(*path, ec).string();
    if (const size_t i = invalid_utf8_at(abs); i != std::string::npos)
      throw Error(o.at(key) + ": " + abs + ": not valid UTF-8 at byte " + std::to_string(i) +
                  " (run_config.json records it and is JSON, UTF-8 only: rename the directory)");
  }
  if (c.device == "cuda" && !torch::cuda::is_available())
    throw Error(o.at("device") + ": cuda, and no CUDA device is available");
  // Our CUDA kernel runs on CUDA tensors only: said now, not at the first step.
  if (c.attention.backend == "kernel") {
    if (!attention::kernel_compiled())
      throw Error(o.at("attention.backend") + ": kernel: this build has no CUDA kernels (built without CUDA)");
    if (pick_device(c.device).is_cpu())
      throw Error(o.at("attention.backend") + ": kernel runs on a CUDA device, and this run is on the CPU (device " +
                  c.device + (c.device == "auto" ? ", no CUDA device found" : "") + ")");
  }
  if (c.train.warmup_steps >= c.train.max_steps)
    spdlog::warn("{}: {} steps of warmup in {} steps: the learning rate never reaches train.lr {}",
                 o.at("train.warmup_steps"), c.train.warmup_steps, c.train.max_steps, c.train.lr);
  preflight(c, o);
}

std::optional<std::string> plan_start(const RunConfig& cfg, const ResumeRequest& resume) {
  std::optional<std::string> from;
  if (!resume.from.empty()) {
    from = resume.from;
  } else if (resume.latest) {
    from = latest_checkpoint(cfg.output.dir);
    if (!from) spdlog::warn("--resume: no complete checkpoint in {}: starting from step 0", cfg.output.dir);
  }
  const int64_t start = from ? read_trainer_state(*from).step : 0;
  // This run's checkpoints must not mix with another's in output.dir: keep_last would
  // prune the newer-numbered ones (a new run's own), and --resume would pick them.
  const auto done = complete_checkpoints(cfg.output.dir);
  // A save of step N replaces a checkpoint-N folder; one without COMPLETE past the
  // start (where this run saves) is no save of ours (ours are renamed into place
  // whole), and what it holds is not ours to delete. Below the start one is a prune
  // (or re-save) killed mid-deletion: left alone.
  for (const auto& [step, dir] : incomplete_checkpoints(cfg.output.dir))
    if (step > start)
      throw Error("output.dir: " + dir +
                  " is not a complete checkpoint (no COMPLETE file) and a save would replace it: move it out of " +
                  cfg.output.dir + " first");
  if (!done.empty() && !from)
    throw Error("output.dir: " + cfg.output.dir + " holds " + fs::path(done.back().second).filename().string() +
                " of an earlier run: --resume continues it; for a new run, choose another output.dir or remove it");
  if (!done.empty() && done.back().first > start)
    throw Error("output.dir: " + done.back().second + " is newer than the resumed " + *from + " (step " +
                std::to_string(start) + "): this run's checkpoints would mix with it; move it out of " +
                cfg.output.dir + " first");
  return from;
}

namespace {

// One host sync for all of them: it runs after every update.
bool all_finite(const std::vector<torch::Tensor>& params) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> ok;
  for (const auto& p : params) ok.push_back(torch::isfinite(p).all());
  return ok.empty() || torch::stack(ok).all().item<bool>();
}

// metrics.jsonl keeps the records of steps up to `step`: those logged after the
// resumed checkpoint (or by a run that saved none) are replaced by this run's. A last
// line without its newline is a record cut short by a crash: dropped too, or the next
// record would be appended to it. `unlogged` (records a failed write lost, kept in the
// checkpoint) are appended unless there already. Returns whether an eval record of
// `step` is there: a run stopped between its save and its eval lacks one.
bool trim_metrics(const fs::path& path, int64_t step, const std::vector<nlohmann::json>& unlogged) {
  std::error_code ec;
  // A FIFO blocked the run before its first step; a device reads without end.
  if (fs::exists(path, ec) && !fs::is_regular_file(path, ec))
    throw Error(path.string() + ": not a regular file (the run appends its metrics there)");
  std::string all;
  if (std::ifstream in(path, std::ios::binary); in)
    all.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  const bool cut_short = !all.empty() && all.back() != '\n';
  if (cut_short) all.erase(all.rfind('\n') + 1);  // npos + 1 == 0: the one line goes
  std::istringstream lines(all);
  std::string kept, line;
  std::vector<nlohmann::json> records;
  int64_t dropped = cut_short, appended = 0;
  while (std::getline(lines, line)) {
    // Our own lines; one that is not a record (damaged, or nested too deep to copy
    // safely) is kept as it is.
    nlohmann::json rec;
    try {
      rec = nlohmann::json::parse(line, json_depth_limit<nlohmann::json>(path.string()), /*allow_exceptions=*/false);
    } catch (const Error&) {
      kept += line + "\n";
      continue;
    }
    if (rec.is_object() && rec.contains("step") && rec["step"].is_number_integer() &&
        rec["step"].get<int64_t>() > step) {
      ++dropped;
      continue;
    }
    kept += line + "\n";
    records.push_back(rec);
  }
  for (const auto& rec : unlogged) {
    if (std::find(records.begin(), records.end(), rec) != records.end()) continue;
    kept += rec.dump() + "\n";
    records.push_back(rec);
    ++appended;
  }
  const bool has_eval = std::any_of(records.begin(), records.end(), [&](const nlohmann::json& r) {
    return r.is_object() && r.contains("eval_loss") && r.value("step", nlohmann::json()) == nlohmann::json(step);
  });
  if (dropped == 0 && appended == 0) return has_eval;
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << kept;
    out.flush();
    if (!out) {
      const int err = errno;
      fs::remove(tmp);
      throw Error(tmp.string() + ": write failed: " + std::strerror(err));
    }
  }
  fs::rename(tmp, path);
  if (dropped > 0)
    spdlog::info("{}: {} records past step {} removed{} (this run logs those steps again)", path.string(), dropped,
                 step, cut_short ? ", the last one cut short" : "");
  if (appended > 0)
    spdlog::info("{}: {} records a failed write lost appended from the checkpoint", path.string(), appended);
  return has_eval;
}

}  // namespace

int train(const RunConfig& cfg, const ResumeRequest& resume) {
  ignore_sigpipe();
  std::error_code ec;
  fs::create_directories(cfg.output.dir, ec);
  if (ec) throw Error("output.dir: " + cfg.output.dir + ": cannot create: " + ec.message());
  const RunLock lock(cfg.output.dir);
  const std::optional<std::string> from = plan_start(cfg, resume);
  Session s = make_session(cfg);
  auto& m = *s.model;
  const auto& tc = cfg.train;

  const std::string model_config = cfg.lora.enabled ? "" : full_finetune_config(cfg, m.cfg.rope_factor);
  TrainerState st;
  auto save = [&] { return save_checkpoint(cfg.output.dir, m, s.trainable, *s.optimizer, st, cfg, model_config); };
  if (from) {
    st = load_checkpoint(*from, s.trainable, *s.optimizer, cfg, m.cfg);
    // Its adapter (or optimizer state) continued on other frozen weights than it
    // trained with: the loss jumped, and nothing said why.
    if (!st.base_sample.empty() && !model::same_base(st.base_sample, s.base_sample))
      throw Error(*from + "/trainer_state.json: base_sample: the base weights differ from those this checkpoint "
                  "trained on (" +
                  (cfg.model.init == "random" ? "random init from " + model_config_path(cfg) + ": train.seed or the config changed"
                                              : "model.path " + cfg.model.path + " holds other weights now") +
                  "): resume on the same base");
    spdlog::info("resumed from {} at step {}", *from, st.step);
    if (st.step >= tc.max_steps)
      spdlog::warn("{} is at step {}, train.max_steps is {}: nothing left to train", *from, st.step, tc.max_steps);
  }
  // The data cursor counts rows of the data it was saved with: changed data (same
  // path, rewritten) resumes at another place in it, which the user should know.
  {
    const auto size = fs::file_size(cfg.data.train, ec);
    const int64_t rows = s.data->size(), bytes = ec ? 0 : static_cast<int64_t>(size);
    if (from && st.data_rows > 0 && (st.data_rows != rows || st.data_bytes != bytes))
      spdlog::warn("resume: {} has {} rows ({} bytes) now, {} ({} bytes) when {} was saved: the data cursor "
                   "(row {}) counts the old rows",
                   cfg.data.train, rows, bytes, st.data_rows, st.data_bytes, *from, st.cursor);
    st.data_rows = rows;
    st.data_bytes = bytes;
  }
  st.base_sample = s.base_sample;  // recorded from this save on
  const bool has_eval = trim_metrics(fs::path(cfg.output.dir) / "metrics.jsonl", st.step, st.unlogged_metrics);
  st.unlogged_metrics.clear();

  install_interrupt_handlers();
  const std::string metrics_path = (fs::path(cfg.output.dir) / "metrics.jsonl").string();
  std::ofstream metrics(metrics_path, std::ios::app);
  if (!metrics) throw Error(metrics_path + ": cannot open for appending: " + std::strerror(errno));
  // A record that cannot be written (disk full) stops the run as a signal does: save,
  // then exit 1. Unchecked, the run went on and its metrics were silently lost.
  bool metrics_failed = false;
  auto record = [&](const nlohmann::json& rec) {
    metrics << rec.dump() << std::endl;
    if (!metrics) {
      // Kept in the checkpoint about to be saved; its resume appends it.
      st.unlogged_metrics.push_back(rec);
      if (!metrics_failed)
        spdlog::error("{}: write failed ({}): saving a checkpoint and stopping", metrics_path, std::strerror(errno));
      metrics_failed = true;
    }
  };

  const int64_t L = cfg.data.seq_len, mbs = tc.micro_batch_size;
  // Instruction rows are right-padded to seq_len; a micro-batch is cut to its longest
  // row (as LongLoRA's collator pads to the batch's longest), rounded up so that S2's
  // groups (seq_len / group of them) stay whole and even. The group then is a fraction
  // of that length, as LongLoRA sizes it from the batch's q_len.
  const bool trim = s.data->kind() == "sft";
  const bool grouped = s.train_forward.attn.mode != attention::Mode::Full && s.train_forward.attn.group < L;
  const int64_t n_groups = grouped ? L / s.train_forward.attn.group : 1;
  const int64_t trim_unit = grouped ? 2 * n_groups : 1;
  std::vector<torch::Tensor> params;
  for (auto& [n, p] : s.trainable) params.push_back(p);
  // fp16 gradients of the activations underflow (a 32k-token step's share of the loss
  // per token is ~3e-5, below fp16's smallest normal, 6e-5): the loss is scaled up before the
  // backward and the gradients down after it. Dynamic, as torch's GradScaler: halved,
  // and the update skipped, when a gradient overflows; doubled after
  // train.loss_scale_window finite steps in a row. Its state goes with the checkpoint.
  const bool dynamic_scale = tc.loss_scale == 0 && s.dtype == torch::kFloat16;
  if (!dynamic_scale) st.loss_scale = 0, st.loss_scale_good_steps = 0;
  else if (st.loss_scale == 0) st.loss_scale = tc.initial_loss_scale;
  const double fixed_scale = tc.loss_scale > 0 ? tc.loss_scale : 1.0;
  int64_t last_saved = from ? st.step : -1;
  // data.eval scored at the current step, as every save is followed by.
  auto eval_saved = [&](const char* note) {
    auto r = eval::perplexity(m, *s.eval_data, L, L, cfg.data.eval, tc.loss_chunk);
    m.train();
    spdlog::info("eval at step {}{}: loss {:.4f}, perplexity {:.3f}", st.step, note, r.loss, r.perplexity);
    record({{"step", st.step}, {"eval_loss", r.loss}, {"eval_perplexity", r.perplexity}});
  };
  // A run killed between a save and its eval left the checkpoint without one, and the
  // resume would never run it.
  if (from && s.eval_data && !has_eval) eval_saved(" (not in metrics.jsonl: the run stopped before it)");
  int64_t last_update = st.step;  // the weights are those after this step
  // Tests make every step from this one on non-finite (a NaN loss is hard to cause in fp32).
  const char* nonfinite_env = std::getenv("LONGLORA_TEST_NONFINITE_FROM_STEP");
  const int64_t test_nonfinite_from = nonfinite_env ? std::atoll(nonfinite_env) : 0;
  // And an update that leaves a NaN in the weights (validated configs give none).
  const char* nan_update_env = std::getenv("LONGLORA_TEST_NAN_UPDATE_AT_STEP");
  const int64_t test_nan_update_at = nan_update_env ? std::atoll(nan_update_env) : 0;
  const auto t_start = std::chrono::steady_clock::now();
  const int64_t first_step = st.step;
  int64_t bad_this_run = 0;  // non-finite steps, fp16 overflows of the loss scale aside
  // Throughput over the steps since the last record (not the last step alone: its rate
  // is noisy), from the steps' own time (a save or eval between them is left out).
  double interval_s = 0;
  int64_t interval_steps = 0, interval_positions = 0, interval_loss_tokens = 0;
  // The logged loss is the mean of the steps' losses since the previous record, as
  // Hugging Face's Trainer logs it (the last step's alone is noisy at log_steps > 1).
  double interval_loss = 0;
  int64_t interval_finite = 0;
  m.train();

  while (st.step < tc.max_steps) {
    const auto t0 = std::chrono::steady_clock::now();
    // Steps skipped at an fp16 overflow leave the schedule where it was (HF's Trainer
    // steps its scheduler only when the optimizer ran): they would eat the warmup.
    const double lr = lr_at(tc, st.step - st.overflow_steps);
    for (auto& g : s.optimizer->param_groups())
      static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);

    // ---- the step: count the target tokens (the loss is normalized by them before
    // the first backward) and each micro-batch's width, then gather each micro-batch
    // just before its forward: a step holds one micro-batch's ids, not grad_accum's
    // (at grad_accum 2^62 the gathering alone filled the host's memory).
    const int64_t first_row = st.cursor;
    const auto seed = static_cast<uint64_t>(tc.seed);
    std::vector<int64_t> widths;
    int64_t count = 0, positions = 0;
    for (int64_t a = 0; a < tc.grad_accum; ++a) {
      int64_t need = 1;  // up to the rows' last position with a target (for the cut)
      for (int64_t b = 0; b < mbs; ++b) {
        if (st.cursor > 0 && st.cursor % s.data->size() == 0)
          spdlog::info("data: epoch {} begins at step {} ({} rows an epoch{})", st.cursor / s.data->size() + 1,
                       st.step + 1, s.data->size(), cfg.data.shuffle ? ", reshuffled" : "");
        const auto row = s.data->row_at(st.cursor++, cfg.data.shuffle, seed);
        for (int64_t i = 0; i < L; ++i)
          if (row.targets[i] >= 0) {
            ++count;
            need = std::max(need, i + 1);
          }
      }
      const int64_t width = trim ? std::min(L, (need + trim_unit - 1) / trim_unit * trim_unit) : L;
      widths.push_back(width);
      positions += mbs * width;
    }
    // Micro-batch a's rows, cut to its width, on the device.
    auto gather = [&](int64_t a) {
      // Filled through raw pointers: indexing a tensor element by element (ib[b][i] = ...)
      // goes through the dispatcher twice per token: 8-12% of the demo's step time.
      const int64_t w = widths[static_cast<size_t>(a)];
      auto ib = torch::empty({mbs, w}, torch::kInt64), tb = torch::empty({mbs, w}, torch::kInt64);
      int64_t* ip = ib.data_ptr<int64_t>();
      int64_t* tp = tb.data_ptr<int64_t>();
      for (int64_t b = 0; b < mbs; ++b) {
        const auto row = s.data->row_at(first_row + a * mbs + b, cfg.data.shuffle, seed);
        std::copy(row.ids.begin(), row.ids.begin() + w, ip + b * w);
        std::copy(row.targets.begin(), row.targets.begin() + w, tp + b * w);
      }
      return std::make_pair(ib.to(s.device), tb.to(s.device));
    };
    s.optimizer->zero_grad();
    const double scale = dynamic_scale ? st.loss_scale : fixed_scale;
    double nll = 0;
    for (int64_t a = 0; a < tc.grad_accum; ++a) {
      const auto [ids, tgts] = gather(a);
      const int64_t w = ids.size(1);
      auto fwd = s.train_forward;
      // Ungrouped (ratio 1) the group is the whole row, the cut one included.
      fwd.attn.group = grouped ? w / n_groups : w;
      auto h = m.hidden(ids, fwd);
      auto [sum, n] = model::chunked_nll(m, h, tgts, tc.loss_chunk);
      (sum * (scale / static_cast<double>(std::max<int64_t>(count, 1)))).backward();
      nll += sum.item<double>();
    }
    if (scale != 1) {  // the fp32 master gradients, unscaled before clipping and the update
      torch::NoGradGuard ng;
      for (auto& p : params)
        if (p.grad().defined()) p.mutable_grad().mul_(1.0 / scale);
    }
    double loss = nll / std::max<int64_t>(count, 1);
    if (test_nonfinite_from > 0 && st.step + 1 >= test_nonfinite_from) loss = std::nan("");
    const double norm = torch::nn::utils::clip_grad_norm_(
        params, tc.max_grad_norm > 0 ? tc.max_grad_norm : std::numeric_limits<double>::infinity());
    const bool finite = std::isfinite(loss) && std::isfinite(norm);
    // An overflow of the scaled gradients, not of the model: at a scale of 1 there is
    // nothing left to lower, and it counts as a non-finite step.
    const bool overflow = dynamic_scale && !finite && std::isfinite(loss) && st.loss_scale > 1;
    if (finite) {
      s.optimizer->step();
      if (st.step + 1 == test_nan_update_at) {
        torch::NoGradGuard ng;
        params.front().view(-1)[0] = std::numeric_limits<float>::quiet_NaN();
      }
      // A finite gradient can still give a non-finite update (an eps that is 0 in the
      // weights' dtype: 0 / 0); left alone, every later step was skipped and the NaN
      // weights saved over good checkpoints.
      if (!all_finite(params)) {
        spdlog::error("step {}: the update made the trainable weights non-finite, though the loss ({}) and gradient "
                      "norm ({}) were finite (train.lr {:g}, train.eps {:g}): stopping; nothing saved, no checkpoint "
                      "removed",
                      st.step + 1, loss, norm, lr, tc.eps);
        return 3;
      }
      last_update = st.step + 1;
      st.bad_steps = 0;
      if (dynamic_scale && ++st.loss_scale_good_steps >= tc.loss_scale_window) {
        st.loss_scale *= 2;
        st.loss_scale_good_steps = 0;
      }
    } else if (overflow) {
      st.loss_scale = std::max(1.0, st.loss_scale / 2);
      st.loss_scale_good_steps = 0;
      ++st.overflow_steps;
      spdlog::warn("step {}: gradient overflow at loss scale {:g}, update skipped; scale now {:g}", st.step + 1,
                   scale, st.loss_scale);
    } else {
      ++st.bad_steps;
      ++bad_this_run;
      st.loss_scale_good_steps = 0;
      spdlog::warn("step {}: non-finite {} ({}), update skipped ({} in a row)", st.step + 1,
                   std::isfinite(loss) ? "gradient norm" : "loss", std::isfinite(loss) ? norm : loss,
                   st.bad_steps);
    }
    ++st.step;
    st.tokens_seen += positions;
    const bool stop_bad = st.bad_steps >= tc.max_bad_steps, stop_signal = signalled();

    // ---- diagnostics
    const auto now = std::chrono::steady_clock::now();
    interval_s += std::chrono::duration<double>(now - t0).count();
    interval_steps += 1;
    interval_positions += positions;
    interval_loss_tokens += count;
    if (std::isfinite(loss)) interval_loss += loss, ++interval_finite;  // skipped steps are flagged apart
    // Every step a checkpoint may hold is recorded (a resume logs from the step after
    // it): the saved ones and the one a run stops at.
    if (st.step % cfg.output.log_steps == 0 || st.step % cfg.output.save_steps == 0 || st.step == tc.max_steps ||
        stop_bad || stop_signal) {
      const double elapsed = std::chrono::duration<double>(now - t_start).count();
      const double per_step = elapsed / static_cast<double>(st.step - first_step);
      // tokens/s counts every position the model computes, padding included (what a
      // benchmark compares); loss tokens/s only those with a target (an SFT output).
      const double tps = static_cast<double>(interval_positions) / interval_s;
      const double loss_tps = static_cast<double>(interval_loss_tokens) / interval_s;
      const double mem = peak_memory_gib(s.device);
      // Packed rows have a target at every position but their last; fewer means
      // masked prompts or padding (instruction data), worth a figure of its own.
      const int64_t packed_targets = interval_steps * tc.grad_accum * mbs * (L - 1);
      const std::string with_loss =
          interval_loss_tokens < packed_targets ? fmt::format(" ({:.0f} with loss)", loss_tps) : "";
      const std::string scale_note = dynamic_scale ? fmt::format(" | loss scale {:g}", st.loss_scale) : "";
      const double mean_loss = interval_finite > 0 ? interval_loss / static_cast<double>(interval_finite) : loss;
      spdlog::info("step {}/{} | loss {:.4f} | lr {:.3e} | grad norm {:.3f}{} | {:.0f} tokens/s{} | "
                   "peak mem {:.2f} GiB | ETA {}",
                   st.step, tc.max_steps, mean_loss, lr, norm, scale_note, tps, with_loss, mem,
                   eta(per_step * static_cast<double>(tc.max_steps - st.step)));
      nlohmann::json rec = {{"step", st.step},
                            {"loss", mean_loss},
                            {"step_loss", loss},
                            {"lr", lr},
                            {"grad_norm", norm},
                            {"tokens_per_s", tps},
                            {"loss_tokens_per_s", loss_tps},
                            {"peak_mem_gib", mem},
                            {"step_time_s", interval_s / static_cast<double>(interval_steps)},
                            {"skipped", !finite},
                            {"tokens_seen", st.tokens_seen}};
      if (dynamic_scale) rec["loss_scale"] = st.loss_scale;  // after this step's change
      record(rec);
      interval_s = 0;
      interval_steps = interval_positions = interval_loss_tokens = interval_finite = 0;
      interval_loss = 0;
    }

    if (stop_bad) {
      spdlog::error("{} non-finite steps in a row: stopping", st.bad_steps);
      // Skipped steps change nothing, so the weights and optimizer state are those after
      // the last finite step: saved, the good steps since the last save are kept (they
      // were lost). Nothing is pruned for it, and weights that are not finite (an
      // update blew them up) are not saved over anything.
      if (all_finite(params)) {
        const auto dir = save();
        spdlog::info("saved {}: the state after step {}, the last finite one (no checkpoint removed)", dir,
                     last_update);
      } else {
        spdlog::error("the trainable weights are not finite: nothing saved");
      }
      return 3;
    }

    // ---- periodic work
    if (st.step % cfg.output.save_steps == 0 || st.step == tc.max_steps || signalled() || metrics_failed) {
      const auto dir = save();
      prune_checkpoints(cfg.output.dir, cfg.output.keep_last);
      last_saved = st.step;
      spdlog::info("saved {}", dir);
      if (s.eval_data) eval_saved("");
    }
    // Read again after the save and the eval: a signal or a failed metrics write during
    // them stops at the checkpoint just written, not one step and one save later.
    if ((signalled() || metrics_failed) && last_saved == st.step) {
      if (metrics_failed) throw Error(metrics_path + ": write failed: checkpoint saved at step " + std::to_string(st.step));
      spdlog::info("signal received: checkpoint saved at step {}, exiting", st.step);
      return 0;
    }
  }
  if (last_saved != st.step) save();
  // Every step skipped (fewer than train.max_bad_steps): the run trained nothing. fp16
  // overflows alone are the loss scale coming down, routine in a run's first steps.
  if (last_update == first_step && st.step > first_step && bad_this_run > 0) {
    spdlog::error("none of this run's {} steps was finite: nothing trained (its checkpoints hold the weights it "
                  "started from)",
                  st.step - first_step);
    return 3;
  }
  spdlog::info("training done: {} steps", st.step);
  return 0;
}

}  // namespace longlora::train
