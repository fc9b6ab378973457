#include <spdlog/spdlog.h>

#include <iostream>
#include <nlohmann/json.hpp>

#include "longlora/cli/commands.h"
#include "longlora/common/error.h"
#include "longlora/train/config.h"
#include "longlora/train/trainer.h"

namespace longlora::cli {

int run_train(const TrainArgs& a) {
  auto cfg = train::load_run_config(a.config);
  train::ConfigOrigin origin{a.config, {}};
  for (const auto& s : a.overrides) origin.overridden.push_back(train::apply_override(cfg, s));
  train::validate_for_training(cfg, origin);
  train::ResumeRequest r;
  r.latest = a.resume;
  r.from = a.resume_from;
  if (a.dry_run) {
    // What a run would start from, checked as a run checks it (not the tensors).
    train::refuse_if_in_use(cfg.output.dir);
    if (auto from = train::plan_start(cfg, r)) spdlog::info("would resume from {}", *from);
    std::cout << train::to_json(cfg).dump(2) << std::endl;
    return 0;
  }
  return train::train(cfg, r);
}

}  // namespace longlora::cli
