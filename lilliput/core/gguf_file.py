"""A fast GGUF reader: metadata as plain Python values, tensors dequantized to float32 in torch.

The `gguf` package's reader builds a numpy view for every metadata element (seconds for a
49152-token vocabulary) and dequantizes in numpy; this one parses with `struct` over an mmap
and dequantizes the common block formats (Q4_0, Q4_1, Q8_0, F16, BF16, F32) with vectorized
torch, handing any other format to `gguf.quants.dequantize`.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

MAGIC = b"GGUF"
# metadata value types -> struct format (strings and arrays are handled apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# ggml tensor type -> (name, elements per block, bytes per block)
_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34),
          30: ("BF16", 1, 2)}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (rows first): GGUF stores ne reversed
    type_id: int
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """Read a GGUF file's metadata and tensors. `metadata` maps keys to Python values."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, IndexError, KeyError, OverflowError) as e:
            raise ValueError(f"{self.path} is a truncated or corrupt GGUF file ({type(e).__name__})") from None

    def _parse(self):
        mm = self._mm
        if mm[:4] != MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (bad magic {bytes(mm[:4])!r})")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        if version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        self._pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._str()
            (vtype,) = self._unpack("<I")
            self.metadata[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._str()
            (n_dims,) = self._unpack("<I")
            ne = self._unpack(f"<{n_dims}Q")
            type_id, offset = self._unpack("<IQ")
            infos.append((name, tuple(reversed(ne)), type_id, offset))
        align = self.metadata.get("general.alignment", 32)
        data_start = (self._pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, type_id, offset in infos:
            _, per_block, block_bytes = _TYPES.get(type_id, ("?", 1, 0))
            n = int(np.prod(shape))
            self.tensors[name] = TensorInfo(name, shape, type_id, data_start + offset, n // per_block * block_bytes)

    def _unpack(self, fmt: str):
        vals = struct.unpack_from(fmt, self._mm, self._pos)
        self._pos += struct.calcsize(fmt)
        return vals

    def _str(self) -> str:
        (n,) = self._unpack("<Q")
        s = self._mm[self._pos:self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype: int):
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype])[0]
        if vtype == _STRING:
            return self._str()
        if vtype == _ARRAY:
            etype, n = self._unpack("<IQ")
            if etype in _SCALARS:  # one numpy read for the whole array
                dt = np.dtype(_SCALARS[etype])
                arr = np.frombuffer(self._mm, dtype=dt, count=n, offset=self._pos)
                self._pos += n * dt.itemsize
                return arr.tolist()
            return [self._value(etype) for _ in range(n)]
        raise ValueError(f"{self.path}: unknown GGUF metadata type {vtype}")

    def raw(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name` dequantized to float32, shape in PyTorch order."""
        info = self.tensors[name]
        if info.type_id not in _TYPES:
            return self._fallback(info)
        kind = _TYPES[info.type_id][0]
        buf = torch.frombuffer(bytearray(self.raw(name)), dtype=torch.uint8)
        if kind == "F32":
            return buf.view(torch.float32).reshape(info.shape).clone()
        if kind == "F16":
            return buf.view(torch.float16).float().reshape(info.shape)
        if kind == "BF16":
            return buf.view(torch.bfloat16).float().reshape(info.shape)
        return _dequant_blocks(kind, buf, info.shape)

    def _fallback(self, info: TensorInfo) -> torch.Tensor:
        import gguf
        from gguf.quants import dequantize

        try:
            qtype = gguf.GGMLQuantizationType(info.type_id)
        except ValueError:
            raise ValueError(f"{self.path}: tensor {info.name} has unknown ggml type {info.type_id}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n = int(np.prod(info.shape))
        data = np.frombuffer(self._mm, dtype=np.uint8, count=n // block * type_size, offset=info.offset)
        rows = data.reshape(-1, info.shape[-1] // block * type_size)
        try:
            values = dequantize(rows, qtype)
        except NotImplementedError:  # gguf's own error names neither the file nor the tensor
            raise ValueError(f"{self.path}: tensor {info.name} is {qtype.name}, which lilliput cannot dequantize; "
                             "convert the model to a common type (F16, Q8_0, Q4_K, ...)") from None
        return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(info.shape)

    def close(self):
        self._mm.close()


def _dequant_blocks(kind: str, buf: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Dequantize ggml blocks of 32 values. buf: the tensor's raw bytes (uint8)."""
    block_bytes = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
    blocks = buf.view(-1, block_bytes)  # (nb, block_bytes)
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # (nb, 1) scale
    if kind == "Q8_0":
        q = blocks[:, 2:].contiguous().view(torch.int8).float()  # (nb, 32)
        return (q * d).reshape(shape)
    qs = blocks[:, 4:] if kind == "Q4_1" else blocks[:, 2:]  # (nb, 16): element j low nibble, j+16 high
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()  # (nb, 32)
    if kind == "Q4_0":
        return ((q - 8.0) * d).reshape(shape)
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()  # (nb, 1) minimum
    return (q * d + m).reshape(shape)
