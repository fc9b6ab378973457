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
  std::string protocol = "plain";  // plain | longlora (LongLoRA's eval.py)
  int64_t batch_size = 32;         // --protocol longlora: windows per averaged batch
  double rope_factor = 0;  // 0 = config.json's
  bool json = false;
  std::string device = "auto", dtype = "auto";
  // --task passkey
  std::vector<int64_t> lengths;  // target prompt lengths in tokens
  int64_t trials = 10;
  uint64_t seed = 0;
  // The flags given on the command line ("--data", ...): the other task's are refused.
  std::vector<std::string> given;
};

struct GenerateArgs {
  std::string model, adapter, prompt, prompt_file;
  int64_t max_new_tokens = 512;     // defaults: LongLoRA's inference.py
  double temperature = 0.6;         // 0 = greedy
  double top_p = 0.9;
  int64_t top_k = 50;               // transformers' generate default; 0 = off
  uint64_t seed = 0;
  double rope_factor = 0;           // 0 = config.json's
  bool no_cache = false;
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
int run_generate(const GenerateArgs& a);

}  // namespace longlora::cli
