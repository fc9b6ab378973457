// The S2-Attention kernel entry points of a build without CUDA kernels.
#include "longlora/attention/attention.h"
#include "longlora/common/error.h"

namespace longlora::attention {

bool kernel_compiled() { return false; }

torch::Tensor attention_kernel(const torch::Tensor& /*q*/, const torch::Tensor& /*k*/,
                               const torch::Tensor& /*v*/, Mode /*mode*/, int64_t /*group*/) {
  throw Error("attention.backend=kernel needs a CUDA build and a CUDA device");
}

}  // namespace longlora::attention
