// Checkpoint format 1's optimizer state: state.pt, a LibTorch archive (TorchScript
// zip). LibTorch's reader trusts its file: a crafted one (pickles nested 10^6 deep,
// storage records shorter than their tensors) crashed the process. So it is read in a
// child process, this binary run as `longlora-train __read-legacy-state`, which writes
// what it read as safetensors; the caller validates that file as it does format 2's.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "longlora/io/safetensors.h"

namespace longlora::train {

// The hidden subcommand's name (argv[1]) and its entry point, called by main() first.
inline constexpr const char* kLegacyStateCommand = "__read-legacy-state";
int legacy_state_reader_main(int argc, char** argv);

// Reads `state_pt` in a child process. `group_sizes`: the parameters of each AdamW
// group, in order (the archive matches its moments to parameters by position). The
// result holds "P.exp_avg", "P.exp_avg_sq", "P.step" for the P-th parameter (counted
// across the groups) that has state, and "rng.cpu" ("rng.cuda" if saved). The child
// writes into a folder made under `scratch_dir` and removed before this returns. An
// Error names state_pt when the child fails, crashes or is killed.
std::shared_ptr<io::SafetensorsFile> read_legacy_state(const std::string& state_pt,
                                                       const std::vector<size_t>& group_sizes,
                                                       const std::string& scratch_dir);

}  // namespace longlora::train
