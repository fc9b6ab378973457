#include "longlora/train/legacy_state.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "longlora/common/error.h"
#include "longlora/common/fs.h"
#include "longlora/common/interrupt.h"
#include "longlora/common/strings.h"
#include "longlora/io/tensors.h"

extern char** environ;

namespace fs = std::filesystem;

namespace longlora::train {

// The child: argv = exe, command, IN, OUT, then each group's parameter count. The
// archive matches moments to parameters by position, so stand-ins in groups of the
// same sizes take them; they go out by position. Whatever goes wrong is one line on
// stderr (which the parent reads) and exit 1; a crash is the parent's to report.
int legacy_state_reader_main(int argc, char** argv) {
  // Ends with the resume that started it: a second Ctrl-C exits the parent at once,
  // and an orphan would go on writing a copy of the moments into output.dir.
  const pid_t parent = ::getppid();
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) return 1;  // the parent was gone already
  try {
    if (argc < 4) throw std::runtime_error(std::string("usage: ") + kLegacyStateCommand + " IN OUT GROUP_SIZE...");
    std::vector<torch::Tensor> params;
    std::vector<torch::optim::OptimizerParamGroup> groups;
    for (int i = 4; i < argc; ++i) {
      std::vector<torch::Tensor> g;
      for (long n = std::stol(argv[i]); n > 0; --n) {
        g.push_back(torch::zeros({1}));
        params.push_back(g.back());
      }
      groups.emplace_back(g);
    }
    torch::optim::AdamW opt(groups);
    torch::serialize::InputArchive ar;
    ar.load_from(argv[2], torch::Device(torch::kCPU));
    opt.load(ar);
    std::vector<std::pair<std::string, torch::Tensor>> out;
    for (size_t i = 0; i < params.size(); ++i) {
      auto it = opt.state().find(params[i].unsafeGetTensorImpl());
      if (it == opt.state().end()) continue;
      const auto& ps = static_cast<const torch::optim::AdamWParamState&>(*it->second);
      if (!ps.exp_avg().defined() || !ps.exp_avg_sq().defined())
        throw std::runtime_error("parameter " + std::to_string(i) + " has a state without moments");
      const std::string p = std::to_string(i);
      out.emplace_back(p + ".exp_avg", ps.exp_avg());
      out.emplace_back(p + ".exp_avg_sq", ps.exp_avg_sq());
      out.emplace_back(p + ".step", torch::tensor({ps.step()}, torch::kInt64));
    }
    torch::Tensor rng;
    ar.read("rng_cpu", rng);
    out.emplace_back("rng.cpu", rng);
    if (ar.try_read("rng_cuda", rng)) out.emplace_back("rng.cuda", rng);
    io::save_tensors(argv[3], out);
    return 0;
  } catch (const c10::Error& e) {
    std::cerr << first_line(e.what_without_backtrace()) << "\n";
  } catch (const std::exception& e) {  // TorchScript's parser, std::out_of_range, our Error
    std::cerr << first_line(e.what()) << "\n";
  }
  return 1;
}

std::shared_ptr<io::SafetensorsFile> read_legacy_state(const std::string& state_pt,
                                                       const std::vector<size_t>& group_sizes,
                                                       const std::string& scratch_dir) {
  if (!fs::is_regular_file(state_pt)) throw Error(state_pt + ": missing: the checkpoint has no optimizer state");
  std::error_code ec;
  fs::create_directories(scratch_dir, ec);
  std::string dir = (fs::path(scratch_dir) / ".legacy-state-XXXXXX").string();
  if (::mkdtemp(dir.data()) == nullptr)
    throw Error(scratch_dir + ": cannot create a folder to read " + state_pt + " into: " + std::strerror(errno));
  struct Remove {
    std::string d;
    ~Remove() { remove_tree(d); }
  } remove{dir};
  const std::string out = dir + "/state.safetensors", err = dir + "/stderr";
  const fs::path exe = "/proc/self/exe";

  std::vector<std::string> args{exe.string(), kLegacyStateCommand, state_pt, out};
  for (size_t n : group_sizes) args.push_back(std::to_string(n));
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  pid_t pid = 0;
  // /proc/self/exe itself, not the path it names: a binary replaced since the start
  // has that path gone (" (deleted)") or another build there.
  const int rc = ::posix_spawn(&pid, exe.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) throw Error(state_pt + ": cannot start " + exe.string() + " to read it: " + std::strerror(rc));
  int status = 0;
  pid_t waited = 0;
  while ((waited = ::waitpid(pid, &status, 0)) < 0 && errno == EINTR) {
  }
  if (waited < 0)  // ECHILD where SIGCHLD is ignored: the child's end is unknown
    throw Error(state_pt + ": cannot learn how the process reading it ended: " + std::strerror(errno));
  // Ctrl-C (or a hangup, a kill) reaches the child too: this process's signal is
  // the reason, whatever the child did, and ends the run as any interruption does.
  check_interrupt("interrupted while reading " + state_pt);
  // The child's error is its last line (LibTorch may warn before it).
  std::string why;
  {
    std::ifstream in(err);
    for (std::string line; std::getline(in, line);)
      if (!line.empty()) why = line;
  }
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    if (sig == SIGKILL)
      throw Error(state_pt + ": the process reading it was killed (SIGKILL; out of memory?)");
    throw Error(state_pt + ": LibTorch's reader crashed on it (" + strsignal(sig) +
                "): the file is damaged (a format-1 checkpoint's state.pt is read in a process of its own)");
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    throw Error(state_pt + ": cannot restore the optimizer and RNG state: " +
                (why.empty() ? "the reader failed without a word" : why));
  // Mapped: removing the folder leaves the mapping readable.
  return std::make_shared<io::SafetensorsFile>(out);
}

}  // namespace longlora::train
