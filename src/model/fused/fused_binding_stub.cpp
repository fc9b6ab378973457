// The fused decoder-layer kernels in a build without CUDA kernels: never enabled,
// so the model always takes the LibTorch path.
#include "longlora/model/fused.h"

namespace longlora::model::fused {

bool enabled(const torch::Tensor&) { return false; }
void set_enabled(bool) {}
bool rms_norm_fits(const torch::Tensor&) { return false; }
bool rope_fits(const torch::Tensor&) { return false; }
bool swiglu_fits(const torch::Tensor&) { return false; }

namespace {
[[noreturn]] void unavailable() { TORCH_CHECK(false, "fused kernels need a CUDA build"); }
}  // namespace

std::pair<torch::Tensor, torch::Tensor> rms_norm_forward(const torch::Tensor&, const torch::Tensor&, double) {
  unavailable();
}
std::pair<torch::Tensor, torch::Tensor> rms_norm_backward(const torch::Tensor&, const torch::Tensor&,
                                                          const torch::Tensor&, const torch::Tensor&, bool) {
  unavailable();
}
torch::Tensor rope(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, bool) { unavailable(); }
torch::Tensor swiglu_forward(const torch::Tensor&, const torch::Tensor&) { unavailable(); }
std::pair<torch::Tensor, torch::Tensor> swiglu_backward(const torch::Tensor&, const torch::Tensor&,
                                                        const torch::Tensor&) {
  unavailable();
}

}  // namespace longlora::model::fused
