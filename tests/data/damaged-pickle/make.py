# Writes the damaged torch.save files the reader must refuse (run with PyTorch):
#   short_record.bin  a plain dict {"w": 4x4 fp32} whose data record is cut to 8 bytes
#   legacy.bin        the same dict in torch.save's legacy (non-zip) format
#   repeated.bin      {"w": a (100000, 8) view of 8 floats, strides (0, 1)}: within its
#                     storage, but 3.2 MB of elements from 32 bytes
import io
import os
import zipfile

import torch

here = os.path.dirname(os.path.abspath(__file__))
t = {"w": torch.arange(16, dtype=torch.float32).reshape(4, 4)}

buf = io.BytesIO()
torch.save(t, buf)
src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
out = io.BytesIO()
with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
    for name in src.namelist():
        data = src.read(name)
        dst.writestr(zipfile.ZipInfo(name), data[:8] if name.endswith("/data/0") else data)
with open(os.path.join(here, "short_record.bin"), "wb") as f:
    f.write(out.getvalue())

torch.save(t, os.path.join(here, "legacy.bin"), _use_new_zipfile_serialization=False)

torch.save({"w": torch.arange(8, dtype=torch.float32).as_strided((100000, 8), (0, 1))},
           os.path.join(here, "repeated.bin"))
