"""Layer kinds: modules a checkpoint saves by name and rebuilds empty before loading their tensors.

core saves models whose layers it does not define (int8 and int4 linear layers live in compress,
four floors up), so a layer class registers itself here under a kind name:

    @register_layer("int8")
    class Int8Linear(nn.Module):
        def spec(self) -> dict: ...                 # JSON: enough to rebuild it empty
        @classmethod
        def from_spec(cls, spec) -> "Int8Linear": ...
        weight_shape: tuple[int, ...]              # the float weight it stands for, e.g. (N, K)

`save_checkpoint` writes, for every registered layer of a model, `{"kind", "module", **spec()}`
into config.json; `load_folder` rebuilds each with `build_layer`. A checkpoint can be loaded by a
program that imported only core, so the kind may not be registered yet: `build_layer` then
imports the module recorded beside it (`type(layer).__module__`, written by the layer itself when
it was saved) and expects that import to register the kind. It is the same contract as a Python
entry point, with the checkpoint, not the installed metadata, naming the plugin's module: core's
code names no higher layer, built-in layers and third-party ones load the same way. Only installed
modules are imported (nothing from the checkpoint folder), and a module that does not register the
kind it was named for is an error.
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Callable

import torch.nn as nn

from lilliput.core.registry import Registry

LAYER_KINDS: Registry[type] = Registry("layer kind")
"""Kind name -> layer class (with spec(), from_spec() and weight_shape)."""
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def register_layer(kind: str) -> Callable[[type], type]:
    """Class decorator: save and load instances of the class as layer kind `kind`."""

    def add(cls: type) -> type:
        cls.layer_kind = kind
        return LAYER_KINDS.register(kind)(cls)

    return add


def kind_of(module: nn.Module) -> str | None:
    """The registered kind of `module`'s exact class, else None (plain torch modules)."""
    kind = getattr(type(module), "layer_kind", None)
    return kind if kind in LAYER_KINDS and LAYER_KINDS[kind] is type(module) else None


def layer_specs(model: nn.Module) -> dict[str, dict]:
    """{qualified name: {"kind", "module", **spec}} of every registered layer of `model` (config.json)."""
    return {name: {"kind": kind, "module": type(m).__module__, **m.spec()}
            for name, m in model.named_modules() if (kind := kind_of(m))}


def weight_numel(module: nn.Module) -> int:
    """Logical parameters of a registered layer: the elements of the float weight it stands for
    (a packed int4 weight of N x K counts N * K, not the N * K / 2 bytes that hold it)."""
    return math.prod(module.weight_shape)


def ensure_registered(kind: str, module: str | None) -> None:
    """Register `kind` by importing the module a checkpoint names for it (see the module docstring)."""
    if kind in LAYER_KINDS:
        return
    if not isinstance(module, str) or not _MODULE.fullmatch(module):
        raise ValueError(f"layer kind {kind!r} is not registered and the checkpoint names no module for it "
                         f"(got {module!r}): import the package that defines it before loading")
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"layer kind {kind!r} comes from module {module!r}, which cannot be imported ({e}): "
                         f"install the package that provides it") from None
    if kind not in LAYER_KINDS:
        raise ValueError(f"module {module!r} does not register layer kind {kind!r}: the checkpoint's config.json "
                         f"is damaged or from another version")


def build_layer(spec: dict) -> nn.Module:
    """An empty layer of the kind and shape config.json recorded (its tensors are loaded next)."""
    kind = spec.get("kind")
    if not isinstance(kind, str):
        raise ValueError(f"a layer in config.json has no kind ({sorted(spec)}): it was saved by a lilliput "
                         f"without layer kinds; quantize the model again to re-save it")
    ensure_registered(kind, spec.get("module"))
    return LAYER_KINDS[kind].from_spec({k: v for k, v in spec.items() if k not in ("kind", "module")})


def set_layer(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, layer)
