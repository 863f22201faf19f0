"""PTQ methods behind one registry.

A method is ``quantize(model, spec: QuantSpec, calib, cfg: dict) -> dict``: it quantizes
``model`` in place and returns a small info dict (e.g. ``{"layers": 224}``). Every module in
this package is imported on import, so a new method file only needs ``@register("name")``.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable

Method = Callable[..., dict]
_REGISTRY: dict[str, Method] = {}
_NEEDS_CALIBRATION: dict[str, bool] = {}


def register(name: str, needs_calibration: bool = False) -> Callable[[Method], Method]:
    """Decorator registering a quantizing method under ``name``; ``needs_calibration``: it reads
    ``calib``. The registered function is checked here: a quantized spec, and calibration data
    when it needs it (the FP baseline registers itself directly)."""
    def deco(fn: Method) -> Method:
        @functools.wraps(fn)
        def checked(model, spec, calib, cfg: dict) -> dict:
            if spec.is_fp:
                raise ValueError(f"method {name!r} needs a quantized spec (e.g. w4a16g128); use method=fp for FP")
            if needs_calibration and calib is None:
                raise ValueError(f"method {name!r} needs calibration data (an object with .input_ids [N, L])")
            return fn(model, spec, calib, cfg)
        _add(name, checked, needs_calibration)
        return fn
    return deco


def _add(name: str, fn: Method, needs_calibration: bool) -> None:
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered")
    _REGISTRY[name] = fn
    _NEEDS_CALIBRATION[name] = needs_calibration


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
