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
  for (const auto& s : a.overrides) train::apply_override(cfg, s);
  train::validate_for_training(cfg, a.config);
  if (a.dry_run) {
    std::cout << train::to_json(cfg).dump(2) << std::endl;
    return 0;
  }
  train::ResumeRequest r;
  r.latest = a.resume;
  r.from = a.resume_from;
  return train::train(cfg, r);
}

}  // namespace longlora::cli
