// Torch side of the fused decoder-layer kernels (compiled only in CUDA builds):
// layout checks (a copy where a tensor does not fit the kernels' 16-byte accesses),
// outputs, the current stream and device guard.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "longlora/model/fused.h"
#include "longlora/model/fused_params.h"

namespace longlora::model::fused {
namespace {

std::atomic<int>& switch_state() {  // -1: read the environment on first use
  static std::atomic<int> s{-1};
  return s;
}

bool globally_on() {
  int s = switch_state().load();
  if (s < 0) {
    const char* e = std::getenv("LONGLORA_FUSED_OPS");
    s = (e && std::string(e) == "0") ? 0 : 1;
    switch_state().store(s);
  }
  return s == 1;
}

Dtype dtype_of(const torch::Tensor& t) { return t.scalar_type() == torch::kBFloat16 ? Dtype::BF16 : Dtype::FP16; }

bool aligned(const torch::Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0; }

// Contiguous and 16-byte aligned (a narrow()ed view may start mid-chunk).
torch::Tensor dense(const torch::Tensor& t) {
  auto c = t.contiguous();
  return aligned(c) ? c : c.clone();
}

// Strides of (B, H, L, D) fit 8-element accesses: D contiguous, the rest multiples of 8.
bool rope_layout(const torch::Tensor& t) {
  if (t.stride(3) != 1 || !aligned(t)) return false;
  for (int d = 0; d < 3; ++d)
    if (t.size(d) != 1 && t.stride(d) % 8 != 0) return false;
  return true;
}

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

}  // namespace

void set_enabled(bool on) { switch_state().store(on ? 1 : 0); }

bool enabled(const torch::Tensor& x) {
  return globally_on() && x.defined() && x.is_cuda() &&
         (x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kHalf);
}

bool rms_norm_fits(const torch::Tensor& x) {
  return enabled(x) && x.dim() >= 1 && x.size(-1) % 8 == 0 && x.size(-1) <= kRmsNormMaxCols;
}

bool rope_fits(const torch::Tensor& x) { return enabled(x) && x.dim() == 4 && x.size(3) % 16 == 0; }

bool swiglu_fits(const torch::Tensor& a) { return enabled(a) && a.numel() % 8 == 0; }

std::pair<torch::Tensor, torch::Tensor> rms_norm_forward(const torch::Tensor& x, const torch::Tensor& w,
                                                         double eps) {
  TORCH_CHECK(rms_norm_fits(x), "fused rms_norm: unsupported input ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(w.numel() == x.size(-1), "fused rms_norm: weight ", w.sizes(), " for rows of ", x.size(-1));
  c10::cuda::CUDAGuard guard(x.device());
  auto xc = dense(x);
  auto wc = dense(w.to(x.scalar_type()));
  RmsNormFwdParams p;
  p.cols = static_cast<int>(x.size(-1));
  p.rows = x.numel() / p.cols;
  auto y = torch::empty_like(xc);
  auto rstd = torch::empty({p.rows}, x.options().dtype(torch::kFloat32));
  p.x = xc.data_ptr();
  p.w = wc.data_ptr();
  p.y = y.data_ptr();
  p.rstd = rstd.data_ptr<float>();
  p.eps = static_cast<float>(eps);
  p.dtype = dtype_of(x);
  rms_norm_fwd(p, stream());
  return {y, rstd};
}

std::pair<torch::Tensor, torch::Tensor> rms_norm_backward(const torch::Tensor& g, const torch::Tensor& x,
                                                          const torch::Tensor& w, const torch::Tensor& rstd,
                                                          bool need_gw) {
  TORCH_CHECK(rms_norm_fits(x) && g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(),
              "fused rms_norm backward: grad ", g.sizes(), " for input ", x.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  auto gc = dense(g), xc = dense(x), wc = dense(w.to(x.scalar_type()));
  auto rc = rstd.to(torch::kFloat32).contiguous();
  RmsNormBwdParams p;
  p.cols = static_cast<int>(x.size(-1));
  p.rows = x.numel() / p.cols;
  TORCH_CHECK(rc.numel() == p.rows, "fused rms_norm backward: rstd has ", rc.numel(), " rows, not ", p.rows);
  auto gx = torch::empty_like(xc);
  torch::Tensor gw;
  if (need_gw) gw = torch::zeros({p.cols}, x.options().dtype(torch::kFloat32));
  p.g = gc.data_ptr();
  p.x = xc.data_ptr();
  p.w = wc.data_ptr();
  p.rstd = rc.data_ptr<float>();
  p.gx = gx.data_ptr();
  p.gw = need_gw ? gw.data_ptr<float>() : nullptr;
  p.dtype = dtype_of(x);
  rms_norm_bwd(p, at::cuda::getCurrentDeviceProperties()->multiProcessorCount, stream());
  return {gx, gw};
}

torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, bool backward) {
  TORCH_CHECK(rope_fits(x), "fused rope: unsupported input ", x.sizes(), " ", x.scalar_type());
  const int64_t L = x.size(2), D = x.size(3);
  TORCH_CHECK(cos.numel() == L * D && sin.numel() == L * D, "fused rope: tables ", cos.sizes(), " and ",
              sin.sizes(), " for L=", L, ", D=", D);
  c10::cuda::CUDAGuard guard(x.device());
  auto xin = rope_layout(x) ? x : dense(x);
  auto out = torch::empty_like(xin);  // same strides as a dense input
  if (!rope_layout(out)) out = torch::empty(xin.sizes(), xin.options());
  auto c = dense(cos.to(x.scalar_type())), s = dense(sin.to(x.scalar_type()));
  RopeParams p;
  p.x = xin.data_ptr();
  p.cos = c.data_ptr();
  p.sin = s.data_ptr();
  p.out = out.data_ptr();
  p.B = static_cast<int>(x.size(0));
  p.H = static_cast<int>(x.size(1));
  p.L = static_cast<int>(L);
  p.D = static_cast<int>(D);
  for (int d = 0; d < 3; ++d) {
    p.x_stride[d] = xin.stride(d);
    p.out_stride[d] = out.stride(d);
  }
  p.backward = backward;
  p.dtype = dtype_of(x);
  fused::rope(p, stream());
  return out;
}

torch::Tensor swiglu_forward(const torch::Tensor& a, const torch::Tensor& b) {
  TORCH_CHECK(swiglu_fits(a) && a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(),
              "fused swiglu: inputs ", a.sizes(), " and ", b.sizes());
  c10::cuda::CUDAGuard guard(a.device());
  auto ac = dense(a), bc = dense(b);
  auto y = torch::empty_like(ac);
  SwiGluParams p;
  p.a = ac.data_ptr();
  p.b = bc.data_ptr();
  p.y = y.data_ptr();
  p.n = a.numel();
  p.dtype = dtype_of(a);
  swiglu_fwd(p, stream());
  return y;
}

std::pair<torch::Tensor, torch::Tensor> swiglu_backward(const torch::Tensor& g, const torch::Tensor& a,
                                                        const torch::Tensor& b) {
  TORCH_CHECK(swiglu_fits(a) && a.sizes() == b.sizes() && g.sizes() == a.sizes() &&
                  g.scalar_type() == a.scalar_type(),
              "fused swiglu backward: grad ", g.sizes(), " for inputs ", a.sizes());
  c10::cuda::CUDAGuard guard(a.device());
  auto gc = dense(g), ac = dense(a), bc = dense(b);
  auto da = torch::empty_like(ac), db = torch::empty_like(bc);
  SwiGluParams p;
  p.a = ac.data_ptr();
  p.b = bc.data_ptr();
  p.g = gc.data_ptr();
  p.da = da.data_ptr();
  p.db = db.data_ptr();
  p.n = a.numel();
  p.dtype = dtype_of(a);
  swiglu_bwd(p, stream());
  return {da, db};
}

}  // namespace longlora::model::fused
