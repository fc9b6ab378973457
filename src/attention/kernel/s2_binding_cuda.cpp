// Torch side of the S2-Attention CUDA kernel (compiled only in CUDA builds): input
// checks, output allocation, current stream and device guard, the parameter structs,
// and the autograd Function (forward saves q, k, v, o, lse; backward runs s2_bwd).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "longlora/attention/attention.h"
#include "longlora/attention/kernel/s2_params.h"
#include "longlora/common/error.h"

namespace longlora::attention {
namespace {

namespace k = longlora::attention::kernel;

k::S2Mode to_kernel_mode(Mode m) {
  switch (m) {
    case Mode::Full: return k::S2Mode::Full;
    case Mode::Segments: return k::S2Mode::Segments;
    case Mode::Roll: return k::S2Mode::Roll;
  }
  TORCH_CHECK(false, "attention_kernel: unknown mode");
}

k::S2Strides strides_of(const torch::Tensor& t) {  // (B, H, L, D)
  return {t.stride(0), t.stride(1), t.stride(2)};
}

// The kernels move rows in 16-byte chunks: the last dim contiguous, the other strides
// multiples of 8 elements (size-1 dims never stepped over), the base 16-byte aligned.
// Anything else (odd views, a broadcast gradient) is copied once.
torch::Tensor kernel_layout(const torch::Tensor& t) {
  bool ok = t.stride(3) == 1 && reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3 && ok; ++d) ok = t.size(d) == 1 || t.stride(d) % 8 == 0;
  return ok ? t : t.contiguous();
}

void check_inputs(const torch::Tensor& q, const torch::Tensor& kt, const torch::Tensor& v) {
  TORCH_CHECK(q.defined() && kt.defined() && v.defined(),
              "attention_kernel: q, k, v must be defined");
  TORCH_CHECK(q.is_cuda() && kt.is_cuda() && v.is_cuda(),
              "attention_kernel: q, k, v must be CUDA tensors (got ", q.device(), ", ",
              kt.device(), ", ", v.device(), ")");
  TORCH_CHECK(q.device() == kt.device() && q.device() == v.device(),
              "attention_kernel: q, k, v must be on one device (got ", q.device(), ", ",
              kt.device(), ", ", v.device(), ")");
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kHalf,
              "attention_kernel: dtype must be bfloat16 or float16 (got ", q.scalar_type(),
              ")");
  TORCH_CHECK(kt.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "attention_kernel: q, k, v must share a dtype (got ", q.scalar_type(), ", ",
              kt.scalar_type(), ", ", v.scalar_type(), ")");
  TORCH_CHECK(q.dim() == 4 && kt.dim() == 4 && v.dim() == 4,
              "attention_kernel: q, k, v must be 4-D (B, H, L, D) (got ", q.sizes(), ", ",
              kt.sizes(), ", ", v.sizes(), ")");
  TORCH_CHECK(kt.sizes() == v.sizes(), "attention_kernel: k ", kt.sizes(), " and v ",
              v.sizes(), " must have one shape (B, Hkv, L, D)");
  TORCH_CHECK(q.size(0) == kt.size(0) && q.size(2) == kt.size(2) && q.size(3) == kt.size(3),
              "attention_kernel: q ", q.sizes(), " and k ", kt.sizes(),
              " must agree on B, L and D");
  const int64_t D = q.size(3);
  TORCH_CHECK(D == 64 || D == 128, "attention_kernel: head dim must be 64 or 128 (got ", D,
              ")");
  TORCH_CHECK(q.stride(3) == 1 && kt.stride(3) == 1 && v.stride(3) == 1,
              "attention_kernel: q, k, v need a contiguous last dim (strides ", q.strides(),
              ", ", kt.strides(), ", ", v.strides(), ")");
  const int64_t H = q.size(1), Hkv = kt.size(1);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "attention_kernel: query heads H=", H,
              " must be a multiple of kv heads Hkv=", Hkv);
  TORCH_CHECK(q.size(0) <= 65535 && H <= 65535,
              "attention_kernel: batch and heads must be <= 65535 (got B=", q.size(0),
              ", H=", H, ")");
  TORCH_CHECK(q.size(2) <= std::numeric_limits<int32_t>::max() / 2,
              "attention_kernel: sequence too long (L=", q.size(2), ")");
}

void fill_forward(k::S2FwdParams& p, const torch::Tensor& q, const torch::Tensor& kt,
                  const torch::Tensor& v, Mode mode, int64_t G) {
  p.q = q.data_ptr();
  p.k = kt.data_ptr();
  p.v = v.data_ptr();
  p.B = static_cast<int>(q.size(0));
  p.H = static_cast<int>(q.size(1));
  p.Hkv = static_cast<int>(kt.size(1));
  p.L = static_cast<int>(q.size(2));
  p.D = static_cast<int>(q.size(3));
  p.q_stride = strides_of(q);
  p.k_stride = strides_of(kt);
  p.v_stride = strides_of(v);
  p.group = static_cast<int>(G);
  p.mode = to_kernel_mode(mode);
  p.softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.D)));
  p.dtype = q.scalar_type() == torch::kBFloat16 ? k::S2Dtype::BF16 : k::S2Dtype::FP16;
}

class S2AttentionFunction : public torch::autograd::Function<S2AttentionFunction> {
 public:
  // q (B, H, L, D), k v (B, Hkv, L, D), already checked and in kernel layout.
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& q,
                               const torch::Tensor& kt, const torch::Tensor& v,
                               int64_t mode, int64_t group) {
    const c10::cuda::CUDAGuard guard(q.device());
    auto o = torch::empty(q.sizes(), q.options());  // (B, H, L, D), contiguous
    auto lse = torch::empty({q.size(0), q.size(1), q.size(2)},
                            q.options().dtype(torch::kFloat32));  // (B, H, L)
    k::S2FwdParams p;
    fill_forward(p, q, kt, v, static_cast<Mode>(mode), group);
    p.o = o.data_ptr();
    p.o_stride = strides_of(o);
    p.lse = lse.data_ptr<float>();
    k::s2_fwd(p, at::cuda::getCurrentCUDAStream().stream());

    ctx->save_for_backward({q, kt, v, o, lse});
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["group"] = group;
    return o;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& q = saved[0];
    const auto& kt = saved[1];
    const auto& v = saved[2];
    const auto& o = saved[3];
    const auto& lse = saved[4];
    if (!grads[0].defined()) return {torch::Tensor(), torch::Tensor(), torch::Tensor(),
                                     torch::Tensor(), torch::Tensor()};
    const c10::cuda::CUDAGuard guard(q.device());
    const auto dout = kernel_layout(grads[0].to(q.scalar_type()));  // (B, H, L, D)

    auto dq = torch::empty(q.sizes(), q.options());
    auto dk = torch::empty(kt.sizes(), kt.options());
    auto dv = torch::empty(v.sizes(), v.options());
    auto dq_accum = torch::zeros(q.sizes(), q.options().dtype(torch::kFloat32));
    auto delta = torch::empty({q.size(0), q.size(1), q.size(2)},
                              q.options().dtype(torch::kFloat32));

    k::S2BwdParams p;
    fill_forward(p, q, kt, v, static_cast<Mode>(ctx->saved_data["mode"].toInt()),
                 ctx->saved_data["group"].toInt());
    p.o = o.data_ptr();
    p.o_stride = strides_of(o);
    p.lse = lse.data_ptr<float>();
    p.dout = dout.data_ptr();
    p.dout_stride = strides_of(dout);
    p.dq = dq.data_ptr();
    p.dq_stride = strides_of(dq);
    p.dk = dk.data_ptr();
    p.dk_stride = strides_of(dk);
    p.dv = dv.data_ptr();
    p.dv_stride = strides_of(dv);
    p.dq_accum = dq_accum.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    k::s2_bwd(p, at::cuda::getCurrentCUDAStream().stream());
    return {dq, dk, dv, torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

bool kernel_compiled() { return true; }

torch::Tensor attention_kernel(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, Mode mode, int64_t group) {
  check_inputs(q, k, v);
  const int64_t G = check_s2_shape(q.size(1), k.size(1), q.size(2), group, mode);
  return S2AttentionFunction::apply(kernel_layout(q), kernel_layout(k), kernel_layout(v),
                                    static_cast<int64_t>(mode), G);
}

}  // namespace longlora::attention
