"""lilliput's GGUF reader against the `gguf` package: same bytes in, same float32 values out."""

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from lilliput.core.gguf_file import GGUFFile

T = gguf.GGMLQuantizationType
NATIVE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")  # dequantized in torch; the rest via gguf


def can(op, t: T) -> bool:
    """Whether gguf.quants implements `op` (quantize or dequantize) for type `t`."""
    block, type_size = gguf.GGML_QUANT_SIZES[t]
    try:
        if op is quantize:
            quantize(np.zeros((1, block), dtype=np.float32), t)
        else:
            dequantize(np.zeros((1, type_size), dtype=np.uint8), t)
    except NotImplementedError:
        return False
    return True


# every type the reader hands to gguf.quants.dequantize (K-quants, IQ*, TQ*, MXFP4, ...) and its own;
# random bytes for all, gguf's own quantization of Gaussian data where gguf can quantize the type
SUPPORTED = [t.name for t in T if can(dequantize, t)]
CASES = [(name, "random") for name in SUPPORTED] + [(name, "quantized") for name in SUPPORTED if can(quantize, T[name])]


def write_gguf(path, tensor: np.ndarray, qtype: T):
    """A GGUF holding `tensor` (raw bytes of `qtype` blocks) between two float tensors, so its
    offset is neither 0 nor aligned by luck."""
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_tensor("before", np.arange(7, dtype=np.float16))  # 14 bytes: the next tensor is padded
    w.add_tensor("x", tensor, raw_dtype=qtype)
    w.add_tensor("after", np.arange(3, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def raw_blocks(qtype: T, shape: tuple[int, ...], mode: str, rng) -> np.ndarray:
    """Bytes of a tensor of `shape` values, quantized by gguf or random (every code and sign;
    random scales can be inf or NaN, which both readers must carry alike)."""
    if mode == "quantized":
        return quantize(rng.standard_normal(shape).astype(np.float32), qtype).view(np.uint8).reshape(*shape[:-1], -1)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return rng.integers(0, 256, (*shape[:-1], shape[-1] // block * type_size), dtype=np.uint8)


@pytest.mark.parametrize("name,mode", CASES)
def test_dequantization_matches_the_gguf_package(name, mode, tmp_path):
    qtype = T[name]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    shape = (2, 3, 2 * max(block, 32))  # two blocks per row (K-quants: 256 values a block)
    with np.errstate(all="ignore"):  # random fp16 scales overflow in numpy too
        raw = raw_blocks(qtype, shape, mode, np.random.default_rng(sum(map(ord, name + mode))))
        want = torch.from_numpy(np.asarray(dequantize(raw, qtype), dtype=np.float32))
        f = GGUFFile(write_gguf(tmp_path / "t.gguf", raw, qtype))
        got = f.tensor("x")
    assert got.dtype == torch.float32 and got.shape == shape
    torch.testing.assert_close(got, want.reshape(shape), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(f.tensor("before"), torch.arange(7.0), rtol=0, atol=0)
    torch.testing.assert_close(f.tensor("after"), torch.arange(3.0), rtol=0, atol=0)
    f.close()


def test_native_types_are_all_covered():
    assert set(NATIVE) <= set(SUPPORTED)


@pytest.mark.parametrize("name", ["Q8_1", "Q8_K"])  # block types the gguf package cannot dequantize
def test_undequantizable_type_is_one_clear_error(name, tmp_path):
    qtype = T[name]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    f = GGUFFile(write_gguf(tmp_path / "t.gguf", np.zeros((2, type_size), dtype=np.uint8), qtype))
    with pytest.raises(ValueError, match=rf"tensor x is {name}, which lilliput cannot dequantize"):
        f.tensor("x")
    f.close()
