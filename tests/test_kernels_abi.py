"""The kernels' one interface: the ctypes mirror (infer/kernels/abi.py) against csrc/lilliput.h."""

import ctypes

import pytest

from lilliput.infer.kernels import abi, build


@pytest.fixture(scope="module")
def lib():
    kernel = build.load()
    if isinstance(kernel, str):
        pytest.skip(kernel)
    return kernel.lib


def test_mirror_matches_the_compiled_header(lib):
    abi.check(lib)  # what load() ran; also: every header entry is mirrored and vice versa
    layout = abi.c_layout(lib)
    assert layout["linear_t"] == ctypes.sizeof(abi.Linear)
    assert layout["ll_kind.LL_KIND_INT8_BATCH"] == abi.Kind.INT8_BATCH


def test_mirror_with_a_missing_field_is_refused(lib):
    class Short(ctypes.Structure):  # linear_t without its `group`
        _c_name_ = "linear_t"
        _fields_ = [(n, t) for n, t in abi.Linear._fields_ if n != "group"]

    structs = tuple(Short if s is abi.Linear else s for s in abi.STRUCTS)
    with pytest.raises(abi.AbiMismatch, match=r"linear_t\.group: C offset \d+, missing from the mirror") as e:
        abi.check(lib, "test.so", structs=structs)
    assert "linear_t: C size" in str(e.value) and "linear_t.variant: C offset" in str(e.value)


def test_mirror_with_a_wrong_enum_value_or_extra_field_is_refused(lib):
    from enum import IntEnum

    class Kind(IntEnum):
        F32, BF16, INT8, INT4, INT8_BATCH, INT2 = 0, 1, 2, 3, 5, 6

    class Extra(ctypes.Structure):
        _c_name_ = "gemv_args_t"
        _fields_ = [*abi.GemvArgs._fields_, ("spare", ctypes.c_int64)]

    enums = {**abi.ENUMS, "ll_kind": (Kind, "LL_KIND_")}
    structs = tuple(Extra if s is abi.GemvArgs else s for s in abi.STRUCTS)
    with pytest.raises(abi.AbiMismatch) as e:
        abi.check(lib, structs=structs, enums=enums)
    msg = str(e.value)
    assert "ll_kind.LL_KIND_INT8_BATCH: C value 4, mirror 5" in msg
    assert "ll_kind.LL_KIND_INT2: mirror value 6, missing from lilliput.h" in msg
    assert "gemv_args_t.spare: mirror offset" in msg


def test_load_raises_on_a_mismatch_instead_of_falling_back(lib, monkeypatch):
    monkeypatch.setattr(abi, "STRUCTS", tuple(s for s in abi.STRUCTS if s is not abi.Layer))
    build.load.cache_clear()
    try:
        with pytest.raises(abi.AbiMismatch, match="layer_t"):
            build.load()
    finally:
        monkeypatch.undo()
        build.load.cache_clear()


def test_header_change_changes_cache_key(monkeypatch, tmp_path):
    compiler = build.find_compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    header = tmp_path / "lilliput.h"
    header.write_text(build.HEADERS[0].read_text() + "\n/* changed */\n")
    before = build.build_key(compiler)
    monkeypatch.setattr(build, "HEADERS", (header, *build.HEADERS[1:]))
    assert build.build_key(compiler) != before
