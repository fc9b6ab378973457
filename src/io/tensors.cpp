#include "longlora/io/tensors.h"

#include "longlora/common/error.h"

namespace longlora::io {

torch::ScalarType to_torch_dtype(DType d) {
  switch (d) {
    case DType::F32: return torch::kFloat32;
    case DType::F16: return torch::kFloat16;
    case DType::BF16: return torch::kBFloat16;
    case DType::I64: return torch::kInt64;
    case DType::I32: return torch::kInt32;
  }
  return torch::kFloat32;
}

DType from_torch_dtype(torch::ScalarType t, const std::string& what) {
  switch (t) {
    case torch::kFloat32: return DType::F32;
    case torch::kFloat16: return DType::F16;
    case torch::kBFloat16: return DType::BF16;
    case torch::kInt64: return DType::I64;
    case torch::kInt32: return DType::I32;
    default: throw Error(what + ": dtype " + std::string(c10::toString(t)) + " cannot be saved");
  }
}

torch::Tensor view_tensor(const TensorInfo& t, std::shared_ptr<const void> owner) {
  auto keep = new std::shared_ptr<const void>(std::move(owner));
  return torch::from_blob(const_cast<void*>(t.data), t.shape,
                          [keep](void*) { delete keep; },
                          torch::dtype(to_torch_dtype(t.dtype)));
}

std::map<std::string, torch::Tensor> load_tensors(const std::string& path) {
  auto ckpt = std::make_shared<SafetensorsCheckpoint>(path);
  std::map<std::string, torch::Tensor> out;
  for (const auto& n : ckpt->names()) out[n] = view_tensor(ckpt->get(n), ckpt);
  return out;
}

FileDigest save_tensors(const std::string& path,
                        const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  std::vector<TensorToWrite> entries;
  for (const auto& [name, t] : tensors) {
    TensorToWrite e;
    e.name = name;
    e.dtype = from_torch_dtype(t.scalar_type(), path + ": tensor '" + name + "'");
    e.shape = t.sizes().vec();
    torch::Tensor src = t;
    e.write = [src](const std::function<void(const void*, size_t)>& sink) {
      auto c = src.detach().to(torch::kCPU).contiguous();
      sink(c.data_ptr(), c.numel() * c.element_size());
    };
    entries.push_back(std::move(e));
  }
  return write_safetensors(path, entries, metadata);
}

}  // namespace longlora::io
