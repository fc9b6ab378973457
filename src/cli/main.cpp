// longlora-train: LongLoRA context extension for LLaMA checkpoints.
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iostream>
#include <limits>
#include <sstream>

#include "longlora/attention/bench.h"
#include "longlora/train/bench.h"
#include "longlora/data/synthetic.h"
#include "longlora/train/config.h"
#include "longlora/train/legacy_state.h"
#include "longlora/cli/commands.h"
#include "longlora/common/error.h"
#include "longlora/common/interrupt.h"
#include "longlora/eval/passkey.h"
#include "longlora/io/export.h"
#include "longlora/io/hf_config.h"

using namespace longlora;

namespace {

// A command line that does not parse as our commands do (a flag where it does not
// belong, an empty value): exit 2, as CLI11's own refusals.
struct UsageError : Error {
  using Error::Error;
};

// UsageError(message(NAME)) for the first of `a`'s options given on the command line
// but those `allowed`: a flag that the command taken does not read.
void refuse_given(const CLI::App& a, const std::vector<std::string>& allowed,
                  const std::function<std::string(const std::string&)>& message) {
  for (const auto* opt : a.get_options())
    if (opt->count() > 0 && std::find(allowed.begin(), allowed.end(), opt->get_name()) == allowed.end())
      throw UsageError(message(opt->get_name()));
}

// An integer flag in [lo, hi], checked on the text: CLI::PositiveNumber printed
// "Value 0 not in range 0.000000 to 1797693...(309 digits)" for 0, -1 and "abc" alike,
// and an unsigned option took "-1" as 2^64 - 1.
CLI::Validator integer_in(int64_t lo, int64_t hi = std::numeric_limits<int64_t>::max()) {
  const std::string range = hi == std::numeric_limits<int64_t>::max() ? ">= " + std::to_string(lo)
                                                                       : "in [" + std::to_string(lo) + ", " +
                                                                             std::to_string(hi) + "]";
  return CLI::Validator(
      [lo, hi, range](std::string& s) -> std::string {
        int64_t v = 0;
        const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
        if (ec == std::errc::result_out_of_range || (ec == std::errc() && end == s.data() + s.size() && (v < lo || v > hi)))
          return "expected an integer " + range + ", got " + s +
                 (ec == std::errc::result_out_of_range ? " (past 64 bits)" : "");
        if (ec != std::errc() || end != s.data() + s.size()) return "expected an integer, got '" + s + "'";
        return {};
      },
      "INT " + range);
}

// A flag that takes one of `values`; the message as integer_in's (CLI::IsMember's
// "x not in {a,b}" reads as a different kind of error).
CLI::Validator one_of(const std::vector<std::string>& values) {
  std::string list;
  for (const auto& v : values) list += (list.empty() ? "" : ", ") + v;
  return CLI::Validator(
      [values, list](std::string& s) -> std::string {
        if (std::find(values.begin(), values.end(), s) != values.end()) return {};
        return "expected one of " + list + ", got '" + s + "'";
      },
      "one of " + list);
}

// A number flag in [lo, hi] ((lo, hi] when `lo_open`; no upper end when hi is
// infinite): CLI::Range let "nan" through (every comparison with it is false), and
// --rope-factor nan fell back to the model's factor silently.
CLI::Validator number_in(double lo, double hi, bool lo_open = false) {
  std::ostringstream r;
  if (std::isinf(hi)) r << (lo_open ? "> " : ">= ") << lo;
  else r << "in " << (lo_open ? "(" : "[") << lo << ", " << hi << "]";
  const std::string range = r.str();
  return CLI::Validator(
      [lo, hi, lo_open, range](std::string& s) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(s.c_str(), &end);
        if (s.empty() || end != s.c_str() + s.size() || !std::isfinite(v) || v < lo || v > hi || (lo_open && v == lo))
          return "expected a number " + range + ", got '" + s + "'";
        return {};
      },
      "NUMBER " + range);
}

// The options every command that loads a model for inference takes.
void add_model_options(CLI::App* cmd, std::string& model, std::string& adapter, double& rope_factor,
                       std::string& device, std::string& dtype, const std::string& model_help) {
  cmd->add_option("--model", model, model_help);
  cmd->add_option("--adapter", adapter, "peft adapter directory (or training checkpoint)");
  cmd->add_option("--rope-factor", rope_factor,
                  "linear position interpolation factor (overrides config.json and a checkpoint's)")
      ->check(number_in(1.0, io::kMaxRopeFactor));
  cmd->add_option("--device", device, "auto | cpu | cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd->add_option("--dtype", dtype, "compute dtype: auto | fp32 | bf16 | fp16")
      ->check(CLI::IsMember({"auto", "fp32", "bf16", "fp16"}));
}

// The command itself; main() adds the check that stdout was written.
int run(int argc, char** argv) {
  // Long contexts allocate tensors of many sizes; growable segments keep the caching
  // allocator from reserving far more than it holds. The user's own setting wins.
  if (!std::getenv("PYTORCH_CUDA_ALLOC_CONF") && !std::getenv("PYTORCH_ALLOC_CONF"))
    setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True", 0);
  // Every command: `eval ... | head` killed eval and generate with SIGPIPE (exit 141,
  // no word); with it ignored, a write to a closed pipe fails and is reported at exit.
  ignore_sigpipe();
  // Logs go to stderr so stdout carries only results (--json).
  spdlog::set_default_logger(spdlog::stderr_color_mt("longlora"));
  spdlog::set_pattern("[%H:%M:%S] %v");

  CLI::App app{"longlora-train: extend the context of LLaMA models with LongLoRA "
               "(LoRA + trainable embed/norm, position interpolation, S2-Attn)"};
  app.set_version_flag("--version", std::string("longlora-train ") + LONGLORA_VERSION);
  app.require_subcommand(0, 1);
  // One line, like every other error (CLI11 adds "Run with --help ..." as a second).
  // Set before the subcommands are added: they copy it.
  app.failure_message([](const CLI::App*, const CLI::Error& e) { return std::string("error: ") + e.what() + "\n"; });

  cli::TrainArgs train;
  app.add_option("--config", train.config, "run configuration (JSON), see README")
      ->check(CLI::ExistingFile);
  auto* resume = app.add_flag("--resume", train.resume,
                              "continue from the newest complete checkpoint in output.dir");
  app.add_option("--resume-from", train.resume_from, "continue from this checkpoint directory")
      ->excludes(resume);
  app.add_option("--set", train.overrides, "override a config key: key.path=value (repeatable)");
  app.add_flag("--dry-run", train.dry_run, "load, validate and print the resolved config; do not train");
  bool config_reference = false;
  app.add_flag("--config-reference", config_reference, "print every config key (markdown table) and exit");

  cli::EvalArgs ev;
  // --model, --data, --seq-len, --lengths are checked in run_eval (one-line errors, per task).
  auto* eval = app.add_subcommand(
      "eval", "perplexity of a model (full attention) on a data file, or passkey retrieval (--task passkey)");
  eval->add_option("--task", ev.task, "perplexity (default) | passkey (LongLoRA's passkey retrieval test)")
      ->check(one_of({"perplexity", "passkey"}));
  add_model_options(eval, ev.model, ev.adapter, ev.rope_factor, ev.device, ev.dtype,
                    "Hugging Face model directory (required)");
  eval->add_option("--data", ev.data, "perplexity: data: .bin (uint16 ids), .txt or .jsonl (text field)");
  eval->add_option("--seq-len", ev.seq_lens, "perplexity: window length(s) in tokens; several give one row each")
      ->delimiter(',')->check(integer_in(1));
  eval->add_option("--lengths", ev.lengths, "passkey: target prompt length(s) in tokens, e.g. 1024,2048,4096")
      ->delimiter(',')->check(integer_in(1, eval::kPasskeyMaxLength));
  eval->add_option("--trials", ev.trials, "passkey: trials (random key and depth) per length (default 10)")
      ->check(integer_in(1));
  eval->add_option("--seed", ev.seed, "passkey: seed of the keys and depths (default 0)")->check(integer_in(0));
  eval->add_option("--stride", ev.stride, "perplexity: window stride (default: seq-len; 256 with --protocol longlora)")
      ->check(integer_in(1));
  eval->add_option("--protocol", ev.protocol,
                   "perplexity: plain (default: every window's L predictions, one mean) | longlora (LongLoRA's "
                   "eval.py: L - 1 predictions a window, the last start dropped, batch means averaged, 2.71828^loss)")
      ->check(one_of({"plain", "longlora"}));
  eval->add_option("--batch-size", ev.batch_size, "perplexity, --protocol longlora: windows per batch (default 32)")
      ->check(integer_in(1));
  eval->add_flag("--json", ev.json, "print one JSON object per seq-len (passkey: one for all lengths)");

  cli::GenerateArgs gen;
  auto* gen_cmd = app.add_subcommand(
      "generate", "generate text after a prompt (BOS prepended; full attention, KV cache; streams to stdout)");
  add_model_options(gen_cmd, gen.model, gen.adapter, gen.rope_factor, gen.device, gen.dtype,
                    "Hugging Face model directory with tokenizer.model (required)");
  gen_cmd->add_option("--prompt", gen.prompt, "prompt text (or --prompt-file)");
  gen_cmd->add_option("--prompt-file", gen.prompt_file, "file whose whole content is the prompt (at most 16 MiB)");
  gen_cmd->add_option("--max-new-tokens", gen.max_new_tokens, "stop after this many new tokens (default 512) or at EOS")
      ->check(integer_in(1));
  gen_cmd->add_option("--temperature", gen.temperature, "sampling temperature (default 0.6); 0 = greedy")
      ->check(number_in(0, std::numeric_limits<double>::infinity()));
  gen_cmd->add_option("--top-p", gen.top_p, "nucleus sampling: keep the most probable tokens up to this mass (default 0.9)")
      ->check(number_in(0, 1, /*lo_open=*/true));
  gen_cmd->add_option("--top-k", gen.top_k,
                      "sample among the k most probable tokens, before --top-p (default 50, as transformers' "
                      "generate; 0 = off)")
      ->check(integer_in(0));
  gen_cmd->add_option("--seed", gen.seed, "sampling seed (default 0)")->check(integer_in(0));
  gen_cmd->add_flag("--no-cache", gen.no_cache, "recompute the whole sequence for every token (no KV cache)");

  cli::ExportArgs ex;
  auto* exp = app.add_subcommand(
      "export", "write a checkpoint as a Hugging Face model with the LoRA merged in, or as a peft adapter");
  exp->add_option("--checkpoint", ex.checkpoint, "training checkpoint (checkpoint-STEP) or peft adapter directory")
      ->required();
  exp->add_option("--output", ex.output, "directory to write (refused if it exists, unless --overwrite)")->required();
  exp->add_option("--format", ex.format, "merged (HF model, LoRA merged into the weights) | peft (adapter)")
      ->check(CLI::IsMember({"merged", "peft"}));
  exp->add_option("--dtype", ex.dtype, "output dtype: bf16 | fp16 | fp32 (default: merged: the base's torch_dtype, "
                                       "peft: as stored)")
      ->check(CLI::IsMember({"bf16", "fp16", "fp32"}));
  exp->add_option("--max-shard-size", ex.max_shard_size,
                  "largest safetensors shard, e.g. 5GB, 500MB, 100KB (powers of 1000) or 2GiB (1024)")
      ->check(CLI::Validator(
          [](std::string& s) -> std::string {
            try {
              (void)io::parse_size(s, "");
              return {};
            } catch (const Error& e) {
              return e.what();
            }
          },
          "SIZE"));
  exp->add_option("--base", ex.base, "base model directory (default: model.path of the checkpoint's run_config.json)");
  exp->add_option("--rope-factor", ex.rope_factor,
                  "linear RoPE factor written to config.json (default: the training run's; peft dir: the base's)")
      ->check(number_in(1.0, io::kMaxRopeFactor));
  exp->add_flag("--overwrite", ex.overwrite, "replace an existing output directory");

  attention::AttentionBenchOptions ab;
  data::PasskeyCorpusOptions pc;
  auto* mk = app.add_subcommand(
      "make-data", "write a synthetic corpus of passkey documents (.jsonl, \"text\" field) with long-range structure");
  mk->add_option("--tokenizer", pc.tokenizer, "tokenizer.model (document lengths are counted in its tokens)")
      ->required()->check(CLI::ExistingFile);
  mk->add_option("--out", pc.out, "output .jsonl (refused if it exists, unless --overwrite)")->required();
  mk->add_flag("--overwrite", pc.overwrite, "replace an existing --out (only once the new corpus is complete)");
  mk->add_option("--docs", pc.docs, "number of documents")->check(integer_in(1));
  mk->add_option("--min-tokens", pc.min_tokens, "shortest document (tokens)")
      ->check(integer_in(16, data::kMaxDocumentTokens));
  mk->add_option("--max-tokens", pc.max_tokens, "longest document (tokens)")
      ->check(integer_in(16, data::kMaxDocumentTokens));
  mk->add_option("--min-keys", pc.min_keys, "fewest keys in a document (each with its info line and questions)")
      ->check(integer_in(1));
  mk->add_option("--max-keys", pc.max_keys, "most keys in a document (1: LongLoRA's prompt with its answer)")
      ->check(integer_in(1));
  mk->add_option("--max-asks", pc.max_asks, "each key is asked for 1..N times")->check(integer_in(1));
  mk->add_option("--row-tokens", pc.row_tokens,
                 "make every document exactly N-2 tokens, so rows of seq_len N are whole documents "
                 "(BOS, text, EOS; the last document has no EOS after it, so D documents make D-1 rows; "
                 "--min/--max-tokens unused; 0 = off, else at least 64)")
      ->check(integer_in(0, data::kMaxDocumentTokens));
  mk->add_option("--copy-frac", pc.copy_frac,
                 "fraction of documents that are copy drills (a random string repeated line after line)")
      ->check(number_in(0.0, 1.0));
  mk->add_option("--seed", pc.seed, "random seed")->check(integer_in(0));
  train::TrainBenchOptions tb;
  auto* bench = app.add_subcommand(
      "bench", "training steps of a random-weight model of a given shape (default recipe, batch 1 unless --set train.micro_batch_size=N); "
               "`bench attention` for the S2-Attn kernel (see docs/benchmarks.md)");
  auto* bench_attn = bench->add_subcommand("attention", "S2-Attn kernel vs sdpa, forward and forward+backward");
  bench->require_subcommand(0, 1);
  bench->add_option("--shape", tb.shape, "model config.json, e.g. configs/shapes/llama2-7b.json")
      ->check(CLI::ExistingFile);
  bench->add_option("--seq-len", tb.seq_len, "context length")->check(integer_in(1));
  bench->add_option("--steps", tb.steps, "timed steps")->check(integer_in(1, std::numeric_limits<int>::max()));
  bench->add_option("--warmup", tb.warmup, "untimed steps first")->check(integer_in(0, std::numeric_limits<int>::max()));
  bench->add_option("--device", tb.device, "auto | cpu | cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  bench->add_option("--set", tb.overrides, "override a run-config key: key.path=value (repeatable)");
  bench->add_flag("--json", tb.json, "one JSON object");
  bench->add_option("--profile", tb.profile,
                    "profile one more step; print the N largest kernels and ops (to stderr with --json)")
      ->check(integer_in(0, std::numeric_limits<int>::max()));
  bench_attn->add_option("--seq-len", ab.seq_len)->check(integer_in(1));
  bench_attn->add_option("--heads", ab.heads)->check(integer_in(1));
  bench_attn->add_option("--kv-heads", ab.kv_heads)->check(integer_in(1));
  bench_attn->add_option("--head-dim", ab.head_dim)->check(integer_in(1));
  bench_attn->add_option("--batch", ab.batch)->check(integer_in(1));
  bench_attn->add_option("--dtype", ab.dtype)->check(CLI::IsMember({"bf16", "fp16"}));
  bench_attn->add_option("--mode", ab.mode)->check(CLI::IsMember({"segments", "roll", "full"}));
  bench_attn->add_option("--group-ratio", ab.group_ratio)->check(number_in(0.0, 1.0));
  bench_attn->add_option("--warmup", ab.warmup)->check(integer_in(0, std::numeric_limits<int>::max()));
  bench_attn->add_option("--iters", ab.iters)->check(integer_in(1, std::numeric_limits<int>::max()));
  bench_attn->add_flag("--json", ab.json);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // CLI11's own codes (105 for a failed check, 109 for an unknown flag) mean nothing
    // to a script; a command-line error exits 2, as a missing --config does.
    return app.exit(e) == 0 ? 0 : 2;
  }

  try {
    // The training flags belong to the command without a subcommand: given before one
    // ("--config c.json eval ..."), they were parsed and then ignored.
    if (const CLI::App* sub = app.get_subcommands().empty() ? nullptr : app.get_subcommands().front())
      refuse_given(app, {"--help", "--version"}, [&](const std::string& flag) {
        return flag + ": a training flag, which does not go with the " + sub->get_name() + " subcommand";
      });
    // Likewise bench's own flags before `attention`: that benchmark has its own.
    if (*bench_attn)
      refuse_given(*bench, {"--help"}, [](const std::string& flag) {
        return "bench " + flag + ": not a flag of `bench attention` (its flags follow it)";
      });
    // An empty value read as "not given": --resume-from "" started a fresh run and
    // --adapter "" ran without the adapter. No flag takes an empty value.
    std::function<void(const CLI::App*)> no_empty = [&](const CLI::App* a) {
      for (const auto* opt : a->get_options())
        for (const auto& r : opt->results())
          if (r.empty() && opt->get_type_size() != 0)
            throw UsageError((a == &app ? "" : a->get_name() + " ") + opt->get_name() + ": empty value");
      for (const auto* sub : a->get_subcommands()) no_empty(sub);
    };
    no_empty(&app);
    if (*eval) {
      // Which flags were given, so that run_eval can refuse the other task's.
      for (const auto* opt : eval->get_options())
        if (opt->count() > 0) ev.given.push_back(opt->get_name());
      return cli::run_eval(ev);
    }
    if (*gen_cmd) return cli::run_generate(gen);
    if (*exp) {
      // peft writes an adapter as one adapter_model.safetensors; a limit would be ignored.
      if (ex.format == "peft" && exp->get_option("--max-shard-size")->count() > 0)
        throw Error("export --max-shard-size: a peft adapter is written as one file (as peft writes it); "
                    "the limit is for --format merged");
      return cli::run_export(ex);
    }
    if (*bench_attn) return attention::run_attention_bench(ab);
    if (*mk) {
      install_interrupt_handlers();  // so that the temporary .jsonl is removed
      std::cout << data::write_passkey_corpus(pc) << " documents written to " << pc.out << std::endl;
      return 0;
    }
    if (*bench) {
      if (tb.shape.empty()) throw Error("bench: --shape FILE is required (or `bench attention`)");
      return train::run_train_bench(tb);
    }
    if (config_reference) {
      // It prints and exits: a --config beside it (or any training flag) was ignored.
      refuse_given(app, {"--config-reference"}, [](const std::string& flag) {
        return flag + ": not a flag of --config-reference, which prints the keys and exits";
      });
      std::cout << train::config_reference();
      return 0;
    }
    if (train.config.empty()) {
      std::cerr << "error: --config FILE is required (or a subcommand; see --help)\n";
      return 2;
    }
    return cli::run_train(train);
  } catch (const Interrupted& e) {
    std::cerr << e.what() << "\n";
    return e.exit_code();
  } catch (const UsageError& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  } catch (const c10::Error& e) {
    std::string m = e.what_without_backtrace();
    // Tensors past the free memory: a CUDA OutOfMemoryError, or the CPU allocator's
    // "[enforce fail at alloc_cpu.cpp:...] ... can't allocate memory: you tried ...".
    if (dynamic_cast<const c10::OutOfMemoryError*>(&e) || m.find("can't allocate memory") != std::string::npos) {
      if (const auto p = m.find("can't allocate memory: "); p != std::string::npos) m = m.substr(p + 23);
      m = "out of memory: " + m + " (lower the sequence length or the batch, or use a larger machine)";
    }
    // One line, whatever c10 put in the message.
    for (auto& c : m)
      if (c == '\n') c = ' ';
    std::cerr << "error: " << m << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}

}  // namespace

int main(int argc, char** argv) {
  // A child of a resume, reading a format-1 checkpoint's state.pt (legacy_state.h).
  if (argc >= 2 && std::strcmp(argv[1], longlora::train::kLegacyStateCommand) == 0)
    return longlora::train::legacy_state_reader_main(argc, argv);
  const int rc = run(argc, argv);
  // Results that never reached stdout (a full disk, a closed pipe) must not end in
  // exit 0: the caller would take the missing output for an empty result.
  errno = 0;
  std::cout.flush();
  const bool flushed = std::fflush(stdout) == 0;
  const int err = errno;
  if (rc == 0 && (!flushed || std::cout.fail() || std::ferror(stdout))) {
    std::cerr << "error: stdout: the output could not be written" << (err ? std::string(": ") + std::strerror(err) : "")
              << "\n";
    return 1;
  }
  return rc;
}
