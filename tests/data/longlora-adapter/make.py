# Writes this folder from the golden peft adapter, as LongLoRA's scripts leave an
# adapter: adapter_model.bin (torch.save of a plain dict of the LoRA factors, as
# get_trainable_weights.py writes it) and trainable_params.bin (the embedding and
# norms, "base_model.model." cut off, which its eval and merge scripts load into the
# base before PeftModel), modules_to_save null. ordered/ holds an OrderedDict save,
# which LibTorch's unpickler cannot read. Run from the repository root:
#   .venv/bin/python tests/data/longlora-adapter/make.py
import collections, json, os, struct
import torch

src = "tests/data/golden/tiny-llama/adapter"
out = "tests/data/longlora-adapter"
raw = open(src + "/adapter_model.safetensors", "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
tensors = {}
for k, v in header.items():
    if k == "__metadata__":
        continue
    s, e = v["data_offsets"]
    tensors[k] = torch.frombuffer(bytearray(data[s:e]), dtype=dtypes[v["dtype"]]).reshape(v["shape"]).clone()
lora = {k: v for k, v in tensors.items() if "lora_" in k}
trainable = {k[len("base_model.model."):]: v for k, v in tensors.items() if "lora_" not in k}
torch.save(lora, out + "/adapter_model.bin")
torch.save(trainable, out + "/trainable_params.bin")
cfg = json.load(open(src + "/adapter_config.json"))
cfg["modules_to_save"] = None
json.dump(cfg, open(out + "/adapter_config.json", "w"), indent=2)
os.makedirs(out + "/ordered", exist_ok=True)
torch.save(collections.OrderedDict(lora), out + "/ordered/adapter_model.bin")
json.dump(cfg, open(out + "/ordered/adapter_config.json", "w"), indent=2)

# cuda/: the LoRA factors as a GPU run saves them (storages located on "cuda:0"), made
# without a GPU by rewriting the location in the pickle; they must load onto the CPU.
import zipfile
os.makedirs(out + "/cuda", exist_ok=True)
src_zip = zipfile.ZipFile(out + "/adapter_model.bin")
with zipfile.ZipFile(out + "/cuda/adapter_model.bin", "w", zipfile.ZIP_STORED) as z:
    for info in src_zip.infolist():
        data = src_zip.read(info.filename)
        if info.filename.endswith("data.pkl"):
            assert b"X\x03\x00\x00\x00cpu" in data  # BINUNICODE, later uses are memo gets
            data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
        z.writestr(info.filename, data)
json.dump(cfg, open(out + "/cuda/adapter_config.json", "w"), indent=2)
