// S2-Attn reference (libtorch ops, autograd through them), the sdpa baseline and
// the dispatch. The reference is the oracle the CUDA kernel is tested against.
#include "longlora/attention/attention.h"

#include <cmath>

#include "longlora/common/error.h"

namespace longlora::attention {

using torch::indexing::Slice;

Mode parse_mode(const std::string& s) {
  if (s == "full") return Mode::Full;
  if (s == "segments") return Mode::Segments;
  if (s == "roll") return Mode::Roll;
  throw Error("attention mode '" + s + "' is unknown (expected full, segments or roll)");
}

Backend parse_backend(const std::string& s) {
  if (s == "auto") return Backend::Auto;
  if (s == "reference") return Backend::Reference;
  if (s == "sdpa") return Backend::Sdpa;
  if (s == "kernel") return Backend::Kernel;
  throw Error("attention backend '" + s + "' is unknown (expected auto, reference, sdpa, kernel)");
}

std::string to_string(Mode m) {
  switch (m) {
    case Mode::Full: return "full";
    case Mode::Segments: return "segments";
    case Mode::Roll: return "roll";
  }
  return "?";
}

std::string to_string(Backend b) {
  switch (b) {
    case Backend::Auto: return "auto";
    case Backend::Reference: return "reference";
    case Backend::Sdpa: return "sdpa";
    case Backend::Kernel: return "kernel";
  }
  return "?";
}

int64_t visible_pairs(int64_t L, int64_t G, Mode mode, bool shifted) {
  auto tri = [](int64_t n) { return n * (n + 1) / 2; };
  if (mode == Mode::Full || G == L) return tri(L);
  if (!shifted || mode == Mode::Roll) return (L / G) * tri(G);  // Roll: whole rolled groups
  return 2 * tri(G / 2) + (L / G - 1) * tri(G);                  // Segments: two half groups at the ends
}

int64_t check_s2_shape(int64_t H, int64_t Hkv, int64_t L, int64_t group, Mode mode, const std::string& group_field,
                       const std::string& heads_field) {
  if (Hkv <= 0 || H % Hkv != 0)
    throw Error(heads_field + ": " + std::to_string(H) + " query heads are not a multiple of " +
                std::to_string(Hkv) + " kv heads");
  if (mode == Mode::Full) return L;
  if (group <= 0 || group > L)
    throw Error(group_field + ": S2 group size " + std::to_string(group) +
                " must be in [1, seq_len " + std::to_string(L) + "]");
  if (L % group != 0)
    throw Error(group_field + ": sequence length " + std::to_string(L) +
                " is not a multiple of the S2 group size " + std::to_string(group));
  if (group == L) return L;  // ratio 1: full attention, nothing shifted, any L and H
  if (group % 2 != 0)
    throw Error(group_field + ": S2 group size " + std::to_string(group) +
                " is odd; the shift of half a group needs it even");
  if (H % 2 != 0)
    throw Error(heads_field + ": S2-Attn shifts half of the heads; " + std::to_string(H) +
                " query heads is odd");
  return group;
}

namespace {

// Causal attention over the last-but-one dim of q,k,v (..., n, D); softmax in fp32.
torch::Tensor causal_block(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  const int64_t n = q.size(-2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  auto scores = torch::matmul(q, k.transpose(-2, -1)) * scale;
  auto mask = torch::ones({n, n}, torch::dtype(torch::kBool).device(q.device())).triu(1);
  scores = scores.masked_fill(mask, -std::numeric_limits<float>::infinity());
  // Softmax in at least fp32 (as transformers), in fp64 for fp64 inputs.
  auto p = torch::softmax(scores, -1, torch::promote_types(q.scalar_type(), torch::kFloat32))
               .to(q.scalar_type());
  return torch::matmul(p, v);
}

// 4-D inputs only: the fused (flash / memory-efficient) kernels take nothing else, and
// 5-D groups fell back to the math path, which materialises every G x G score matrix
// (156 GiB at 100k, seen on an H200).
torch::Tensor sdpa_block(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  return at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0,
                                          /*is_causal=*/true);
}

// Causal attention inside consecutive groups of G along L: (B, h, L, D).
torch::Tensor grouped(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t G) {
  const auto B = q.size(0), h = q.size(1), L = q.size(2), D = q.size(3);
  auto g = [&](const torch::Tensor& t) { return t.reshape({B, h, L / G, G, D}); };
  return causal_block(g(q), g(k), g(v)).reshape({B, h, L, D});
}

}  // namespace

torch::Tensor attention_reference(const torch::Tensor& q, const torch::Tensor& k_in,
                                  const torch::Tensor& v_in, Mode mode, int64_t group) {
  TORCH_CHECK(q.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, "attention: q, k, v must be 4-D");
  torch::Tensor k = k_in, v = v_in;
  const int64_t H = q.size(1), Hkv = k.size(1), L = q.size(2);
  const int64_t G = check_s2_shape(H, Hkv, L, group, mode);
  if (Hkv != H) {  // grouped-query: query head h reads kv head h / (H / Hkv)
    k = k.repeat_interleave(H / Hkv, 1);
    v = v.repeat_interleave(H / Hkv, 1);
  }
  // ratio 1 (G = L) is plain full causal attention in both modes, by definition.
  if (mode == Mode::Full || G == L) return causal_block(q, k, v);
  const int64_t h2 = H / 2, half = G / 2;
  auto lo = Slice(0, h2), hi = Slice(h2, H);
  auto o1 = grouped(q.index({Slice(), lo}), k.index({Slice(), lo}), v.index({Slice(), lo}), G);
  auto q2 = q.index({Slice(), hi}), k2 = k.index({Slice(), hi}), v2 = v.index({Slice(), hi});
  torch::Tensor o2;
  if (mode == Mode::Roll) {
    auto r = [&](const torch::Tensor& t) { return t.roll(-half, 2); };
    o2 = grouped(r(q2), r(k2), r(v2), G).roll(half, 2);
  } else {
    // Segments [0, G/2), [G/2, 3G/2), ..., [L - G/2, L).
    auto seg = [&](const torch::Tensor& t, int64_t a, int64_t b) {
      return t.index({Slice(), Slice(), Slice(a, b)});
    };
    auto first = causal_block(seg(q2, 0, half), seg(k2, 0, half), seg(v2, 0, half));
    auto last = causal_block(seg(q2, L - half, L), seg(k2, L - half, L), seg(v2, L - half, L));
    std::vector<torch::Tensor> parts{first};
    if (L - G > 0)
      parts.push_back(grouped(seg(q2, half, L - half), seg(k2, half, L - half), seg(v2, half, L - half), G));
    parts.push_back(last);
    o2 = torch::cat(parts, 2);
  }
  return torch::cat({o1, o2}, 1);
}

namespace {

// Positions (B, n*G, h, D) in groups of G -> (B*n, h, G, D), one sdpa batch entry per
// group: a view on the projections' memory when B = 1 or the groups cover all of L.
torch::Tensor to_groups(const torch::Tensor& t, int64_t n, int64_t G) {
  return t.reshape({t.size(0) * n, G, t.size(2), t.size(3)}).transpose(1, 2);
}

// Causal sdpa inside consecutive groups of G of the positions of (B, n*G, h, D)
// tensors; the output in the same order.
torch::Tensor sdpa_grouped(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t G) {
  const int64_t B = q.size(0), n = q.size(1) / G;
  auto o = sdpa_block(to_groups(q, n, G), to_groups(k, n, G), to_groups(v, n, G));
  return o.transpose(1, 2).reshape({B, n * G, q.size(2), q.size(3)});
}

}  // namespace

// The production GPU path: the same S2 rule as the reference, each group one causal
// sdpa call (LibTorch's fused flash/cuDNN kernel on GPUs), without copying or rolling
// q, k, v. It works in the (B, L, H, D) order of the projections' memory: the head
// halves and the shifted half's [0, G/2) | [G/2, L - G/2) | [L - G/2, L) are split
// views, and the output is put together by cat. So the backward is one cat per
// split (not a zero-filled full-size gradient per view, summed) and hands dq, dk, dv
// back in that same memory order, which the projections' matmuls take without a copy.
// Roll's wrapped last group is the only gathered copy (2 x G/2 positions).
torch::Tensor attention_sdpa(const torch::Tensor& q, const torch::Tensor& k_in,
                             const torch::Tensor& v_in, Mode mode, int64_t group) {
  TORCH_CHECK(q.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, "attention: q, k, v must be 4-D");
  const int64_t H = q.size(1), Hkv = k_in.size(1), L = q.size(2);
  const int64_t G = check_s2_shape(H, Hkv, L, group, mode);
  // Full causal attention: one call; ratio 1 (G = L) is the same by definition.
  if (mode == Mode::Full || G == L) {
    if (Hkv == H) return sdpa_block(q, k_in, v_in);
    return sdpa_block(q, k_in.repeat_interleave(H / Hkv, 1), v_in.repeat_interleave(H / Hkv, 1));
  }
  auto Q = q.transpose(1, 2), K = k_in.transpose(1, 2), V = v_in.transpose(1, 2);  // (B, L, H, D)
  if (Hkv != H) {  // grouped-query: query head h reads kv head h / (H / Hkv)
    K = K.repeat_interleave(H / Hkv, 2);
    V = V.repeat_interleave(H / Hkv, 2);
  }
  const int64_t h2 = H / 2, half = G / 2;
  auto heads = [&](const torch::Tensor& t) { return t.split_with_sizes({h2, H - h2}, 2); };
  auto qh = heads(Q), kh = heads(K), vh = heads(V);
  auto o_lo = sdpa_grouped(qh[0], kh[0], vh[0], G);  // heads [0, H/2): [0, G), [G, 2G), ...
  // Shifted heads: [0, G/2) | groups [G/2, 3G/2), ... up to L - G/2 | [L - G/2, L).
  auto shifted = [&](const torch::Tensor& t) { return t.split_with_sizes({half, L - G, half}, 1); };
  auto qs = shifted(qh[1]), ks = shifted(kh[1]), vs = shifted(vh[1]);
  std::vector<torch::Tensor> parts(3);
  parts[1] = sdpa_grouped(qs[1], ks[1], vs[1], G);  // G < L divides L, so L - G >= G
  if (mode == Mode::Segments) {
    parts[0] = sdpa_grouped(qs[0], ks[0], vs[0], half);
    parts[2] = sdpa_grouped(qs[2], ks[2], vs[2], half);
  } else {
    // Roll: the last rolled group is [L - G/2, L) followed by [0, G/2).
    auto wrap = [](const std::vector<torch::Tensor>& t) { return torch::cat({t[2], t[0]}, 1); };
    auto o = sdpa_grouped(wrap(qs), wrap(ks), wrap(vs), G).split_with_sizes({half, half}, 1);
    parts[2] = o[0];
    parts[0] = o[1];
  }
  return torch::cat({o_lo, torch::cat(parts, 1)}, 2).transpose(1, 2);
}

Backend resolve_backend(Backend b, bool cuda) {
  if (b != Backend::Auto) return b;
  return cuda ? Backend::Sdpa : Backend::Reference;
}

torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const Options& opt) {
  switch (resolve_backend(opt.backend, q.is_cuda())) {
    case Backend::Kernel: return attention_kernel(q, k, v, opt.mode, opt.group);
    case Backend::Sdpa: return attention_sdpa(q, k, v, opt.mode, opt.group);
    default: return attention_reference(q, k, v, opt.mode, opt.group);
  }
}

}  // namespace longlora::attention
