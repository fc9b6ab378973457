# Writes this folder from the golden model's safetensors shards, as transformers'
# save_pretrained(safe_serialization=False) leaves a sharded model: one torch.save of a
# plain dict per shard (pytorch_model-0000N-of-00002.bin) and pytorch_model.bin.index.json.
# Each layer also keeps rotary_emb.inv_freq, a buffer that transformers 4.28-4.30 saved
# and later versions ignore on load. Run from the repository root:
#   .venv/bin/python tests/data/pickled-model/make.py
import json, math, shutil, struct
import torch

src = "tests/data/golden/tiny-llama/model"
out = "tests/data/pickled-model"
dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
index = json.load(open(src + "/model.safetensors.index.json"))
tensors = {}
for shard in sorted(set(index["weight_map"].values())):
    raw = open(src + "/" + shard, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    for k, v in header.items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        tensors[k] = torch.frombuffer(bytearray(data[s:e]), dtype=dtypes[v["dtype"]]).reshape(v["shape"]).clone()
cfg = json.load(open(src + "/config.json"))
d = cfg["hidden_size"] // cfg["num_attention_heads"]
inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
for i in range(cfg["num_hidden_layers"]):
    tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
# Shard 1: the embedding and layer 0; shard 2: the rest.
first = lambda k: k.startswith("model.embed_tokens.") or k.startswith("model.layers.0.")
shards = {"pytorch_model-00001-of-00002.bin": {k: v for k, v in tensors.items() if first(k)},
          "pytorch_model-00002-of-00002.bin": {k: v for k, v in tensors.items() if not first(k)}}
weight_map = {}
for name, shard in shards.items():
    torch.save(shard, out + "/" + name)
    weight_map.update({k: name for k in shard})
total = sum(t.numel() * t.element_size() for t in tensors.values())
json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
          open(out + "/pytorch_model.bin.index.json", "w"), indent=2)
shutil.copy(src + "/config.json", out + "/config.json")
