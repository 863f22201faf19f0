"""PTQ methods behind one registry: each method is a frozen options dataclass and a recipe.

A *recipe* turns validated options into an ordered list of *steps*; each step changes a
``QuantState`` (the model in place, or the calibration set) and may report info. Each method's
file holds its whole algorithm and its options; a simple method registers itself there
(``@register(name, Options)`` on its step, recipe ``[step, install_quantizers]``). Compositions
(QuaRot = rotate, then GPTQ or RTN weights; DLLMQuant = TMAS, CGQ, a base, IA-AQ) are declared in
``recipes.py``, in the style of llm-compressor's recipes. ``install_quantizers`` is the one step that
installs activation and KV quantizers.

Importing this package loads no torch (method files import it lazily), so options are checked
in a fraction of a second, before any model loads:

    methods.build_options("gptq", {"damp": -1})            # OptionError naming key, value, allowed
    methods.get("gptq")(model, spec, calib, {"damp": 0.02})  # options: a dict or GPTQOptions
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import json
import pkgutil
import typing
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from qdlm_bench import quant
from qdlm_bench.lazy import lazy_import
from qdlm_bench.quant.spec import QuantSpec

torch = lazy_import("torch")


def options(cls: type) -> type:
    """Make ``cls`` a method's options: a frozen dataclass validated on construction (strict types,
    ``Literal`` choices, ``Field(ge=...)`` ranges; unknown keys rejected). A field may hold nested
    options (another such class; ``make_options`` builds it from a dict)."""
    return _pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid", strict=True))(cls)


class OptionError(ValueError):
    """A bad method option; the message names the key, the value and what is allowed."""


@dataclasses.dataclass
class QuantState:
    """What the steps of a recipe share: the model (changed in place), the spec, the calibration
    set (a step may replace it, e.g. TMAS), IA-AQ's per-block V ranges and the steps' info."""

    model: Any
    spec: QuantSpec
    calib: Any = None
    v_range: list | None = None
    info: dict = dataclasses.field(default_factory=dict)


Step = Callable[[QuantState], "dict | None"]


def install_quantizers(state: QuantState) -> None:
    """The activation and KV quantizers of ``state.spec`` (``quant.install_quantizers``)."""
    quant.install_quantizers(state.model, state.spec, state.v_range)


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method: its options class, its recipe (options -> steps) and whether it reads
    a calibration set. Calling it quantizes ``model`` in place and returns the steps' info."""

    name: str
    options: type
    recipe: Callable[[Any], list[Step]]
    calibration: bool = False

    def __call__(self, model, spec: QuantSpec, calib=None, opts: Any = None) -> dict:
        opts = opts if isinstance(opts, self.options) else build_options(self.name, opts or {})
        if self.name != "fp" and spec.is_fp:
            raise ValueError(f"method {self.name!r} needs a quantized spec (e.g. w4a16g128); use method=fp for FP")
        if self.calibration and calib is None:
            raise ValueError(f"method {self.name!r} needs calibration data (an object with .input_ids [N, L])")
        state = QuantState(model, spec, calib)
        with torch.no_grad():
            for step in self.recipe(opts):
                state.info.update(step(state) or {})
        return state.info


_REGISTRY: dict[str, Method] = {}


def add(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def register(name: str, options_cls: type, calibration: bool = False):
    """Decorator on a method's step ``fn(state, opts)``: registers the method ``name`` with the
    recipe ``[fn, install_quantizers]``; returns ``fn`` (recipes may compose it)."""
    def deco(fn):
        add(Method(name, options_cls, lambda o: [functools.partial(fn, opts=o), install_quantizers], calibration))
        return fn
    return deco


def _hint(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def get(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}{_hint(str(name), _REGISTRY)}; available: {', '.join(available())}")
    return _REGISTRY[name]


def available() -> list[str]:
    return sorted(_REGISTRY)


def needs_calibration(name: str) -> bool:
    """Whether the method reads a calibration set (the pipeline builds one only then)."""
    return get(name).calibration


def _problem(error: dict, where: str, cls: type) -> str:
    """One pydantic error as a sentence naming the key, the value and what is allowed."""
    path = ".".join([where, *map(str, error["loc"])])
    value, kind, ctx = error.get("input"), error["type"], error.get("ctx") or {}
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:  # a check across fields
        return f"{where}: {message}"
    if kind == "unexpected_keyword_argument":
        key, valid = str(error["loc"][-1]), [f.name for f in dataclasses.fields(cls)]
        return f"{where}: unknown method keys {[key]}{_hint(key, valid)}; valid keys: {valid}"
    if kind == "literal_error":
        return f"{path} must be one of {ctx.get('expected')}, got {value!r}"
    if kind == "bool_type":
        return f"{path} must be true or false, got {value!r}"
    return f"{path}={value!r}: {message}"


def make_options(cls: type, values: Mapping | None = None, where: str = "method") -> Any:
    """``cls(**values)``, nested options built from dicts first; an ``OptionError`` names each bad
    key (``where.key``), its value and what is allowed."""
    values = dict(values or {})
    for key, kind in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(kind) and isinstance(values.get(key), Mapping):
            values[key] = make_options(kind, values[key], f"{where}.{key}")
    try:
        return cls(**values)
    except ValidationError as err:
        raise OptionError("; ".join(_problem(e, where, cls) for e in err.errors())) from None


def build_options(name: str, values: Mapping | None = None) -> Any:
    """The validated options of method ``name`` from ``values`` (keys of its options class), its
    recipe checked too (a composition's nested options); raises ``OptionError``."""
    method = get(name)
    opts = make_options(method.options, values)
    method.recipe(opts)  # steps are only built here: cheap, and it checks a base method's options
    return opts


def as_dict(opts: Any) -> dict:
    """Options as plain JSON data (tuples become lists), as a record stores them."""
    return json.loads(json.dumps(dataclasses.asdict(opts)))


def defaults(name: str) -> dict:
    """The default options of method ``name`` (what ``conf/method/<name>.yaml`` holds)."""
    return as_dict(get(name).options())


for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
