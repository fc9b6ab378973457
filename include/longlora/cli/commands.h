// The subcommands behind main(): each takes parsed arguments and returns the exit code.
#pragma once

#include <string>
#include <vector>

namespace longlora::cli {

struct TrainArgs {
  std::string config;
  bool resume = false;
  std::string resume_from;
  std::vector<std::string> overrides;
  bool dry_run = false;
};

struct EvalArgs {
  std::string model, adapter, data, task = "perplexity";
  std::vector<int64_t> seq_lens;
  int64_t stride = 0;
  double rope_factor = 0;  // 0 = config.json's
  bool json = false;
  std::string device = "auto", dtype = "auto";
};

struct ExportArgs {
  std::string checkpoint, output, base;
  std::string format = "merged";       // merged | peft
  std::string dtype;                   // "" = merged: the base's torch_dtype, peft: as stored
  std::string max_shard_size = "5GB";
  double rope_factor = 0;              // 0 = trainer_state.json's, else the base config's
  bool overwrite = false;
};

int run_train(const TrainArgs& a);
int run_eval(const EvalArgs& a);
int run_export(const ExportArgs& a);

}  // namespace longlora::cli
