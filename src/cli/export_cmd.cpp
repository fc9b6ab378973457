#include <iostream>

#include "longlora/cli/commands.h"
#include "longlora/common/interrupt.h"
#include "longlora/io/export.h"

namespace longlora::cli {

int run_export(const ExportArgs& a) {
  io::ExportOptions o;
  o.checkpoint = a.checkpoint;
  o.output = a.output;
  o.format = a.format;
  o.dtype = a.dtype;
  o.max_shard_size = io::parse_size(a.max_shard_size, "--max-shard-size");
  o.base = a.base;
  if (a.rope_factor > 0) o.rope_factor = a.rope_factor;
  o.overwrite = a.overwrite;
  // Stops at the next chunk, and the temporary folder (as large as the model) goes.
  install_interrupt_handlers();
  try {
    io::export_checkpoint(o);
  } catch (const Interrupted& e) {
    throw Interrupted(e.signal(), "interrupted: nothing written to " + a.output);
  }
  std::cout << "exported " << a.format << " to " << a.output << std::endl;
  return 0;
}

}  // namespace longlora::cli
