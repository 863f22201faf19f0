"""Lazy imports, so that the configuration check and the method registry never load torch (2-5 s on a
2-core CPU): a bad option fails in well under 3 s, and torch loads on first use.

``lazy_import("torch")`` returns a stand-in that imports the module on its first attribute read;
``lazy_exports`` gives a package a module ``__getattr__`` (PEP 562) that imports each re-exported
name's submodule when the name is first read.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType


class _LazyModule(ModuleType):
    """Stands for the module ``__name__`` and imports it on the first attribute read; it is not
    put in ``sys.modules``, so code that walks loaded modules (``inspect``, Hydra's error
    handler) never triggers the import."""

    def __getattr__(self, attr: str):
        module = self.__dict__.get("_module")
        if module is None:
            module = self.__dict__["_module"] = importlib.import_module(self.__name__)
        return getattr(module, attr)


def lazy_import(name: str) -> ModuleType:
    """``name``, imported on its first attribute read (at once if it already is)."""
    if name in sys.modules:
        return sys.modules[name]
    if importlib.util.find_spec(name) is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return _LazyModule(name)


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps a name to the submodule (relative,
    e.g. ``".quantizer"``) that defines it."""
    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__


def no_grad(fn: Callable) -> Callable:
    """``torch.no_grad()`` around each call of ``fn``, without importing torch before the first call."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with importlib.import_module("torch").no_grad():
            return fn(*args, **kwargs)

    return wrapper
