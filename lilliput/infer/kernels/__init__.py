"""lilliput's C kernels: one header (csrc/lilliput.h), one library, one Python mirror.

- `build`: compile csrc/*.c on first use into a cache, load it with ctypes (`build.load()`);
- `abi`: the ctypes mirror of the header (enums, structs, prototypes), checked at load;
- `descriptor`: the descriptor of a linear layer (`for_module`, `make`), the only place one is made;
- `ops`: the kernels as torch functions (GEMV, any layer through its descriptor, RMSNorm, argmax,
  thread control).

The fused decode step that runs a whole model in one C call is `lilliput.infer.fused`.
"""

from lilliput.infer.kernels import abi, build, descriptor, ops
from lilliput.infer.kernels.abi import Kind, Variant
from lilliput.infer.kernels.build import Kernel, available, cpu_has, unavailable_reason
from lilliput.infer.kernels.ops import (MAX_ROWS, argmax, decode_threads, describe, get_threads, linear,
                                        rmsnorm, set_spin_us, set_threads)

__all__ = ["abi", "build", "descriptor", "ops", "Kind", "Variant", "Kernel", "available", "cpu_has", "unavailable_reason",
           "MAX_ROWS", "argmax", "decode_threads", "describe", "get_threads", "linear", "rmsnorm",
           "set_spin_us", "set_threads"]
