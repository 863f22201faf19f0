"""PTQ methods behind one registry.

A method is ``quantize(model, spec: QuantSpec, calib, cfg: dict) -> dict``: it quantizes
``model`` in place and returns a small info dict (e.g. ``{"layers": 224}``). Every module in
this package is imported on import, so a new method file only needs ``@register("name")``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

Method = Callable[..., dict]
_REGISTRY: dict[str, Method] = {}
_NEEDS_CALIBRATION: dict[str, bool] = {}


def register(name: str, needs_calibration: bool = False) -> Callable[[Method], Method]:
    """Decorator registering a method under ``name``; ``needs_calibration``: it reads ``calib``."""
    def deco(fn: Method) -> Method:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        _REGISTRY[name] = fn
        _NEEDS_CALIBRATION[name] = needs_calibration
        return fn
    return deco


def get(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def needs_calibration(name: str) -> bool:
    """Whether the method needs a calibration set (the pipeline builds one only then)."""
    get(name)
    return _NEEDS_CALIBRATION[name]


def available() -> list[str]:
    return sorted(_REGISTRY)


for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
