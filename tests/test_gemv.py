"""Parity of the C GEMV kernel with torch, its fallbacks, its build cache and its ABI check."""

import ctypes
import multiprocessing
import threading

import pytest
import torch
import torch.nn.functional as F

from lilliput.infer import kernels
from lilliput.infer.kernels import abi, build


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory):
    """Builds the kernel once into a private cache so tests never touch ~/.cache."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("lilliput_cache")
    mp.setenv("LILLIPUT_CACHE", str(cache))
    mp.delenv("LILLIPUT_NO_KERNEL", raising=False)
    build.load.cache_clear()
    yield cache
    mp.undo()
    build.load.cache_clear()


@pytest.fixture
def fresh_load():
    """Forgets the loaded kernel before and after a test that changes how it loads."""
    build.load.cache_clear()
    yield
    build.load.cache_clear()


def _require_kernel():
    if not kernels.available():
        pytest.skip(f"kernel unavailable: {kernels.unavailable_reason()}")


SHAPES = [(37, 61), (16, 16), (130, 200), (960, 576)]  # (N, K), odd ones not multiples of 16


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("b", [1, 3])
def test_fp32_matches_torch(n, k, b):
    _require_kernel()
    g = torch.Generator().manual_seed(n * k + b)
    x, w = torch.randn(b, k, generator=g), torch.randn(n, k, generator=g)
    y = kernels.linear(x, w)
    assert y.shape == (b, n) and y.dtype == torch.float32
    ref = F.linear(x.double(), w.double())
    # fp32 rounding over K terms of size ~1: well inside 1e-4 relative to the row scale
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4 * k**0.5)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-4 * k**0.5)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("b", [1, 3])
def test_bf16_weights_fp32_x_match_fp32_math(n, k, b):
    _require_kernel()
    g = torch.Generator().manual_seed(7 + n + k + b)
    x, w = torch.randn(b, k, generator=g), torch.randn(n, k, generator=g).bfloat16()
    y = kernels.linear(x, w)
    assert y.dtype == torch.float32
    # bf16 -> fp32 is exact, so this is the fp32 GEMV of the same numbers
    torch.testing.assert_close(y, F.linear(x, w.float()), rtol=1e-5, atol=1e-4 * k**0.5)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("b", [1, 3])
def test_bf16_x_and_weights_match_torch_bf16(n, k, b):
    _require_kernel()
    g = torch.Generator().manual_seed(11 + n + k + b)
    x = torch.randn(b, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    y = kernels.linear(x, w)
    assert y.dtype == torch.bfloat16
    exact = F.linear(x.double(), w.double())
    # fp32 accumulation then one rounding to bf16: within one bf16 ulp (2**-8 relative)
    torch.testing.assert_close(y.double(), exact, rtol=2**-7, atol=1e-3 * k**0.5)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1.6e-2, atol=2e-2 * k**0.5)


def test_one_dim_x_and_leading_dims():
    _require_kernel()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(61, 37, generator=g)
    x1 = torch.randn(37, generator=g)
    y1 = kernels.linear(x1, w)
    assert y1.shape == (61,)
    torch.testing.assert_close(y1, F.linear(x1, w))
    x3 = torch.randn(2, 1, 37, generator=g)  # (B, T, K) as a model passes it
    y3 = kernels.linear(x3, w)
    assert y3.shape == (2, 1, 61)
    torch.testing.assert_close(y3, F.linear(x3, w))


def test_non_contiguous_x_is_copied():
    _require_kernel()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 24, generator=g)
    x = torch.randn(24, 3, generator=g).t()  # (3, 24), strided
    torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w))


def test_out_argument_is_filled_and_returned():
    _require_kernel()
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 61, generator=g), torch.randn(37, 61, generator=g)
    out = torch.full((3, 37), float("nan"))
    y = kernels.linear(x, w, out=out)
    assert y is out
    torch.testing.assert_close(out, F.linear(x, w))


def test_out_with_wrong_shape_raises_with_fix():
    _require_kernel()
    x, w = torch.randn(2, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        kernels.linear(x, w, out=torch.empty(2, 6))


def test_feature_mismatch_raises():
    _require_kernel()
    with pytest.raises(ValueError, match="features"):
        kernels.linear(torch.randn(1, 7), torch.randn(5, 8))


def test_empty_output_rows():
    _require_kernel()
    y = kernels.linear(torch.randn(2, 8), torch.randn(0, 8))
    assert y.shape == (2, 0)


@pytest.mark.parametrize(
    "case",
    ["nine_rows", "fp16", "transposed_w", "autograd"],
)
def test_unsupported_inputs_fall_back_to_torch(case):
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 24, generator=g), torch.randn(16, 24, generator=g)
    if case == "nine_rows":
        x = torch.randn(9, 24, generator=g)
    elif case == "fp16":
        x, w = x.half(), w.half()
    elif case == "transposed_w":
        w = torch.randn(24, 16, generator=g).t()
    elif case == "autograd":
        w.requires_grad_(True)
    y = kernels.linear(x, w)
    torch.testing.assert_close(y, F.linear(x, w))
    if case == "autograd":
        y.sum().backward()
        torch.testing.assert_close(w.grad, x.sum(0).expand(16, 24))


def test_env_var_forces_fallback_with_same_result(monkeypatch, fresh_load):
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(3, 61, generator=g), torch.randn(37, 61, generator=g)
    fast = kernels.linear(x, w)
    monkeypatch.setenv("LILLIPUT_NO_KERNEL", "1")
    build.load.cache_clear()
    assert not kernels.available()
    assert "LILLIPUT_NO_KERNEL" in kernels.unavailable_reason()
    slow = kernels.linear(x, w)
    torch.testing.assert_close(slow, fast, rtol=1e-5, atol=1e-4)
    out = torch.empty(3, 37)
    assert kernels.linear(x, w, out=out) is out
    torch.testing.assert_close(out, slow)
    # mixed dtypes in the fallback accumulate in fp32 too
    torch.testing.assert_close(kernels.linear(x, w.bfloat16()), F.linear(x, w.bfloat16().float()))


def test_no_compiler_warns_once_and_falls_back(monkeypatch, fresh_load):
    monkeypatch.setattr(build, "find_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert not kernels.available()
    assert "no C compiler" in kernels.unavailable_reason()
    x, w = torch.randn(2, 8), torch.randn(5, 8)
    torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w))


def test_compile_error_warns_and_falls_back(monkeypatch, tmp_path, fresh_load):
    bad = tmp_path / "gemv.c"
    bad.write_text("this is not C;\n")
    monkeypatch.setattr(build, "SOURCES", (bad,))
    with pytest.warns(RuntimeWarning, match="failed"):
        assert not kernels.available()
    assert not list(build.cache_dir().glob("*.tmp"))  # no half-written files left behind


def test_second_load_uses_cache_without_compiling(monkeypatch, kernel_cache, fresh_load):
    first = build.load()
    if isinstance(first, str):
        pytest.skip(first)
    assert first.path.parent == kernel_cache / "kernels"
    assert first.path.is_file()

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although the cache holds the kernel")

    monkeypatch.setattr(build, "build", no_build)
    build.load.cache_clear()
    second = build.load()
    assert not isinstance(second, str)
    assert second.path == first.path and not second.built and second.build_s == 0.0


def test_source_change_changes_cache_key(monkeypatch, tmp_path):
    compiler = build.find_compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    other = tmp_path / "gemv.c"
    other.write_text(build.SOURCES[0].read_text() + "\n/* changed */\n")
    before = build.build_key(compiler)
    monkeypatch.setattr(build, "SOURCES", (other, *build.SOURCES[1:]))
    assert build.build_key(compiler) != before


def test_threads_setting_round_trips_and_keeps_results():
    _require_kernel()
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 576, generator=g), torch.randn(960, 576, generator=g)
    before = kernels.get_threads()
    try:
        kernels.set_threads(1)
        assert kernels.get_threads() == 1
        one = kernels.linear(x, w)
        kernels.set_threads(2)
        assert kernels.get_threads() == 2
        two = kernels.linear(x, w)
    finally:
        kernels.set_threads(before)
    torch.testing.assert_close(one, two, rtol=0, atol=0)  # same rows, same order per row


def test_concurrent_callers_get_their_own_results():
    _require_kernel()
    g = torch.Generator().manual_seed(6)
    w = torch.randn(960, 576, generator=g)
    xs = [torch.randn(1, 576, generator=g) for _ in range(4)]
    refs = [F.linear(x, w) for x in xs]
    errors = []

    def run(i):
        for _ in range(50):
            y = kernels.linear(xs[i], w)
            if not torch.allclose(y, refs[i], rtol=1e-5, atol=1e-3):
                errors.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _child_gemv(conn, x, w):
    conn.send(kernels.linear(x, w).tolist())  # plain lists: torch's tensor pickling needs sockets
    conn.close()


def test_pool_works_in_forked_child():
    _require_kernel()
    g = torch.Generator().manual_seed(8)
    x, w = torch.randn(1, 576, generator=g), torch.randn(960, 576, generator=g)
    kernels.linear(x, w)  # parent starts its workers before forking
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child_gemv, args=(child, x, w))
    p.start()
    assert parent.poll(30), "forked child hung in the kernel"
    y = torch.tensor(parent.recv())
    p.join(10)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("lanes", [4, 16])
def test_other_vector_widths_match_torch(lanes, tmp_path):
    """The 16-lane (AVX-512) and 4-lane (portable) builds, forced on this CPU."""
    compiler = build.find_compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    path = tmp_path / f"gemv{lanes}.so"
    build.build(compiler, path, extra_flags=(f"-DGEMV_LANES={lanes}", "-Wno-psabi"))
    kernel = build.open_library(path, built=True, build_s=0.0)
    assert kernel.lanes == lanes
    g = torch.Generator().manual_seed(lanes)
    for n, k, b in [(37, 61, 1), (130, 200, 3), (67, 576, 8)]:
        x, w = torch.randn(b, k, generator=g), torch.randn(n, k, generator=g)
        for wt in (w, w.bfloat16()):
            y = torch.empty(b, n)
            a = abi.GemvArgs(x.data_ptr(), wt.data_ptr(), y.data_ptr(),
                             abi.DType.F32 | kernels.ops._DTYPE_CODE[wt.dtype] << 4 | b << 16, n, k)
            assert kernel.fn(ctypes.byref(a)) == 0
            torch.testing.assert_close(y, F.linear(x, wt.float()), rtol=1e-5, atol=1e-4 * k**0.5)


def test_the_kernel_builds_where_a_compiler_exists():
    """A compile error must fail here, not fall back to torch and skip every kernel test."""
    if build.find_compiler() is None:
        pytest.skip("no C compiler")
    assert kernels.available(), kernels.unavailable_reason()


ISAS = {"x86-64": set(), "haswell": {"avx2", "fma", "f16c"}, "alderlake": {"avx2", "avx_vnni"},
        "skylake-avx512": {"avx512f", "avx512bw", "avx512vl"}, "native-avx2": {"avx2", "fma", "f16c"}}
"""-march targets; native-avx2 is this CPU without AVX-512, AVX-VNNI and AMX (LILLIPUT_ISA=avx2)."""


def _descs(layer, lib) -> list:
    """The layer's descriptors that `lib` runs: row-major, and for int8 the batch layout `lib` packs."""
    from lilliput.compress import qlinear as ql
    from lilliput.infer.kernels import descriptor

    layer.kernel_variant = "dot"  # row-major int8 (kernel_desc packs only for "auto")
    descs = [layer.kernel_desc()]
    rows = lib.qgemv_int8_pack()
    if isinstance(layer, ql.Int8Linear) and rows:
        packed = ql.pack_int8(layer.codes(), rows)
        descs.append(descriptor.make(abi.Kind.INT8_BATCH, packed, layer.out_features, layer.in_features,
                                     scale=layer.scale, group=rows))
        descs[-1].keep = packed
    rows = lib.qgemv_int4_pack()
    if isinstance(layer, ql.Int4Linear) and rows:
        kept = (ql.pack_int4_batch(layer.codes()), ql.group_rows(layer.scale, rows), ql.group_rows(layer.zero, rows))
        descs.append(descriptor.make(abi.Kind.INT4_BATCH, kept[0], layer.out_features, layer.in_features,
                                     scale=kept[1], zero=kept[2], group=layer.group_size))
        descs[-1].keep = kept
    return descs


@pytest.mark.parametrize("march", sorted(ISAS))
def test_quantized_paths_of_every_instruction_set_agree(march, tmp_path):
    """The int8/int4 kernels built for other instruction sets (scalar, AVX2 maddubs, AVX-VNNI,
    AVX-512 without VNNI, this CPU forced to AVX2) run where this CPU can: every one, in every
    layout it packs, is within int8-activation error of the float product, and the integer paths
    give what the native build gives."""
    from lilliput.compress.quantize import Grid
    from lilliput.eval.peers import cpu_flags

    compiler = build.find_compiler()
    if compiler is None or not kernels.available():
        pytest.skip("no C compiler")
    if not ISAS[march] <= cpu_flags():
        pytest.skip(f"this CPU cannot run a {march} build")
    path = tmp_path / f"gemv-{march}.so"
    flags = build.ISA_FLAGS["avx2"] if march == "native-avx2" else (f"-march={march}",)
    try:
        build.build(compiler, path, extra_flags=(*flags, "-Wno-psabi"))
    except RuntimeError as e:
        pytest.skip(f"{compiler} cannot target {march}: {e}")
    other = ctypes.CDLL(str(path))
    native = build.load().lib
    abi.bind(other)
    if march == "native-avx2":
        assert other.qgemv_int8_pack() == 8 and other.qgemv_isa() == 1
    g = torch.Generator().manual_seed(1)
    for bits, group in ((8, 576), (4, 64), (4, 32)):
        w = torch.randn(40, 576, generator=g)
        layer = Grid.fit(w, bits, group).module(w)
        for b in (1, 5, 8, 13):
            x = torch.randn(b, 576, generator=g)
            ref = x @ layer.dequantize().T
            y0 = torch.empty(b, 40)
            assert native.qlinear_run_rows(ctypes.byref(_descs(layer, native)[0]), x.data_ptr(), y0.data_ptr(), b) == 0
            for desc in _descs(layer, other):
                y = torch.empty(b, 40)
                assert other.qlinear_run_rows(ctypes.byref(desc), x.data_ptr(), y.data_ptr(), b) == 0
                assert (y - ref).abs().max() < 0.02 * ref.abs().max()  # int8 activations at most
                if march != "x86-64":  # the same integer dot products: only the float sums' order differs
                    torch.testing.assert_close(y, y0, rtol=1e-4, atol=1e-3)
                for r in (0, b - 1):  # a row's result does not depend on the rows beside it
                    one = torch.empty(1, 40)
                    assert other.qlinear_run_rows(ctypes.byref(desc), x[r:r + 1].contiguous().data_ptr(),
                                                  one.data_ptr(), 1) == 0
                    assert torch.equal(one[0], y[r])


def test_a_batch_layout_packed_for_another_build_is_refused():
    """Groups of 16 rows handed to an 8-row build (or the reverse): -1, never a wrong product."""
    from lilliput.compress import qlinear as ql
    from lilliput.infer.kernels import descriptor

    if not kernels.available() or not build.load().lib.qgemv_int8_pack():
        pytest.skip("no int8 batch layout in this build")
    lib = build.load().lib
    wrong = 24 - lib.qgemv_int8_pack()  # 8 <-> 16
    q = torch.randint(-127, 128, (48, 64), dtype=torch.int8)
    packed = ql.pack_int8(q, wrong)
    desc = descriptor.make(abi.Kind.INT8_BATCH, packed, 48, 64, scale=torch.ones(48), group=wrong)
    x, y = torch.randn(2, 64), torch.empty(2, 48)
    assert lib.qlinear_run_rows(ctypes.byref(desc), x.data_ptr(), y.data_ptr(), 2) == -1


@pytest.mark.parametrize("n", [1, 7, 8, 33, 64, 1000, 49152])
def test_argmax_matches_torch_first_on_ties(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=g)
    x[1, n // 3] = x[1, n - 1] = 1e9  # a tie: the first wins
    x[2, -1] = 1e9
    assert kernels.argmax(x) == x.argmax(-1).tolist()


def test_lilliput_isa_names_the_build(monkeypatch):
    """LILLIPUT_ISA=avx2 adds the flags that turn AVX-512, AVX-VNNI and AMX off (and keys the cache on
    them); an unknown name is refused by name."""
    monkeypatch.setenv("LILLIPUT_ISA", "avx2")
    assert build.isa() == "avx2" and "-mno-avx512f" in build.ISA_FLAGS["avx2"]
    compiler = build.find_compiler() or "cc"
    forced = build.build_key(compiler)
    monkeypatch.setenv("LILLIPUT_ISA", "")
    assert build.isa() == "native" and build.build_key(compiler) != forced
    monkeypatch.setenv("LILLIPUT_ISA", "avx3")
    with pytest.raises(ValueError, match="LILLIPUT_ISA='avx3'"):
        build.isa()
